"""The discrete Ambrosio-Tortorelli energy: the contract every backend solves.

For an image f and its smoothing u in R^(H x W x C) and one edge field s in R^(H x W)
shared by all channels (vectorial Mumford-Shah):

    E(u, s) = sum_{i,j,c} (u - f)^2
            + alpha * sum_{i,j} (1 - s)^2 * sum_c (Dx u_c^2 + Dy u_c^2)
            + lam   * sum_{i,j} [ eps * (Dx s^2 + Dy s^2) + s^2 / (4 eps) ]

with forward differences, a Neumann boundary and unit grid spacing:
Dx a[i, j] = a[i, j+1] - a[i, j] for j < W-1 and 0 on the last column; Dy likewise
over rows. s is near 1 on edges and near 0 in smooth regions.

When to stop (every backend, per image, a function of that image alone): with E_t the
energy after t sweeps (E_0: u = f with its seed edges), read every CHECK_EVERY = k sweeps,
an image stops after sweep t = k, 2k, ... at the first t where `converged(E_(t-k), E_t, tol)`,

    E_(t-k) - E_t <= tol * E_t,

and after n_iter sweeps at the most; tol = 0 turns the test off (n_iter sweeps always).
The numpy reference reads E_t with `at_energy`; numba and cupy with their own cheap
summation (float32 terms per pixel, float64 sums in a fixed order, so the same bits for an
image in any batch or schedule), which agrees with `at_energy` to ~1e-7 relative.
"""
from __future__ import annotations

import numpy as np

CHECK_EVERY = 5   # k: sweeps between two energy checks (and the window of the decrease)


def converged(E_prev: float, E: float, tol: float) -> bool:
    """The stopping rule: E fell by at most tol * E over the last CHECK_EVERY sweeps.

    Parameters
    ----------
    E_prev, E : float
        E(u, s) CHECK_EVERY sweeps ago and now (energy units of `at_energy`, >= 0).
    tol : float
        Relative tolerance in [0, 1); 0 never stops (the caller does not check then).
    """
    return E_prev - E <= tol * E


def forward_diff(a: np.ndarray, axis: int) -> np.ndarray:
    """Forward difference along `axis` with a Neumann boundary (0 on the last slice)."""
    d = np.zeros_like(a)
    n = a.shape[axis]
    if n > 1:
        hi = [slice(None)] * a.ndim
        lo = [slice(None)] * a.ndim
        hi[axis], lo[axis] = slice(1, None), slice(0, n - 1)
        d[tuple(lo)] = a[tuple(hi)] - a[tuple(lo)]
    return d


def at_energy(u, f, s, alpha: float, lam: float, eps: float) -> float:
    """E(u, s) above for one image, accumulated in float64.

    Parameters
    ----------
    u, f : array, shape (H, W, C) or (H, W)
        Smoothed image and data.
    s : array, shape (H, W)
        Edge field.
    alpha, lam, eps : float
        Smoothness weight, edge-length weight, edge width in pixels.
    """
    u = np.asarray(u, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    if u.ndim == 2:
        u, f = u[..., None], f[..., None]
    if u.shape != f.shape or u.ndim != 3 or s.shape != u.shape[:2]:
        raise ValueError(f"at_energy: shapes u{u.shape}, f{f.shape}, s{s.shape} do not fit (H,W[,C]) and (H,W)")
    grad2 = (forward_diff(u, 1) ** 2 + forward_diff(u, 0) ** 2).sum(axis=-1)
    data = ((u - f) ** 2).sum()
    smooth = alpha * ((1.0 - s) ** 2 * grad2).sum()
    edges = lam * (eps * (forward_diff(s, 1) ** 2 + forward_diff(s, 0) ** 2).sum() + (s ** 2).sum() / (4.0 * eps))
    return float(data + smooth + edges)


def batch_energy(u_NHWC, f_NHWC, s_NHW, p) -> np.ndarray:
    """E(u, s) of each image of a batch (N,), by `at_energy`; p holds alpha, lam, eps (ATParams)."""
    return np.array([at_energy(u_NHWC[n], f_NHWC[n], s_NHW[n], p.alpha, p.lam, p.eps)
                     for n in range(u_NHWC.shape[0])])
