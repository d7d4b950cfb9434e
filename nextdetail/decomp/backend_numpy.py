"""Readable vectorized reference of the AT solver (the numba and cupy kernels mirror it).

One sweep is two half-sweeps over a red-black checkerboard (colour (i + j) % 2). In the
half-sweep of one colour, every pixel p of that colour takes, in this order:

  1. the exact minimizer of E over s_p (u and the other s fixed):
         s_p = (alpha G_p + b sum_q s_q) / (alpha G_p + c + b deg_p),
     G_p = sum_c (Dx u_c^2 + Dy u_c^2) at p, b = lam eps, c = lam / (4 eps), q the deg_p
     in-image 4-neighbours of p;
  2. an over-relaxed (SOR, 0 < omega < 2) step towards the minimizer of E over u_p:
         u*_p = (f_p + alpha sum_q w_pq u_q) / (1 + alpha sum_q w_pq),
     w_pq the edge weight (1 - s)^2 of the forward difference that joins p and q.

Pixels of one colour share no term of E with each other, so each half-sweep is a block
coordinate step; each step lowers E, hence E never increases from sweep to sweep, and the
order inside a colour does not matter (backends agree up to float32 rounding).

Each image stops on its own when it has converged (the rule in `energy`): every CHECK_EVERY
sweeps its energy is compared with that of CHECK_EVERY sweeps before.
"""
from __future__ import annotations

import numpy as np

from .energy import CHECK_EVERY, batch_energy, converged
from .params import ATParams


def _neighbour_sum(x_NHW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the in-image 4-neighbours of every pixel, and their count (Neumann)."""
    tot = np.zeros_like(x_NHW)
    deg = np.zeros(x_NHW.shape[1:], dtype=x_NHW.dtype)
    tot[:, :, :-1] += x_NHW[:, :, 1:]
    tot[:, :, 1:] += x_NHW[:, :, :-1]
    tot[:, :-1, :] += x_NHW[:, 1:, :]
    tot[:, 1:, :] += x_NHW[:, :-1, :]
    deg[:, :-1] += 1
    deg[:, 1:] += 1
    deg[:-1, :] += 1
    deg[1:, :] += 1
    return tot, deg


def grad2(u_NHWC: np.ndarray) -> np.ndarray:
    """G = sum_c (Dx u_c^2 + Dy u_c^2), forward differences, Neumann; shape (N, H, W)."""
    dx = np.zeros_like(u_NHWC)
    dy = np.zeros_like(u_NHWC)
    dx[:, :, :-1] = u_NHWC[:, :, 1:] - u_NHWC[:, :, :-1]
    dy[:, :-1, :] = u_NHWC[:, 1:, :] - u_NHWC[:, :-1, :]
    return (dx * dx + dy * dy).sum(axis=-1)


def edge_update(u_NHWC: np.ndarray, s_NHW: np.ndarray, p: ATParams) -> np.ndarray:
    """Pointwise-exact s_p for every pixel from u and the current neighbours of s."""
    a, b, c = np.float32(p.alpha), np.float32(p.lam * p.eps), np.float32(p.lam / (4 * p.eps))
    aG = a * grad2(u_NHWC)
    nb, deg = _neighbour_sum(s_NHW)
    return (aG + b * nb) / (aG + c + b * deg)


def _u_update(u_NHWC, s_NHW, f_NHWC, p: ATParams) -> np.ndarray:
    """SOR step of u towards its exact minimizer for the current s, at every pixel."""
    a, omega = np.float32(p.alpha), np.float32(p.omega)
    w = (1 - s_NHW) ** 2
    wE = np.zeros_like(w); wE[:, :, :-1] = w[:, :, :-1]    # link (i,j)-(i,j+1) weighs w[i,j]
    wW = np.zeros_like(w); wW[:, :, 1:] = w[:, :, :-1]     # link (i,j-1)-(i,j) weighs w[i,j-1]
    wS = np.zeros_like(w); wS[:, :-1, :] = w[:, :-1, :]
    wN = np.zeros_like(w); wN[:, 1:, :] = w[:, :-1, :]
    pull = np.zeros_like(u_NHWC)
    pull[:, :, :-1] += wE[:, :, :-1, None] * u_NHWC[:, :, 1:]
    pull[:, :, 1:] += wW[:, :, 1:, None] * u_NHWC[:, :, :-1]
    pull[:, :-1, :] += wS[:, :-1, :, None] * u_NHWC[:, 1:, :]
    pull[:, 1:, :] += wN[:, 1:, :, None] * u_NHWC[:, :-1, :]
    u_star = (f_NHWC + a * pull) / (1 + a * (wE + wW + wS + wN))[..., None]
    return u_NHWC + omega * (u_star - u_NHWC)


def _sweep(u, s, f, colour, p: ATParams):
    """One sweep (colour 0, then colour 1) of the images of u, s, f; returns the new u, s."""
    for col in (0, 1):
        m = colour == col
        s = np.where(m, edge_update(u, s, p), s)
        u = np.where(m[..., None], _u_update(u, s, f, p), u)
    return u, s


def solve(f_NHWC: np.ndarray, p: ATParams, track_energy: bool = False):
    """Sweeps from u = f on a float32 (N, H, W, C) batch until each image has converged
    (`energy.converged`, checked every CHECK_EVERY sweeps; never when p.tol = 0) or has run
    p.n_iter sweeps. A stopped image is left as it is while the others go on.

    Returns (u_NHWC, s_NHW, energy_N, history, sweeps_N); history lists the per-image energies
    from u = f and after each sweep when track_energy (a stopped image's repeated), else None;
    sweeps_N the sweeps each image ran."""
    N, H, W, C = f_NHWC.shape
    ii, jj = np.indices((H, W))
    colour = (ii + jj) % 2
    u = f_NHWC.copy()
    s = edge_update(u, np.zeros((N, H, W), np.float32), p)   # start from s*(f) without coupling
    history = [batch_energy(u, f_NHWC, s, p)] if track_energy else None
    check = p.tol > 0
    E_prev = batch_energy(u, f_NHWC, s, p) if check else None
    sweeps = np.zeros(N, np.int64)
    act = np.arange(N)                                       # the images still sweeping
    for t in range(1, p.n_iter + 1):
        u[act], s[act] = _sweep(u[act], s[act], f_NHWC[act], colour, p)
        sweeps[act] = t
        if track_energy:
            history.append(batch_energy(u, f_NHWC, s, p))
        if check and t % CHECK_EVERY == 0:
            E = batch_energy(u[act], f_NHWC[act], s[act], p)
            done = np.array([converged(E_prev[n], e, p.tol) for n, e in zip(act, E)], bool)
            E_prev[act] = E
            act = act[~done]
        if act.size == 0:
            break
    return u, s, batch_energy(u, f_NHWC, s, p), history, sweeps
