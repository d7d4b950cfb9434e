"""Stored bases as the tokenizer takes them: the one conversion every reader of a store uses
(tokenizer training, evaluation, token export, upscaling), so that a token depends on the image
alone and not on which path read it.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch

from ..stores.layers import split_layers
from ..stores.shards import unit_log_table

# (q_(k-1) - q_k) / 255 for every difference -255..255 of two 8-bit values, divided in float32
# here once: looked up rather than divided on the device, because CUDA divides by a scalar as a
# multiplication by its reciprocal, which differs from the division in the last bit.
_LINEAR_STEPS = np.arange(-255, 256, dtype=np.float32) / np.float32(255.0)
_LINEAR_STEPS.setflags(write=False)


def inputs_from_bases(q: torch.Tensor, levels: int, space: str = "linear") -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The tokenizer's inputs (I, [B_1, ..., B_n]) from stored bases, computed on q's device.

    Parameters
    ----------
    q : torch.Tensor, uint8, shape (B, N+1, 3, H, W)
        Bases [q_0, ..., q_N] as a decomposition store holds them, q_k = round(255 B_k), q_0 = I
        (`DecompositionStore.quantized`, `read_range`, or the training loader's crops).
    levels : int
        n <= N, the bases returned (`Tokenizer.needs_bases`; 0: the image alone).
    space : {"linear", "log"}
        The store's layer space (`DecompositionStore.space`).

    Returns
    -------
    image : torch.Tensor, float32, shape (B, 3, H, W)
    bases : list of n torch.Tensor, float32, shape (B, 3, H, W), B_1 (the finest) first

    Notes
    -----
    With t the identity / 255 (linear) or the store's unit-log table (log, `unit_log_table`),
    the layers in generation order are L_0 = t(q_N), L_j = t(q_(N-j)) - t(q_(N-j+1)) for
    j = 1..N (B_N, D_N, ..., D_1), and B_k = L_0 + ... + L_(N-k), I = B_0 (`split_layers`).
    Linear differences are exact multiples of 1/255 (q_(k-1) - q_k in integers first). The
    values equal `shards.layers_from_bases` (the store reader's `layers`) bit for bit on
    every device.
    """
    N = q.shape[1] - 1
    if space == "log":
        v = torch.tensor(unit_log_table(), device=q.device)[q.int()]            # t(q_k), (B, N+1, 3, H, W)
        layers = torch.cat([v[:, N:], (v[:, :N] - v[:, 1:]).flip(1)], 1)
    elif space == "linear":
        s = q.short()
        steps = torch.cat([s[:, N:], (s[:, :N] - s[:, 1:]).flip(1)], 1)         # q_N, q_(N-1) - q_N, ..., q_0 - q_1
        steps += 255                                                             # table rows, 0..510
        layers = torch.tensor(_LINEAR_STEPS, device=q.device)[steps.int()]
    else:
        raise ValueError(f"layer space {space!r}: 'linear' or 'log'")
    return split_layers(layers, levels)
