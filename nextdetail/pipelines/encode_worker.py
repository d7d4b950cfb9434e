"""The export job's actor: encode blocks of a decomposition store into token rows.

Each actor loads the tokenizer once (on its GPU when Ray gave it one), reads its blocks'
layers from the store itself (one Zarr read per shard) or, for GPU actors, takes them read by
CPU tasks (`read_block`), encodes them and writes one part file per block,
_parts/block-<b>.bin (uint16 (rows, L), raw), atomically. A block is owned
by the one task that encodes it and a retried task rewrites the same bytes, so Ray's retries
and reruns after a kill are safe. With TOKENS on object storage a part is one PUT (atomic there
too) and the store is read from its URL by every actor; nothing is shared but the bucket.

Same bytes whatever the batching: `Tokenizer.encode` runs fixed-shape micro-batches, and the
actor pins what else decides the order of float sums: one torch thread on the CPU (oneDNN
splits its loops by thread count: 1 and 2 threads differ in the last bit of the features),
and on CUDA deterministic cuDNN algorithms without autotuning and no TF32.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Dict, List, Optional

import numpy as np

from ..storage import as_path
from ..stores import PARTS, write_bytes_atomic
from ..stores.decomposition import DecompositionStore, StoreError
from ..stores.layers import centre_crop
from ..stores.tokens import DTYPE
from .attempts import DEFAULT_MAX_ATTEMPTS, AttemptJournal, died_message, journal_folder, maybe_crash

log = logging.getLogger(__name__)


def part_name(block: int) -> str:
    return f"block-{block:06d}.bin"


def failed_name(block: int) -> str:
    return f"block-{block:06d}.failed"


def part_path(out, block: int):
    return as_path(out) / PARTS / part_name(block)


def failed_path(out, block: int):
    """A block given up on after --max-attempts deaths of its worker (JSON: block, lo, hi, reason)."""
    return as_path(out) / PARTS / failed_name(block)


def flatten_maps(maps_M: List["torch.Tensor"]) -> np.ndarray:  # noqa: F821
    """M int64 maps (B, h_k, w_k) -> uint16 (B, L), maps concatenated in generation order."""
    import torch

    flat_BL = torch.cat([m.reshape(m.shape[0], -1) for m in maps_M], dim=1)
    return flat_BL.cpu().numpy().astype(DTYPE)


ENCODE_THREADS = 1     # torch CPU threads of an encoder: one actor per CPU, and fixed bytes


def pin_numerics(device) -> None:
    """Fix everything besides the input shapes that decides the encoder's float sums."""
    import torch

    if device.type == "cpu":
        torch.set_num_threads(ENCODE_THREADS)
    else:
        # cuBLAS is run-to-run deterministic for a shape only with a fixed workspace (set before
        # its first call in this process); cuDNN only with autotuning off (it picks algorithms
        # by timing) and its deterministic algorithms; TF32 would round the convolutions.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def numerics(device) -> dict:
    """What the token bytes depend on besides the inputs (recorded in the token store's meta)."""
    import torch

    from ..tokenize.tokenizer import encode_micro_batch

    out = {"device": device.type, "micro_batch": encode_micro_batch(device), "torch": torch.__version__}
    if device.type == "cpu":
        out.update(threads=ENCODE_THREADS, cpu_capability=torch.backends.cpu.get_cpu_capability())
    else:
        out.update(gpu=torch.cuda.get_device_name(device), cudnn=torch.backends.cudnn.version(),
                   cudnn_deterministic=True, tf32=False)
    return out


_STORES: Dict[str, DecompositionStore] = {}     # a read task's process opens each store once


def read_block(batch: Dict[str, np.ndarray], store: str, size: int) -> Dict[str, np.ndarray]:
    """The GPU path's read task: {block, lo, hi} (one row) -> the same plus "bases", the centre
    crops of the block's stored bases, uint8 (1, hi - lo, n+1, 3, size, size), so that the GPU
    actor never waits on Zarr decoding; or "bad_input" naming a damaged store file."""
    if len(batch["block"]) != 1:
        raise ValueError(f"a read task takes one block at a time, got {len(batch['block'])}")
    lo, hi = int(batch["lo"][0]), int(batch["hi"][0])
    out = dict(batch)
    try:
        if store not in _STORES:
            _STORES[store] = DecompositionStore(store)
        q = centre_crop(_STORES[store].read_range(lo, hi), size)
        out.update(bases=np.ascontiguousarray(q)[None], bad_input=np.asarray([""]))
    except StoreError as e:
        out.update(bases=np.zeros((1, 0), np.uint8), bad_input=np.asarray([json.dumps([str(e.path), e.reason])]))
    return out


