"""High resolution without retraining (CART): `generate_highres` draws the base maps at the
trained size, upsamples the base by an integer `scale` (as an image, decoded, resized and
encoded again, or as features; `upsample_base`), and draws the detail maps patchwise on s x s
windows (s: the trained latent side) of the (scale s)^2 latent, each window conditioned on its
own crop of the upsampled base (re-quantized into the base maps by the tokenizer's own base
stage, `Quantizer.quantize_base`, then fed as a teacher-forced prefix). Windows either tile the
latent (`overlap=False`, CART-NOV) or step by s/2 (`overlap=True`, CART-OV), their detail
features blended with a tent window. The decoder is convolutional, so it decodes the larger
latent directly.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from ..train.inputs import prefix_features
from .loop import generate
from .options import SampleError


def requantize_base(quantizer, f_BChw: torch.Tensor, num_base: int) -> List[torch.Tensor]:
    """The prefix of a window: the first num_base maps of its base feature f (B, C, s, s), as the
    tokenizer's base stage codes f_Bn (`quantizer.quantize_base`)."""
    maps = quantizer.quantize_base(f_BChw)
    if num_base > len(maps):
        raise SampleError(f"{num_base} base maps asked: the tokenizer's base stage has {len(maps)}")
    return maps[:num_base]


def patch_boxes(S: int, side: int, overlap: bool) -> List[tuple]:
    """Top-left corners (y, x) of the side x side windows over an S x S latent: a tiling (stride
    side) or 50 % overlapping windows (stride side/2); the last row/column is moved in to end at S."""
    stride = max(1, side // 2) if overlap else side
    starts = list(range(0, S - side + 1, stride))
    if starts[-1] != S - side:
        starts.append(S - side)
    return [(y, x) for y in starts for x in starts]


def tent(side: int, device) -> torch.Tensor:
    """(side, side) separable tent window, > 0 everywhere, for blending 50%-overlapping patches."""
    t = 1.0 - (2 * (torch.arange(side, device=device) + 0.5) / side - 1).abs() + 1.0 / side
    return t[:, None] * t[None, :]


@torch.no_grad()
def upsample_base(f_base_BChw: torch.Tensor, scale: int, tokenizer=None) -> torch.Tensor:
    """The base features at scale x the latent side. With a tokenizer (the default path): decode
    the base to an image, bicubic-upsample the image, and encode it again, which is how a base
    image's features f_Bn are made in training; without one: bicubic upsampling of the features."""
    if scale == 1:
        return f_base_BChw
    if tokenizer is None:
        return F.interpolate(f_base_BChw, scale_factor=scale, mode="bicubic")
    img = tokenizer.decode_features(f_base_BChw)          # the tokenizer's own space, as encode takes
    img = F.interpolate(img, scale_factor=scale, mode="bicubic").clamp(0, 1)
    return tokenizer.encode_features(img)


@torch.no_grad()
def generate_highres(model, quantizer, labels_B, *, scale: int = 2, overlap: bool = False, num_base: int,
                     order: int, patch_batch: int = 64, tokenizer=None, **kw):
    """(f_base_up, f_hat) at (B, Cvae, scale s, scale s): the upsampled base and base + patchwise details.
    num_base, order: the quantizer's schedule (`quantizer.num_base`, `quantizer.order`).
    tokenizer: upsample the base as an image (decode, resize, encode; see `upsample_base`), else
    the features. kw: cfg, top_k, top_p, temperature, generator as in `generate`."""
    M = len(model.cfg.map_shapes)
    if num_base >= M:
        raise SampleError("high-resolution generation needs detail maps after the base maps: a model of the "
                          "BD (base-detail) quantizer")
    if scale < 1:
        raise SampleError(f"scale {scale}: must be >= 1")
    base = generate(model, quantizer, labels_B, stop=num_base, **kw)
    f_up = upsample_base(base.f_hat, scale, tokenizer)
    return f_up, patchwise_details(model, quantizer, f_up, labels_B, num_base=num_base, overlap=overlap,
                                   patch_batch=patch_batch, **kw)


@torch.no_grad()
def patchwise_details(model, quantizer, f_up: torch.Tensor, labels_B, *, num_base: int, overlap: bool = False,
                      patch_batch: int = 64, **kw) -> torch.Tensor:
    """f_up + details drawn on s x s windows of a base feature f_up (B, Cvae, S, S), S a multiple
    of the latent side s: each window's crop of f_up is re-quantized into the base maps and fed as
    a teacher-forced prefix, the detail maps drawn after it; overlapping windows are blended with
    a tent. kw: cfg, top_k, top_p, temperature, generator as in `generate`."""
    side, S = quantizer.latent, f_up.shape[-1]
    boxes = patch_boxes(S, side, overlap)
    B = labels_B.shape[0]
    win = tent(side, f_up.device) if overlap else torch.ones(side, side, device=f_up.device)
    acc, wsum = torch.zeros_like(f_up), torch.zeros(S, S, device=f_up.device)
    crops = torch.cat([f_up[:, :, y:y + side, x:x + side] for y, x in boxes])   # (P B, C, s, s), patch-major
    labels_P = labels_B.repeat(len(boxes))
    for lo in range(0, crops.shape[0], patch_batch):
        f_p = crops[lo:lo + patch_batch]
        prefix = requantize_base(quantizer, f_p, num_base)
        out = generate(model, quantizer, labels_P[lo:lo + patch_batch], prefix=prefix, **kw)
        detail = out.f_hat - prefix_features(quantizer, prefix)
        for j in range(detail.shape[0]):
            p, b = divmod(lo + j, B)
            y, x = boxes[p]
            acc[b, :, y:y + side, x:x + side] += detail[j] * win
            wsum[y:y + side, x:x + side] += win
    return f_up + acc / wsum
