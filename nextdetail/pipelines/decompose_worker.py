"""The two map stages of the decompose-dataset job: read (decode, resize, crop) and
decompose-and-write a shard.

The unit of work is one shard of the store (shards.py): a row {"shard": k, "sources": JSON
[[index, path, member, problem], ...]} in, its manifest rows out. On CPU workers the actor
reads its own shard, so pixels never leave the process that decodes them; GPU actors get their
shards' pixels from CPU read tasks. Either way nothing but paths and manifest rows passes
through the driver.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..decomp import decompose
from ..decomp.at import to_host
from ..faults import machine_error
from ..imageio import ImageError, load_image, load_image_bytes
from ..storage import as_path, is_url, read_bytes, read_many
from ..stores.decomposition_format import STATUS_ERROR, STATUS_OK, StoreParams, manifest_schema, run_parts
from ..stores.shard_journal import staged_shard_file
from ..stores.shards import quantize_bases, write_shard
from .attempts import DEFAULT_MAX_ATTEMPTS, journal_folder, AttemptJournal, died_message, maybe_crash
from .source_files import PARQUET, read_parquet_rows, read_tar_keys, source_file_kind

log = logging.getLogger(__name__)


# Extra columns a worker returns to the driver (not stored): wall-clock start and end of
# its batch, so the driver can tell start-up time from processing time.
T_START, T_END = "_t_start", "_t_end"


def read_batch(batch: Dict[str, np.ndarray], size: int, max_pixels: Optional[int] = None,
               journal=None, max_attempts: int = DEFAULT_MAX_ATTEMPTS, crash_on: Optional[str] = None,
               image_column: str = "image") -> Dict[str, np.ndarray]:
    """{index, path[, member, problem]} -> the same plus image (B, size, size, 3) float32, error
    ('' when read), read_seconds, and the batch's wall-clock start. An image with a member is
    read from its source file (each file opened once per batch); one with a problem is not read.

    journal: an AttemptJournal (or the path of one, in the GPU path's read tasks): an image
    whose reads killed the process max_attempts times becomes an error, not another attempt.
    """
    t_start = time.time()
    n = len(batch["index"])
    members = batch.get("member", [None] * n)
    problems = batch.get("problem", [None] * n)
    own = journal is not None and not isinstance(journal, AttemptJournal)
    if own:
        journal = AttemptJournal(journal)
    encoded = _file_members(batch["path"], members, image_column)
    # Image files in a bucket: fetched together, concurrently, before the loop decodes them.
    fetched = read_many(str(p) for p, m, pr in zip(batch["path"], members, problems)
                        if m is None and not pr and is_url(p))
    images = np.zeros((n, size, size, 3), np.float32)
    errors, seconds = [], np.zeros(n)
    for j, (i, path, member, problem) in enumerate(zip(batch["index"], batch["path"], members, problems)):
        t0 = time.perf_counter()
        item = f"read:{int(i)}"
        deaths = journal.deaths(item) if journal is not None else 0
        if problem:
            errors.append(str(problem))
            continue
        if deaths >= max_attempts:
            errors.append(died_message("reading this image", deaths, max_attempts))
            continue
        name = str(path) if member is None else f"{path}#{member}"
        data = None if member is None else encoded[(str(path), member)]
        if isinstance(data, str):               # the source file said why it has no image there
            errors.append(data)
            continue
        try:
            with journal.attempt(item) if journal is not None else nullcontext():
                maybe_crash(name, crash_on)
                if data is None and is_url(name):      # an object, fetched above (one GET)
                    data = fetched.get(name)
                    if data is None:
                        data = read_bytes(name)
                    if isinstance(data, BaseException):
                        raise data
                images[j] = load_image(name, size, max_pixels=max_pixels) if data is None else \
                    load_image_bytes(data, name, size, max_pixels=max_pixels)
            errors.append("")
        except ImageError as e:
            errors.append(e.reason)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the dataset
            if machine_error(e):        # a full disk is not this image's fault: stop the job
                raise
            errors.append(f"cannot read ({type(e).__name__}: {e})")
        seconds[j] = time.perf_counter() - t0
    if own:
        journal.drop()          # read: what follows (the solve) is journaled by the actor
    out = dict(batch)
    out.update(image=images, error=np.asarray(errors, object), read_seconds=seconds)
    out[T_START] = np.full(n, t_start)
    return out


def _file_members(paths, members, image_column: str) -> dict:
    """{(source file path, member): encoded bytes or an error string} for the images that live in
    source files (Parquet, tar), each file opened once."""
    wanted: Dict[str, list] = {}
    for path, member in zip(paths, members):
        if member is not None:
            wanted.setdefault(str(path), []).append(member)
    out = {}
    for path, want in wanted.items():
        try:
            if source_file_kind(Path(path)) == PARQUET:
                got = read_parquet_rows(path, want, image_column)
            else:
                got = read_tar_keys(path, want)
        except Exception as e:  # noqa: BLE001 - a file gone or damaged since listing: error rows
            got = {m: f"cannot read the source file ({type(e).__name__}: {e})" for m in want}
        out.update({(path, m): got[m] for m in want})
    return out


def shard_items(plan, shards: Optional[Sequence[int]] = None) -> List[dict]:
    """The job's rows for `shards` (default: every shard the plan writes): one per shard, its
    sources as JSON (a type Ray keeps as is), read from the store's manifest.

    Each task could read its shard's sources from the manifest itself instead, sparing the
    driver even the window; the driver builds the rows because a window's size is bounded
    whatever N is (about 100 bytes per image, ~40 MB at 4,096 shards of 64 images).
    docs/dataset-store.md ("How the job runs") has the measurements and the design notes."""
    from ..stores.manifest import ManifestShards, manifest_sources

    manifest = ManifestShards(plan.path, plan.params.shard_images)
    return [{"shard": k, "sources": json.dumps([[s.index, s.path, s.member, s.problem]
                                                 for s in manifest_sources(manifest, k)])}
            for k in (plan.shards if shards is None else shards)]


def shard_sources(row: Dict[str, np.ndarray]) -> tuple:
    """A one-row Ray batch -> (shard k, {"index": (m,) int64, "path", "member", "problem": (m,) object})."""
    if len(row["shard"]) != 1:
        raise ValueError(f"a task gets one shard at a time, got {len(row['shard'])}")
    rows = json.loads(str(row["sources"][0]))
    return int(row["shard"][0]), {"index": np.asarray([r[0] for r in rows], np.int64),
                                  **{c: np.asarray([r[j] for r in rows], object)
                                     for j, c in enumerate(("path", "member", "problem"), 1)}}


def read_source_images(row: Dict[str, np.ndarray], size: int, max_pixels: Optional[int] = None,
                       journal=None, max_attempts: int = DEFAULT_MAX_ATTEMPTS, crash_on: Optional[str] = None,
                       image_column: str = "image") -> Dict[str, np.ndarray]:
    """The GPU path's read task: a shard row -> the same row plus its source images (1, m, S, S, 3)
    and, as JSON, each image's read error and seconds (journal: the folder of the attempt journals)."""
    k, flat = shard_sources(row)
    got = read_batch(flat, size, max_pixels, Path(journal) / f"read-{k:07d}.log", max_attempts, crash_on,
                     image_column)
    out = dict(row)
    out.update(image=got["image"][None], read=np.asarray([json.dumps(
        {"error": list(got["error"]), "seconds": got["read_seconds"].tolist()})], object))
    out[T_START] = got[T_START][:1]
    return out


class DecomposeWorker:
    """Ray Data actor: decomposes the images of one shard at a time and writes the shard.

    Compiles (or loads from Numba's cache) the solver kernels once, in __init__. Writes are
    idempotent: shard k holds images of shard k only and is staged whole by one atomic rename
    (the driver commits it), so a retried shard rewrites the same file with the same bytes and
    no two tasks ever write parts of one shard.
    """

    def __init__(self, store: str, params: dict, run: int, batch_size: int, threads: int = 1,
                 read_size: Optional[int] = None, max_pixels: Optional[int] = None,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, crash_on: Optional[str] = None,
                 image_column: str = "image"):
        # read_size: read the shard's files here (CPU workers); None: shards arrive read.
        self.read_size, self.max_pixels, self.image_column = read_size, max_pixels, image_column
        self.max_attempts, self.crash_on = int(max_attempts), crash_on
        self.batch_size = int(batch_size)
        self.params = StoreParams.from_dict(params)
        self.order, self.levels = self.params.order, self.params.levels
        self.threads = None
        if self.params.backend == "numba":
            import numba
            # One actor per CPU: more Numba threads than the actor's CPUs would oversubscribe.
            self.threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
            self._limit_threads()
        self.store = as_path(store)
        self.parts, self.run = run_parts(store, run), int(run)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.schema = manifest_schema(self.levels)
        # Warm-up: kernels are compiled per process; do it before the first real shard.
        self._decompose(np.zeros((1, 8, 8, 3), np.float32), n_iter=1)

    def _limit_threads(self) -> None:
        # numba.set_num_threads is per calling thread, and Ray Data calls the actor from
        # another thread than the one that ran __init__: set it on every call.
        if self.threads is not None:
            import numba
            numba.set_num_threads(self.threads)

    def _decompose(self, images: np.ndarray, **override):
        at = dict(self.params.at.to_dict(), **override)
        return decompose(images, self.order, method=self.params.method, backend=self.params.backend, **at)

    def _solve(self, images: np.ndarray, index: np.ndarray, journal: AttemptJournal) -> tuple:
        """Bases (B, n+1, 3, H, W) uint8 and energies and sweeps (B, n, 2) of one solver batch (n:
        the store's levels); per image when
        the batch fails or when a process died solving it before (then per-image deaths are
        journaled too: a death of the batch solve counts as an attempt at each of its images)."""
        batch_item = f"batch:{int(index.min())}"
        batch_deaths = journal.deaths(batch_item)
        if not batch_deaths:
            try:
                with journal.attempt(batch_item):
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
            except MemoryError as e:    # one image at the store's size: the worker's memory is at fault
                raise MemoryError(f"decomposing image {int(i)} at {self.params.size} x {self.params.size} px "
                                  f"(order {self.order}) in a worker: {e}") from e
            except (ValueError, RuntimeError, TypeError) as e:
                out.append(None)
                errs.append(f"decomposition failed ({type(e).__name__}: {e})")
        return out, errs

    def _solve_batch(self, images: np.ndarray) -> tuple:
        dec = self._decompose(images)
        # The AT energy and sweeps of each level; NaN where the method has none (specular has no AT).
        energies = np.full((len(images), self.levels, 2), np.nan)
        for j, (e, t) in enumerate(zip(dec.energies, dec.iterations)):
            energies[:, j, 0] = np.asarray(to_host(e), np.float64).reshape(-1)
            energies[:, j, 1] = np.asarray(t, np.float64).reshape(-1)
        return quantize_bases(dec.linear_bases()), energies

    def __call__(self, row: Dict[str, np.ndarray]):
        import pyarrow as pa

        self._limit_threads()
        k, batch = shard_sources(row)
        index = batch["index"]
        n = len(index)
        journal = AttemptJournal(journal_folder(self.parts) / f"shard-{k:07d}.log")
        if self.read_size is not None:
            batch = read_batch(batch, self.read_size, self.max_pixels, journal, self.max_attempts, self.crash_on,
                               self.image_column)
            t_start = float(batch[T_START][0])
        else:
            read = json.loads(str(row["read"][0]))
            batch.update(image=np.asarray(row["image"][0]), error=np.asarray(read["error"], object),
                         read_seconds=np.asarray(read["seconds"], np.float64))
            t_start = float(np.min(row[T_START]))
        errors: List[str] = list(batch["error"])
        seconds = np.asarray(batch["read_seconds"], np.float64).copy()
        S, n_bases = self.params.size, self.levels + 1
        bases = np.zeros((n, n_bases, 3, S, S), np.uint8)      # error rows stay 0, the array's fill value
        energies = np.full((n, self.levels, 2), np.nan)         # AT energy, sweeps
        images = np.asarray(batch["image"])
        good = [j for j, e in enumerate(errors) if not e]
        # The solver takes batch_size images at a time; the shard is written once, at the end.
        for lo in range(0, len(good), self.batch_size):
            part = good[lo:lo + self.batch_size]
            t0 = time.perf_counter()
            solved, per_image_errors = self._solve(images[part], index[part], journal)
            if per_image_errors is None:
                bases[part], energies[part] = solved
            else:
                for j, res, msg in zip(part, solved, per_image_errors):
                    errors[j] = msg
                    if res is not None:
                        bases[j], energies[j] = res[0][0], res[1][0]
            seconds[part] += (time.perf_counter() - t0) / len(part)      # shared by the batch
        ok = [not e for e in errors]
        t0 = time.perf_counter()
        # Staged in this run's folder: the driver moves it into bases.zarr when this result
        # reaches it (a worker that outlives its driver can never change the store).
        shard_bytes = write_shard(staged_shard_file(self.store, self.run, k), bases, self.params.shard_images)
        if any(ok):
            seconds[np.flatnonzero(ok)] += (time.perf_counter() - t0) / sum(ok)
        # id, label and class_name stay null here: the store's manifest, written by the
        # driver from SRC, is their one source (merged in by shard_journal.shard_tables).
        cols = {"index": index, "id": [None] * n, "path": [str(p) for p in batch["path"]],
                "member": list(batch["member"]), "problem": list(batch["problem"]),
                "label": [None] * n, "class_name": [None] * n,
                "status": [STATUS_OK if o else STATUS_ERROR for o in ok],
                "error": [None if o else e for o, e in zip(ok, errors)], "shard_bytes": [shard_bytes] * n,
                "seconds": seconds, "backend": [self.params.backend] * n,
                "worker_host": [self.host] * n, "worker_pid": [self.pid] * n}
        for j in range(1, self.levels + 1):
            solved = [ok[r] and not np.isnan(energies[r, j - 1, 0]) for r in range(n)]
            cols[f"energy_{j}"] = [float(energies[r, j - 1, 0]) if solved[r] else None for r in range(n)]
            cols[f"iterations_{j}"] = [int(energies[r, j - 1, 1]) if solved[r] else None for r in range(n)]
        table = pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in self.schema},
                         schema=self.schema)
        journal.drop()
        now = time.time()
        return table.append_column(T_START, pa.array([t_start] * n, pa.float64())) \
                    .append_column(T_END, pa.array([now] * n, pa.float64()))
