"""GPU backend of the AT solver: one fused CUDA kernel per half-sweep over the whole batch.

Same update as `backend_numpy` (read its docstring for the math). Each launch updates one
colour of every image in the batch: a thread owns one pixel of that colour, computes
G = sum_c |grad u_c|^2 there, takes the exact s-step, then the SOR u-step for all channels.
Pixels of one colour share no term of E, so threads never race, and results do not depend
on the launch configuration or on the batch an image came in.

The iteration loop only enqueues launches on the current stream: no host round trip
until the result is read back. Launch overhead (a few microseconds) is small against a
half-sweep over a batch of 256x256 images (about 16M threads for 512 images), so there is
no CUDA graph yet; capture the sweep loop into one if a profile of small batches shows
launch-bound gaps.

Memory layout on the device is planar, (N, C, H, W) for u and f and (N, H, W) for s, so
neighbouring threads touch neighbouring addresses.

Bytes per pixel per sweep that a kernel must move (float32, C = 3): read f (12), read and
write u (24), read and write s (8) = 44 B; each launch reads whole cache lines of both
colours, so the traffic actually issued is higher unless the batch stays in L2.
"""
from __future__ import annotations

import numpy as np

from .params import ATParams


# The per-pixel steps are __host__ __device__ so that tests can run this exact source on the
# CPU through nvcc's host compiler (tests/test_cuda_source.py) where no GPU is present.
CUDA_SOURCE = r"""
extern "C" {

__host__ __device__ inline float sq(float x) { return x * x; }

// G = sum_c (Dx u_c^2 + Dy u_c^2) at pixel (i, j) of image n (forward differences, Neumann).
__host__ __device__ inline float at_grad2(const float* __restrict__ u, long long n, int i, int j,
                                          int C, int H, int W)
{
    long long HW = (long long)H * W, p = (long long)i * W + j;
    float G = 0.f;
    for (int ch = 0; ch < C; ++ch) {
        const float* uc = u + (n * C + ch) * HW;
        float up = uc[p];
        float dE = j < W - 1 ? uc[p + 1] - up : 0.f;
        float dS = i < H - 1 ? uc[p + W] - up : 0.f;
        G += dE * dE + dS * dS;
    }
    return G;
}

// s = alpha G / (alpha G + c + b deg) from u = f: the s-step with all neighbours at 0.
__host__ __device__ inline void at_seed_pixel(const float* __restrict__ u, float* __restrict__ s,
                                              long long n, int i, int j, int C, int H, int W,
                                              float a, float b, float c)
{
    long long HW = (long long)H * W, p = (long long)i * W + j;
    float deg = (float)(j < W - 1) + (float)(j > 0) + (float)(i > 0) + (float)(i < H - 1);
    float aG = a * at_grad2(u, n, i, j, C, H, W);
    s[n * HW + p] = aG / (aG + c + b * deg);
}

// Pixel (i, j) of image n: exact s-step, then SOR u-step (see backend_numpy for the math).
__host__ __device__ inline void at_relax_pixel(float* __restrict__ u, float* __restrict__ s,
                                               const float* __restrict__ f,
                                               long long n, int i, int j, int C, int H, int W,
                                               float a, float b, float c, float omega)
{
    long long HW = (long long)H * W, p = (long long)i * W + j;
    float* sn = s + n * HW;
    bool hasE = j < W - 1, hasW = j > 0, hasN = i > 0, hasS = i < H - 1;
    float mE = hasE, mW = hasW, mN = hasN, mS = hasS;

    float G = at_grad2(u, n, i, j, C, H, W);
    float sE = hasE ? sn[p + 1] : 0.f, sW = hasW ? sn[p - 1] : 0.f;
    float sN = hasN ? sn[p - W] : 0.f, sS = hasS ? sn[p + W] : 0.f;
    float aG = a * G;
    float s_new = (aG + b * (mE * sE + mW * sW + mN * sN + mS * sS)) / (aG + c + b * (mE + mW + mN + mS));
    sn[p] = s_new;

    // a link weighs (1 - s)^2 of the pixel its forward difference starts at
    float w = sq(1.f - s_new);
    float wE = mE * w, wS = mS * w, wW = mW * sq(1.f - sW), wN = mN * sq(1.f - sN);
    float inv = 1.f / (1.f + a * (wE + wW + wN + wS));
    for (int ch = 0; ch < C; ++ch) {
        float* uc = u + (n * C + ch) * HW;
        float up = uc[p];
        float pull = (hasE ? wE * uc[p + 1] : 0.f) + (hasW ? wW * uc[p - 1] : 0.f)
                   + (hasN ? wN * uc[p - W] : 0.f) + (hasS ? wS * uc[p + W] : 0.f);
        float u_star = (f[(n * C + ch) * HW + p] + a * pull) * inv;
        uc[p] = up + omega * (u_star - up);
    }
}

__global__ void at_seed_edges(const float* __restrict__ u, float* __restrict__ s,
                              int N, int C, int H, int W, float a, float b, float c)
{
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long HW = (long long)H * W;
    if (idx >= (long long)N * HW) return;
    long long p = idx % HW;
    at_seed_pixel(u, s, idx / HW, (int)(p / W), (int)(p % W), C, H, W, a, b, c);
}

// One colour of one sweep, for every image of the batch: one thread per pixel of that colour.
__global__ void at_half_sweep(float* __restrict__ u, float* __restrict__ s,
                              const float* __restrict__ f,
                              int N, int C, int H, int W, int colour,
                              float a, float b, float c, float omega)
{
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int Wc = (W + 1) / 2;                       // pixels of one colour per row, at most
    if (idx >= (long long)N * H * Wc) return;
    int k = (int)(idx % Wc);
    long long rest = idx / Wc;
    int i = (int)(rest % H);
    int j = 2 * k + ((i + colour) & 1);
    if (j >= W) return;
    at_relax_pixel(u, s, f, rest / H, i, j, C, H, W, a, b, c, omega);
}

}  // extern "C"
"""

