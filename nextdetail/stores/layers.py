"""A decomposition's stored layers as the tokenizer takes them: crops and running sums.

A store holds, per image, layers (n+1, 3, H, W) in generation order [B_n, D_n, ..., D_1]; the
running sums of that order are the bases, coarse to fine: B_n, B_(n-1) = B_n + D_n, ...,
B_0 = I. Every reader of layers (tokenizer training, evaluation, export) crops and sums here.
"""
from __future__ import annotations

import numpy as np


def crop_layers(layers: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """The size x size window at (top, left) of layers (..., H, W)."""
    return layers[..., top:top + size, left:left + size]


def centre_crop(layers: np.ndarray, size: int) -> np.ndarray:
    """The centred size x size window of layers (..., H, W) (the extra pixel right/below)."""
    h, w = layers.shape[-2:]
    return crop_layers(layers, (h - size) // 2, (w - size) // 2, size)


def split_layers(layers_BL3HW, n: int):
    """Store layers (B, N+1, 3, H, W) (torch), generation order -> (I, [B_1, ..., B_n]) for n <= N."""
    sums = layers_BL3HW.cumsum(1)                  # sums[:, j] = B_(N-j)
    N = layers_BL3HW.shape[1] - 1
    return sums[:, N], [sums[:, N - k] for k in range(1, n + 1)]
