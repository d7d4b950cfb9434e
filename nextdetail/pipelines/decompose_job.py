"""The decompose-dataset job on Ray Data: list sources -> read -> decompose in an actor pool ->
write the store.

    listing = scan_source(SRC)                  source files (Parquet, tar): listed one at a time
    check_store: the listing, streamed, compared with the store's manifest or staged as the
                 manifest of a new store (before paying for Ray)
    connect to Ray (local, or a cluster with address)
    plan_store: create the store, or work out which shards a rerun still has to do
    for each window of WINDOW_SHARDS shards to write:
        from_items(one row per shard, its images read from the manifest)
            -> [map_batches(read_source_images), GPU only]
            -> map_batches(DecomposeWorker, ActorPoolStrategy)     one shard per call, written whole
        commit each shard as its rows come back
    finish the store (manifest.parquet, then meta.json)

Only paths go out of the driver and only manifest rows come back; pixels are read, solved
and written by the workers, so the job scales with the cluster. The driver holds one shard of
the listing and one window of rows at a time, so its memory does not grow with the number of
images in source files (a folder's walk is held whole: sorting it needs every name). A task owns whole shards,
so no two processes ever write one shard file (Zarr would lose images). What both Ray jobs share
(connecting, resources, failures, timing) is in ray_job.py.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

from ..decomp.files import sweeps_text
from ..errors import ConfigError
from ..limits import human
from ..stores.decomposition_format import STATUS_ERROR, run_parts, source_name
from ..stores.lock import folder_lock
from ..stores.shard_journal import commit_shards
from ..stores.store_check import check_store
from ..stores.store_plan import StorePlan, finish_store, plan_store
from ..storage import absolute
from .attempts import crash_hook, journal_folder
from .config import DecomposeDatasetConfig
from .ray_job import (Progress, RayJobReport, batches, cluster_resources, job_failures, largest_node,
                      quiet_data_context, ray_session, resolve_workers, worker_env)
from .sources import scan_source
from .decompose_worker import T_END, T_START, DecomposeWorker, read_source_images, shard_items

log = logging.getLogger(__name__)

# Shards sent to Ray per Dataset: bounds what the driver holds (~10 KB of sources per shard);
# each window starts a new actor pool (seconds), so windows are many shards per actor.
WINDOW_SHARDS = 4096
WINDOW_SHARDS_PER_ACTOR = 64


@dataclass
class DecomposeDatasetReport(RayJobReport):
    """What a decompose-dataset run did (device: the solver backend)."""

    store: str = ""
    images: int = 0
    ok: int = 0                    # in the finished store
    error: int = 0
    errors: List[str] = field(default_factory=list)   # "id: reason" of this run's error rows
    source: str = ""               # what was read, e.g. "read 257 parquet shards"
    failed_shards: List[str] = field(default_factory=list)   # "<source file>: <reason>": not opened
    sweeps: List[List[float]] = field(default_factory=list)  # per level: [sum, images] of this run's AT sweeps

    def count_sweeps(self, rows: List[dict]) -> None:
        """Add the manifest rows' iterations_k (the AT sweeps of level k) to the per-level sums."""
        for r in rows:
            for key, t in r.items():
                if key.startswith("iterations_") and t is not None:
                    k = int(key[len("iterations_"):])
                    self.sweeps += [[0.0, 0] for _ in range(k - len(self.sweeps))]
                    self.sweeps[k - 1][0] += t
                    self.sweeps[k - 1][1] += 1

    def summary(self) -> str:
        skipped = f" ({self.skipped} already done)" if self.skipped else ""
        return (f"{self.images} images: {self.ok} ok, {self.error} error{skipped}; {self.timing()}; "
                f"{sweeps_text([t / n for t, n in self.sweeps])}; {self.source}; store {self.store}")


def resolve_resources(cfg: DecomposeDatasetConfig) -> tuple:
    """(backend, gpus_per_worker, workers) for the Ray we are connected to."""
    backend = cfg.backend
    if backend == "auto":
        if cfg.address is None:
            backend = _local_auto(cfg)
        else:  # the driver may run on a node without a GPU: go by the cluster's resources
            backend = "cupy" if cluster_resources()[1] and cfg.gpus_per_worker != 0 else "numba"
    if backend == "cupy" and cfg.gpus_per_worker is not None and cfg.gpus_per_worker <= 0:
        raise ConfigError("the cupy backend needs --gpus-per-worker > 0")
    # GPU actors also need a CPU left for the read tasks that feed them.
    return (backend, *resolve_workers(cfg, gpu_job=backend == "cupy", spare_cpus=1))


def _windows(plan: StorePlan, workers: int) -> Iterator[List[int]]:
    """The shards to write in windows of at least WINDOW_SHARDS, and WINDOW_SHARDS_PER_ACTOR per
    actor, so that the tail of a window (actors idle while its last shards finish) stays small."""
    size = max(WINDOW_SHARDS, WINDOW_SHARDS_PER_ACTOR * workers)
    for lo in range(0, len(plan.shards), size):
        yield plan.shards[lo:lo + size]


