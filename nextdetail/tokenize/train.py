"""Training the tokenizer on a decomposition store with the compound loss
L = L2 + VQ/commitment + lambda_p LPIPS + lambda_G hinge-GAN (from `disc_start`; a PatchGAN or
the StyleGAN2-style discriminator, optionally with the R1 penalty).

    report = train(TokenizerTrainConfig(data="STORE", out="RUN", tokenizer=config_for("basedetail")))

RUN/ holds `ckpt-<step>.pt` (every `ckpt_every` steps and at the end: model, discriminator,
both AdamW states, step, both configs, RNG states), `log.jsonl` (one record per step),
`loss.png` and `tb/` (TensorBoard curves and reconstructions; nextdetail.tblog, previews.py). `--resume` (cfg.resume) continues from the latest checkpoint and gives bitwise the same
weights on the CPU as an uninterrupted run: all randomness (batch choice, crop offsets,
dead-code restarts) comes from RNG states stored in the checkpoint.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from ..distributed import Dist, all_reduce_sum, step_generator
from ..limits import check_memory
from ..precision import bf16_autocast
from ..run_mirror import local_folder
from ..runs import (PLOT, RunLog, RunReport, TrainError, checkpoint_name, load_resumed, preemptible, read_log,
                    resume_from, run_training, running_mean, save_checkpoint)
from ..storage import as_path
from ..stores.decomposition import DecompositionStore, StoreError
from .bases import inputs_from_bases
from .config import TokenizerConfig
from .disc_stylegan import StyleGANDiscriminator, r1_penalty
from .loader import StoreLoader, check_store_fits, default_workers
from .losses import PatchDiscriminator, build_lpips, hinge_d_loss, hinge_g_loss
from .memory import training_needs
from .train_config import TokenizerTrainConfig, lpips_without
from .tokenizer import Tokenizer, to_model

log = logging.getLogger(__name__)


@dataclass
class TrainReport(RunReport):
    trainer: Optional["TokenizerTrainer"] = None

    def summary(self) -> str:
        losses = " ".join(f"{k}={self.last[k]:.4g}" for k in ("loss", "l2", "vq", "lpips", "g", "d")
                          if k in self.last)
        return (f"{self.timing()}; last: {losses}; perplexity {self.last.get('perplexity', 0):.1f}; "
                f"run {self.out}")


# ----------------------------------------------------------------------------- data

def open_training_store(path, tokenizer: TokenizerConfig) -> DecompositionStore:
    """The store to train on, refused in one line (TrainError) when it cannot serve: unreadable,
    no ok image, of another decomposition than the tokenizer's, too few bases for the tokenizer,
    images smaller than the crop."""
    try:
        store = DecompositionStore(path)
    except StoreError as e:
        raise TrainError(str(e)) from None
    if len(store) == 0:
        raise TrainError(f"{path}: the store has no ok images")
    check_store_fits(store, tokenizer, TrainError)
    return store


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


def discriminator(cfg: TokenizerTrainConfig) -> torch.nn.Module:
    if cfg.disc == "stylegan":
        return StyleGANDiscriminator(cfg.disc_ch, cfg.tokenizer.image_size, cfg.disc_mbstd_group)
    return PatchDiscriminator(cfg.disc_ch)


def check_training_memory(cfg: TokenizerTrainConfig, device: torch.device) -> None:
    """MemoryRefusal naming the option when a step cannot fit (nextdetail.tokenize.memory)."""
    s, workers = cfg.tokenizer.image_size, max(1, default_workers() if cfg.loader_workers < 0 else cfg.loader_workers)
    buffer = cfg.shuffle_buffer * (cfg.tokenizer.needs_bases() + 1) * 3 * s * s * workers
    needs = training_needs(cfg.tokenizer, cfg.batch_size, disc_factory=lambda: discriminator(cfg), ema=cfg.ema > 0,
                           buffer_bytes=buffer, buffer=cfg.shuffle_buffer,
                           gan=cfg.disc_start < cfg.steps)
    check_memory(needs, device=str(device), max_memory=cfg.max_memory)


# ----------------------------------------------------------------------------- loop

class TokenizerTrainer:
    """The state of one tokenizer training process: models, optimizers, EMA weights, the batch
    stream and the step counter; `step()` trains one batch, `save()` writes a checkpoint;
    `train()` drives it. Resume restores all of it, so a resumed run equals an uninterrupted one
    bitwise on the CPU.

    Under torchrun (d.world > 1) the tokenizer and the discriminator train under DDP (gradients
    averaged over the ranks), each rank reads its own lanes of the data stream (loader.py), and
    the codebook's bookkeeping is made global: usage counts summed over the ranks, dead codes
    restarted from the features of all ranks with one seeded draw, so every rank sets the same
    codes. The ranks stay identical, and equal one process with the ranks' batches together."""

    def __init__(self, cfg: TokenizerTrainConfig, *, batches=None,
                 dist_: Optional[Dist] = None):
        """batches: where the batches come from; default the store's stream (loader.StoreLoader).
        Anything with next() -> uint8 bases (B, n+1, 3, s, s), [q_0 .. q_n], and state_dict() /
        load_state_dict() will do (the GPU check trains on synthetic batches)."""
        self.cfg, self.out = cfg, local_folder(cfg.out)     # a URL's run: its local mirror
        self.dist = d = dist_ or Dist()
        found = resume_from(self.out, cfg.resume)
        self.device = d.device(cfg.device)
        cfg.tokenizer.validate()
        self.n_bases = cfg.tokenizer.needs_bases()
        if batches is None:
            store = open_training_store(cfg.data, cfg.tokenizer)
            check_training_memory(cfg, self.device)      # before the loader's processes start
            workers = default_workers(d.world) if cfg.loader_workers < 0 else cfg.loader_workers
            try:
                batches = StoreLoader(store, cfg.tokenizer.image_size, cfg.batch_size, seed=cfg.seed, rank=d.rank,
                                      world=d.world, lanes=cfg.loader_lanes or d.world, workers=workers,
                                      buffer=cfg.shuffle_buffer, pin=self.device.type == "cuda")
            except ValueError as e:
                raise TrainError(str(e)) from None
        self.batches = batches
        torch.manual_seed(cfg.seed)
        self.tok = Tokenizer(cfg.tokenizer).to(self.device)   # weights from the seeded RNG
        self.disc = discriminator(cfg).to(self.device)
        self.lpips = (build_lpips(cfg.lpips_net, cfg.lpips_backbone, no_download=cfg.offline,
                                  without=lpips_without()).to(self.device)
                      if cfg.lpips_weight > 0 else None)
        self.opt = torch.optim.AdamW(self.tok.parameters(), lr=cfg.lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay)
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr, betas=cfg.betas,
                                       weight_decay=cfg.weight_decay)
        # EMA weights: theta_ema <- ema * theta_ema + (1 - ema) * theta after every step; integer
        # buffers (codebook counters) are copied. Saved as "model_ema"; from_checkpoint prefers them.
        self.ema = {k: v.detach().clone() for k, v in self.tok.state_dict().items()} if cfg.ema > 0 else None
        self.step_ = 0
        self.restarted = 0            # dead codes restarted by this process's steps
        self._warned_usage = False
        if found is not None:
            self._load(found)
        self.amp = bf16_autocast(self.device)
        self.tok.train()
        self.net, self.net_d = self.tok, self.disc
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers are not broadcast: the codebook's usage is made global by end_step itself.
            self.net = DDP(self.tok, device_ids=ids, broadcast_buffers=False)
            self.net_d = DDP(self.disc, device_ids=ids, broadcast_buffers=False)
        if cfg.compile:
            # The convolutional parts, compiled in place (state_dict keys unchanged). Not the
            # quantizer: its loop over maps would recompile once per map size.
            for module in (self.tok.encoder, self.tok.decoder, self.disc):
                module.compile()

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        state = {"config": self.cfg.to_dict(), "model": self.tok.state_dict(), "disc": self.disc.state_dict(),
                 "opt": self.opt.state_dict(), "opt_d": self.opt_d.state_dict(), "step": self.step_,
                 "rng": {"torch": torch.get_rng_state()}, "data": self.batches.state_dict(),
                 "map_seen": self.tok.quantizer.map_seen.clone()}
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
        if "data" not in ckpt:
            raise TrainError(f"{path}: a checkpoint without data stream state (nextdetail 0.1.0 or an early 0.2.0 "
                             f"build); it loads as a tokenizer, but cannot be resumed: start a new run")
        self.tok.load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema = {k: v.to(self.device) for k, v in ckpt["model_ema"].items()}
        self.disc.load_state_dict(ckpt["disc"])
        self.opt.load_state_dict(ckpt["opt"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.tok.quantizer.map_seen.copy_(ckpt["map_seen"])
        try:
            self.batches.load_state_dict(ckpt["data"])
        except ValueError as e:
            raise TrainError(f"{path}: {e}; pass --loader-lanes as the run had it") from None
        self.step_ = ckpt["step"]

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> dict:
        """Train one batch: the generator (L2 + VQ + LPIPS, + GAN from disc_start), the codebook's
        dead-code restarts, the EMA, then the discriminator. Returns the step's log record
        (losses averaged over the ranks)."""
        cfg, tok, disc, d = self.cfg, self.tok, self.disc, self.dist
        q = self.batches.next().to(self.device, non_blocking=True)
        self.last_batch = q              # the checkpoint's reconstructions in the curves (previews.py)
        image, bases = inputs_from_bases(q, self.n_bases, cfg.tokenizer.space())
        x = to_model(image)
        gan = self.step_ >= cfg.disc_start
        with self.amp:
            o = self.net(image, bases)
            l2 = F.mse_loss(o.x_hat.float(), x)
            recon = l2
            rec = {"step": self.step_ + 1, "l2": l2.detach(), "vq": o.q.vq_loss.detach()}
            if self.lpips is not None:
                p = self.lpips(o.x_hat.float(), x).mean()
                recon = recon + cfg.lpips_weight * p
                rec["lpips"] = p.detach()
            loss = recon + o.q.vq_loss
            if gan:
                for w_ in disc.parameters():
                    w_.requires_grad_(False)      # the generator step does not train D
                g = hinge_g_loss(disc(o.x_hat))   # the bare D: no DDP sync in the generator's step
                for w_ in disc.parameters():
                    w_.requires_grad_(True)
                w = adaptive_weight(recon, g, tok.decoder.net[-1].weight, d) if cfg.adaptive_gan else 1.0
                loss = loss + cfg.disc_weight * w * g
                rec["g"], rec["gan_w"] = g.detach(), cfg.disc_weight * float(w)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step_ + 1}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # Read only (no clipping): the curves' grad norm, the gradient of the whole global batch under DDP.
        rec["grad_norm"] = torch.nn.utils.get_total_norm([p.grad for p in tok.parameters() if p.grad is not None])
        rec["lr"] = cfg.lr
        self.opt.step()
        rec["restarted"] = tok.quantizer.end_step(self._restart_generator(), d)
        self.restarted += rec["restarted"]
        if self.ema is not None:
            with torch.no_grad():
                for k, v in tok.state_dict().items():
                    if v.is_floating_point():
                        self.ema[k].mul_(cfg.ema).add_(v, alpha=1.0 - cfg.ema)
                    else:
                        self.ema[k].copy_(v)
        if gan:
            real = x.detach().requires_grad_(cfg.r1_gamma > 0)
            with self.amp:
                real_logits = self.net_d(real)
                dl = hinge_d_loss(real_logits, self.net_d(o.x_hat.detach()))
            if cfg.r1_gamma > 0:
                r1 = r1_penalty(real_logits, real)
                dl = dl + 0.5 * cfg.r1_gamma * r1
                rec["r1"] = r1.detach()
            self.opt_d.zero_grad(set_to_none=True)
            dl.backward()
            self.opt_d.step()
            rec["d"] = dl.detach()
        rec["loss"] = loss.detach()
        self.step_ += 1
        rec = self._averaged(rec)
        rec["perplexity"] = tok.quantizer.perplexity()
        if self.step_ % cfg.usage_every == 0:
            rec["map_usage"] = self._map_usage()
        return rec

    def _map_usage(self) -> List[float]:
        """Fraction of the codebook each token map picked in the last usage_every steps (all
        ranks); warns once when, after two windows, a map uses under 1% of the codes."""
        q = self.tok.quantizer
        seen = all_reduce_sum(q.map_seen.float(), self.dist) if self.dist.world > 1 else q.map_seen.float()
        usage = (seen > 0).float().mean(1).tolist()
        q.map_seen.zero_()
        low = [k for k, u in enumerate(usage) if u < 0.01]
        if low and not self._warned_usage and self.step_ >= 2 * self.cfg.usage_every and self.dist.main:
            self._warned_usage = True
            log.warning("token map%s %s use%s under 1%% of the %d codes over the last %d steps (%s): a collapsing "
                        "codebook (the 1x1 and 3x3 maps are where multi-scale tokenizers collapse); more "
                        "steps, a smaller --vocab or a lower --dead-after help",
                        "s" if len(low) > 1 else "", ", ".join(f"{k + 1} ({q.sizes[k]}x{q.sizes[k]})" for k in low),
                        "" if len(low) > 1 else "s", q.map_seen.shape[1], self.cfg.usage_every,
                        ", ".join(f"{usage[k]:.2%}" for k in low))
        return [round(u, 5) for u in usage]

    def _restart_generator(self) -> torch.Generator:
        """Dead-code restarts draw from (seed, step): the same on every rank and after a resume."""
        return step_generator(self.cfg.seed, self.step_)

    def _averaged(self, rec: dict) -> dict:
        """The record's tensors as floats, averaged over the ranks (one all-reduce)."""
        keys = [k for k, v in rec.items() if torch.is_tensor(v)]
        if keys:
            vals = torch.stack([rec[k].float().reshape(()) for k in keys]).cpu()
            vals = all_reduce_sum(vals, self.dist) / self.dist.world
            rec.update({k: float(v) for k, v in zip(keys, vals.tolist())})
        return rec


def train(cfg: TokenizerTrainConfig, *, progress: Optional[Callable[[int, int, dict], None]] = None) -> TrainReport:
    """Train (or, with cfg.resume, resume) into cfg.out; `progress(step, steps, record)` after
    every step (rank 0). Under torchrun, every rank runs this."""
    return run_training(cfg, lambda d: _train(cfg, d, progress))


def _train(cfg: TokenizerTrainConfig, d: Dist, progress) -> TrainReport:
    from ..previews import reconstructions
    from ..tblog import perf_scalars

    tr = TokenizerTrainer(cfg, dist_=d)
    start, t0, rec = tr.step_, time.perf_counter(), {}
    run_log = RunLog(tr.out, start, main=d.main, log=cfg.log, config=cfg.to_dict())
    try:
        with preemptible(cfg.term_grace):
            while tr.step_ < cfg.steps:
                ts = time.perf_counter()
                rec = tr.step()
                run_log.write(rec, perf=perf_scalars(tr.device, time.perf_counter() - ts, cfg.batch_size * d.world))
                run_log.end_step(tr.step_, cfg.steps, cfg.ckpt_every, tr.save, plot_log,
                                 images=lambda: reconstructions(tr, cfg.log_images))
                if progress is not None and d.main:
                    progress(tr.step_, cfg.steps, rec)
                run_log.stop_if_terminated(tr.step_, tr.save, plot_log, d, tr.device)
    finally:
        run_log.close(plot_log)
    return TrainReport(out=as_path(cfg.out), start_step=start, steps=tr.step_, seconds=time.perf_counter() - t0, last=rec,
                       trainer=tr)


def adaptive_weight(recon, g, last_layer, d: Optional[Dist] = None) -> torch.Tensor:
    """VQGAN's balance: the GAN gradient at the decoder's last layer scaled to the size of the
    reconstruction gradient there, so the GAN neither swamps nor vanishes (detached, <= 1e4).
    Under DDP the gradients are averaged over the ranks first: the losses are batch means, so
    that is the gradient of the whole global batch, as one process would compute it."""
    g_rec = torch.autograd.grad(recon, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
    if d is not None and d.world > 1:
        g_rec, g_gan = (all_reduce_sum(t.clone(), d) / d.world for t in (g_rec, g_gan))
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()

