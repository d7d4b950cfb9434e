"""Training the next-detail transformer on a token store (never images).

    report = train(TransformerTrainConfig(tokens="TOKENS", tokenizer="RUN", out="RUN2", steps=1000))

Reads the token store (`TokenDataset`, one memmap gather per batch) and the tokenizer's quantizer
(codebook + phi convs, `inputs.load_quantizer`) to build the continuous inputs. Loss: cross
entropy over all L tokens; labels are replaced by the null class with probability `cond_drop`
(classifier-free guidance). AdamW, linear warmup then cosine decay to `min_lr` x lr, gradient
clipping. A fraction `val_fraction` of the samples (a fixed, seeded choice) is held out and
evaluated every `val_every` steps and at the end.

RUN2/ holds `ckpt-<step>.pt` (every `ckpt_every` steps and at the end; written atomically:
model, optimizer, step, sampler state, RNG state, configs, the tokenizer checkpoint's path and
sha256), `log.jsonl` (train records every step: lr, loss, acc, grad_norm, per-map loss and
accuracy, tokens/s; val records with "split": "val"), `loss.png` and `tb/` (TensorBoard curves
and samples; nextdetail.tblog, previews.py). `--resume` continues
from the latest checkpoint, bitwise equal to an uninterrupted run on the CPU: the batch order is
the sampler's state, the learning rate a function of the step, and the label dropout is drawn
from a generator seeded by (seed, step), so nothing depends on the process's history.

Multi-GPU / multi-node: launch with torchrun; RANK / WORLD_SIZE / LOCAL_RANK select the shard
(EpochSampler: every rank gets a fixed-size slice of the same global batch) and DDP averages
the gradients (gloo on the CPU, nccl on CUDA). Rank 0 writes the log and the checkpoints.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..limits import check_memory
from ..options import nested, opt, option_name
from ..precision import bf16_autocast
from ..pretrained import model_source
from ..run_mirror import local_folder
from ..storage import absolute, as_path
from ..runs import (PLOT, RunConfig, RunError, RunLog, RunReport, TrainError, checkpoint_differences, checkpoint_name,
                    load_resumed, preemptible, read_log, resume_from, run_training, running_mean,
                    save_checkpoint)
from ..distributed import Dist, all_reduce_sum, step_generator
from .inputs import load_quantizer, teacher_inputs
from .memory import training_needs
from .model import NextDetailTransformer, TransformerConfig, TransformerShape

log = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True)
class TransformerTrainConfig(RunConfig):
    """Settings of `nextdetail train`: the model's shape and its training."""

    tokens: str = opt(help="token store (nextdetail export-tokens)", metavar="TOKENS")
    tokenizer: str = opt(help="tokenizer run folder or checkpoint the tokens were exported with", metavar="RUN")
    out: str = opt(help="run folder of this training", metavar="RUN2")
    model: TransformerShape = nested(TransformerShape)
    batch_size: int = opt(32, "samples per step and process", ge=1)
    lr: float = opt(3e-4, "peak AdamW learning rate", gt=0)
    min_lr: float = opt(0.1, "cosine floor as a fraction of --lr", ge=0, le=1)
    warmup: int = opt(100, "linear warmup steps", ge=0)
    weight_decay: float = opt(0.05, "AdamW weight decay", ge=0)
    betas: Tuple[float, float] = (0.9, 0.95)
    grad_clip: float = opt(1.0, "max gradient norm; 0: off", ge=0)
    cond_drop: float = opt(0.1, "null-class probability (classifier-free guidance)", ge=0, lt=1)
    val_fraction: float = opt(0.05, "held-out samples", ge=0, lt=1)
    val_every: int = opt(500, "steps between validations", ge=1)
    val_batches: int = 20              # at most this many batches per validation
    compile: bool = opt(False, "torch.compile the model")

    # Fields a resumed run may change: where and how long it runs, how often it reports.
    RESUMABLE_CHANGES = ("out", "steps", "ckpt_every", "val_every", "val_batches", "device", "compile",
                         "tokens", "tokenizer") + RunConfig.CONTROL_FIELDS

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "betas", tuple(self.betas))
        for name in ("tokens", "tokenizer", "out"):      # plain str: checkpoints hold plain data only
            object.__setattr__(self, name, str(getattr(self, name)))
        flag = lambda name: option_name(TransformerTrainConfig, name) or name     # noqa: E731
        for name in ("batch_size", "val_every", "val_batches"):
            if getattr(self, name) < 1:
                raise TrainError(f"{flag(name)} {getattr(self, name)}: must be >= 1")
        for name in ("cond_drop", "val_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TrainError(f"{flag(name)} {getattr(self, name)}: must be in [0, 1)")
        if not 0.0 <= self.min_lr <= 1.0:
            raise TrainError(f"{flag('min_lr')} {self.min_lr}: must be in [0, 1] (a fraction of --lr)")
        if self.lr <= 0 or self.warmup < 0 or self.grad_clip < 0:
            raise TrainError(f"--lr {self.lr}, --warmup {self.warmup}, --grad-clip {self.grad_clip}: "
                             "need --lr > 0, --warmup >= 0, --grad-clip >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerTrainConfig":
        """From a checkpoint's config; checkpoints of 0.1.0 and early 0.2.0 builds kept the shape's fields as
        top-level keys."""
        shape = {f.name for f in fields(TransformerShape)}
        model = dict(d.get("model") or {k: v for k, v in d.items() if k in shape})
        known = {f.name for f in fields(cls)} - {"model"}
        return cls(**{k: v for k, v in d.items() if k in known}, model=TransformerShape(**model))

    def differences(self, other: "TransformerTrainConfig") -> List[str]:
        return checkpoint_differences(self, other, ignore=self.RESUMABLE_CHANGES)


def lr_at(cfg: TransformerTrainConfig, step: int) -> float:
    """Learning rate of step `step` (0-based): linear warmup, then cosine to min_lr * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def split_indices(n: int, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train, val) sample indices: a seeded random `fraction` of 0..n-1 is held out (at least one
    when fraction > 0 and n >= 2; never all)."""
    n_val = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    perm = np.random.default_rng((seed, 0x5EED)).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def label_dropout(labels_B: torch.Tensor, null: int, p: float, seed: int, step: int, rank: int) -> torch.Tensor:
    """Replace labels by the null class with probability p; the draw depends only on (seed, step)
    and the rank's slice of the global batch, so resume and DDP see the same mask."""
    if p <= 0:
        return labels_B
    B = labels_B.shape[0]
    g = step_generator(seed, step)
    drop = torch.rand(B * (rank + 1), generator=g)[rank * B:]
    return torch.where(drop.to(labels_B.device) < p, torch.full_like(labels_B, null), labels_B)


def map_stats(loss_BL: torch.Tensor, hit_BL: torch.Tensor, level_L: torch.Tensor, M: int) -> torch.Tensor:
    """(2, M) float64: [sum of loss, number of hits] per map (sums over batch and positions)."""
    out = torch.zeros(2, M, dtype=torch.float64, device=loss_BL.device)
    out[0].index_add_(0, level_L, loss_BL.detach().double().sum(0))
    out[1].index_add_(0, level_L, hit_BL.double().sum(0))
    return out


# ----------------------------------------------------------------------------- trainer

@dataclass
class TrainReport(RunReport):
    tokens: int = 0
    val: Optional[dict] = None
    trainer: Optional["Trainer"] = field(default=None, repr=False)    # the final state (tests, bench)

    def summary(self) -> str:
        tps = self.tokens / self.seconds if self.seconds > 0 else float("nan")
        last = (f"loss {self.last['loss']:.4f} acc {self.last['acc']:.3f}" if self.last else "no step run")
        val = f"; val loss {self.val['loss']:.4f} acc {self.val['acc']:.3f}" if self.val else ""
        return f"{self.timing(f', {tps:,.0f} tokens/s')}; last: {last}{val}; run {self.out}"


class Trainer:
    """The state of one training process; `train()` drives it. Split into `next_batch` (data)
    and `step` (inputs, forward, backward, update) so the benchmark can time them apart."""

    def __init__(self, cfg: TransformerTrainConfig, *, dist_: Optional[Dist] = None):
        from ..pretrained import ModelFolderError, model_sha256, resolve_model
        from ..stores.tokens import TokenDataset, TokenStoreError
        from ..tokenize import CheckpointError
        from .sampler import EpochSampler

        self.cfg = cfg
        self.dist = dist_ or Dist()
        self.out = local_folder(cfg.out)          # a URL's run: its local mirror (run_mirror)
        found = resume_from(self.out, cfg.resume)
        self.device = self.dist.device(cfg.device)
        try:
            self.ds = TokenDataset(cfg.tokens, tokenizer=cfg.tokenizer)
            self.tok_ckpt = resolve_model(cfg.tokenizer)       # a model folder, or a run's latest checkpoint
        except (TokenStoreError, RunError, ModelFolderError) as e:
            raise TrainError(str(e)) from None
        self.tok_sha = model_sha256(self.tok_ckpt)
        try:
            self.quantizer = load_quantizer(self.tok_ckpt).to(self.device)
        except (CheckpointError, ModelFolderError) as e:
            raise TrainError(str(e)) from None
        if self.quantizer.sizes and [tuple(s) for s in self.ds.map_shapes] != [(p, p) for p in self.quantizer.sizes]:
            raise TrainError(f"{cfg.tokens}: map shapes {self.ds.map_shapes} differ from the tokenizer's "
                             f"schedule {self.quantizer.sizes}")
        self.mcfg = TransformerConfig(vocab=self.ds.vocab, map_shapes=tuple(self.ds.map_shapes),
                                      cvae=self.quantizer.dim,
                                      num_classes=self.ds.num_classes, **asdict(cfg.model))
        check_memory(training_needs(self.mcfg, cfg.batch_size), device=str(self.device), max_memory=cfg.max_memory)
        torch.manual_seed(cfg.seed)
        self.model = NextDetailTransformer(self.mcfg).to(self.device)
        self.train_idx, self.val_idx = split_indices(len(self.ds), cfg.val_fraction, cfg.seed)
        d = self.dist
        self.sampler = EpochSampler(len(self.train_idx), cfg.batch_size, cfg.seed, d.rank, d.world)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "emb" not in n]
        other = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
        self.step_ = 0
        if found is not None:
            self._load(found)
        self.net = self.model
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # The only buffers (level index, mask) are constants: nothing to broadcast per step.
            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           broadcast_buffers=False)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.amp = bf16_autocast(self.device)
        self.level_L = self.model.level_L

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {"config": self.cfg.to_dict(), "model_config": self.mcfg.to_dict(),
                "model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step_,
                "sampler": self.sampler.state_dict(), "rng": {"torch": torch.get_rng_state()},
                "tokenizer": {"checkpoint": model_source(self.tok_ckpt), "sha256": self.tok_sha},
                "data": {"tokens": absolute(self.cfg.tokens), "num_base": self.ds.num_base,
                         "order": self.ds.order, "num_samples": len(self.ds),
                         "val_samples": len(self.val_idx),
                         "class_names": list(self.ds.meta.get("class_names") or [])}}

    def save(self) -> Path:
        path = self.out / checkpoint_name(self.step_)
        save_checkpoint(path, self.state())
        return path

    def _load(self, path: Path) -> None:
        ckpt = load_resumed(path, self.device, "`nextdetail train` checkpoint", TransformerTrainConfig.from_dict,
                            self.cfg)
        if ckpt["tokenizer"]["sha256"] != self.tok_sha:
            raise TrainError(f"{path}: trained with tokenizer {ckpt['tokenizer']['checkpoint']}, not {self.tok_ckpt}")
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])
        self.sampler.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.step_ = int(ckpt["step"])
        log.info("resuming %s from step %d", path, self.step_)

    # -- one step ------------------------------------------------------------------------------
    def next_batch(self):
        """(tokens_BL, labels_B) of this rank's next batch, on the device."""
        idx = self.train_idx[self.sampler.next_batch()]
        tokens_BL, labels_B = self.ds.get_batch(idx)
        nb = self.device.type == "cuda"
        return tokens_BL.to(self.device, non_blocking=nb), labels_B.to(self.device, non_blocking=nb)

    def losses(self, tokens_BL, labels_B, net=None):
        """Per-token cross entropy (B, L) and hits (B, L) under teacher forcing."""
        f_BLc = teacher_inputs(self.quantizer, self.ds.split_maps(tokens_BL))
        with self.amp:
            logits_BLV = (net or self.net)(labels_B, f_BLc)
        loss_BL = F.cross_entropy(logits_BLV.float().flatten(0, 1), tokens_BL.flatten(),
                                  reduction="none").view_as(tokens_BL)
        return loss_BL, logits_BLV.argmax(-1) == tokens_BL

    def step(self, tokens_BL, labels_B) -> dict:
        cfg, M = self.cfg, len(self.mcfg.map_shapes)
        lr = lr_at(cfg, self.step_)
        for g in self.opt.param_groups:
            g["lr"] = lr
        labels_B = label_dropout(labels_B, self.mcfg.num_classes, cfg.cond_drop, cfg.seed, self.step_,
                                 self.dist.rank)
        self.net.train()
        loss_BL, hit_BL = self.losses(tokens_BL, labels_B)
        loss = loss_BL.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0
                 else torch.zeros(()))
        self.opt.step()
        self.step_ += 1
        stats = all_reduce_sum(map_stats(loss_BL, hit_BL, self.level_L, M), self.dist)
        return self._record(stats, tokens_BL.shape[0] * self.dist.world,
                            {"step": self.step_, "split": "train", "lr": lr, "grad_norm": float(gnorm)})

    def _record(self, stats: torch.Tensor, samples: int, rec: dict) -> dict:
        counts = torch.tensor([h * w for h, w in self.mcfg.map_shapes], dtype=torch.float64) * samples
        s = stats.cpu()
        rec.update(loss=float(s[0].sum() / counts.sum()), acc=float(s[1].sum() / counts.sum()),
                   map_loss=[round(v, 5) for v in (s[0] / counts).tolist()],
                   map_acc=[round(v, 4) for v in (s[1] / counts).tolist()])
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"loss is {rec['loss']} at step {self.step_}")
        return rec

    @torch.no_grad()
    def validate(self) -> Optional[dict]:
        """Per-map loss and accuracy on the held-out samples (true labels), summed over ranks."""
        if not len(self.val_idx):
            return None
        from .sampler import EpochSampler

        M = len(self.mcfg.map_shapes)
        vs = EpochSampler(len(self.val_idx), self.cfg.batch_size, self.cfg.seed, self.dist.rank, self.dist.world)
        # The bare model: ranks may run one batch more or fewer here, so no DDP collectives.
        self.model.eval()
        stats = torch.zeros(2, M, dtype=torch.float64, device=self.device)
        n = torch.zeros((), dtype=torch.float64, device=self.device)
        for b, idx in enumerate(vs.iter_epoch(0)):
            if b >= self.cfg.val_batches:
                break
            tokens_BL, labels_B = self.ds.get_batch(self.val_idx[idx])
            tokens_BL, labels_B = tokens_BL.to(self.device), labels_B.to(self.device)
            loss_BL, hit_BL = self.losses(tokens_BL, labels_B, net=self.model)
            stats += map_stats(loss_BL, hit_BL, self.level_L, M)
            n += tokens_BL.shape[0]
        stats, n = all_reduce_sum(stats, self.dist), all_reduce_sum(n, self.dist)
        return self._record(stats, int(n), {"step": self.step_, "split": "val"})