def _dataset(plan: StorePlan, shards: List[int], cfg: DecomposeDatasetConfig, gpus: float, workers: int):
    import ray.data

    quiet_data_context()
    items = shard_items(plan, shards)
    # One block per shard: blocks are what Ray schedules, so this spreads shards evenly.
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    if gpus:
        # GPU actors should not spend their time decoding: CPU tasks read ahead of them.
        # max_retries=-1: a read task whose process died is retried until its journal (in
        # the store's _parts) says an image killed it --max-attempts times: an error row.
        ds = ds.map_batches(read_source_images, batch_size=1, batch_format="numpy", num_cpus=1, max_retries=-1,
                            **worker_env(cfg.src, plan.path),
                            fn_kwargs={"size": plan.params.size, "max_pixels": cfg.max_pixels,
                                       "journal": str(journal_folder(run_parts(plan.path, plan.run)).resolve()),
                                       "max_attempts": cfg.max_attempts, "crash_on": crash_hook(),
                                       "image_column": cfg.image_column})
    # CPU actors read their own shards (read_size): the pixels stay in the process that
    # decodes them, and no read task competes with the actors for the CPUs. (A separate
    # read stage is not fused into the actors here, and on a 2-CPU machine its tasks wait
    # forever behind 2 actors.)
    return ds.map_batches(
        DecomposeWorker, batch_size=1, batch_format="numpy",
        # A small queue per actor: enough to keep it busy, few enough that the last
        # shards do not wait behind one actor while another idles.
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
        # Ray Data restarts a dead actor and retries its batch without limit (max_restarts =
        # max_task_retries = -1); the worker's attempt journal makes an image that killed the
        # process --max-attempts times an error row, so the retries end (pipelines/attempts.py).
        num_cpus=1, num_gpus=gpus or None, **worker_env(cfg.src, plan.path),
        fn_constructor_kwargs={"store": absolute(plan.path), "params": plan.params.to_dict(),
                               "run": plan.run, "batch_size": cfg.batch_size, "threads": 1,
                               "read_size": None if gpus else plan.params.size, "max_pixels": cfg.max_pixels,
                               "max_attempts": cfg.max_attempts, "crash_on": crash_hook(),
                               "image_column": cfg.image_column})


def run_job(cfg: DecomposeDatasetConfig, progress: Optional[Progress] = None) -> DecomposeDatasetReport:
    """Decompose every image of cfg.src not yet in cfg.out. Raises SourceError, StoreError,
    ConfigError (bad input, refused store, options that cannot fit), FolderLocked (another job
    writes the store) or JobError (Ray or I/O failure; rerun resumes)."""
    if cfg.address is None:             # a cluster's nodes are known once connected
        cfg.check_memory(cfg.memory_needs(), cfg.local_workers())
    with folder_lock(cfg.out, "store"):
        return _run_job(cfg, progress)


def _run_job(cfg: DecomposeDatasetConfig, progress: Optional[Progress]) -> DecomposeDatasetReport:
    t_begin = time.perf_counter()
    listing = scan_source(cfg.src, cfg.source_file_options())
    # Refuse a mismatched store before paying for Ray; a cluster's 'auto' backend is only
    # known once connected, so it is compared then.
    early_backend = cfg.backend if cfg.backend != "auto" or cfg.address is not None else _local_auto(cfg)
    ignore = ("backend",) if early_backend == "auto" else ()
    check = check_store(cfg.out, cfg.store_params(early_backend), listing, overwrite=cfg.overwrite, ignore=ignore)
    report = DecomposeDatasetReport(store=str(cfg.out), images=check.n_images, source=listing.describe(),
                       failed_shards=listing.failed)
    with ray_session(cfg, "store", report) as t_connected:
        backend, gpus, workers = resolve_resources(cfg)
        if cfg.address is not None:
            cfg.check_memory(cfg.memory_needs(), workers, node=largest_node())
        report.device, report.workers = backend, workers
        plan = plan_store(cfg.out, cfg.store_params(backend), check, overwrite=cfg.overwrite)
        report.skipped = plan.done
        if plan.previous_errors:
            log.info("retrying %d images that failed in an earlier run", plan.previous_errors)
        if plan.damaged:
            log.warning("%d shards were damaged or gone; redoing them", plan.damaged)
        # More actors than shards would only idle (and make Ray Data warn).
        workers = min(workers, max(1, len(plan.shards)))
        report.workers = workers
        if progress:
            progress.start(plan.todo, plan.done)
        t_first, t_last = None, None
        def needs() -> str:             # the space a full disk still has to find
            left = max(0, plan.todo - report.processed)
            per = 3 * plan.params.size ** 2 * (plan.params.levels + 1)
            return f"about {human(left * per)} more for {left} images, uncompressed"

        with job_failures("job", "store", progress, needs):
            for shards in _windows(plan, workers):
                with batches(_dataset(plan, shards, cfg, gpus, workers), batch_size=None,
                             batch_format="pyarrow") as results:
                    for batch in results:
                        report.processed += batch.num_rows
                        t0, t1 = min(batch.column(T_START).to_pylist()), max(batch.column(T_END).to_pylist())
                        t_first = t0 if t_first is None else min(t_first, t0)
                        t_last = t1 if t_last is None else max(t_last, t1)
                        done = batch.drop_columns([T_START, T_END])
                        # The commit: staged shard into bases.zarr, then its journal part.
                        commit_shards(plan.path, plan.params, plan.run, done)
                        rows = done.to_pylist()
                        report.errors += [f"{source_name(r)}: {r['error']}" for r in rows
                                          if r["status"] == STATUS_ERROR]
                        report.count_sweeps(rows)
                        if progress:
                            progress.update(rows)
        report.timed(t_connected, t_first, t_last)
        counts = finish_store(plan, src=str(cfg.src))
        report.ok, report.error = counts["ok"], counts["error"]
    report.seconds = time.perf_counter() - t_begin
    return report


def _local_auto(cfg: DecomposeDatasetConfig) -> str:
    """'auto' on this machine: cupy when it has a usable GPU and GPUs are not turned off."""
    from ..decomp.at import cupy_usable
    return "cupy" if cfg.gpus_per_worker != 0 and cupy_usable() else "numba"
