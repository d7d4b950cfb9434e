"""Training the tokenizer on a decomposition store with the compound loss
L = L2 + VQ/commitment + lambda_p LPIPS + lambda_G hinge-GAN (PatchGAN, from `disc_start`).

    report = train(TokenizerTrainConfig(data="STORE", out="RUN", tokenizer=config_for("basedetail")))

RUN/ holds `ckpt-<step>.pt` (every `ckpt_every` steps and at the end: model, discriminator,
both AdamW states, step, both configs, RNG states), `log.jsonl` (one record per step) and
`loss.png`. `resume=True` continues from the latest checkpoint and gives bitwise the same
weights on the CPU as an uninterrupted run: all randomness (batch choice, crop offsets,
dead-code restarts) comes from RNG states stored in the checkpoint.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..options import check_int, differences, nested, opt
from ..runs import (PLOT, RunConfig, RunLog, RunReport, TrainError, checkpoint_name, load_resumed, read_log,
                    resume_from, running_mean, save_checkpoint)
from ..stores.decomposition import DecompositionStore, StoreError
from ..stores.layers import crop_layers, split_layers
from .config import TokenizerConfig
from .losses import PatchDiscriminator, build_lpips, hinge_d_loss, hinge_g_loss
from .tokenizer import Tokenizer, to_model

log = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True)
class TokenizerTrainConfig(RunConfig):
    """Settings of `nextdetail train-tokenizer`: the tokenizer (nested) and its training."""

    data: str = opt(help="decomposition store", metavar="STORE")
    out: str = opt(help="run folder", metavar="RUN")
    tokenizer: TokenizerConfig = nested(TokenizerConfig)
    batch_size: int = opt(8, "images per step")
    lr: float = opt(1e-4, "AdamW learning rate (generator and discriminator)")
    betas: tuple = (0.5, 0.9)
    weight_decay: float = opt(1e-4, "AdamW weight decay")
    lpips_weight: float = opt(1.0, "LPIPS weight; 0 switches LPIPS off")
    lpips_net: str = opt("alex", "LPIPS backbone", choices=("alex", "vgg", "squeeze"))
    lpips_backbone: str = opt("pretrained", "random LPIPS backbone instead of the pretrained weights from "
                                            "the torch hub cache (offline tests; warns)",
                              flag="--lpips-random-backbone", action="store_const", const="random")
    disc_weight: float = opt(0.1, "PatchGAN loss weight")
    disc_start: int = opt(2000, "step from which the discriminator trains, and its loss counts")
    disc_ch: int = opt(64, "PatchGAN width")
    adaptive_gan: bool = opt(False, "scale the GAN loss by |grad rec| / |grad G| at the decoder's last layer "
                                    "(VQGAN)", flag="--adaptive-gan-weight")
    ema: float = opt(0.0, "keep an EMA of the weights with this decay (e.g. 0.999); 0: off", metavar="DECAY")

    def __post_init__(self):
        super().__post_init__()
        # Paths as str: the config is saved in checkpoints, which hold plain data only.
        for name in ("data", "out"):
            object.__setattr__(self, name, str(getattr(self, name)))
        object.__setattr__(self, "betas", tuple(self.betas))
        check_int("batch_size", self.batch_size)
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"--ema {self.ema}: must be in [0, 1)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokenizer"] = self.tokenizer.to_dict()
        return d

    # Fields a resumed run may change: where it writes and how long it goes on.
    RESUMABLE_CHANGES = ("steps", "out", "ckpt_every")

    def differences(self, other: "TokenizerTrainConfig") -> List[str]:
        """The tokenizer's differences first, named as in its own config ('quant.vocab ...')."""
        return (self.tokenizer.differences(other.tokenizer)
                + differences(self, other, ignore=self.RESUMABLE_CHANGES + ("tokenizer",)))


@dataclass
class TrainReport(RunReport):
    def summary(self) -> str:
        losses = " ".join(f"{k}={self.last[k]:.4g}" for k in ("loss", "l2", "vq", "lpips", "g", "d")
                          if k in self.last)
        return (f"{self.timing()}; last: {losses}; perplexity {self.last.get('perplexity', 0):.1f}; "
                f"run {self.out}")


# ----------------------------------------------------------------------------- data

