"""Generated features as image files: decoded to 8-bit pixels, laid out in strips and grids."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..tokenize import Tokenizer


@torch.no_grad()
def decode(tok: Tokenizer, f_hat_BCHW: torch.Tensor) -> np.ndarray:
    """Features -> uint8 images (B, H, W, 3), pixels (a log-space tokenizer's converted)."""
    img = tok.to_pixels(tok.decode_features(f_hat_BCHW))
    return (img.permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def tile(images: Sequence[np.ndarray], cols: int, gap: int = 2) -> np.ndarray:
    """uint8 (H, W, 3) images of one size -> one grid image, white gaps."""
    h, w = images[0].shape[:2]
    rows = math.ceil(len(images) / cols)
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = im
    return out
