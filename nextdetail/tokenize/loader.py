"""Batches for tokenizer training, read from a decomposition store by loader worker processes:
whole shards in sequential reads, shuffled through a buffer, randomly cropped, in an order that
depends on the seed alone.

The stream. Epoch e visits the store's shards in a permutation drawn from (seed, e); their ok
images, shard after shard, are the epoch's sequence. It is cut into `lanes` equal pieces of
P = N // lanes images (the last N mod lanes images sit that epoch out), and lane l's stream is
its pieces of epochs 0, 1, 2, ... Each piece is cut into blocks of `buffer` images; a block is
read (each shard it touches in one sequential read), shuffled, and cropped with one generator
seeded by (seed, e, l, block). A training step takes the next b images of each lane a process
owns (b = batch_size / lanes per process) and concatenates them.

Why lanes: a process reads only its own lanes' shards (across ranks no image is read twice in
an epoch, and no rank reads the whole dataset), and the global batches do not depend on how
many processes share the lanes: 2 ranks of batch b see together what one process of batch 2b
with 2 lanes sees (how DDP is tested), and a run can resume on another number of GPUs.

On object storage (--data s3://...) the same: a shard is one object, read whole in one GET by
the worker that needs it (DecompositionStore.read_shard), with more blocks read ahead (prefetch
4 per worker); the batches are the ones a local copy of the store gives.

Why blocks: a worker produces whole blocks (block t of a process's sequence goes to worker
t mod W, and torch's DataLoader hands items back in that round-robin order), so the batches are
the same for any number of workers, 0 included; the block is the shuffle buffer. Workers return
uint8 bases (4x less to move than float32); `bases.inputs_from_bases` makes the float inputs on the
device.

State: the lanes' common position s (images taken from each lane). Resuming recomputes epoch,
block and offset from s, so a resumed run draws exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..decomp.hierarchy import decomposition_name
from ..options import flag_of
from ..storage import is_url
from ..stores.decomposition import DecompositionStore, StoreError
from .config import quantizer_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamPlan:
    """The stream's arithmetic, shared by the main process and its workers (picklable)."""

    path: str
    crop: int
    seed: int
    lanes: int
    buffer: int                 # images per block
    shard_starts: np.ndarray    # (n_shards + 1,) ok-image index where each shard starts

    @property
    def images(self) -> int:
        return int(self.shard_starts[-1])

    @property
    def piece(self) -> int:
        """P: images per lane per epoch."""
        return self.images // self.lanes

    @property
    def blocks(self) -> int:
        """Blocks per lane per epoch."""
        return -(-self.piece // self.buffer)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Ok-image indices (N,) in epoch order: shards permuted by (seed, epoch), rows in order."""
        n_shards = len(self.shard_starts) - 1
        perm = np.random.default_rng((self.seed, int(epoch))).permutation(n_shards)
        s = self.shard_starts
        return np.concatenate([np.arange(s[k], s[k + 1]) for k in perm] or [np.zeros(0, np.int64)])

    def block_items(self, order: np.ndarray, lane: int, block: int) -> np.ndarray:
        lo = lane * self.piece + block * self.buffer
        return order[lo:min(lo + self.buffer, (lane + 1) * self.piece)]

    def block_rng(self, epoch: int, lane: int, block: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, int(epoch), int(lane), int(block)))


