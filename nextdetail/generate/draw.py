"""One token per position from a map's logits: filtering (top-k, top-p), the classifier-free
guidance scale of each map, and draws whose randomness is each row's own."""
from __future__ import annotations

from typing import Sequence

import torch

from .options import SampleError


def filter_logits(logits_NV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Keep the top_k largest logits (0: all) and the smallest set whose probability reaches
    top_p (0 or 1: all); the rest become -inf."""
    V = logits_NV.shape[-1]
    if 0 < top_k < V:
        kth = logits_NV.topk(top_k, -1).values[..., -1:]
        logits_NV = logits_NV.masked_fill(logits_NV < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_NV, order = logits_NV.sort(-1, descending=True)
        cum = sorted_NV.softmax(-1).cumsum(-1)
        drop = cum - sorted_NV.softmax(-1) >= top_p          # mass before this token already enough
        drop[..., 0] = False
        logits_NV = logits_NV.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits_NV


def inverse_cdf(probs_BNV: torch.Tensor, u_BN: torch.Tensor) -> torch.Tensor:
    """int64 (B, N): the token whose CDF interval holds u * total mass, u in [0, 1). The first
    token with cdf > u (searchsorted right), so that u = 0 skips leading zero-probability tokens;
    clamped to the last token of positive probability, in case rounding puts u at the very top."""
    cdf_BNV = probs_BNV.cumsum(-1)
    x_BN1 = (u_BN * cdf_BNV[..., -1]).unsqueeze(-1)
    idx_BN = torch.searchsorted(cdf_BNV.contiguous(), x_BN1.contiguous(), right=True).squeeze(-1)
    V = probs_BNV.shape[-1]
    last_BN = V - 1 - (probs_BNV.flip(-1) > 0).int().argmax(-1)
    return torch.minimum(idx_BN, last_BN)


def draw_per_row(probs_BNV: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per position, row b's uniforms drawn from generators[b] alone: a row's tokens do
    not depend on the other rows of the batch (given its own probabilities)."""
    B, N, _ = probs_BNV.shape
    if len(generators) != B:
        raise SampleError(f"{len(generators)} generators for a batch of {B} rows")
    u_BN = torch.stack([torch.rand(N, generator=g, device=probs_BNV.device, dtype=probs_BNV.dtype)
                        for g in generators])
    return inverse_cdf(probs_BNV, u_BN)


def guidance_scale(cfg: float, k: int, M: int) -> float:
    """s_k = 1 + (cfg - 1) k / (M - 1): no guidance on map 0, cfg on the last map."""
    return cfg if M == 1 else 1.0 + (cfg - 1.0) * k / (M - 1)