# ----------------------------------------------------------------------------- log and plot

def plot_log(out: Path) -> Path:
    """loss.png: train loss (running mean over ~1/50 of the run) and validation loss against step."""
    from ..plots import line_plot

    recs = read_log(out)
    train_pts = [(r["step"], r["loss"]) for r in recs if r.get("split") == "train"]
    win = max(1, len(train_pts) // 50)
    series = {"train loss": ([x for x, _ in train_pts], running_mean([y for _, y in train_pts], win))}
    val = [(r["step"], r["loss"]) for r in recs if r.get("split") == "val"]
    if val:
        series["val loss"] = ([x for x, _ in val], [y for _, y in val])
    title = f"next-detail transformer: {out.name}" + (f" (train: running mean of {win})" if win > 1 else "")
    return line_plot(series, out / PLOT, title=title, xlabel="step", ylabel="cross entropy", log_y=True)


# ----------------------------------------------------------------------------- loop

def train(cfg: TransformerTrainConfig, *, progress: Optional[Callable[[int, int, dict], None]] = None) -> TrainReport:
    """Train (or, with cfg.resume, resume) into cfg.out; `progress(step, steps, record)` after
    every step (rank 0). Under torchrun, every rank runs this."""
    return run_training(cfg, lambda d: _train(cfg, d, progress))


def _train(cfg: TransformerTrainConfig, d: Dist, progress) -> TrainReport:
    from ..previews import Samples
    from ..tblog import perf_scalars

    tr = Trainer(cfg, dist_=d)
    start, t0, tokens, rec, val = tr.step_, time.perf_counter(), 0, {}, None
    run_log = RunLog(tr.out, start, main=d.main, log=cfg.log, config=cfg.to_dict())
    samples = Samples(tr, cfg.log_images)
    try:
        with preemptible(cfg.term_grace):
            while tr.step_ < cfg.steps:
                ts = time.perf_counter()
                batch = tr.next_batch()
                rec = tr.step(*batch)
                n_tok = batch[0].numel() * d.world
                tokens += n_tok
                rec["tokens_per_s"] = round(n_tok / max(time.perf_counter() - ts, 1e-9), 1)
                # the curves' images/s and CUDA memory; tokens/s is the record's own
                perf = perf_scalars(tr.device, time.perf_counter() - ts, batch[0].shape[0] * d.world)
                step = tr.step_
                if step % cfg.val_every == 0 or step == cfg.steps:
                    val = tr.validate()
                run_log.write(rec, *([val] if val is not None and val["step"] == step else []), perf=perf)
                run_log.end_step(step, cfg.steps, cfg.ckpt_every, tr.save, plot_log, images=samples)
                if progress is not None and d.main:
                    progress(step, cfg.steps, rec)
                run_log.stop_if_terminated(step, tr.save, plot_log, d, tr.device)
    finally:
        run_log.close(plot_log)
    return TrainReport(out=as_path(cfg.out), start_step=start, steps=tr.step_, seconds=time.perf_counter() - t0, last=rec,
                       tokens=tokens, val=val, trainer=tr)
