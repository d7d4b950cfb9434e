"""Specular decomposition: a diffuse base and n specular terms (`method="specular"`).

The dichromatic reflection model (Shafer 1985; Tominaga 1994) writes a pixel as a diffuse part
plus a specular part, I = A + E. Under a white (or white-balanced) illuminant the specular part
is achromatic, E = e (1, 1, 1): it adds the same amount to every channel. So the channel
minimum m = min_c I holds all of the specular term plus the diffuse minimum, and I - m is a
specular-free image (Tan & Ikeuchi 2005). What remains is telling e from the diffuse minimum.
Highlights are small bright structures on top of the diffuse shading, and the white top-hat of
mathematical morphology (Serra 1982) extracts exactly those: m - opening_r(m), the part of m
that a flat structuring element of radius r cannot fit under. CART's hierarchy (its order-4
specular decomposition, I = A_4 + E_4 + E_3 + E_2 + E_1) follows from growing radii:

    A_0 = I,   e_k = m_k - opening_{r_k}(m_k),  m_k = min_c A_(k-1),  r_k = 2^k px
    E_k = e_k (1, 1, 1),   A_k = A_(k-1) - E_k,   so   I = A_n + E_n + ... + E_1

E_1 holds the sharpest, smallest highlights (glints, up to ~2 px), E_n the broadest sheen; A_n
is the diffuse base. The sum holds to float32 rounding. Each A_k stays >= 0 (e_k <= m_k) and
keeps the chromaticity differences of A_(k-1) (the same value is taken from every channel).

Limits: anything small, bright and grey-ish in every channel is taken for specular (white
text, a bright sky between leaves, catchlights on eyes are right; a white dot on a shirt is
wrong); coloured light breaks the achromatic assumption (the term is then only the part common
to all channels); highlights wider than 2 r_n stay in the base. No parameters besides the order:
radii are in pixels of the image as given.
"""
from __future__ import annotations

import numpy as np

from .hierarchy import Decomposition, register_decomposition
from .params import ATParams


def specular_radius(k: int) -> int:
    """r_k in pixels: the structuring element of level k is (2 r_k + 1) x (2 r_k + 1)."""
    return 2 ** k


def disk(radius: int) -> np.ndarray:
    """A flat disk structuring element of the given radius, bool (2r+1, 2r+1)."""
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius + radius      # the +r rounds the rim like a drawn disk


def white_tophat(m_NHW: np.ndarray, radius: int) -> np.ndarray:
    """The white top-hat by reconstruction of each image of a batch: m - R_m(opening_disk(m)),
    where R_m dilates the opened image geodesically under m until stable. A bright structure
    that no disk of this radius fits into is removed whole; every other structure keeps its
    exact shape (a plain opening would leave the disk's footprint around them). >= 0, <= m."""
    from scipy import ndimage
    from skimage.morphology import reconstruction

    out = np.empty_like(m_NHW, dtype=np.float32)
    for n, m in enumerate(m_NHW):
        opened = ndimage.grey_opening(m, footprint=disk(radius), mode="reflect")
        out[n] = m - reconstruction(opened, m, method="dilation")
    return out


@register_decomposition("specular", names=("A", "E"), summary="diffuse base + --order specular terms")
def specular(image: np.ndarray, order: int, params: ATParams, backend: str) -> Decomposition:
    """Diffuse bases A_0 = I .. A_n and achromatic specular terms E_1 .. E_n (module docstring).
    params and backend are not used: the top-hat runs on the CPU in scipy."""
    f = np.asarray(image, np.float32)
    batch = f.ndim == 4
    f_NHWC = f if batch else f[None]
    if f_NHWC.shape[-1] != 3:
        raise ValueError(f"the specular decomposition needs RGB images (3 channels), got {f_NHWC.shape[-1]}")
    bases, details = [f_NHWC], []
    for k in range(1, order + 1):
        a = bases[-1]
        e_NHW = white_tophat(a.min(axis=-1), specular_radius(k))
        E = np.repeat(e_NHW[..., None], 3, axis=-1)
        details.append(E)
        bases.append(a - E)
    unbatch = (lambda x: x) if batch else (lambda x: x[0])
    return Decomposition([unbatch(b) for b in bases], [unbatch(d) for d in details], edges=[], energies=[],
                         method="specular", params={"radii": [specular_radius(k) for k in range(1, order + 1)]},
                         names=("A", "E"))
