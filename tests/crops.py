"""Real-photo crops for the solver tests and the decomposition benchmark.

The photos stay in <repo>/../shared/data (never copied into the repository); this module
only reads them. Crops are float32 in [0, 1], shape (size, size, 3); grayscale files are
repeated over 3 channels so every crop of a batch has the same shape.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Centre 256x256 crops of these are the quality-bar set (tests/test_at_quality.py) and the
# first crops of the benchmark, so the two report gaps on the same pictures. Chosen for
# variety: stone wall and foliage (dense texture), a face (smooth skin, soft shading),
# parrots (smooth background against sharp contours). Their exact floors take ~15-50 s each
# (kodim05's motorbikes, a fine 4th choice, need 250 alternations and ~60 s).
QUALITY_CROPS = ("kodak24/kodim01.png", "kodak24/kodim15.png", "kodak24/kodim23.png")

# Folders scanned for more pictures when a benchmark batch needs more crops.
PHOTO_FOLDERS = ("kodak24", "bsd100", "set14", "set5")


def center_crop(path, size: int = 256) -> np.ndarray:
    """Centre (size, size, 3) crop of an image file, float32 in [0, 1]."""
    im = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / np.float32(255)
    H, W, _ = im.shape
    if H < size or W < size:
        raise ValueError(f"{path} is {W}x{H}, smaller than a {size}x{size} crop")
    y, x = (H - size) // 2, (W - size) // 2
    return np.ascontiguousarray(im[y:y + size, x:x + size])


def photo_paths(data_dir, min_size: int = 256) -> list[Path]:
    """The QUALITY_CROPS first, then every other photo of PHOTO_FOLDERS (sorted) at least
    min_size on both sides; the order is fixed so a batch of k crops is reproducible."""
    data_dir = Path(data_dir)
    first = [data_dir / n for n in QUALITY_CROPS]
    rest = []
    for folder in PHOTO_FOLDERS:
        for p in sorted((data_dir / folder).glob("*.png")):
            if p not in first:
                with Image.open(p) as im:
                    if min(im.size) >= min_size:
                        rest.append(p)
    return [p for p in first if p.is_file()] + rest
