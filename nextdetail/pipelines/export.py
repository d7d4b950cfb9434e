"""The token export job: a decomposition store + a tokenizer -> a token store.

    plan    : rows = the store's ok images in store order, cut into blocks of block_rows (export_plan.py)
    prepare : create TOKENS/_parts (with plan.json), or check a rerun against it and skip the
              blocks whose part file is complete
    encode  : from_items(blocks) -> map_batches(EncodeWorker, ActorPoolStrategy): one tokenizer
              per actor, one part file per block (nextdetail.pipelines.encode_worker)
    finish  : parts -> tokens.bin (or shards/), index.parquet, then meta.json (the complete
              mark), then the journal is dropped (nextdetail.stores.tokens_writer)

Resume works from the folder alone: a part exists only once complete (atomic rename), so a
killed run loses at most the blocks in flight. The token store format is documented in
nextdetail.stores.tokens.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ..errors import JobError
from ..limits import human
from ..pretrained import model_source
from ..storage import absolute
from ..stores.tokens import META
from ..stores.tokens_writer import TOKEN_STORE
from .attempts import crash_hook
from .encode_worker import EncodeWorker, read_block
from .export_plan import ExportConfig, ExportPlan, done_blocks, failed_blocks, finish, make_plan, memory_needs, prepare
from .ray_job import (Progress, RayJobReport, batches, cluster_resources, job_failures, largest_node,
                      quiet_data_context, ray_session, resolve_workers, worker_env)

log = logging.getLogger(__name__)


@dataclass
class ExportReport(RayJobReport):
    """What an export-tokens run did (processed: rows encoded by this run)."""

    out: str = ""
    rows: int = 0                  # N in the token store
    tokens_per_row: int = 0        # L
    blocks: int = 0
    failed: List[dict] = field(default_factory=list)   # blocks given up on: {block, lo, hi, reason}

    def summary(self) -> str:
        skipped = f" ({self.skipped} already done)" if self.skipped else ""
        failed = ""
        if self.failed:
            f = self.failed[0]
            failed = (f"; {len(self.failed)} blocks FAILED (e.g. block {f['block']}, rows {f['lo']}..{f['hi'] - 1}: "
                      f"{f['reason']}): token store NOT finished, the rest is kept; fix and rerun")
        return (f"{self.rows} images x {self.tokens_per_row} tokens in {self.blocks} blocks{skipped}; "
                f"{self.timing('encoded')}; token store {self.out}{failed}")


# ----------------------------------------------------------------------------- the job

def _dataset(plan: ExportPlan, gpus: float, workers: int, read_tasks: bool):
    import ray.data

    quiet_data_context()
    items = [{"block": b, "lo": lo, "hi": hi} for b, lo, hi in plan.todo]
    # Workers on other nodes (or started before the variables were set) reach the same bucket;
    # a tokenizer given as a URL is fetched by each worker from the URL of its exact checkpoint.
    env = worker_env(plan.cfg.out, plan.store.path, plan.cfg.tokenizer)
    checkpoint = model_source(plan.checkpoint)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    if read_tasks:
        # GPU actors should not spend their time decoding Zarr: CPU tasks read ahead of them
        # (as decompose-dataset's read tasks feed its GPU actors). On CPU actors the actor reads
        # its own blocks: a separate stage would only compete with it for the CPUs.
        ds = ds.map_batches(read_block, batch_size=1, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"store": absolute(plan.store.path),
                                       "size": int(plan.tokenizer_config["image_size"])}, **env)
    return ds.map_batches(
        EncodeWorker, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
        num_cpus=1, num_gpus=gpus or None, **env,
        fn_constructor_kwargs={"store": absolute(plan.store.path), "checkpoint": checkpoint,
                               "out": absolute(plan.cfg.out), "batch_size": plan.cfg.batch_size,
                               "max_attempts": plan.cfg.max_attempts, "crash_on": crash_hook()})


def run_export(cfg: ExportConfig, progress: Optional[Progress] = None, *,
               read_tasks: Optional[bool] = None) -> ExportReport:
    """Export every ok image of cfg.data not yet in cfg.out. Raises StoreError / ConfigError (bad
    input, refused folder) or JobError (Ray or I/O failure; a rerun resumes).

    read_tasks: feed the actors from CPU read tasks; default when the actors have GPUs (True
    on the CPU runs the GPU path's plan with CPU actors: how it is tested without a GPU)."""
    plan = make_plan(cfg)
    if cfg.address is None:             # a cluster's nodes are known once connected
        cfg.check_memory(memory_needs(plan), cfg.local_workers())
    with TOKEN_STORE.lock(cfg.out):
        return _run_export(cfg, plan, progress, read_tasks)


def _run_export(cfg: ExportConfig, plan: ExportPlan, progress: Optional[Progress], read_tasks: Optional[bool]):
    t_begin = time.perf_counter()
    report = ExportReport(out=str(cfg.out), rows=plan.N, tokens_per_row=plan.L, blocks=len(plan.blocks))
    report.skipped = prepare(plan)
    if not plan.todo and (cfg.out / META).is_file():
        report.seconds = time.perf_counter() - t_begin
        return report
    with ray_session(cfg, "token store", report, needed=bool(plan.todo)) as t_connected:
        if plan.todo:
            gpus, workers = resolve_workers(cfg, gpu_job=cluster_resources()[1] >= 1, spare_cpus=1)
            if cfg.address is not None:
                cfg.check_memory(memory_needs(plan), workers, node=largest_node())
            report.workers = workers = min(workers, len(plan.todo))
            report.device = "gpu" if gpus else "cpu"
            if read_tasks is None:
                read_tasks = bool(gpus)
            if progress:
                progress.start(sum(hi - lo for _, lo, hi in plan.todo), report.skipped)
            t_first = None
            def needs() -> str:         # the space a full disk still has to find: uint16 tokens
                left = max(0, sum(hi - lo for _, lo, hi in plan.todo) - report.processed)
                return f"about {human(2 * left * plan.L)} more for {left} images"

            with job_failures("export", "token store", progress, needs):
                with batches(_dataset(plan, gpus, workers, read_tasks), batch_size=None,
                             batch_format="numpy") as results:
                    for batch in results:
                        plan.saw(batch)
                        rows = int(np.sum(batch["rows"]))
                        report.processed += int(np.sum(np.asarray(batch["rows"])[~np.asarray(batch["failed"], bool)]))
                        if t_first is None:
                            t_first = time.time() - float(np.max(batch["seconds"]))
                        if progress:
                            progress.update(rows)
            report.timed(t_connected, t_first, time.time())
        report.failed = failed_blocks(plan)
        if report.failed:
            report.seconds = time.perf_counter() - t_begin
            return report
        done = done_blocks(cfg.out, plan)
        missing = [b for b in plan.blocks if b[0] not in done]
        if missing:
            raise JobError(f"{len(missing)} blocks have no part file after the run (e.g. block {missing[0][0]}); "
                           f"rerun the same command")
        finish(plan)
    report.seconds = time.perf_counter() - t_begin
    return report


def export_in_process(cfg: ExportConfig) -> ExportReport:
    """The same export without Ray: one EncodeWorker in this process (small stores, tests)."""
    plan = make_plan(cfg)
    cfg.check_memory(memory_needs(plan), 1)
    with TOKEN_STORE.lock(cfg.out):
        return _export_in_process(cfg, plan)


def _export_in_process(cfg: ExportConfig, plan: ExportPlan) -> ExportReport:
    t0 = time.perf_counter()
    report = ExportReport(out=str(cfg.out), rows=plan.N, tokens_per_row=plan.L, blocks=len(plan.blocks),
                          device="cpu", workers=1)
    report.skipped = prepare(plan)
    if plan.todo:
        import torch

        threads = torch.get_num_threads()       # the worker pins 1 thread; give the caller its own back
        try:
            worker = EncodeWorker(str(plan.store.path), str(plan.checkpoint), str(cfg.out), cfg.batch_size,
                                  cfg.max_attempts)
            t1 = time.perf_counter()
            for b, lo, hi in plan.todo:
                done = worker({"block": [b], "lo": [lo], "hi": [hi]})
                plan.saw(done)
                report.processed += 0 if done["failed"][0] else hi - lo
            report.processing_seconds = time.perf_counter() - t1
        finally:
            torch.set_num_threads(threads)
    report.failed = failed_blocks(plan)
    if not report.failed and (plan.todo or not (cfg.out / META).is_file()):
        finish(plan)
    report.seconds = time.perf_counter() - t0
    return report
