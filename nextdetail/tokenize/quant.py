"""Quantizers: one shared codebook, three schedules behind one interface.

Every quantizer maps encoder features to M integer token maps and back:

    out = q(f_BChw, bases=[f_B1_BChw, ..., f_Bn_BChw])   # -> QuantOut; out.idx: M (B, h_k, w_k) int64
    f_hat_BChw = q.lookup(out.idx)                        # Algorithm 2: sum_k phi_k(up(z_k))

f is (B, C, s, s) with C = Cvae and s the latent side. `QuantOut.f_hat` is the straight-through reconstruction
(value = sum of the phi contributions, gradient = identity to f_I); `QuantOut.contribs[k]`
is phi_k(up(z_k)) and `QuantOut.inputs[k]` the residual map k quantized (before
down-sampling), so the bookkeeping of Algorithm 1 can be checked from outside.

- vanilla    : RQ-VAE residual quantization of f_I at full resolution, depth d.
- multiscale : VAR next-scale: area-down to p_k, quantize, look up, bicubic-up, phi_k, subtract.
- basedetail : CART Algorithm 1: multi-scale residual quantization of f_Bn (the base maps),
               then each detail factor f_Dk = f_B(k-1) - f_Bk (f_B0 = f_I), for k = n..1
               (generation order, coarse to fine), residually quantized at full resolution
               with depth (M - B) / n. sum_k f_Dk + f_Bn = f_I, so f_hat approximates f_I.
"""
from __future__ import annotations

import contextlib

import logging
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_cat, all_reduce_sum
from .config import QuantConfig
from .schedule import map_schedule

log = logging.getLogger(__name__)


@dataclass
class QuantOut:
    f_hat: torch.Tensor                 # (B, C, s, s), straight-through
    idx: List[torch.Tensor]             # M maps (B, h_k, w_k) int64
    vq_loss: torch.Tensor               # codebook + beta * commitment, mean over maps
    contribs: List[torch.Tensor] = field(default_factory=list)   # phi_k(up(z_k)), (B, C, s, s)
    inputs: List[torch.Tensor] = field(default_factory=list)     # residual quantized at map k


