"""What both Ray jobs (decompose-dataset, export-tokens) share: starting or joining Ray, how
many actors on which resources, the Data context, the progress protocol, the report's timing
and the one place Ray's failures become a JobError.

    started, ray_seconds = connect(cfg)             # cfg: a RayJobConfig
    gpus, workers = resolve_workers(cfg, gpu_job)   # checks --workers / --gpus-per-worker once
    ds = ray.data.from_items(items, ...)            # after quiet_data_context()
    with job_failures("export", "token store", progress): ...
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Protocol

from ..errors import ConfigError, JobError
from ..faults import as_os_error, cause_line, install_term_handler
from ..stores.decomposition_format import StoreError
from .config import RayJobConfig
from .native_log import quiet_known_native_lines

log = logging.getLogger(__name__)


class Progress(Protocol):
    """Where a job reports progress: images to do and done, then counts or manifest rows as
    they finish (the CLI draws a bar; None reports nothing)."""

    def start(self, todo: int, done: int) -> None: ...

    def update(self, rows) -> None: ...

    def close(self) -> None: ...


@dataclass
class RayJobReport:
    """Timing of a run. `rate` is this run's items per second of processing, Ray's start-up
    (ray.init, actor pool, warm-up) excluded; `seconds` is the whole command."""

    processed: int = 0             # items this run did
    skipped: int = 0               # already done before it
    workers: int = 0
    device: str = ""               # what the workers ran on (numba, cupy, cpu, gpu)
    seconds: float = 0.0
    ray_seconds: float = 0.0       # ray.init (0 when joining an already running Ray)
    startup_seconds: float = 0.0   # from connecting to the first batch starting
    processing_seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.processed / self.processing_seconds if self.processing_seconds > 0 else 0.0

    def timing(self, verb: str = "processed") -> str:
        return (f"{verb} {self.processed} in {self.processing_seconds:.1f} s = {self.rate:.1f} images/s on "
                f"{self.workers} {self.device} workers; Ray start-up {self.startup_seconds:.1f} s, total "
                f"{self.seconds:.1f} s")

    def timed(self, t_connected: float, t_first, t_last) -> None:
        """Split start-up from processing (wall-clock times: connected, first batch began, last
        batch ended; t_first None when nothing ran)."""
        if t_first is not None:
            self.startup_seconds = max(0.0, t_first - t_connected)
            self.processing_seconds = max(1e-9, t_last - t_first)


def _quiet_env() -> None:
    # Ray 2.60 turns token auth on by default; a local, single-user Ray does not need it.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def connect(cfg: RayJobConfig) -> tuple:
    """Start or join Ray. Returns (we_started_it, seconds). Reuses an initialized Ray (tests)."""
    import ray

    if ray.is_initialized():
        return False, 0.0
    _quiet_env()
    t0 = time.perf_counter()
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING)
    where = "a local Ray" if cfg.address is None else f"Ray at {cfg.address}"
    # A local start times out now and then ("The current node timed out during startup"); a
    # second start, in a temp folder of its own, nearly always comes up.
    for attempt in (1, 2) if cfg.address is None else (1,):
        try:
            if cfg.address is None:
                workers = cfg.workers or 0
                # address="local": a new Ray of our own, even when RAY_ADDRESS points elsewhere.
                extra = {} if attempt == 1 else {"_temp_dir": tempfile.mkdtemp(prefix="nextdetail-ray-")}
                ray.init(address="local", num_cpus=cfg.num_cpus or max(os.cpu_count() or 1, workers), **kwargs,
                         **extra)
            else:
                ray.init(address=cfg.address, **kwargs)
            break
        except Exception as e:  # ConnectionError, RuntimeError, ... from Ray
            if attempt == 1 and cfg.address is None:
                log.info("the local Ray did not start (%s: %s); starting it once more", type(e).__name__, e)
                ray.shutdown()
                continue
            again = ", also when started a second time" if cfg.address is None else ""
            raise JobError(f"cannot start {where}{again} ({type(e).__name__}: {' '.join(str(e).split())[:300]})") \
                from None
    # ray.init's core worker installs a SIGTERM handler that prints a C++ stack dump and exits
    # 15; ours stops like Ctrl-C (exit 143, nothing lost).
    install_term_handler()
    return True, time.perf_counter() - t0


@contextmanager
def ray_session(cfg: RayJobConfig, output: str, report: RayJobReport, needed: bool = True):
    """Connect (when `needed`) for the block; yield the wall-clock time Ray was ready. OSError on
    the driver's side (writing the output) becomes a JobError naming it; a Ray we started is
    shut down either way."""
    started, report.ray_seconds = connect(cfg) if needed else (False, 0.0)
    try:
        with quiet_known_native_lines():
            yield time.time() - report.ray_seconds
    except OSError as e:
        raise JobError(f"cannot write the {output}: {cause_line(e)}") from e
    finally:
        if started:
            import ray
            ray.shutdown()


def cluster_resources() -> tuple:
    """(CPUs, GPUs) of the Ray we are connected to."""
    import ray

    res = ray.cluster_resources()
    return int(res.get("CPU", 0)), float(res.get("GPU", 0))


def largest_node() -> tuple:
    """(bytes, 'node ADDR') of the alive Ray node with the most memory for tasks and actors."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    best = max(nodes, key=lambda n: n.get("Resources", {}).get("memory", 0), default=None)
    if best is None:
        return (0, "no alive node")
    return (int(best["Resources"].get("memory", 0)), f"node {best.get('NodeManagerAddress', '?')}")


