"""The two map stages of the job: read (decode, resize, crop) and decompose-and-write.

On CPU workers the actor reads its own batches, so pixels never leave the process that
decodes them; GPU actors get their batches from CPU read tasks. Either way nothing but
paths and manifest rows passes through the driver.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..decomp import decompose
from ..imageio import ImageError, load_image
from ..stores import write_table_atomic
from ..stores.decomposition import LAYERS, STATUS_ERROR, STATUS_OK, StoreParams, manifest_schema, run_parts
from .attempts import ATTEMPTS, DEFAULT_MAX_ATTEMPTS, AttemptJournal, died_message, maybe_crash

log = logging.getLogger(__name__)


# Extra columns a worker returns to the driver (not stored): wall-clock start and end of
# its batch, so the driver can tell start-up time from processing time.
T_START, T_END = "_t_start", "_t_end"


def read_batch(batch: Dict[str, np.ndarray], size: int, max_pixels: Optional[int] = None,
               journal=None, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
               crash_on: Optional[str] = None) -> Dict[str, np.ndarray]:
    """{index, id, path, label, class_name} -> the same plus image (B, size, size, 3) float32,
    error ('' when read), read_seconds, and the batch's wall-clock start.

    journal: an AttemptJournal (or the folder for one, in the GPU path's read tasks): an image
    whose reads killed the process max_attempts times becomes an error, not another attempt.
    """
    t_start = time.time()
    n = len(batch["index"])
    own = journal is not None and not isinstance(journal, AttemptJournal)
    if own:
        journal = AttemptJournal(Path(journal) / f"read-{int(np.min(batch['index'])):09d}.log")
    images = np.zeros((n, size, size, 3), np.float32)
    errors, seconds = [], np.zeros(n)
    for j, (i, path) in enumerate(zip(batch["index"], batch["path"])):
        t0 = time.perf_counter()
        item = f"read:{int(i)}"
        deaths = journal.deaths(item) if journal is not None else 0
        if deaths >= max_attempts:
            errors.append(died_message("reading this image", deaths, max_attempts))
            continue
        try:
            with journal.attempt(item) if journal is not None else nullcontext():
                maybe_crash(path, crash_on)
                images[j] = load_image(str(path), size, max_pixels=max_pixels)
            errors.append("")
        except ImageError as e:
            errors.append(e.reason)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the dataset
            errors.append(f"cannot read ({type(e).__name__}: {e})")
        seconds[j] = time.perf_counter() - t0
    if own:
        journal.drop()          # read: what follows (the solve) is journaled by the actor
    out = dict(batch)
    out.update(image=images, error=np.asarray(errors, object), read_seconds=seconds)
    out[T_START] = np.full(n, t_start)
    return out


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def stored_layers(dec) -> np.ndarray:
    """A batch Decomposition as the store holds it: C-contiguous float16 (B, n+1, 3, H, W),
    layers in generation order. The one conversion, shared by the job and the benchmark."""
    layers = np.stack([_host(a) for a in dec.layers], axis=1)              # (B, n+1, H, W, 3)
    return np.ascontiguousarray(layers.transpose(0, 1, 4, 2, 3), dtype=np.float16)


class DecomposeWorker:
    """Ray Data actor: decomposes batches of images and writes them into the store.

    Compiles (or loads from Numba's cache) the solver kernels once, in __init__. Writes
    are idempotent: chunk i holds image i only, and the journal part is named after the
    batch's first index, so a retried batch rewrites the same files with the same bytes.
    """

    def __init__(self, store: str, params: dict, run: int, threads: int = 1,
                 read_size: Optional[int] = None, max_pixels: Optional[int] = None,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, crash_on: Optional[str] = None):
        import zarr

        # read_size: read the batch's files here (CPU workers); None: batches arrive read.
        self.read_size, self.max_pixels = read_size, max_pixels
        self.max_attempts, self.crash_on = int(max_attempts), crash_on
        self.params = StoreParams.from_dict(params)
        self.order = self.params.order
        self.threads = None
        if self.params.backend == "numba":
            import numba
            # One actor per CPU: more Numba threads than the actor's CPUs would oversubscribe.
            self.threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
            self._limit_threads()
        self.array = zarr.open_array(Path(store) / LAYERS, mode="r+")
        self.parts = run_parts(store, run)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.schema = manifest_schema(self.order)
        # Warm-up: kernels are compiled per process; do it before the first real batch.
        self._decompose(np.zeros((1, 8, 8, 3), np.float32), n_iter=1)

    def _limit_threads(self) -> None:
        # numba.set_num_threads is per calling thread, and Ray Data calls the actor from
        # another thread than the one that ran __init__: set it on every call.
        if self.threads is not None:
            import numba
            numba.set_num_threads(self.threads)

    def _decompose(self, images: np.ndarray, **override):
        at = dict(self.params.params.to_dict(), **override)
        return decompose(images, self.order, method=self.params.method, backend=self.params.backend, **at)

    def _solve(self, images: np.ndarray, index: np.ndarray, journal: AttemptJournal) -> tuple:
        """Layers (B, n+1, 3, H, W) float16 and energies (B, n); per image when the batch fails
        or when a process died solving it before (then per-image deaths are journaled too: a
        death of the batch solve counts as an attempt at each of its images)."""
        batch_deaths = journal.deaths("solve")
        if not batch_deaths:
            try:
                with journal.attempt("solve"):
                    return self._solve_batch(images), None
            except (ValueError, RuntimeError, MemoryError, TypeError) as e:
                log.warning("batch of %d failed (%s); solving its images one by one", len(images), e)
        else:
            log.warning("a worker died solving the batch of image %d; solving its %d images one by one",
                        int(index.min()), len(images))
        out, errs = [], []
        for im, i in zip(images, index):
            item = f"solve:{int(i)}"
            deaths = batch_deaths + journal.deaths(item)
            if deaths >= self.max_attempts:
                out.append(None)
                errs.append(died_message("decomposing this image", deaths, self.max_attempts))
                continue
            try:
                with journal.attempt(item):
                    out.append(self._solve_batch(im[None]))
                errs.append("")
            except (ValueError, RuntimeError, MemoryError, TypeError) as e:
                out.append(None)
                errs.append(f"decomposition failed ({type(e).__name__}: {e})")
        return out, errs

    def _solve_batch(self, images: np.ndarray) -> tuple:
        dec = self._decompose(images)
        energies = np.stack([np.asarray(_host(e), np.float64).reshape(-1) for e in dec.energies], axis=1)
        return stored_layers(dec), energies

    def __call__(self, batch: Dict[str, np.ndarray]):
        import pyarrow as pa

        self._limit_threads()
        index = np.asarray(batch["index"], np.int64)
        journal = AttemptJournal(self.parts / ATTEMPTS / f"batch-{int(index.min()):09d}.log")
        if self.read_size is not None:
            batch = read_batch(batch, self.read_size, self.max_pixels, journal, self.max_attempts, self.crash_on)
        t_start = float(np.min(batch[T_START]))
        n = len(index)
        errors: List[str] = list(batch["error"])
        seconds = np.asarray(batch["read_seconds"], np.float64).copy()
        good = [j for j, e in enumerate(errors) if not e]
        energies = np.full((len(index), self.order), np.nan)
        if good:
            t0 = time.perf_counter()
            solved, per_image_errors = self._solve(np.asarray(batch["image"])[good], index[good], journal)
            if per_image_errors is None:
                layers, e = solved
                results = [(layers[k], e[k]) for k in range(len(good))]
            else:
                results = [None if s is None else (s[0][0], s[1][0]) for s in solved]
                for j, msg in zip(good, per_image_errors):
                    errors[j] = msg
            for j, res in zip(good, results):
                if res is not None:
                    # A whole chunk, this image's own: safe next to any other writer.
                    self.array[int(index[j])] = res[0]
                    energies[j] = res[1]
            # The batch's solve and write time, shared by its images.
            seconds[good] += (time.perf_counter() - t0) / len(good)
        ok = [not e for e in errors]
        # id, label and class_name stay null here: the store's manifest, written by the
        # driver from SRC, is their one source (merged in by writer.merged_manifest).
        cols = {"index": index, "id": [None] * n, "path": [str(p) for p in batch["path"]],
                "label": [None] * n, "class_name": [None] * n,
                "status": [STATUS_OK if o else STATUS_ERROR for o in ok],
                "error": [None if o else e for o, e in zip(ok, errors)],
                "seconds": seconds, "backend": [self.params.backend] * n,
                "worker_host": [self.host] * n, "worker_pid": [self.pid] * n}
        for k in range(1, self.order + 1):
            cols[f"energy_{k}"] = [float(energies[j, k - 1]) if ok[j] else None for j in range(n)]
            cols[f"iterations_{k}"] = [self.params.params.n_iter if ok[j] else None for j in range(n)]
        table = pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in self.schema},
                         schema=self.schema)
        # After the chunks: a part only ever describes images already on disk.
        write_table_atomic(table, self.parts / f"part-{int(index.min()):09d}.parquet")
        journal.drop()
        now = time.time()
        return table.append_column(T_START, pa.array([t_start] * n, pa.float64())) \
                    .append_column(T_END, pa.array([now] * n, pa.float64()))