class _Blocks(torch.utils.data.IterableDataset):
    """A process's blocks from number `first` on: (epoch, lane, block) for t = first, first+1, ...
    in the order epoch, block, lane (the lanes advance together); worker w of W makes t = w mod W.
    Each item: (ok-image indices (m,) int64, uint8 crops (m, n+1, 3, c, c)), shuffled."""

    def __init__(self, plan: StreamPlan, lanes: Sequence[int], first: int):
        self.plan, self.lanes, self.first = plan, list(lanes), first
        self._store: Optional[DecompositionStore] = None
        self._order: Tuple[Optional[int], Optional[np.ndarray]] = (None, None)

    def where(self, t: int) -> Tuple[int, int, int]:
        k = len(self.lanes)
        epoch, rest = divmod(t, self.plan.blocks * k)
        return epoch, self.lanes[rest % k], rest // k

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        t = self.first + w
        while True:
            try:
                yield self.block(*self.where(t))
            except StoreError as e:
                # Sent home as data: torch re-raises a worker's exception as a RuntimeError
                # with the traceback in its text, and a damaged store must stay one line.
                yield _Damaged(str(e.path), e.reason)
                return
            t += W

    def block(self, epoch: int, lane: int, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
        plan = self.plan
        if self._store is None:            # opened in the worker process, not before the fork
            self._store = DecompositionStore(plan.path)
        if self._order[0] != epoch:
            self._order = (epoch, plan.epoch_order(epoch))
        items = plan.block_items(self._order[1], lane, block)
        rng = plan.block_rng(epoch, lane, block)
        items = items[rng.permutation(len(items))]
        store, c = self._store, plan.crop
        span = store.size - c + 1
        offsets = rng.integers(0, span, size=(len(items), 2))
        out = np.empty((len(items), store.levels + 1, 3, c, c), np.uint8)
        shard_of = np.searchsorted(plan.shard_starts, items, side="right") - 1
        for k in np.unique(shard_of):           # each shard it touches: one sequential read
            shard = store.read_shard(int(k))
            for j in np.flatnonzero(shard_of == k):
                y, x = offsets[j]
                out[j] = shard.bases[items[j] - shard.items[0], :, :, y:y + c, x:x + c]
        return torch.from_numpy(items), torch.from_numpy(out)


@dataclass(frozen=True)
class _Damaged:
    """A StoreError met in a worker: the file and the reason."""

    path: str
    reason: str


def _worker_init(_: int) -> None:
    # One thread per worker: the workers are the parallelism, and decoding is zstd + copies.
    torch.set_num_threads(1)
    # A forked worker inherits the trainer's SIGTERM handler (checkpoint, then stop); a worker
    # has nothing to save: it just ends, and its parent stops at the end of the step.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def default_workers(world: int = 1) -> int:
    """Loader workers per process: the CPUs a process has (its share of the node's), less one
    for the training loop itself, at most 8."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(0, min(8, (os.cpu_count() or 1) // max(1, local) - 1))


class StoreLoader:
    """This process's batches: uint8 bases (B, n+1, 3, c, c), [q_0 .. q_n] of the store.

    batch_size: images per step of this process; lanes: the stream's lanes (a multiple of
    world); this rank owns lanes [rank*k, (rank+1)*k), k = lanes / world, b = batch_size / k."""

    def __init__(self, store: DecompositionStore, crop: int, batch_size: int, *, seed: int, rank: int = 0,
                 world: int = 1, lanes: int = 1, workers: int = 0, buffer: int = 256, pin: bool = False):
        if lanes % world:
            raise ValueError(f"--loader-lanes {lanes} is not a multiple of the {world} processes")
        k = lanes // world
        if batch_size % k:
            raise ValueError(f"--batch-size {batch_size} is not a multiple of the {k} lanes each process reads")
        if len(store) < lanes:
            raise ValueError(f"{store.path}: {len(store)} ok images cannot fill {lanes} lanes")
        self.plan = StreamPlan(str(store.path), crop, seed, lanes, max(1, buffer), store.shard_starts)
        self.lanes = list(range(rank * k, (rank + 1) * k))
        self.b, self.workers, self.pin = batch_size // k, workers, pin
        self.position = 0                       # images taken from each lane
        self._it = None
        self._pending: Dict[int, List[torch.Tensor]] = {}

    def _start(self) -> None:
        """The block stream from the one holding `position`, and the lanes' leftovers."""
        per_epoch = self.plan.piece
        epoch, at = divmod(self.position, per_epoch)
        block, skip = divmod(at, self.plan.buffer)
        data = _Blocks(self.plan, self.lanes, (epoch * self.plan.blocks + block) * len(self.lanes))
        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=self.workers,
                                             worker_init_fn=_worker_init if self.workers else None,
                                             pin_memory=self.pin, persistent_workers=False,
                                             prefetch_factor=self._prefetch() if self.workers else None,
                                             # Its own generator: starting workers draws a seed,
                                             # which must not move torch's global RNG.
                                             generator=torch.Generator().manual_seed(self.plan.seed))
        self._it = iter(loader)
        self._pending = {lane: [] for lane in self.lanes}
        self._pull()
        for lane in self.lanes:
            self._pending[lane][0] = self._pending[lane][0][skip:]

    def _prefetch(self) -> int:
        """Blocks each worker reads ahead: 2 from a disk; 4 from object storage, where a block's
        shards are whole-object GETs of tens of ms each, so that a step never waits on one."""
        return 4 if is_url(self.plan.path) else 2

    def _pull(self) -> None:
        """The next block of every lane (they are made in that order). StoreError when a
        worker met a damaged store (named in one line)."""
        for lane in self.lanes:
            got = next(self._it)
            if isinstance(got, _Damaged):
                raise StoreError(got.path, got.reason)
            self._pending[lane].append(got[1])

    def _take(self, lane: int, n: int) -> torch.Tensor:
        got, have = [], 0
        queue = self._pending[lane]
        while have < n:
            if not queue:
                self._pull()
            part = queue[0][:n - have]
            got.append(part)
            have += len(part)
            queue[0] = queue[0][len(part):]
            if not len(queue[0]):
                queue.pop(0)
        return torch.cat(got) if len(got) > 1 else got[0]

    def next(self) -> torch.Tensor:
        """The next step's uint8 bases of this process (batch_size, n+1, 3, c, c)."""
        if self._it is None:
            self._start()
        q = torch.cat([self._take(lane, self.b) for lane in self.lanes])
        self.position += self.b
        return q

    def state_dict(self) -> dict:
        return {"position": self.position, "lanes": self.plan.lanes, "buffer": self.plan.buffer,
                "seed": self.plan.seed, "images": self.plan.images}

    def load_state_dict(self, state: dict) -> None:
        for key, have in (("lanes", self.plan.lanes), ("buffer", self.plan.buffer), ("seed", self.plan.seed),
                          ("images", self.plan.images)):
            if int(state[key]) != have:
                raise ValueError(f"the checkpoint's data stream has {key} {state[key]}, this run {have}")
        self.position, self._it = int(state["position"]), None


def check_store_fits(store: DecompositionStore, tokenizer, error, what: str = "the tokenizer") -> None:
    """error(one line) when `store` cannot feed a tokenizer of this TokenizerConfig: another decomposition,
    fewer bases than its quantizer takes, images smaller than its input."""
    if store.method != tokenizer.decomposition:
        raise error(f"{store.path}: a store of {decomposition_name(store.method)} ({', '.join(store.layer_names)}); "
                    f"{what} is for {decomposition_name(tokenizer.decomposition)}")
    n = tokenizer.needs_bases()
    if store.levels < n:
        raise error(f"{store.path}: store of order {store.levels} has bases B_1..B_{store.levels}; {what} "
                    f"needs order >= {n}: its {quantizer_name(tokenizer.quant.kind)} takes B_1..B_{n} "
                    f"(decompose-dataset --order {n})")
    if store.size < tokenizer.image_size:
        raise error(f"{store.path}: store images are {store.size} px, smaller than the "
                    f"{tokenizer.image_size} px input of {what} (train-tokenizer "
                    f"{flag_of(type(tokenizer), 'image_size')})")