class StoreBatches:
    """Random crops of a decomposition store as (image, [B_1..B_n]), float32 (B, 3, s, s) in [0, 1].

    The store's layers are [B_N, D_N, ..., D_1] (N = store order), so their running sums are
    B_N, B_(N-1), ..., B_0 = I. Batches are drawn with a private torch.Generator whose state
    goes into the checkpoint."""

    def __init__(self, path, crop: int, needs_bases: int, seed: int):
        try:
            self.store = DecompositionStore(path)
        except StoreError as e:
            raise TrainError(str(e)) from None
        if len(self.store) == 0:
            raise TrainError(f"{path}: the store has no ok images")
        if self.store.order < needs_bases:
            raise TrainError(f"{path}: store of order {self.store.order} has bases B_1..B_{self.store.order}; "
                             f"the base-detail tokenizer needs order >= {needs_bases} "
                             f"(decompose-dataset --order {needs_bases})")
        if self.store.size < crop:
            raise TrainError(f"{path}: store images are {self.store.size} px, smaller than the "
                             f"{crop} px training crop (image_size)")
        self.crop, self.n = crop, needs_bases
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, batch_size: int):
        idx = torch.randint(len(self.store), (batch_size,), generator=self.gen).tolist()
        span = self.store.size - self.crop + 1
        off = torch.randint(span, (batch_size, 2), generator=self.gen).tolist()
        c = self.crop
        layers = torch.stack([torch.from_numpy(crop_layers(self.store.layers(i), y, x, c).astype("float32"))
                              for i, (y, x) in zip(idx, off)])
        return split_layers(layers, self.n)


