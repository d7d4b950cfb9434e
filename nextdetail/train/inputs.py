"""The transformer's continuous inputs, from token maps and the tokenizer's quantizer only.

Step k > 1 of the next-detail transformer sees the VAR/CART input: the cumulative
reconstruction after maps < k, f_hat_(<k) = sum_(j<k) phi_j(up(lookup(r_j))) (B, Cvae, s, s)
with s the latent side, area-resized to map k's size (identity for the s x s detail maps). Only
the codebook and the phi convs are needed, so `load_quantizer` builds just the quantizer from a
tokenizer checkpoint (EMA weights when the run kept them, as `Tokenizer.from_checkpoint`).

    q = load_quantizer("RUN/ckpt-0002000.pt")
    f_BLc = teacher_inputs(q, maps)          # training: (B, L - h_1 w_1, Cvae), maps 2..M
    f_hat, f_Blc = next_input(q, k, idx_Bhw, f_hat, (h, w))   # sampling, after map k is drawn
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..tokenize.quant import Quantizer, build_quantizer
from ..tokenize.tokenizer import Tokenizer, checkpoint_weights, read_checkpoint


def load_quantizer(path, map_location="cpu", ema: bool = True) -> Quantizer:
    """The quantizer (codebook + phi convs) of a tokenizer checkpoint or model folder, in eval
    mode, frozen."""
    from ..pretrained import is_model_folder

    if is_model_folder(path):
        q = Tokenizer.from_pretrained(path, map_location).quantizer
        return q.eval().requires_grad_(False)
    ckpt, cfg = read_checkpoint(path, map_location)
    q = build_quantizer(cfg.quant, cfg.model.z_channels, cfg.latent())
    state = checkpoint_weights(ckpt, ema)
    q.load_state_dict({k[len("quantizer."):]: v for k, v in state.items() if k.startswith("quantizer.")})
    q.eval().requires_grad_(False)
    return q


def resize(f_BChw: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """Area-resize to (h, w) (VAR's down-sampling of f_hat for the next scale); identity at size."""
    if tuple(f_BChw.shape[-2:]) == tuple(shape):
        return f_BChw
    return F.interpolate(f_BChw, size=tuple(shape), mode="area")


def tokens_of(f_BChw: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h w, C), row-major like the token maps."""
    return f_BChw.flatten(2).transpose(1, 2)


@torch.no_grad()
def teacher_inputs(quantizer: Quantizer, maps: Sequence[torch.Tensor],
                   shapes: Optional[Sequence[Tuple[int, int]]] = None) -> Optional[torch.Tensor]:
    """Inputs of maps 2..M for teacher forcing: (B, L - h_1 w_1, Cvae) float32, None if M = 1.
    maps: M int64 (B, h_k, w_k); shapes default to the maps' own."""
    shapes = list(shapes or [tuple(m.shape[-2:]) for m in maps])
    if len(maps) < 2:
        return None
    contribs = quantizer.contributions(list(maps[:-1]))
    f_hat, parts = torch.zeros_like(contribs[0]), []
    for k in range(1, len(maps)):
        f_hat = f_hat + contribs[k - 1]
        parts.append(tokens_of(resize(f_hat, shapes[k])))
    return torch.cat(parts, 1)


@torch.no_grad()
def contribution(quantizer: Quantizer, k: int, idx_Bhw: torch.Tensor) -> torch.Tensor:
    """phi_k(up(lookup(r_k))) at the latent size (B, Cvae, s, s)."""
    return quantizer.map_contribution(k, idx_Bhw, quantizer.latent)


def prefix_features(quantizer: Quantizer, maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_k phi_k(up(lookup(r_k))) over the given first maps r_1 .. r_K: the features they
    contribute (B, Cvae, s, s); all M maps give f_hat."""
    return sum(contribution(quantizer, k, idx) for k, idx in enumerate(maps))


@torch.no_grad()
def next_input(quantizer: Quantizer, k: int, idx_Bhw: torch.Tensor, f_hat_BChw: Optional[torch.Tensor],
               next_shape: Optional[Tuple[int, int]]):
    """After map k is drawn: f_hat += its contribution; returns (f_hat, input of map k + 1 as
    (B, h w, Cvae), or None when k was the last map)."""
    c = contribution(quantizer, k, idx_Bhw)
    f_hat_BChw = c if f_hat_BChw is None else f_hat_BChw + c
    return f_hat_BChw, (tokens_of(resize(f_hat_BChw, next_shape)) if next_shape is not None else None)
