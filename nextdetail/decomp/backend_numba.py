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

Convergence. The thread that sweeps an image also decides when it stops: every CHECK_EVERY
sweeps it computes the image's energy (`_image_energy`: float32 terms per pixel, added in
float64 column by column over the rows, then across the columns, a fixed order whatever the
schedule) and applies `energy.converged`; a check costs about half a sweep (measured by
benchmarks/bench_decomp.py). The banded schedule computes the same terms in parallel and
adds them in the same order, so an image stops after the same sweep, with the same bits.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .energy import CHECK_EVERY, converged
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

_converged = njit(**_JIT)(converged)      # the stopping rule, one source for every backend

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
def _energy_terms(U, S, F, mE, g, e, eo, n, i, C, H, L, count0, count1, a, b, c):
    """The float32 terms of E(u, s) at the pixels of row i of image n,

        e_p = sum_c (u_c - f_c)^2 + a (1 - s_p)^2 G_p + b (Dx s^2 + Dy s^2)_p + c s_p^2,

    a = alpha, b = lam eps, c = lam / (4 eps), into e[eo + h L + t] for pixel (i, 2 (t - 1) + h)
    (its ghosts are left alone: keep them 0). g: a scratch row (L,)."""
    r = i + 1
    mS = _ONE if i < H - 1 else np.float32(0.0)
    for h in range(2):
        q = 1 - h
        count = count0 if h == 0 else count1
        _grad2_row(U, n, r, h, count, C, H, L, mE, mS, g)
        end = _u64(count) + _u64(1)
        ep = _u64(eo + h * L)
        for t in range(_u64(1), end):
            e[ep + t] = 0.0
        for ch in range(C):
            up = _u64((((n * C + ch) * (H + 2) + r) * 2 + h) * L)
            for t in range(_u64(1), end):
                d = U[up + t] - F[up + t]
                e[ep + t] += d * d
        me = _u64(h * L)
        srow = ((n * (H + 2) + r) * 2) * L
        sp, sE, sS = _u64(srow + h * L), _u64(srow + q * L + h), _u64(srow + h * L + 2 * L)
        for t in range(_u64(1), end):
            s_p = S[sp + t]
            dE = mE[me + t] * (S[sE + t] - s_p)
            dS = mS * (S[sS + t] - s_p)
            e[ep + t] += a * (_ONE - s_p) * (_ONE - s_p) * g[t] + b * (dE * dE + dS * dS) + c * s_p * s_p


@njit(**_JIT)
def _accumulate(acc, e, eo):
    """acc[k] += e[eo + k] in float64, k < len(acc): a row of terms added column by column."""
    for k in range(_u64(0), _u64(len(acc))):
        acc[k] += e[_u64(eo) + k]


@njit(**_JIT)
def _total(acc):
    """The sum of acc in index order."""
    total = 0.0
    for k in range(len(acc)):
        total += acc[k]
    return total


@njit(**_JIT)
def _image_energy(U, S, F, mE, g, e, acc, n, C, H, L, count0, count1, a, b, c):
    """E(u, s) of image n: its terms (`_energy_terms`) added row after row into the per-column
    float64 sums acc (2 L,), then those in order: a fixed order (the same bits in any schedule),
    and the adds vectorize. e: scratch (2 L,) with zero ghosts."""
    acc[:] = 0.0
    for i in range(H):
        _energy_terms(U, S, F, mE, g, e, 0, n, i, C, H, L, count0, count1, a, b, c)
        _accumulate(acc, e, 0)
    return _total(acc)


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
def _solve_image(U, S, F, mE, mW, n, chans, H, L, count0, count1, n_iter, budget, seed, a, b, c, omega,
                 tol, sweeps, E_prev, done):
    """Up to `budget` more sweeps of image n, one thread, stopping when it has converged
    (`energy.converged` every CHECK_EVERY sweeps when tol > 0) or has run n_iter; its state
    between calls is sweeps[n], E_prev[n] (E at the last check) and done[n]. `seed` first
    sets s from u (and E_0).

    `chans` is a tuple of C zeros: its length is part of the type, so each channel count
    gets its own compiled (and cached) kernel with C a constant, which LLVM unrolls; with C a
    runtime integer the same loops run 3x slower.
    """
    C = len(chans)
    g = np.empty(L, np.float32)
    e = np.zeros(2 * L, np.float32)
    acc = np.empty(2 * L, np.float64)
    if seed:
        _init_edges_image(U, S, mE, mW, g, n, C, H, L, count0, count1, a, b, c)
        if tol > 0:
            E_prev[n] = _image_energy(U, S, F, mE, g, e, acc, n, C, H, L, count0, count1, a, b, c)
    t = sweeps[n]
    stop = min(n_iter, t + budget)
    while t < stop and not done[n]:
        for colour in range(2):
            for i in range(H):
                _relax_row(U, S, F, mE, mW, g, n, i, colour, C, H, L, count0, count1, a, b, c, omega)
        t += 1
        if tol > 0 and t % CHECK_EVERY == 0:
            E = _image_energy(U, S, F, mE, g, e, acc, n, C, H, L, count0, count1, a, b, c)
            done[n] = _converged(E_prev[n], E, tol)
            E_prev[n] = E
    sweeps[n] = t