def plot_log(out: Path) -> Path:
    """loss.png: the log's losses against step, each a running mean over ~1/50 of the run
    (per-step values of a batch of a few crops are too noisy to read)."""
    from ..plots import line_plot

    recs = read_log(out)
    win = max(1, len(recs) // 50)
    series = {}
    for k in ("loss", "l2", "vq", "lpips"):                     # g and d are signed: no log axis
        pts = [(r["step"], r[k]) for r in recs if k in r]
        if pts:
            series[k] = ([x for x, _ in pts], running_mean([y for _, y in pts], win))
    title = f"tokenizer training: {out.name}" + (f" (running mean of {win} steps)" if win > 1 else "")
    return line_plot(series, out / PLOT, title=title, xlabel="step", ylabel="loss", log_y=True)


# ----------------------------------------------------------------------------- loop

class TokenizerTrainer:
    """The state of one tokenizer training: models, optimizers, EMA weights, the batch stream
    and the step counter; `step()` trains one batch, `save()` writes a checkpoint; `train()`
    drives it. Resume restores all of it, so a resumed run equals an uninterrupted one bitwise
    on the CPU."""

    def __init__(self, cfg: TokenizerTrainConfig, *, resume: bool = False, batches=None):
        """batches: where the (image, bases) batches come from; default the store's random crops
        (StoreBatches). Anything with next(batch_size) and a torch.Generator `gen` will do (the
        GPU check trains on synthetic batches, where no store can be read)."""
        self.cfg, self.out = cfg, Path(cfg.out)
        found = resume_from(self.out, resume)
        self.device = torch.device(cfg.device)
        cfg.tokenizer.validate()
        self.batches = batches or StoreBatches(cfg.data, cfg.tokenizer.image_size, cfg.tokenizer.needs_bases(),
                                               cfg.seed)
        torch.manual_seed(cfg.seed)
        self.tok = Tokenizer(cfg.tokenizer).to(self.device)   # weights from the seeded RNG
        self.disc = PatchDiscriminator(cfg.disc_ch).to(self.device)
        self.lpips = (build_lpips(cfg.lpips_net, cfg.lpips_backbone).to(self.device)
                      if cfg.lpips_weight > 0 else None)
        self.opt = torch.optim.AdamW(self.tok.parameters(), lr=cfg.lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay)
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr, betas=cfg.betas,
                                       weight_decay=cfg.weight_decay)
        # EMA weights: theta_ema <- ema * theta_ema + (1 - ema) * theta after every step; integer
        # buffers (codebook counters) are copied. Saved as "model_ema"; from_checkpoint prefers them.
        self.ema = {k: v.detach().clone() for k, v in self.tok.state_dict().items()} if cfg.ema > 0 else None
        self.step_ = 0
        if found is not None:
            self._load(found)
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        self.tok.train()

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        state = {"config": self.cfg.to_dict(), "model": self.tok.state_dict(), "disc": self.disc.state_dict(),
                 "opt": self.opt.state_dict(), "opt_d": self.opt_d.state_dict(), "step": self.step_,
                 "rng": {"torch": torch.get_rng_state(), "data": self.batches.gen.get_state()}}
        if self.ema is not None:
            state["model_ema"] = self.ema
        return state

    def save(self) -> Path:
        path = self.out / checkpoint_name(self.step_)
        save_checkpoint(path, self.state())
        return path

    def _load(self, path: Path) -> None:
        def saved_config(d: dict) -> TokenizerTrainConfig:
            return TokenizerTrainConfig(**{**d, "tokenizer": TokenizerConfig.from_dict(d["tokenizer"]),
                                           "betas": tuple(d["betas"])})

        ckpt = load_resumed(path, self.device, "train-tokenizer checkpoint", saved_config, self.cfg)
        self.tok.load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema = {k: v.to(self.device) for k, v in ckpt["model_ema"].items()}
        self.disc.load_state_dict(ckpt["disc"])
        self.opt.load_state_dict(ckpt["opt"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.batches.gen.set_state(ckpt["rng"]["data"])
        self.step_ = ckpt["step"]

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> dict:
        """Train one batch: the generator (L2 + VQ + LPIPS, + GAN from disc_start), the codebook's
        dead-code restarts, the EMA, then the discriminator. Returns the step's log record."""
        cfg, tok, disc = self.cfg, self.tok, self.disc
        image, bases = self.batches.next(cfg.batch_size)
        image, bases = image.to(self.device), [b.to(self.device) for b in bases]
        x = to_model(image)
        gan = self.step_ >= cfg.disc_start
        with self.amp:
            o = tok(image, bases)
            l2 = F.mse_loss(o.x_hat.float(), x)
            recon = l2
            rec = {"step": self.step_ + 1, "l2": l2.item(), "vq": o.q.vq_loss.item()}
            if self.lpips is not None:
                p = self.lpips(o.x_hat.float(), x).mean()
                recon = recon + cfg.lpips_weight * p
                rec["lpips"] = p.item()
            loss = recon + o.q.vq_loss
            if gan:
                for q in disc.parameters():
                    q.requires_grad_(False)      # the generator step does not train D
                g = hinge_g_loss(disc(o.x_hat))
                for q in disc.parameters():
                    q.requires_grad_(True)
                w = adaptive_weight(recon, g, tok.decoder.net[-1].weight) if cfg.adaptive_gan else 1.0
                loss = loss + cfg.disc_weight * w * g
                rec["g"], rec["gan_w"] = g.item(), cfg.disc_weight * float(w)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step_ + 1}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        rec["restarted"] = tok.quantizer.codebook.end_step()
        if self.ema is not None:
            with torch.no_grad():
                for k, v in tok.state_dict().items():
                    if v.is_floating_point():
                        self.ema[k].mul_(cfg.ema).add_(v, alpha=1.0 - cfg.ema)
                    else:
                        self.ema[k].copy_(v)
        if gan:
            with self.amp:
                d = hinge_d_loss(disc(x), disc(o.x_hat.detach()))
            self.opt_d.zero_grad(set_to_none=True)
            d.backward()
            self.opt_d.step()
            rec["d"] = d.item()
        rec["loss"] = loss.item()
        rec["perplexity"] = tok.quantizer.codebook.perplexity()
        self.step_ += 1
        return rec


def train(cfg: TokenizerTrainConfig, *, resume: bool = False,
          progress: Optional[Callable[[int, int, dict], None]] = None) -> TrainReport:
    """Train (or resume) into cfg.out; `progress(step, steps, record)` after every step."""
    tr = TokenizerTrainer(cfg, resume=resume)
    start, t0, rec = tr.step_, time.perf_counter(), {}
    run_log = RunLog(tr.out, start)
    try:
        while tr.step_ < cfg.steps:
            rec = tr.step()
            run_log.write(rec)
            run_log.end_step(tr.step_, cfg.steps, cfg.ckpt_every, tr.save, plot_log)
            if progress is not None:
                progress(tr.step_, cfg.steps, rec)
    finally:
        run_log.close(plot_log)
    return TrainReport(out=tr.out, start_step=start, steps=tr.step_, seconds=time.perf_counter() - t0, last=rec)


def adaptive_weight(recon, g, last_layer) -> torch.Tensor:
    """VQGAN's balance: the GAN gradient at the decoder's last layer scaled to the size of the
    reconstruction gradient there, so the GAN neither swamps nor vanishes (detached, <= 1e4)."""
    g_rec = torch.autograd.grad(recon, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()

