"""CPU backend of the AT solver: fused red-black kernels compiled by Numba.

Same update as `backend_numpy` (read its docstring for the math); what differs is the
memory layout and the schedule, both chosen so the inner loops are unit-stride SIMD.

Layout ("split checkerboard"). Each row is stored as two halves, even columns then odd
columns, with one ghost column at both ends of each half and one ghost row at the top and
bottom:  X[n, c, r, h, t] holds pixel (i, j) = (r - 1, 2 (t - 1) + h). A pixel's colour is
(i + j) % 2 = (i + h) % 2, so the pixels of one colour in row i are exactly one whole half
h = (i + colour) % 2, and their west/east neighbours are the other half q = 1 - h shifted
by -q / +h. Every access in a half-row update is contiguous, so LLVM vectorizes it (the
natural layout would need stride-2 loops, which it does not vectorize).

Ghosts hold 0 and are never written; masks mE/mW (per column) and mN/mS (per row) drop the
links that leave the image (the Neumann boundary of the energy).

Schedule. Each thread takes whole images and runs every sweep on one of them: its working
set (about 28 B/pixel, 1.9 MB at 256x256x3) stays in cache (the "cache-sized pieces"), and
no thread ever waits for another. Only for large images with fewer images than threads is
each half-sweep split into bands of rows across threads. Both run the same row kernel, and
rows of one colour are independent, so results are bitwise the same either way and do not
depend on the batch an image came in.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .params import ATParams

# Fast-math without reassociation, contraction (FMA), approximate reciprocals or functions:
# the loops vectorize without them (no reductions in the sweeps), and with them LLVM's vector
# body and its scalar fallback round differently. Which one runs is decided at run time by
# pointer checks between the arrays, so results depended on where the heap put the arrays:
# one image of 10,000 came out a last bit different after a resume (docs/dataset-store.md).
# With these flags the scalar and the vector loops give the same bits (tested).
_FASTMATH = {"nnan", "ninf", "nsz"}
_JIT = dict(cache=True, fastmath=_FASTMATH, error_model="numpy", nogil=True)
_ROW_BAND = 16  # rows per task in the row-parallel schedule (balances sync cost and load)
# Below this many pixels an image is solved by one thread even when threads sit idle: the
# banded schedule synchronises twice per sweep, which costs more than it saves on small
# images (and a lot on a loaded machine).
_BANDED_MIN_PIXELS = 512 * 512


# ----------------------------------------------------------------------------- layout

@njit(parallel=True, **_JIT)
def _pack(f_NHWC, X):
    """Natural (N, H, W, C) into split layout (N, C, H + 2, 2, Wh + 2); ghosts left at 0."""
    N, H, W, C = f_NHWC.shape
    for n in prange(N):
        for i in range(H):
            for j in range(W):
                for c in range(C):
                    X[n, c, i + 1, j & 1, (j >> 1) + 1] = f_NHWC[n, i, j, c]


@njit(parallel=True, **_JIT)
def _unpack(X, out_NHWC):
    N, H, W, C = out_NHWC.shape
    for n in prange(N):
        for i in range(H):
            for j in range(W):
                for c in range(C):
                    out_NHWC[n, i, j, c] = X[n, c, i + 1, j & 1, (j >> 1) + 1]


def _masks(W: int, Wh: int) -> tuple[np.ndarray, np.ndarray]:
    """mE[h, t] = 1 where column j = 2(t-1)+h has an east neighbour, mW likewise west."""
    mE = np.zeros((2, Wh + 2), np.float32)
    mW = np.zeros((2, Wh + 2), np.float32)
    for h in range(2):
        j = 2 * np.arange(Wh) + h
        valid = j < W
        mE[h, 1:Wh + 1] = valid & (j + 1 < W)
        mW[h, 1:Wh + 1] = valid & (j > 0)
    return mE, mW


# ----------------------------------------------------------------------------- kernels

# Index arithmetic inside the loops is uint64 on purpose: numba wraps negative int64 indices
# (a compare and select per access), which LLVM cannot vectorize. Offsets are computed in
# int64, cast once, and only ever increased inside a loop. Constants are float32 so nothing
# is promoted to float64.
_u64 = numba.uint64
_ONE = np.float32(1.0)


@njit(**_JIT)
def _grad2_row(U, n, r, h, count, C, H, L, mE, mS, g):
    """g[t] = sum_c (Dx u_c^2 + Dy u_c^2) for the pixels of half h of padded row r."""
    q = 1 - h
    me = _u64(h * L)
    end = _u64(count) + _u64(1)
    for t in range(_u64(1), end):
        g[t] = 0.0
    for ch in range(C):
        row = (((n * C + ch) * (H + 2) + r) * 2) * L
        up, uE, uS = _u64(row + h * L), _u64(row + q * L + h), _u64(row + 2 * L + h * L)
        for t in range(_u64(1), end):
            x = U[up + t]
            dE = U[uE + t] - x
            dS = U[uS + t] - x
            g[t] += mE[me + t] * dE * dE + mS * dS * dS


@njit(**_JIT)
def _relax_row(U, S, F, mE, mW, g, n, i, colour, C, H, L, count0, count1, a, b, c, omega):
    """One colour's update of image row i: exact s-step, then SOR u-step, at each pixel.

    Arrays come flat and rows are addressed by offsets: a numba view per row costs an
    atomic reference count, which threads sharing one array fight over. Each loop writes
    one array; the link weights are recomputed per channel (in registers) rather than kept
    in scratch rows, so LLVM has few pointers to check and vectorizes every loop.
    """
    r = i + 1
    h = (i + colour) & 1
    q = 1 - h
    count = count0 if h == 0 else count1
    mN = _ONE if i > 0 else np.float32(0.0)
    mS = _ONE if i < H - 1 else np.float32(0.0)
    _grad2_row(U, n, r, h, count, C, H, L, mE, mS, g)

    end = _u64(count) + _u64(1)
    me = _u64(h * L)                         # this half's masks
    srow = ((n * (H + 2) + r) * 2) * L
    sp = _u64(srow + h * L)                  # this colour's s in row r
    sE = _u64(srow + q * L + h)              # east neighbour: other half, shifted by +h
    sW = _u64(srow + q * L + h - 1)          # west neighbour: other half, shifted by -q
    sN = _u64(srow + h * L - 2 * L)
    sS = _u64(srow + h * L + 2 * L)
    for t in range(_u64(1), end):
        aG = a * g[t]
        nb = mE[me + t] * S[sE + t] + mW[me + t] * S[sW + t] + mN * S[sN + t] + mS * S[sS + t]
        deg = mE[me + t] + mW[me + t] + mN + mS
        S[sp + t] = (aG + b * nb) / (aG + c + b * deg)

    for ch in range(C):
        row = (((n * C + ch) * (H + 2) + r) * 2) * L
        up = _u64(row + h * L)
        uE, uW = _u64(row + q * L + h), _u64(row + q * L + h - 1)
        uN, uS = _u64(row + h * L - 2 * L), _u64(row + h * L + 2 * L)
        for t in range(_u64(1), end):
            s_p = S[sp + t]
            s_w = S[sW + t]
            s_n = S[sN + t]
            w = (_ONE - s_p) * (_ONE - s_p)
            wE = mE[me + t] * w
            wS = mS * w
            wW = mW[me + t] * (_ONE - s_w) * (_ONE - s_w)
            wN = mN * (_ONE - s_n) * (_ONE - s_n)
            pull = wE * U[uE + t] + wW * U[uW + t] + wN * U[uN + t] + wS * U[uS + t]
            u_star = (F[up + t] + a * pull) / (_ONE + a * (wE + wW + wN + wS))
            U[up + t] += omega * (u_star - U[up + t])


@njit(**_JIT)
def _init_edges_image(U, S, mE, mW, g, n, C, H, L, count0, count1, a, b, c):
    """s = alpha G / (alpha G + c + b deg) from u = f: the s-step with every neighbour at 0."""
    for i in range(H):
        mN = _ONE if i > 0 else np.float32(0.0)
        mS = _ONE if i < H - 1 else np.float32(0.0)
        for h in range(2):
            count = count0 if h == 0 else count1
            _grad2_row(U, n, i + 1, h, count, C, H, L, mE, mS, g)
            sp = ((n * (H + 2) + i + 1) * 2 + h) * L
            for t in range(1, count + 1):
                aG = a * g[t]
                S[sp + t] = aG / (aG + c + b * (mE[h * L + t] + mW[h * L + t] + mN + mS))


@njit(**_JIT)
def _solve_image(U, S, F, mE, mW, n, chans, H, L, count0, count1, n_iter, seed, a, b, c, omega):
    """All sweeps of image n, one thread.

    `chans` is a tuple of C zeros: its length is part of the type, so each channel count
    gets its own compiled (and cached) kernel with C a constant, which LLVM unrolls; with C a
    runtime integer the same loops run 3x slower.
    """
    C = len(chans)
    g = np.empty(L, np.float32)
    if seed:
        _init_edges_image(U, S, mE, mW, g, n, C, H, L, count0, count1, a, b, c)
    for _ in range(n_iter):
        for colour in range(2):
            for i in range(H):
                _relax_row(U, S, F, mE, mW, g, n, i, colour, C, H, L, count0, count1, a, b, c, omega)


@njit(**_JIT)
def _relax_band(U, S, F, mE, mW, n, i0, i1, colour, chans, H, L, count0, count1, a, b, c, omega):
    """One colour's update of rows [i0, i1) of image n (`chans` as in _solve_image)."""
    C = len(chans)
    g = np.empty(L, np.float32)
    for i in range(i0, i1):
        _relax_row(U, S, F, mE, mW, g, n, i, colour, C, H, L, count0, count1, a, b, c, omega)


