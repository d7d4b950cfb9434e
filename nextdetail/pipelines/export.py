"""The token export job: a decomposition store + a tokenizer -> a token store.

    plan    : rows = the store's ok images in store order, cut into blocks of block_rows
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

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..errors import ConfigError, JobError
from ..limits import Need, human
from ..options import check_int, opt
from ..stores import PARTS, write_bytes_atomic
from ..stores.decomposition import DecompositionStore, StoreError
from ..stores.lock import folder_lock
from ..stores.tokens import DTYPE, INDEX, MAX_VOCAB, META, SHARDS, TOKENS, file_sha256, map_offsets, shard_name
from ..stores.tokens_writer import finish_token_store
from .attempts import ATTEMPTS, crash_hook
from .config import RayJobConfig
from .encode_worker import EncodeWorker, failed_path, part_path, read_block
from .ray_job import (Progress, RayJobReport, cluster_resources, job_failures, largest_node, quiet_data_context,
                      ray_session, resolve_workers)

log = logging.getLogger(__name__)

PLAN = "plan.json"
ENTRIES = (TOKENS, INDEX, META, PARTS, SHARDS)       # the only names --overwrite removes


@dataclass(frozen=True, kw_only=True)
class ExportConfig(RayJobConfig):
    """Settings of `nextdetail export-tokens` (and the RayJobConfig ones). A block given up on
    after max_attempts worker deaths leaves the token store unfinished (exit status 1)."""

    data: Path = opt(help="decomposition store (its ok images are exported, in store order)", metavar="STORE")
    tokenizer: Path = opt(help="tokenizer run folder (latest checkpoint) or checkpoint file", metavar="RUN")
    out: Path = opt(help="token store folder", metavar="TOKENS")
    batch_size: int = opt(32, "images read and encoded per step; the tokens do not depend on it "
                              "(the encoder runs fixed micro-batches, see Tokenizer.encode)", metavar="B", ge=1)
    block_rows: int = opt(512, "images per part file, the unit of work and of resume", metavar="R", ge=1)
    shard_rows: Optional[int] = opt(None, "keep fixed-size shard files of R rows instead of one tokens.bin "
                                          "(multi-node friendly, no final copy)", metavar="R", ge=1)

    def __post_init__(self):
        super().__post_init__()
        for name in ("data", "tokenizer", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        check_int("batch_size", self.batch_size)
        check_int("block_rows", self.block_rows)
        check_int("shard_rows", self.shard_rows, optional=True)

    @property
    def rows_per_block(self) -> int:
        return int(self.shard_rows or self.block_rows)


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


# ----------------------------------------------------------------------------- plan

@dataclass
class ExportPlan:
    cfg: ExportConfig
    checkpoint: Path
    sha256: str
    store: DecompositionStore
    tokenizer_config: dict
    map_shapes: List[List[int]]
    vocab: int
    num_base: int
    order: int
    blocks: List[tuple] = field(default_factory=list)     # (block, lo, hi)
    todo: List[tuple] = field(default_factory=list)
    numerics: set = field(default_factory=set)            # JSON of each encoder set-up seen

    def saw(self, batch) -> None:
        """Note the encoder set-ups (device, threads, micro-batch...) that encoded a batch;
        StoreError when a worker met a damaged input store."""
        for bad in batch["bad_input"]:
            if bad:
                raise StoreError(*json.loads(str(bad)))
        self.numerics.update(str(v) for v in batch["numerics"])

    @property
    def N(self) -> int:
        return len(self.store)

    @property
    def L(self) -> int:
        return int(map_offsets(self.map_shapes)[-1])

    def key(self) -> dict:
        """What decides the bytes of the export: a rerun must match it to reuse parts. O(1) in N:
        the rows' store indices enter as a digest (they are listed in index.parquet), so
        meta.json, which every rank and loader worker parses, stays a few KB at any N."""
        return {"tokenizer_sha256": self.sha256, "store": str(self.store.path.resolve()),
                "store_indices_sha256": indices_digest(self.store.ok_indices), "N": self.N, "L": self.L,
                "rows_per_block": self.cfg.rows_per_block, "sharded": self.cfg.shard_rows is not None}


def indices_digest(indices) -> str:
    """sha256 of store indices as little-endian int64."""
    import hashlib

    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def _plan_of(old):
    """A recorded plan in today's form: before 0.2 it listed every store index."""
    if isinstance(old, dict) and "store_indices" in old:
        old = dict(old)
        old["store_indices_sha256"] = indices_digest(old.pop("store_indices"))
    return old