class Codebook(nn.Module):
    """V x C embedding shared by every token map, with usage tracking and dead-code restarts.

    `usage` is an exponential moving average of how often each code is picked per step;
    a code whose usage falls below 1/dead_after (unused for about dead_after steps)
    is re-initialised to a random feature vector of the current batch, the standard
    remedy for the codebook collapse reported for multi-scale tokenizers.
    """

    def __init__(self, vocab: int, dim: int, decay: float, dead_after: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.uniform_(self.embed.weight, -1.0 / vocab, 1.0 / vocab)
        self.decay, self.dead_after = decay, dead_after
        self.register_buffer("usage", torch.ones(vocab))      # start "alive": no restart at step 0
        self.register_buffer("_counts", torch.zeros(vocab), persistent=False)   # picks this step
        self._seen: List[torch.Tensor] = []

    def quantize(self, f_BChw: torch.Tensor) -> torch.Tensor:
        """Nearest code (squared L2) of each position -> idx (B, h, w)."""
        B, C, h, w = f_BChw.shape
        f_NC = f_BChw.permute(0, 2, 3, 1).reshape(-1, C)
        e_VC = self.embed.weight
        # Distances in float32 even under bf16 autocast: bf16 would blur the nearest code.
        off = torch.autocast("cuda", enabled=False) if f_NC.is_cuda else contextlib.nullcontext()
        with torch.no_grad(), off:
            f_NC, e_VC = f_NC.float(), e_VC.float()
            d_NV = (f_NC.pow(2).sum(1, keepdim=True) - 2 * f_NC @ e_VC.t() + e_VC.pow(2).sum(1)[None])
            idx_N = d_NV.argmin(1)
        if self.training:
            self._counts += torch.bincount(idx_N, minlength=e_VC.shape[0]).float()
            self._seen.append(f_NC.detach())
        return idx_N.view(B, h, w)

    def lookup(self, idx_Bhw: torch.Tensor) -> torch.Tensor:
        return self.embed(idx_Bhw).permute(0, 3, 1, 2)          # (B, C, h, w)

    @torch.no_grad()
    def end_step(self, gen: Optional[torch.Generator] = None, dist_=None) -> int:
        """After a training step: update usage, restart dead codes; returns how many.

        gen: the generator of the restarts' draw (default torch's global one). dist_ (a
        distributed.Dist): the step's picks are summed over the ranks and the restart pool is
        every rank's features, map by map in rank order (the rows one process would hold for the
        ranks' batches together), so with the same gen every rank sets the same codes."""
        if not self._seen:
            return 0
        if dist_ is not None:
            all_reduce_sum(self._counts, dist_)
        used = (self._counts > 0).float()
        self.usage.mul_(self.decay).add_(used, alpha=1 - self.decay)
        dead = (self.usage < 1.0 / self.dead_after).nonzero().flatten()
        if len(dead):
            pool_NC = torch.cat([all_gather_cat(f, dist_) for f in self._seen] if dist_ is not None else self._seen)
            pick = torch.randint(len(pool_NC), (len(dead),), generator=gen)
            self.embed.weight.data[dead] = pool_NC[pick.to(pool_NC.device)].to(self.embed.weight.dtype)
            self.usage[dead] = 1.0
        self._counts.zero_()
        self._seen = []
        return len(dead)

    def perplexity(self) -> float:
        """exp(entropy) of the usage distribution: the effective number of codes in use."""
        p = self.usage / self.usage.sum()
        return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


class Phi(nn.Module):
    """phi_k: a 3x3 conv blended with its input, (1 - r) z + r conv(z) (VAR's quant_resi):
    the identity part keeps the residual chain well-posed at initialisation."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.ratio = ratio

    def forward(self, z_BChw):
        return (1 - self.ratio) * z_BChw + self.ratio * self.conv(z_BChw)


class Quantizer(nn.Module):
    """The shared machinery: codebook, M phi convs, the schedule of map sizes.

    What the rest of the package reads of a quantizer (a new quantizer provides the same):
    `sizes` (side of each map), `num_base`, `order`, `stage_ends` (its schedule, schedule.py),
    `dim` (Cvae), `latent`; `quantize_base`, `quantize_map`, `map_contribution`,
    `contributions`, `lookup`; for training, `end_step` and `perplexity`.
    """

    def __init__(self, cfg: QuantConfig, dim: int, latent: int):
        super().__init__()
        self.cfg, self.latent, self.dim = cfg, latent, dim
        self.schedule = map_schedule(cfg.schedule(latent), latent)
        self.sizes = list(self.schedule.sizes)
        self.codebook = Codebook(cfg.vocab, dim, cfg.usage_decay, cfg.dead_after)
        self.phi = nn.ModuleList(Phi(dim, cfg.phi_ratio) for _ in self.sizes)
        # Codes picked by each token map since the trainer last read it (training only): the
        # per-map codebook health, VAR-style (coarse maps are where codebooks collapse).
        self.register_buffer("map_seen", torch.zeros(len(self.sizes), cfg.vocab, dtype=torch.bool),
                             persistent=False)

    @property
    def num_base(self) -> int:
        """B: the maps of the first stage (the base maps; every map for a one-stage quantizer)."""
        return self.schedule.num_base

    @property
    def order(self) -> int:
        """n: the detail stages after the base, one per base B_1..B_n the quantizer takes."""
        return self.schedule.order

    @property
    def stage_ends(self) -> List[int]:
        """Maps after the base and after each detail factor: [B, B + d, ..., M]."""
        return self.schedule.stage_ends

    def end_step(self, gen: Optional[torch.Generator] = None, dist_=None) -> int:
        """After a training step: the codebook's usage update and dead-code restarts (Codebook.end_step)."""
        return self.codebook.end_step(gen, dist_)

    def perplexity(self) -> float:
        return self.codebook.perplexity()

    # -- one map: quantize the residual at size p, return (idx, phi contribution at s x s)
    def quantize_map(self, k: int, rest_BChw: torch.Tensor):
        """Map k of the residual rest (B, C, s, s): area-down to p_k, nearest codes ->
        (idx (B, p_k, p_k), phi_k(up(z_k)) (B, C, s, s)). The sampler calls it map by map."""
        p, side = self.sizes[k], rest_BChw.shape[-1]
        small = rest_BChw if p == side else F.interpolate(rest_BChw, size=(p, p), mode="area")
        idx = self.codebook.quantize(small)
        return idx, self.map_contribution(k, idx, side)

    def map_contribution(self, k: int, idx_Bhw: torch.Tensor, side: int) -> torch.Tensor:
        """phi_k(up(lookup(idx))): token map k as features (B, C, side, side)."""
        z = self.codebook.lookup(idx_Bhw)
        if z.shape[-1] != side:
            z = F.interpolate(z, size=(side, side), mode="bicubic")
        return self.phi[k](z)

    def _check(self, f_BChw: torch.Tensor) -> None:
        if f_BChw.shape[-1] != self.latent or f_BChw.shape[-2] != self.latent:
            raise ValueError(f"latent of shape {tuple(f_BChw.shape[-2:])}: this tokenizer's schedule is "
                             f"for {self.latent}x{self.latent} (image side {self.latent} x downsample)")

    def stages(self, f_BChw, bases):  # pragma: no cover - every schedule overrides it
        """[(target, first map, last map + 1)]: which residual each run of maps quantizes,
        the runs being `self.schedule.stages`."""
        raise NotImplementedError

    def code_stage(self, target_BChw: torch.Tensor, lo: int, hi: int):
        """Maps lo..hi-1 quantizing `target` residually (Algorithm 1's inner loop): yields, map
        by map, (k, the residual it quantized, idx, its contribution, the stage's sum so far)."""
        part = torch.zeros_like(target_BChw)       # this stage's reconstruction so far
        for k in range(lo, hi):
            rest = target_BChw - part
            i, c = self.quantize_map(k, rest)
            part = part + c
            yield k, rest, i, c, part

    def quantize_base(self, f_BChw: torch.Tensor) -> List[torch.Tensor]:
        """The base maps r_1..r_B of a base feature f (B, C, s, s), as `forward` codes its first
        stage (f_Bn for base-detail): generation starts from them (a high-resolution window's
        base, an upscaled input's)."""
        lo, hi = self.schedule.stages[0]
        return [i for _, _, i, _, _ in self.code_stage(f_BChw, lo, hi)]

    def forward(self, f_BChw: torch.Tensor, bases: Optional[Sequence[torch.Tensor]] = None) -> QuantOut:
        self._check(f_BChw)
        idx, contribs, inputs = [], [], []
        vq_loss = f_BChw.new_zeros(())
        f_hat = torch.zeros_like(f_BChw)
        for target, lo, hi in self.stages(f_BChw, bases):
            for k, rest, i, c, part in self.code_stage(target, lo, hi):
                inputs.append(rest)
                if self.training:
                    self.map_seen[k, i.flatten()] = True
                idx.append(i)
                contribs.append(c)
                f_hat = f_hat + c
                # Every partial sum should approximate the factor being coded: the first term
                # trains codebook and phi towards the (fixed) target, beta pulls the encoder's
                # target towards its quantization (commitment).
                vq_loss = vq_loss + F.mse_loss(part, target.detach()) + \
                    self.cfg.beta * F.mse_loss(part.detach(), target)
        vq_loss = vq_loss / len(self.sizes)
        # Straight-through: the decoder sees f_hat's value, the encoder gets the gradient of f_I.
        f_ste = f_BChw + (f_hat - f_BChw).detach() if self.training else f_hat
        return QuantOut(f_ste, idx, vq_loss, contribs, inputs)

    def lookup(self, idx: Sequence[torch.Tensor]) -> torch.Tensor:
        """Algorithm 2: f_hat = sum_k phi_k(up(lookup(r_k)))."""
        if len(idx) != len(self.sizes):
            raise ValueError(f"{len(idx)} token maps: this tokenizer uses {len(self.sizes)}")
        return torch.stack(self.contributions(idx)).sum(0)

    def contributions(self, idx: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """phi_k(up(lookup(r_k))) of each map given, (B, C, s, s); a prefix r_1..r_m is allowed
        (its running sum is the reconstruction at quantization depth m)."""
        if len(idx) > len(self.sizes):
            raise ValueError(f"{len(idx)} token maps: this tokenizer uses {len(self.sizes)}")
        for k, (i, p) in enumerate(zip(idx, self.sizes)):
            if tuple(i.shape[-2:]) != (p, p):
                raise ValueError(f"token map {k} has shape {tuple(i.shape[-2:])}, the schedule says ({p}, {p})")
        return [self.map_contribution(k, i, self.latent) for k, i in enumerate(idx)]


class ResidualQuantizer(Quantizer):
    """vanilla (every map s x s) and multiscale (growing maps): one residual chain on f_I;
    the two differ only in their schedule of map sizes."""

    def stages(self, f_BChw, bases):
        return [(f_BChw, *self.schedule.stages[0])]


class BaseDetailQuantizer(Quantizer):
    """CART's base-detail quantizer: Algorithm 1 of the CART papers (encoding) and Algorithm 2
    (`lookup`, reconstruction), on one codebook shared by all M token maps.

    The image's features f_I = E(I) and its bases' f_Bk = E(B_k), k = 1..n (B_n the coarsest;
    f_B0 = f_I), give n + 1 targets, coded in generation order (coarse to fine): the base f_Bn,
    then the detail factors D_n, ..., D_1,

        T_0 = f_Bn,        T_j = f_Dk = f_B(k-1) - f_Bk,  k = n + 1 - j,  j = 1..n,

    so that T_0 + T_1 + ... + T_n = f_I (telescoping). Stage j codes T_j residually with its run
    of maps m (`schedule.stages[j]`): the B base maps of sides `base_patch_sizes` (VAR's
    next-scale, the last = s), then d = (M - B) / n maps per detail factor, all s x s. With the
    stage's partial sum P = 0 at its start, each map m does

        r_m = Q(down_{p_m}(T_j - P))             nearest code (squared L2) of each position
        z_m = phi_m(up_s(Z[r_m]))                Z: the codebook (V x C), phi_m: `Phi`
        P   = P + z_m

    down_p is area resizing to p x p, up_s bicubic to s x s (both the identity at s). The
    reconstruction is Algorithm 2, f_hat = sum_{m=1..M} z_m, which the decoder turns into the
    image. Training averages over the maps, P_m being the partial sum after map m and sg the
    stop-gradient,

        vq_loss = mean_m ||P_m - sg(T_j)||^2 + beta ||sg(P_m) - T_j||^2

    and passes f_I's gradient straight through f_hat (`QuantOut.f_hat`). The paper's
    pseudo-code subtracts each phi_m(z_m) from the running target, which is the same residual
    T_j - P.

    Parameters
    ----------
    cfg : QuantConfig
        kind "basedetail", its schedule filled in (`QuantConfig.schedule`): base_patch_sizes,
        order n, detail_depth d, vocab V, beta, phi_ratio, the codebook's restart settings.
    dim : int
        C = Cvae, the channels of the encoder's features.
    latent : int
        s, the side of the features (image side / downsample); base_patch_sizes ends at it.

    Attributes
    ----------
    sizes : list of int, (M,)
        p_m, the side of each token map, generation order: base_patch_sizes, then n d times s.
    num_base, order, stage_ends : int, int, list of int
        B, n and [B, B + d, ..., M] (the schedule, schedule.py).
    codebook : Codebook
        Z, V x C, shared by every map.
    phi : nn.ModuleList of M `Phi`
        phi_m(z) = (1 - r) z + r conv3x3(z), r = cfg.phi_ratio.

    Examples
    --------
    CART-256's schedule (8 base maps + 3 detail factors x 2) on a 16 x 16 latent of C = 32:

    >>> q = build_quantizer(QuantConfig().schedule(16), dim=32, latent=16).eval()
    >>> q.sizes, q.stage_ends
    ([1, 2, 3, 4, 6, 9, 13, 16, 16, 16, 16, 16, 16, 16], [8, 10, 12, 14])
    >>> f_I = torch.randn(2, 32, 16, 16)
    >>> f_B = [torch.randn(2, 32, 16, 16) for _ in range(3)]      # f_B1, f_B2, f_B3
    >>> out = q(f_I, f_B)           # out.idx: 14 int64 maps (2, p_m, p_m); out.f_hat (2, 32, 16, 16)
    >>> torch.equal(q.lookup(out.idx), out.f_hat)                # Algorithm 2 gives f_hat back
    True
    """

    def stages(self, f_BChw, bases):
        n = self.order
        if bases is None or len(bases) < n:
            got = 0 if bases is None else len(bases)
            raise ValueError(f"base-detail quantizer needs the {n} base features f_B1..f_B{n}, got {got}")
        f_B = [f_BChw] + list(bases[:n])                      # f_B0 = f_I, f_B1, ..., f_Bn
        targets = [f_B[n]] + [f_B[k - 1] - f_B[k] for k in range(n, 0, -1)]     # D_n first: generation order
        return [(t, lo, hi) for t, (lo, hi) in zip(targets, self.schedule.stages)]


QUANTIZERS = {"vanilla": ResidualQuantizer, "multiscale": ResidualQuantizer,
              "basedetail": BaseDetailQuantizer}


def build_quantizer(cfg: QuantConfig, dim: int, latent: int) -> Quantizer:
    return QUANTIZERS[cfg.kind](cfg, dim, latent)