@njit(**_JIT)
def _relax_band(U, S, F, mE, mW, n, i0, i1, colour, chans, H, L, count0, count1, a, b, c, omega):
    """One colour's update of rows [i0, i1) of image n (`chans` as in _solve_image)."""
    C = len(chans)
    g = np.empty(L, np.float32)
    for i in range(i0, i1):
        _relax_row(U, S, F, mE, mW, g, n, i, colour, C, H, L, count0, count1, a, b, c, omega)


@njit(parallel=True, **_JIT)
def _solve_per_image(U, S, F, mE, mW, N, chans, H, L, count0, count1, n_iter, budget, seed, a, b, c, omega,
                     tol, sweeps, E_prev, done, terms, band):
    """Schedule for N >= threads: each thread runs all sweeps of whole images, and decides
    when each of them stops (terms, band: unused, the banded schedule's signature)."""
    for n in prange(N):
        _solve_image(U, S, F, mE, mW, n, chans, H, L, count0, count1, n_iter, budget, seed, a, b, c, omega,
                     tol, sweeps, E_prev, done)


@njit(parallel=True, **_JIT)
def _solve_banded(U, S, F, mE, mW, N, chans, H, L, count0, count1, n_iter, budget, seed, a, b, c, omega,
                  tol, sweeps, E_prev, done, terms, band):
    """Schedule for N < threads: every half-sweep split into bands of rows across threads
    (rows of one colour are independent, so any split gives the same result). An energy
    check computes the terms of all rows in parallel into `terms` (N H 2 L, zeros at the
    ghosts), then adds each image's rows in order: the bits `_image_energy` gives. Converged
    images leave the launch."""
    C = len(chans)
    if seed:
        for n in prange(N):
            _solve_image(U, S, F, mE, mW, n, chans, H, L, count0, count1, n_iter, 0, True, a, b, c, omega,
                         tol, sweeps, E_prev, done)
    n_band = (H + band - 1) // band
    act = np.empty(N, np.int64)
    for _ in range(budget):
        na = 0
        for n in range(N):
            if not done[n] and sweeps[n] < n_iter:
                act[na] = n
                na += 1
        if na == 0:
            break
        for colour in range(2):
            for job in prange(na * n_band):
                n = act[job // n_band]
                i0 = (job % n_band) * band
                _relax_band(U, S, F, mE, mW, n, i0, min(H, i0 + band), colour, chans, H, L, count0, count1,
                            a, b, c, omega)
        for j in range(na):
            sweeps[act[j]] += 1
        if tol > 0 and sweeps[act[0]] % CHECK_EVERY == 0:       # the active images are in step
            for job in prange(na * H):
                n, i = act[job // H], job % H
                g = np.empty(L, np.float32)
                _energy_terms(U, S, F, mE, g, terms, (n * H + i) * 2 * L, n, i, C, H, L, count0, count1, a, b, c)
            for j in prange(na):
                n = act[j]
                acc = np.zeros(2 * L, np.float64)
                for i in range(H):
                    _accumulate(acc, terms, (n * H + i) * 2 * L)
                E = _total(acc)
                done[n] = _converged(E_prev[n], E, tol)
                E_prev[n] = E


@njit(parallel=True, **_JIT)
def _energies(U, S, F, mE, N, chans, H, L, count0, count1, a, b, c):
    """E(u, s) per image (`_image_energy`), one thread per image."""
    out = np.zeros(N, np.float64)
    for n in prange(N):
        g = np.empty(L, np.float32)
        e = np.zeros(2 * L, np.float32)
        acc = np.empty(2 * L, np.float64)
        out[n] = _image_energy(U, S, F, mE, g, e, acc, n, len(chans), H, L, count0, count1, a, b, c)
    return out


# ----------------------------------------------------------------------------- driver

def solve(f_NHWC: np.ndarray, p: ATParams, track_energy: bool = False):
    """Sweeps from u = f on a float32 (N, H, W, C) batch until each image has converged or
    has run p.n_iter (the rule in `energy`, decided per image by the thread that sweeps it).

    Returns (u_NHWC, s_NHW, energy_N, history, sweeps_N); history (T + 1, N) when track_energy.
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
    flat = (U.reshape(-1), S.reshape(-1), F.reshape(-1), mE.reshape(-1), mW.reshape(-1), N, (0,) * C, H, Wh + 2,
            count0, count1)
    energy = lambda: _energies(*flat[:4], *flat[5:], a, b, c)  # noqa: E731
    sweeps, E_prev, done = np.zeros(N, np.int64), np.zeros(N, np.float64), np.zeros(N, np.uint8)
    banded = N < numba.get_num_threads() and H * W >= _BANDED_MIN_PIXELS
    terms = np.zeros(N * H * 2 * (Wh + 2) if banded and p.tol > 0 else 1, np.float32)

    def run(budget: int, seed: bool):
        schedule = _solve_banded if banded else _solve_per_image
        schedule(*flat, p.n_iter, budget, seed, a, b, c, omega, float(p.tol), sweeps, E_prev, done, terms, _ROW_BAND)

    history = None
    if track_energy:  # one sweep per call, so E can be read in between
        run(0, True)
        history = [energy()]
        while ((sweeps < p.n_iter) & (done == 0)).any():
            run(1, False)
            history.append(energy())
    else:
        run(p.n_iter, True)

    u = np.empty_like(f_NHWC)
    _unpack(U, u)
    s = np.empty((N, H, W, 1), np.float32)
    _unpack(S[:, None], s)
    return u, s[..., 0], energy(), history, sweeps
