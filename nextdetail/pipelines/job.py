"""The Ray Data job: list sources -> read -> decompose in an actor pool -> write the store.

    plan = list_sources(SRC); check the store (before paying for Ray)
    connect to Ray (local, or a cluster with address)
    prepare the store (create it, or work out what a rerun still has to do)
    from_items(paths) -> map_batches(read_batch) -> map_batches(DecomposeWorker, ActorPoolStrategy)
    finish the store (manifest.parquet, then meta.json)

Only paths go out of the driver and only manifest rows come back; pixels are read, solved
and written by the workers, so the job scales with the cluster.
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import List, Optional, Protocol

from ..errors import JobError
from .attempts import ATTEMPTS, crash_hook
from .config import ConfigError, JobConfig
from .sources import list_sources
from .store import STATUS_ERROR, StoreError, run_parts
from .worker import T_END, T_START, DecomposeWorker, read_batch
from .writer import StorePlan, check_store, finish_store, prepare_store

log = logging.getLogger(__name__)


class Progress(Protocol):
    """Where the job reports progress (the CLI draws a bar; None reports nothing)."""

    def start(self, todo: int, done: int) -> None: ...

    def update(self, rows: List[dict]) -> None: ...

    def close(self) -> None: ...


@dataclass
class JobReport:
    """What a run did. `rate` is this run's images per second of processing, Ray's start-up
    (ray.init, actor pool, kernel warm-up) excluded; `seconds` is the whole command."""

    store: str
    images: int = 0
    processed: int = 0             # by this run
    skipped: int = 0               # already ok in the store
    ok: int = 0                    # in the finished store
    error: int = 0
    backend: str = ""
    workers: int = 0
    seconds: float = 0.0
    ray_seconds: float = 0.0       # ray.init (0 when joining an already running Ray)
    startup_seconds: float = 0.0   # from connecting to the first batch starting
    processing_seconds: float = 0.0
    errors: List[str] = field(default_factory=list)   # "id: reason" of this run's error rows

    @property
    def rate(self) -> float:
        return self.processed / self.processing_seconds if self.processing_seconds > 0 else 0.0

    def summary(self) -> str:
        skipped = f" ({self.skipped} already done)" if self.skipped else ""
        return (f"{self.images} images: {self.ok} ok, {self.error} error{skipped}; processed "
                f"{self.processed} in {self.processing_seconds:.1f} s = {self.rate:.1f} images/s "
                f"on {self.workers} {self.backend} workers; Ray start-up {self.startup_seconds:.1f} s, "
                f"total {self.seconds:.1f} s; store {self.store}")


def _quiet_env() -> None:
    # Ray 2.60 turns token auth on by default; a local, single-user Ray does not need it.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def connect(cfg: JobConfig) -> tuple:
    """Start or join Ray. Returns (we_started_it, seconds). Reuses an initialized Ray (tests)."""
    import ray

    if ray.is_initialized():
        return False, 0.0
    _quiet_env()
    t0 = time.perf_counter()
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING)
    try:
        if cfg.address is None:
            workers = cfg.workers or 0
            # address="local": a new Ray of our own, even when RAY_ADDRESS points elsewhere.
            ray.init(address="local", num_cpus=cfg.num_cpus or max(os.cpu_count() or 1, workers), **kwargs)
        else:
            ray.init(address=cfg.address, **kwargs)
    except Exception as e:  # ConnectionError, RuntimeError, ... from Ray
        where = "a local Ray" if cfg.address is None else f"Ray at {cfg.address}"
        raise JobError(f"cannot start {where} ({type(e).__name__}: {e})") from None
    return True, time.perf_counter() - t0


def resolve_resources(cfg: JobConfig) -> tuple:
    """(backend, gpus_per_worker, workers) for the Ray we are connected to."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 0)), float(res.get("GPU", 0))
    backend = cfg.backend
    if backend == "auto":
        if cfg.address is None:
            backend = _local_auto(cfg)
        else:  # the driver may run on a node without a GPU: go by the cluster's resources
            backend = "cupy" if gpus and cfg.gpus_per_worker != 0 else "numba"
    per_worker = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if backend == "cupy" else 0.0)
    if backend == "cupy" and per_worker <= 0:
        raise ConfigError("the cupy backend needs --gpus-per-worker > 0")
    if per_worker and gpus < per_worker:
        raise ConfigError(f"--gpus-per-worker {per_worker:g} but the Ray cluster has {gpus:g} GPUs")
    workers = cfg.workers or (int(gpus // per_worker) if per_worker else max(1, cpus))
    # Each actor holds one CPU; GPU actors also need at least one CPU left for read tasks.
    need = workers + (1 if per_worker else 0)
    if need > cpus:
        raise ConfigError(f"--workers {workers} needs {need} CPUs; the Ray cluster has {cpus}")
    if per_worker and workers * per_worker > gpus:
        raise ConfigError(f"--workers {workers} x --gpus-per-worker {per_worker:g} needs "
                          f"{workers * per_worker:g} GPUs; the Ray cluster has {gpus:g}")
    return backend, per_worker, workers


def _dataset(plan: StorePlan, cfg: JobConfig, gpus: float, workers: int):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Our own progress bar and summary replace Ray Data's.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    items = [{"index": s.index, "path": s.path} for s in plan.todo]
    # One block per batch: blocks are what Ray schedules, so this spreads batches evenly.
    blocks = max(1, math.ceil(len(items) / cfg.batch_size))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    if gpus:
        # GPU actors should not spend their time decoding: CPU tasks read ahead of them.
        # max_retries=-1: a read task whose process died is retried until its journal (in
        # the store's _parts) says an image killed it --max-attempts times: an error row.
        ds = ds.map_batches(read_batch, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1,
                            max_retries=-1,
                            fn_kwargs={"size": plan.params.size, "max_pixels": cfg.max_pixels,
                                       "journal": str((run_parts(plan.path, plan.run) / ATTEMPTS).resolve()),
                                       "max_attempts": cfg.max_attempts, "crash_on": crash_hook()})
    # CPU actors read their own batches (read_size): the pixels stay in the process that
    # decodes them, and no read task competes with the actors for the CPUs. (A separate
    # read stage is not fused into the actors here, and on a 2-CPU machine its tasks wait
    # forever behind 2 actors.)
    return ds.map_batches(
        DecomposeWorker, batch_size=cfg.batch_size, batch_format="numpy",
        # A small queue per actor: enough to keep it busy, few enough that the last
        # batches do not wait behind one actor while another idles.
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
        # Ray Data restarts a dead actor and retries its batch without limit (max_restarts =
        # max_task_retries = -1); the worker's attempt journal makes an image that killed the
        # process --max-attempts times an error row, so the retries end (pipelines/attempts.py).
        num_cpus=1, num_gpus=gpus or None,
        fn_constructor_kwargs={"store": str(plan.path.resolve()), "params": plan.params.to_dict(),
                               "run": plan.run, "threads": 1,
                               "read_size": None if gpus else plan.params.size, "max_pixels": cfg.max_pixels,
                               "max_attempts": cfg.max_attempts, "crash_on": crash_hook()})


def run_job(cfg: JobConfig, progress: Optional[Progress] = None) -> JobReport:
    """Decompose every image of cfg.src not yet in cfg.out. Raises SourceError, StoreError,
    ConfigError (bad input, refused store) or JobError (Ray or I/O failure; rerun resumes)."""
    t_begin = time.perf_counter()
    sources = list_sources(cfg.src)
    report = JobReport(store=str(cfg.out), images=len(sources))
    # Refuse a mismatched store before paying for Ray; a cluster's 'auto' backend is only
    # known once connected, so it is compared then.
    early_backend = cfg.backend if cfg.backend != "auto" or cfg.address is not None else _local_auto(cfg)
    ignore = ("backend",) if early_backend == "auto" else ()
    check_store(cfg.out, cfg.store_params(early_backend), sources, overwrite=cfg.overwrite, ignore=ignore)
    started, report.ray_seconds = connect(cfg)
    t_connected = time.time() - report.ray_seconds
    try:
        backend, gpus, workers = resolve_resources(cfg)
        report.backend, report.workers = backend, workers
        plan = prepare_store(cfg.out, cfg.store_params(backend), sources, overwrite=cfg.overwrite)
        report.skipped = plan.done
        if plan.previous_errors:
            log.info("retrying %d images that failed in an earlier run", plan.previous_errors)
        # More actors than batches would only idle (and make Ray Data warn).
        workers = min(workers, max(1, math.ceil(len(plan.todo) / cfg.batch_size)))
        report.workers = workers
        if progress:
            progress.start(len(plan.todo), plan.done)
        t_first, t_last = None, None
        with job_failures("job", "store", progress):
            if plan.todo:
                for batch in _dataset(plan, cfg, gpus, workers).iter_batches(batch_size=None,
                                                                            batch_format="pyarrow"):
                    report.processed += batch.num_rows
                    t0, t1 = min(batch.column(T_START).to_pylist()), max(batch.column(T_END).to_pylist())
                    t_first = t0 if t_first is None else min(t_first, t0)
                    t_last = t1 if t_last is None else max(t_last, t1)
                    rows = batch.drop_columns([T_START, T_END]).to_pylist()
                    report.errors += [f"{r['path']}: {r['error']}" for r in rows if r["status"] == STATUS_ERROR]
                    if progress:
                        progress.update(rows)
        if t_first is not None:
            report.startup_seconds = max(0.0, t_first - t_connected)
            report.processing_seconds = max(1e-9, t_last - t_first)
        counts = finish_store(plan, src=str(cfg.src))
        report.ok, report.error = counts["ok"], counts["error"]
    except OSError as e:   # creating or finishing the store on the driver's side
        raise JobError(f"cannot write the store ({e}); rerun the same command once fixed") from e
    finally:
        if started:
            import ray
            ray.shutdown()
    report.seconds = time.perf_counter() - t_begin
    return report


@contextmanager
def job_failures(job: str, output: str, progress=None):
    """Around a Ray Data run: bad input and refusals (StoreError, ConfigError) pass through;
    any other failure, which Ray wraps in its own exception types, becomes one JobError line
    saying the output is resumable. The progress bar is closed either way."""
    try:
        yield
    except (StoreError, ConfigError):
        raise
    except Exception as e:
        raise JobError(f"the {job} failed; the {output} is resumable, rerun the same command "
                       f"({_root_cause(e)})") from e
    finally:
        if progress:
            progress.close()


def _local_auto(cfg: JobConfig) -> str:
    """'auto' on this machine: cupy when it has a usable GPU and GPUs are not turned off."""
    from ..decomp.at import cupy_usable
    return "cupy" if cfg.gpus_per_worker != 0 and cupy_usable() else "numba"


def _root_cause(e: BaseException) -> str:
    """'Type: message' of the innermost cause (Ray wraps worker errors several times)."""
    seen = set()
    while (e.__cause__ or getattr(e, "cause", None)) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.cause
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
