"""Intrinsic decomposition: albedo and shading, additive in log space (`method="intrinsic"`).

The intrinsic image model writes a pixel as reflectance times illumination, I = A * S, with A
(albedo) carrying the surfaces' colour and S (shading) the light, one grey value per pixel.
CART learns it additively, log I = log A + log S. This is the classical Retinex reading of it
(Land & McCann 1971; in log space as Horn 1974 and Blake 1985 did), with an edge-aware smoother
in place of Retinex's thresholded derivatives:

    L_I = log(I + eps_I)                                per channel; eps_I = 1/255 keeps black finite
    l   = log(Y + eps_I),  Y = 0.2126 R + 0.7152 G + 0.0722 B           (Rec. 709 luminance)
    L_S = the base B_n of n levels of Ambrosio-Tortorelli smoothing of l, in natural-log units
          (a shadow that halves the light is a step of 0.69)              grey, (H, W, 3)
    L_A = L_I - L_S                                                    colour, (H, W, 3)

so exp(L_A + L_S) - eps_I = I to float32 rounding. Shading is the piecewise-smooth part of the
log luminance: gradual illumination, shading of curved surfaces and the boundaries of cast
shadows (strong, long edges that AT keeps) go to S; texture, fine detail and all colour go to A.
Smoothing in log units rather than on [0, 1] is deliberate: a shadow is a ratio, the same log
step on a bright or a dark surface, so AT keeps shadow edges anywhere (mapped to [0, 1], the
5.5-unit log range weakened every edge and the shading came out a plain blur).

Limits (the ambiguity every classical method has): a strong reflectance edge between two large
uniform regions (a black-and-white pattern, a dark door in a white wall) is also strong and long,
so it lands in the shading; faint, soft shadows smaller than the smoothing reach stay in the
albedo; the grey shading assumes one white illuminant (coloured light is left in A). The scale
is the usual one: A * S = (cA)(S/c); here S follows the luminance, so A is near the pixel's
chromaticity times 1 in lit regions and exceeds 1 in dark shading.

As a Decomposition: bases [L_I, L_S], details [L_A] (the layers of generation order [L_S, L_A]
sum to L_I), space "log"; `edges` and `energies` are those of the shading's last AT level.
"""
from __future__ import annotations

import numpy as np

from .at import ambrosio_tortorelli, to_host
from .hierarchy import Decomposition, register_decomposition
from .logspace import LOG_EPS, to_log
from .params import ATParams

REC709 = np.array([0.2126, 0.7152, 0.0722], np.float32)


@register_decomposition("intrinsic", names=("S", "A"), space="log", single_level=True,
                        summary="log shading + log albedo; --order AT levels smooth the shading")
def intrinsic(image: np.ndarray, order: int, params: ATParams, backend: str) -> Decomposition:
    """Log-space albedo and shading (module docstring); `order` AT levels smooth the shading."""
    f = np.asarray(image, np.float32)
    if f.shape[-1] != 3 or f.ndim not in (3, 4):
        raise ValueError(f"the intrinsic decomposition needs RGB images (..., H, W, 3), got shape {f.shape}")
    L_I = to_log(f)
    u = to_log(f @ REC709)[..., None]                             # natural-log units, one channel
    edges, energies, sweeps = [], [], []
    for _ in range(order):
        r = ambrosio_tortorelli(u, params.alpha, params.lam, params.eps, backend=backend,
                                omega=params.omega, n_iter=params.n_iter, tol=params.tol)
        u = to_host(r.u).reshape(u.shape)
        edges.append(to_host(r.s))
        energies.append(r.energy)
        sweeps.append(r.iterations)
    # Grey: the same value in the three channels, so every layer has the image's shape.
    L_S = np.repeat(u, 3, axis=-1)
    L_A = (L_I - L_S).astype(np.float32)
    # One level of the hierarchy: the edges, energy and sweeps of the shading's last AT level.
    return Decomposition([L_I, L_S], [L_A], edges[-1:], energies[-1:], method="intrinsic",
                         params={**params.to_dict(), "levels": order, "log_eps": LOG_EPS},
                         names=("S", "A"), space="log", iterations=sweeps[-1:])