@njit(parallel=True, **_JIT)
def _solve_per_image(U, S, F, mE, mW, N, chans, H, L, count0, count1, n_iter, seed, a, b, c, omega):
    """Schedule for N >= threads: each thread runs all sweeps of whole images.
    `seed` first sets s from u (done once, before the first sweep)."""
    for n in prange(N):
        _solve_image(U, S, F, mE, mW, n, chans, H, L, count0, count1, n_iter, seed, a, b, c, omega)


@njit(parallel=True, **_JIT)
def _solve_banded(U, S, F, mE, mW, N, chans, H, L, count0, count1, n_iter, seed, a, b, c, omega, band):
    """Schedule for N < threads: every half-sweep split into bands of rows across threads
    (rows of one colour are independent, so any split gives the same result)."""
    if seed:
        for n in prange(N):
            _solve_image(U, S, F, mE, mW, n, chans, H, L, count0, count1, 0, True, a, b, c, omega)
    n_band = (H + band - 1) // band
    for _ in range(n_iter):
        for colour in range(2):
            for job in prange(N * n_band):
                n = job // n_band
                i0 = (job % n_band) * band
                _relax_band(U, S, F, mE, mW, n, i0, min(H, i0 + band), colour, chans, H, L, count0, count1,
                            a, b, c, omega)


