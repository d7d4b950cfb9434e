"""What an export-tokens run will do, decided before Ray starts, and the token store's journal.

    make_plan : rows = the store's ok images in store order, cut into blocks of block_rows; the
                tokenizer's config (not its weights) gives the token layout
    prepare   : create TOKENS/_parts with plan.json (ExportPlan.key(): what the bytes depend on),
                or check a rerun against it (nextdetail.stores.journal) and skip the blocks whose
                part file is complete
    finish    : parts -> tokens.bin (or shards/), index.parquet, then meta.json (the complete
                mark), then the journal is dropped (nextdetail.stores.tokens_writer)
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..errors import ConfigError
from ..limits import Need
from ..options import check_int, opt
from ..stores import PARTS
from ..stores.decomposition import DecompositionStore, StoreError
from ..stores.journal import differences, recorded
from ..stores.tokens import DTYPE, MAX_VOCAB, META, SHARDS, map_offsets, shard_name
from ..stores.tokens_writer import TOKEN_STORE, finish_token_store
from ..storage import absolute, as_path, sizes
from .attempts import journal_folder
from .config import RayJobConfig
from .encode_worker import failed_name, failed_path, part_name, part_path

log = logging.getLogger(__name__)

PLAN = "plan.json"
# What a difference in each key of ExportPlan.key() means, as a refusal says it.
PLAN_CHANGES = {"tokenizer_sha256": "another tokenizer checkpoint", "store": "another decomposition store",
                "store_indices_sha256": "other images of the store", "rows_per_block": "another --block-rows/--shard-rows",
                "sharded": "another --shard-rows", "L": "another token layout", "N": "another number of images"}


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
        for name in ("data", "tokenizer", "out"):         # a URL (s3://...) stays one (nextdetail.storage)
            object.__setattr__(self, name, as_path(getattr(self, name)))
        check_int("batch_size", self.batch_size)
        check_int("block_rows", self.block_rows)
        check_int("shard_rows", self.shard_rows, optional=True)

    @property
    def rows_per_block(self) -> int:
        return int(self.shard_rows or self.block_rows)


@dataclass
class ExportPlan:
    """What one `export-tokens` run does, worked out before Ray starts (`make_plan`): the rows,
    the tokenizer, the token layout and the blocks of work; `prepare` sets `todo`.

    Rows are the store's ok images in store order (row i is the i-th of store.ok_indices), cut
    into blocks of cfg.rows_per_block rows: the unit of work, of the part files and of resume.
    Only the tokenizer's config is read here, not its weights.

    Parameters
    ----------
    cfg : ExportConfig
        The command's settings (data, tokenizer, out, block_rows / shard_rows, Ray's).
    checkpoint : Path
        The tokenizer checkpoint exported with (the latest of --tokenizer RUN).
    sha256 : str
        That file's sha256, recorded in meta.json and checked by the trainer.
    store : DecompositionStore
        The input store, open.
    tokenizer_config : dict
        The checkpoint's TokenizerConfig.to_dict().
    map_shapes : list of [int, int], (M,)
        [p_k, p_k] of each token map, generation order (the quantizer's schedule).
    vocab : int
        V, at most MAX_VOCAB (tokens are stored as uint16).
    num_base, order : int
        B and n of the schedule, recorded in meta.json for training and generation.
    blocks : list of (block, lo, hi)
        Every block: rows lo..hi-1.
    todo : list of (block, lo, hi)
        The blocks without a complete part or shard file (set by `prepare`).
    numerics : set of str
        JSON of each encoder set-up (device, threads, micro-batch, ...) that encoded a batch
        (`saw`); more than one means the tokens mix set-ups (meta.json "encode").

    Attributes
    ----------
    N : int
        Rows: the store's ok images.
    L : int
        Tokens per row, sum_k h_k w_k.

    Examples
    --------
    ::

        plan = make_plan(ExportConfig(data=Path("STORE"), tokenizer=Path("RUN"), out=Path("TOKENS")))
        plan.N, plan.L, len(plan.blocks)      # rows, tokens per row, blocks of 512 rows
        done = prepare(plan)                  # rows already exported; plan.todo: what is left
        plan.key()                            # what a rerun must match to reuse the parts
    """

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
        return {"tokenizer_sha256": self.sha256, "store": absolute(self.store.path),
                "store_indices_sha256": indices_digest(self.store.ok_indices), "N": self.N, "L": self.L,
                "rows_per_block": self.cfg.rows_per_block, "sharded": self.cfg.shard_rows is not None}


def indices_digest(indices) -> str:
    """sha256 of store indices as little-endian int64."""
    import hashlib

    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def _plan_of(old) -> dict:
    """A recorded plan in today's form: plans of 0.1.0 and early 0.2.0 builds listed every store index."""
    if not isinstance(old, dict):
        return {}
    if "store_indices" in old:
        old = dict(old)
        old["store_indices_sha256"] = indices_digest(old.pop("store_indices"))
    return old


def make_plan(cfg: ExportConfig) -> ExportPlan:
    """Read the store's manifest and the tokenizer's config (not its weights); check they fit."""
    from ..pretrained import ModelFolderError, model_sha256
    from ..tokenize import CheckpointError
    from ..tokenize.loader import check_store_fits
    from ..tokenize.tokenizer import config_of, resolved

    store = DecompositionStore(cfg.data)
    try:
        ckpt = resolved(cfg.tokenizer)           # a model folder, or a run's latest checkpoint
        tcfg = config_of(ckpt)
    except (CheckpointError, ModelFolderError) as e:
        raise ConfigError(f"--tokenizer {e}") from None
    if tcfg.quant.vocab > MAX_VOCAB:
        raise ConfigError(f"--tokenizer {ckpt}: a vocabulary of {tcfg.quant.vocab} does not fit the "
                          f"token store's uint16 (at most {MAX_VOCAB})")
    check_store_fits(store, tcfg, ConfigError, what=f"--tokenizer {ckpt}")
    schedule = tcfg.map_schedule()          # the quantizer's, from its config alone
    plan = ExportPlan(cfg=cfg, checkpoint=ckpt, sha256=model_sha256(ckpt), store=store,
                      tokenizer_config=tcfg.to_dict(), map_shapes=[[p, p] for p in schedule.sizes],
                      vocab=tcfg.quant.vocab, num_base=schedule.num_base, order=schedule.order)
    R = cfg.rows_per_block
    plan.blocks = [(b, lo, min(lo + R, plan.N)) for b, lo in enumerate(range(0, plan.N, R))]
    return plan


# ----------------------------------------------------------------------------- folder

def done_blocks(out, plan: ExportPlan) -> set:
    """The blocks whose part or shard file is complete (of its full size), from one listing of
    _parts and one of shards/ (on object storage a request per 1,000 files, not two per block)."""
    parts, shards = sizes(as_path(out) / PARTS), sizes(as_path(out) / SHARDS)
    done = set()
    for b, lo, hi in plan.blocks:
        want = (hi - lo) * plan.L * DTYPE.itemsize
        if parts.get(part_name(b)) == want or shards.get(shard_name(b).rsplit("/", 1)[-1]) == want:
            done.add(b)
    return done


def prepare(plan: ExportPlan) -> int:
    """Create or check TOKENS; set plan.todo. Returns rows already done (a finished store: N)."""
    out, key = plan.cfg.out, plan.key()
    TOKEN_STORE.claim(out, overwrite=plan.cfg.overwrite)
    if (out / META).is_file():
        diffs = differences(_plan_of(json.loads((out / META).read_text()).get("plan")), key, names=PLAN_CHANGES)
        if not diffs:
            plan.todo = []
            return plan.N
        raise StoreError(out, f"token store exported from {', '.join(diffs)}; pass --overwrite to replace it")
    parts = out / PARTS
    diffs = differences(_plan_of(recorded(parts / PLAN, key) or key), key, names=PLAN_CHANGES)
    if diffs:
        raise StoreError(out, f"unfinished export from {', '.join(diffs)}; pass --overwrite to start over")
    # Blocks given up on by an earlier run are tried again, with fresh attempt counts.
    for name in sizes(parts):
        if name.endswith(".failed"):
            (parts / name).unlink()
    shutil.rmtree(journal_folder(parts), ignore_errors=True)
    done = done_blocks(out, plan)
    plan.todo = [b for b in plan.blocks if b[0] not in done]
    return sum(hi - lo for b, lo, hi in plan.blocks) - sum(hi - lo for b, lo, hi in plan.todo)


def failed_blocks(plan: ExportPlan) -> List[dict]:
    """The blocks this run gave up on (their worker died --max-attempts times), in order."""
    names = sizes(as_path(plan.cfg.out) / PARTS)
    return [json.loads(failed_path(plan.cfg.out, b).read_text()) for b, _, _ in plan.blocks
            if failed_name(b) in names]


def finish(plan: ExportPlan) -> None:
    """Parts -> the token store's files, meta.json last, then drop the journal (stores.tokens_writer)."""
    out = plan.cfg.out
    finish_token_store(out, plan.store, [(b, hi - lo, part_path(out, b)) for b, lo, hi in plan.blocks],
                       shard_rows=plan.cfg.shard_rows, map_shapes=plan.map_shapes, vocab=plan.vocab,
                       num_base=plan.num_base, order=plan.order, checkpoint=plan.checkpoint, sha256=plan.sha256,
                       tokenizer_config=plan.tokenizer_config, plan=plan.key(), encode=plan.numerics)


def memory_needs(plan: ExportPlan) -> list:
    """What one actor holds: the tokenizer, its encoder's largest step, a batch of inputs."""
    from ..tokenize.config import TokenizerConfig
    from ..tokenize.memory import inference_needs
    from ..tokenize.tokenizer import encode_micro_batch

    tcfg, B = TokenizerConfig.from_dict(plan.tokenizer_config), plan.cfg.batch_size
    s = tcfg.image_size
    return inference_needs(tcfg, min(B, encode_micro_batch("cpu")), f"--batch-size {B}") + [
        Need(f"--batch-size {B}", f"{B} images and their bases as floats", B * (tcfg.needs_bases() + 1) * 3 * s * s * 4)]