class EncodeWorker:
    """Ray Data actor: {block, lo, hi} -> encodes ok images lo..hi-1 of the store, writes the part.
    With a "bases" column (GPU actors fed by read_block tasks) it encodes those instead of
    reading the store itself.

    store       : decomposition store path; rows are its ok images in store order.
    checkpoint  : tokenizer checkpoint file (the export recorded its sha256).
    out         : token store folder.
    batch_size  : images read from the store at a time (the tokens do not depend on it).
    """

    def __init__(self, store: str, checkpoint: str, out: str, batch_size: int = 32,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, crash_on: Optional[str] = None):
        import torch

        from ..tokenize import Tokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        pin_numerics(self.device)
        self.tok = Tokenizer.from_pretrained(checkpoint, map_location=self.device).to(self.device)
        self.store = DecompositionStore(store)
        self.out, self.batch_size = as_path(out), int(batch_size)
        self.size, self.n_bases = self.tok.config.image_size, self.tok.needs_bases
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.numerics = json.dumps(numerics(self.device), sort_keys=True)
        self.max_attempts, self.crash_on = int(max_attempts), crash_on

    def encode_rows(self, lo: int, hi: int, read: Optional[np.ndarray] = None) -> np.ndarray:
        """uint16 (hi - lo, L): token rows of the store's ok images lo .. hi-1 (centre crops);
        read: their cropped bases, already read (else read here)."""
        import torch

        from ..tokenize.bases import inputs_from_bases

        rows = []
        for a in range(lo, hi, self.batch_size):
            if self.crash_on:                   # the test-only hook; nothing in real runs
                for i in range(a, min(hi, a + self.batch_size)):
                    maybe_crash(self.store.id(i), self.crash_on)
            b = min(hi, a + self.batch_size)
            # One Zarr read per shard, cropped before the float conversion.
            q = read[a - lo:b - lo] if read is not None else centre_crop(self.store.read_range(a, b), self.size)
            q = torch.from_numpy(np.array(q)).to(self.device)         # a copy: Ray's arrays are read-only
            image, bases = inputs_from_bases(q, self.n_bases, self.store.space)
            rows.append(flatten_maps(self.tok.encode(image, bases)))
        return np.concatenate(rows) if rows else np.zeros((0, 0), DTYPE)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        out = {"block": [], "rows": [], "failed": [], "bad_input": [], "seconds": [], "host": [], "numerics": []}
        for j, (block, lo, hi) in enumerate(zip(batch["block"], batch["lo"], batch["hi"])):
            block, lo, hi = int(block), int(lo), int(hi)
            t0, bad_input = time.perf_counter(), str(batch["bad_input"][j]) if "bad_input" in batch else ""
            read = np.asarray(batch["bases"][j]) if "bases" in batch else None
            # On object storage (no append) the journal is on this node (attempts.journal_folder).
            journal = AttemptJournal(journal_folder(self.out / PARTS) / f"block-{block:06d}.log")
            deaths = journal.deaths("encode")
            if bad_input:
                pass                            # the read task met a damaged store: reported below
            elif deaths >= self.max_attempts:
                # Given up: recorded for the driver, which finishes every other block and
                # leaves the token store unfinished (exit status 1); a rerun tries again.
                reason = died_message(f"encoding block {block}", deaths, self.max_attempts)
                write_bytes_atomic(failed_path(self.out, block), json.dumps(
                    {"block": block, "lo": lo, "hi": hi, "reason": reason}).encode())
            else:
                try:
                    with journal.attempt("encode"):
                        rows = self.encode_rows(lo, hi, read)
                except StoreError as e:
                    # A damaged store: sent home as data (Ray Data's wrappers drop the exception's
                    # type); the driver stops the job naming the file.
                    bad_input = json.dumps([str(e.path), e.reason])
                else:
                    write_bytes_atomic(part_path(self.out, block), rows.tobytes())
            journal.drop()
            out["block"].append(block)
            out["rows"].append(hi - lo)
            out["failed"].append(deaths >= self.max_attempts)
            out["bad_input"].append(bad_input)
            out["seconds"].append(time.perf_counter() - t0)
            out["host"].append(self.host)
            out["numerics"].append(self.numerics)
        return {k: np.asarray(v) for k, v in out.items()}