def make_plan(cfg: ExportConfig) -> ExportPlan:
    """Read the store's manifest and the tokenizer's config (not its weights); check they fit."""
    from ..runs import RunError, latest_checkpoint
    from ..tokenize import CheckpointError
    from ..tokenize.tokenizer import read_checkpoint
    from ..tokenize.loader import check_store_fits

    store = DecompositionStore(cfg.data)
    try:
        ckpt = latest_checkpoint(cfg.tokenizer)
        tcfg = read_checkpoint(ckpt)[1]
    except (RunError, CheckpointError) as e:
        raise ConfigError(f"--tokenizer {e}") from None
    if tcfg.quant.vocab > MAX_VOCAB:
        raise ConfigError(f"--tokenizer {ckpt}: a vocabulary of {tcfg.quant.vocab} does not fit the "
                          f"token store's uint16 (at most {MAX_VOCAB})")
    check_store_fits(store, tcfg, ConfigError, what=f"--tokenizer {ckpt}")
    schedule = tcfg.map_schedule()          # the quantizer's, from its config alone
    plan = ExportPlan(cfg=cfg, checkpoint=ckpt, sha256=file_sha256(ckpt), store=store,
                      tokenizer_config=tcfg.to_dict(), map_shapes=[[p, p] for p in schedule.sizes],
                      vocab=tcfg.quant.vocab, num_base=schedule.num_base, order=schedule.order)
    R = cfg.rows_per_block
    plan.blocks = [(b, lo, min(lo + R, plan.N)) for b, lo in enumerate(range(0, plan.N, R))]
    return plan


# ----------------------------------------------------------------------------- folder

def _block_done(out: Path, plan: ExportPlan, block: tuple) -> bool:
    b, lo, hi = block
    want = (hi - lo) * plan.L * DTYPE.itemsize
    for p in (part_path(out, b), out / shard_name(b)):
        if p.is_file() and p.stat().st_size == want:
            return True
    return False


def prepare(plan: ExportPlan) -> int:
    """Create or check TOKENS; set plan.todo. Returns rows already done (a finished store: N)."""
    out, cfg = plan.cfg.out, plan.cfg
    if out.exists() and not out.is_dir():
        raise StoreError(out, "exists and is not a folder; choose another --out")
    names = {n for n in os.listdir(out) if not n.startswith(".")} if out.is_dir() else set()    # the lock
    if names and not names & set(ENTRIES):
        raise StoreError(out, "exists and is not a token store; choose another --out "
                              "(--overwrite only ever replaces a token store)")
    if names and cfg.overwrite:
        log.info("%s: --overwrite: removing the existing token store", out)
        for name in ENTRIES:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        names = set()
    key = plan.key()
    if META in names:
        old = _plan_of(json.loads((out / META).read_text()).get("plan"))
        if old == key:
            plan.todo = []
            return plan.N
        raise StoreError(out, f"token store exported from {_differs(old, key)}; pass --overwrite to replace it")
    parts = out / PARTS
    if (parts / PLAN).is_file():
        old = _plan_of(json.loads((parts / PLAN).read_text()))
        if old != key:
            raise StoreError(out, f"unfinished export from {_differs(old, key)}; pass --overwrite to start over")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(parts / PLAN, json.dumps(key).encode())
    # Blocks given up on by an earlier run are tried again, with fresh attempt counts.
    for b, _, _ in plan.blocks:
        failed_path(out, b).unlink(missing_ok=True)
    shutil.rmtree(parts / ATTEMPTS, ignore_errors=True)
    plan.todo = [b for b in plan.blocks if not _block_done(out, plan, b)]
    return sum(hi - lo for b, lo, hi in plan.blocks) - sum(hi - lo for b, lo, hi in plan.todo)