def resolve_workers(cfg: RayJobConfig, gpu_job: bool, spare_cpus: int = 0) -> tuple:
    """(gpus_per_worker, workers) on the connected cluster. gpu_job: the actors take a GPU each
    unless --gpus-per-worker says otherwise; spare_cpus: CPUs the job needs besides one per
    actor (GPU jobs' read tasks). ConfigError names the option the cluster cannot satisfy."""
    cpus, gpus = cluster_resources()
    per = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if gpu_job else 0.0)
    if per and gpus < per:
        raise ConfigError(f"--gpus-per-worker {per:g} but the Ray cluster has {gpus:g} GPUs")
    workers = cfg.workers or (int(gpus // per) if per else max(1, cpus))
    need = workers + (spare_cpus if per else 0)
    if need > cpus:
        raise ConfigError(f"--workers {workers} needs {need} CPUs; the Ray cluster has {cpus}")
    if per and workers * per > gpus:
        raise ConfigError(f"--workers {workers} x --gpus-per-worker {per:g} needs {workers * per:g} GPUs; "
                          f"the Ray cluster has {gpus:g}")
    return per, workers


def quiet_data_context() -> None:
    """Our own progress bar and summary replace Ray Data's."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False


@contextmanager
def batches(ds, **kwargs):
    """`ds.iter_batches(**kwargs)`, closed when the block ends, by an exception too (SIGTERM, a
    failure): Ray Data's own `finally` then shuts its executor down in this thread, while Ray is
    still up. Left to the garbage collector, a background prefetch thread could finalize it after
    ray.shutdown, printing tracebacks (and starting a new local Ray) after our one-line error."""
    it = iter(ds.iter_batches(**kwargs))
    try:
        yield it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def worker_env(*paths) -> dict:
    """Ray remote args that give a job's workers the driver's storage settings (the AWS and GCS
    variables and --storage-options, nextdetail.storage.FORWARDED_ENV) when one of `paths` is a
    URL: a worker on another node, or one started before the variables were set, reaches the same
    bucket with the same credentials. Nothing for local paths (a runtime_env costs a worker start)."""
    from ..storage import FORWARDED_ENV, is_url

    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if not env or not any(is_url(p) for p in paths):
        return {}
    return {"runtime_env": {"env_vars": env}}


@contextmanager
def job_failures(job: str, output: str, progress=None, needs: Callable[[], str] = lambda: ""):
    """Around a Ray Data run: bad input and refusals (StoreError, ConfigError) pass through;
    any other failure, which Ray wraps in its own exception types, becomes one JobError line:
    the real cause dug out of the wrappers (a full disk with its path and the space still
    needed, `needs()`, a permission, a worker out of memory) and that the output is resumable.
    The progress bar is closed either way."""
    try:
        yield
    except (StoreError, ConfigError):
        raise
    except Exception as e:
        if as_os_error(e) is not None:
            raise JobError(f"the {job} stopped: {cause_line(e, needs())}; the {output} is resumable") from e
        raise JobError(f"the {job} failed; the {output} is resumable, rerun the same command "
                       f"({cause_line(e)})") from e
    finally:
        if progress:
            progress.close()