@njit(parallel=True, **_JIT)
def _energy(U, S, F, mE, H, count0, count1, alpha, lam, eps):
    """E(u, s) per image (float64 accumulation), straight from the split layout."""
    N, C = U.shape[0], U.shape[1]
    out = np.zeros(N, np.float64)
    for n in prange(N):
        data = 0.0
        smooth = 0.0
        edge = 0.0
        for i in range(H):
            r = i + 1
            mS = 1.0 if i < H - 1 else 0.0
            for h in range(2):
                q = 1 - h
                count = count0 if h == 0 else count1
                for t in range(1, count + 1):
                    me = mE[h, t]
                    g = 0.0
                    for ch in range(C):
                        up = np.float64(U[n, ch, r, h, t])
                        d = up - F[n, ch, r, h, t]
                        data += d * d
                        dE = me * (U[n, ch, r, q, t + h] - up)
                        dS = mS * (U[n, ch, r + 1, h, t] - up)
                        g += dE * dE + dS * dS
                    sp = np.float64(S[n, r, h, t])
                    smooth += (1.0 - sp) * (1.0 - sp) * g
                    dsE = me * (S[n, r, q, t + h] - sp)
                    dsS = mS * (S[n, r + 1, h, t] - sp)
                    edge += eps * (dsE * dsE + dsS * dsS) + sp * sp / (4.0 * eps)
        out[n] = data + alpha * smooth + lam * edge
    return out


# ----------------------------------------------------------------------------- driver

def solve(f_NHWC: np.ndarray, p: ATParams, track_energy: bool = False):
    """Run p.n_iter sweeps from u = f on a float32 (N, H, W, C) batch.

    Returns (u_NHWC, s_NHW, energy_N, history); history (iterations + 1, N) when track_energy.
    """
    N, H, W, C = f_NHWC.shape
    Wh = (W + 1) // 2
    count0, count1 = Wh, W // 2
    F = np.zeros((N, C, H + 2, 2, Wh + 2), np.float32)
    _pack(f_NHWC, F)
    U = F.copy()
    S = np.zeros((N, H + 2, 2, Wh + 2), np.float32)
    mE, mW = _masks(W, Wh)
    a, b, c = np.float32(p.alpha), np.float32(p.lam * p.eps), np.float32(p.lam / (4 * p.eps))
    omega = np.float32(p.omega)
    energy = lambda: _energy(U, S, F, mE, H, count0, count1, float(p.alpha), float(p.lam), float(p.eps))

    flat = (U.reshape(-1), S.reshape(-1), F.reshape(-1), mE.reshape(-1), mW.reshape(-1), N, (0,) * C, H, Wh + 2,
            count0, count1)

    def run(n_iter: int, seed: bool):
        if N >= numba.get_num_threads() or H * W < _BANDED_MIN_PIXELS:
            _solve_per_image(*flat, n_iter, seed, a, b, c, omega)
        else:
            _solve_banded(*flat, n_iter, seed, a, b, c, omega, _ROW_BAND)

    history = None
    if track_energy:  # one sweep per call, so E can be read in between
        run(0, True)
        history = [energy()]
        for _ in range(p.n_iter):
            run(1, False)
            history.append(energy())
    else:
        run(p.n_iter, True)

    u = np.empty_like(f_NHWC)
    _unpack(U, u)
    s = np.empty((N, H, W, 1), np.float32)
    _unpack(S[:, None], s)
    return u, s[..., 0], energy(), history