def _differs(old, new) -> str:
    if not isinstance(old, dict):
        return "an unknown plan"
    names = {"tokenizer_sha256": "another tokenizer checkpoint", "store": "another decomposition store",
             "store_indices_sha256": "other images of the store", "rows_per_block": "another --block-rows/--shard-rows",
             "sharded": "another --shard-rows", "L": "another token layout", "N": "another number of images"}
    diffs = [names[k] for k in names if old.get(k) != new.get(k)]
    return ", ".join(diffs) or "another plan"


def failed_blocks(plan: ExportPlan) -> List[dict]:
    """The blocks this run gave up on (their worker died --max-attempts times), in order."""
    out = []
    for b, _, _ in plan.blocks:
        p = failed_path(plan.cfg.out, b)
        if p.is_file():
            out.append(json.loads(p.read_text()))
    return out


def finish(plan: ExportPlan) -> None:
    """Parts -> the token store's files, meta.json last, then drop the journal (stores.tokens_writer)."""
    out = plan.cfg.out
    finish_token_store(out, plan.store, [(b, hi - lo, part_path(out, b)) for b, lo, hi in plan.blocks],
                       shard_rows=plan.cfg.shard_rows, map_shapes=plan.map_shapes, vocab=plan.vocab,
                       num_base=plan.num_base, order=plan.order, checkpoint=plan.checkpoint, sha256=plan.sha256,
                       tokenizer_config=plan.tokenizer_config, plan=plan.key(), encode=plan.numerics)


# ----------------------------------------------------------------------------- the job

def _dataset(plan: ExportPlan, gpus: float, workers: int, read_tasks: bool):
    import ray.data

    quiet_data_context()
    items = [{"block": b, "lo": lo, "hi": hi} for b, lo, hi in plan.todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    if read_tasks:
        # GPU actors should not spend their time decoding Zarr: CPU tasks read ahead of them
        # (as decompose-dataset's read tasks feed its GPU actors). On CPU actors the actor reads
        # its own blocks: a separate stage would only compete with it for the CPUs.
        ds = ds.map_batches(read_block, batch_size=1, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"store": str(plan.store.path.resolve()),
                                       "size": int(plan.tokenizer_config["image_size"])})
    return ds.map_batches(
        EncodeWorker, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
        num_cpus=1, num_gpus=gpus or None,
        fn_constructor_kwargs={"store": str(plan.store.path.resolve()), "checkpoint": str(plan.checkpoint.resolve()),
                               "out": str(plan.cfg.out.resolve()), "batch_size": plan.cfg.batch_size,
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
    with folder_lock(cfg.out, "token store"):
        return _run_export(cfg, plan, progress, read_tasks)


def memory_needs(plan: ExportPlan) -> list:
    """What one actor holds: the tokenizer, its encoder's largest step, a batch of inputs."""
    from ..tokenize.config import TokenizerConfig
    from ..tokenize.memory import inference_needs
    from ..tokenize.tokenizer import encode_micro_batch

    tcfg, B = TokenizerConfig.from_dict(plan.tokenizer_config), plan.cfg.batch_size
    s = tcfg.image_size
    return inference_needs(tcfg, min(B, encode_micro_batch("cpu")), f"--batch-size {B}") + [
        Need(f"--batch-size {B}", f"{B} images and their bases as floats", B * (tcfg.needs_bases() + 1) * 3 * s * s * 4)]


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
                for batch in _dataset(plan, gpus, workers, read_tasks).iter_batches(batch_size=None,
                                                                                    batch_format="numpy"):
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
        missing = [b for b in plan.blocks if not _block_done(cfg.out, plan, b)]
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
    with folder_lock(cfg.out, "token store"):
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