_THREADS = 256
_module = None


def _kernels():
    """Compile once per process (cupy also caches the binary on disk)."""
    global _module
    import cupy as cp
    if _module is None:
        _module = cp.RawModule(code=CUDA_SOURCE, options=("-std=c++14",))
    return _module.get_function("at_seed_edges"), _module.get_function("at_half_sweep")


def batch_energy(u_NCHW, f_NCHW, s_NHW, p: ATParams):
    """E(u, s) per image on the GPU in float64 (same formula as energy.at_energy)."""
    import cupy as cp
    u = u_NCHW.astype(cp.float64)
    f = f_NCHW.astype(cp.float64)
    s = s_NHW.astype(cp.float64)
    dx = cp.zeros_like(u); dx[..., :-1] = u[..., 1:] - u[..., :-1]
    dy = cp.zeros_like(u); dy[..., :-1, :] = u[..., 1:, :] - u[..., :-1, :]
    sx = cp.zeros_like(s); sx[..., :-1] = s[..., 1:] - s[..., :-1]
    sy = cp.zeros_like(s); sy[..., :-1, :] = s[..., 1:, :] - s[..., :-1, :]
    data = ((u - f) ** 2).sum(axis=(1, 2, 3))
    smooth = ((1 - s) ** 2 * (dx ** 2 + dy ** 2).sum(axis=1)).sum(axis=(1, 2))
    edges = p.eps * (sx ** 2 + sy ** 2).sum(axis=(1, 2)) + (s ** 2).sum(axis=(1, 2)) / (4 * p.eps)
    return data + p.alpha * smooth + p.lam * edges


def solve(f_NHWC, p: ATParams, track_energy: bool = False):
    """Run p.n_iter sweeps from u = f on a float32 (N, H, W, C) batch (numpy or cupy).

    Returns (u_NHWC, s_NHW, energy_N, history): u and s of the input's kind (a cupy input
    stays on the GPU), energies as numpy; history (iterations + 1, N) when track_energy.
    """
    import cupy as cp
    on_host = isinstance(f_NHWC, np.ndarray)
    N, H, W, C = f_NHWC.shape
    f = cp.ascontiguousarray(cp.asarray(f_NHWC, dtype=cp.float32).transpose(0, 3, 1, 2))
    u = f.copy()
    s = cp.empty((N, H, W), cp.float32)
    seed, half_sweep = _kernels()
    a, b, c = np.float32(p.alpha), np.float32(p.lam * p.eps), np.float32(p.lam / (4 * p.eps))
    omega = np.float32(p.omega)
    dims = (np.int32(N), np.int32(C), np.int32(H), np.int32(W))
    n_half = N * H * ((W + 1) // 2)

    seed(((N * H * W + _THREADS - 1) // _THREADS,), (_THREADS,), (u, s, *dims, a, b, c))

    def sweeps(k: int):
        for _ in range(k):
            for colour in (0, 1):
                half_sweep(((n_half + _THREADS - 1) // _THREADS,), (_THREADS,),
                           (u, s, f, *dims, np.int32(colour), a, b, c, omega))

    history = None
    if track_energy:
        history = [batch_energy(u, f, s, p)]
        for _ in range(p.n_iter):
            sweeps(1)
            history.append(batch_energy(u, f, s, p))
        history = cp.stack(history)
    else:
        sweeps(p.n_iter)

    energy = cp.asnumpy(batch_energy(u, f, s, p))      # energies always come back to the host
    history = None if history is None else cp.asnumpy(history)
    u_NHWC = u.transpose(0, 2, 3, 1)
    if on_host:
        return cp.asnumpy(u_NHWC), cp.asnumpy(s), energy, history
    return cp.ascontiguousarray(u_NHWC), s, energy, history
