"""The order in which training visits a token store: per-epoch permutations, split across ranks."""
from __future__ import annotations

from typing import Iterator

import numpy as np


class EpochSampler:
    """Deterministic, resumable sample order for one rank of `world_size`.

    The global stream is the concatenation of per-epoch permutations of range(n), epoch e's
    drawn from np.random.default_rng((seed, e)). Each training step takes the next
    batch_size * world_size entries of the stream and rank r keeps entries [r*B, (r+1)*B):
    every rank has the same fixed batch shape every step (no DDP hang, no padding), and across
    ranks every sample is seen exactly once per epoch (a step may straddle two epochs).

    The state is (epoch, position): the next entry to take is permutation(epoch)[position].
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError(f"cannot sample batches from {n} samples")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {batch_size}, rank {rank}, world_size {world_size}: need "
                             f"batch_size >= 1 and 0 <= rank < world_size")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng((self.seed, int(epoch))).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self) -> np.ndarray:
        """This rank's int64 (batch_size,) indices for the next step; advances the state."""
        want = self.batch_size * self.world_size
        parts = []
        while want:
            take = min(want, self.n - self.position)
            parts.append(self.permutation(self.epoch)[self.position:self.position + take])
            self.position += take
            want -= take
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        step = np.concatenate(parts)
        return step[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].astype(np.int64)

    def iter_epoch(self, epoch: int = 0) -> Iterator[np.ndarray]:
        """One pass over this rank's share of `epoch` (perm[rank::world_size]) in batches, the last
        possibly shorter; for validation and evaluation. Does not touch the training state."""
        mine = self.permutation(epoch)[self.rank::self.world_size]
        for lo in range(0, len(mine), self.batch_size):
            yield mine[lo:lo + self.batch_size].astype(np.int64)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for k in ("n", "seed"):
            if int(state[k]) != getattr(self, k):
                raise ValueError(f"sampler state of {k}={state[k]}, this sampler has {k}={getattr(self, k)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
