"""GPU backend of the AT solver: one fused CUDA kernel per half-sweep over the whole batch.

Same update as `backend_numpy` (read its docstring for the math). Each launch updates one
colour of every image in the batch: a thread owns one pixel of that colour, computes
G = sum_c |grad u_c|^2 there, takes the exact s-step, then the SOR u-step for all channels.
Pixels of one colour share no term of E, so threads never race, and results do not depend
on the launch configuration or on the batch an image came in.

The iteration loop only enqueues launches on the current stream; the one host round trip is
at each energy check, every CHECK_EVERY sweeps (when tol > 0): one kernel sums each active
image's energy in fixed-size chunks (float32 terms per pixel, float64 sums in a fixed tree:
the same bits whatever the batch), a second applies the stopping rule per image, and the host
reads back which images go on. Converged images drop out of the launches (the kernels take
the list of active images), so a batch costs what its slowest image costs and no more. Launch overhead (a few microseconds) is small against a
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

from .energy import CHECK_EVERY
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

// E's terms at pixel (i, j) of image n (energy.py), float32:
// sum_c (u_c - f_c)^2 + a (1 - s)^2 G + b (Dx s^2 + Dy s^2) + c s^2.
__host__ __device__ inline float at_energy_pixel(const float* __restrict__ u, const float* __restrict__ s,
                                                 const float* __restrict__ f, long long n, int i, int j,
                                                 int C, int H, int W, float a, float b, float c)
{
    long long HW = (long long)H * W, p = (long long)i * W + j;
    const float* sn = s + n * HW;
    float data = 0.f;
    for (int ch = 0; ch < C; ++ch) {
        float d = u[(n * C + ch) * HW + p] - f[(n * C + ch) * HW + p];
        data += d * d;
    }
    float sp = sn[p];
    float dE = j < W - 1 ? sn[p + 1] - sp : 0.f, dS = i < H - 1 ? sn[p + W] - sp : 0.f;
    return data + a * sq(1.f - sp) * at_grad2(u, n, i, j, C, H, W) + b * (dE * dE + dS * dS) + c * sp * sp;
}

#define AT_THREADS 256                     // threads per block of every kernel here
#define AT_PER 16                          // pixels per thread in an energy chunk
#define AT_CHUNK (AT_THREADS * AT_PER)     // pixels per energy block

// Thread t's share of energy chunk k of image n: pixels k AT_CHUNK + t + AT_THREADS m, in order.
__host__ __device__ inline double at_energy_thread(const float* __restrict__ u, const float* __restrict__ s,
                                                   const float* __restrict__ f, long long n, int k, int t,
                                                   int C, int H, int W, float a, float b, float c)
{
    long long HW = (long long)H * W;
    double acc = 0.0;
    for (int m = 0; m < AT_PER; ++m) {
        long long p = (long long)k * AT_CHUNK + t + (long long)AT_THREADS * m;
        if (p < HW) acc += at_energy_pixel(u, s, f, n, (int)(p / W), (int)(p % W), C, H, W, a, b, c);
    }
    return acc;
}

// The stopping rule (energy.converged): E fell by at most tol E over the last CHECK_EVERY sweeps.
__host__ __device__ inline bool at_converged(double E_prev, double E, double tol)
{
    return E_prev - E <= tol * E;
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

// One colour of one sweep, for the images[0..n_img) of the batch still sweeping: one thread per
// pixel of that colour.
__global__ void at_half_sweep(float* __restrict__ u, float* __restrict__ s,
                              const float* __restrict__ f, const int* __restrict__ images,
                              int n_img, int C, int H, int W, int colour,
                              float a, float b, float c, float omega)
{
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int Wc = (W + 1) / 2;                       // pixels of one colour per row, at most
    if (idx >= (long long)n_img * H * Wc) return;
    int k = (int)(idx % Wc);
    long long rest = idx / Wc;
    int i = (int)(rest % H);
    int j = 2 * k + ((i + colour) & 1);
    if (j >= W) return;
    at_relax_pixel(u, s, f, images[rest / H], i, j, C, H, W, a, b, c, omega);
}

// partial[n, k] = E's terms summed over chunk k of image n = images[blockIdx.x / chunks], by a
// fixed tree over the block's threads (the same bits in any launch).
__global__ void at_energy_chunks(const float* __restrict__ u, const float* __restrict__ s,
                                 const float* __restrict__ f, const int* __restrict__ images,
                                 int chunks, int C, int H, int W, float a, float b, float c,
                                 double* __restrict__ partial)
{
    __shared__ double acc[AT_THREADS];
    long long n = images[blockIdx.x / chunks];
    int k = blockIdx.x % chunks, t = threadIdx.x;
    acc[t] = at_energy_thread(u, s, f, n, k, t, C, H, W, a, b, c);
    __syncthreads();
    for (int half = AT_THREADS / 2; half > 0; half >>= 1) {
        if (t < half) acc[t] += acc[t + half];
        __syncthreads();
    }
    if (t == 0) partial[n * chunks + k] = acc[0];
}

// E of each image still sweeping (its chunks added in order), then the stopping rule:
// keep[j] = 0 when image images[j] has converged; E_prev[n] becomes E (start it at +inf).
__global__ void at_check(const double* __restrict__ partial, int chunks, const int* __restrict__ images,
                         int n_img, double tol, double* __restrict__ E_prev, unsigned char* __restrict__ keep)
{
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n_img) return;
    long long n = images[j];
    double E = 0.0;
    for (int k = 0; k < chunks; ++k) E += partial[n * chunks + k];
    keep[j] = !at_converged(E_prev[n], E, tol);
    E_prev[n] = E;
}

}  // extern "C"
"""

_THREADS = 256       # AT_THREADS of the source
_CHUNK = 256 * 16    # AT_CHUNK
_module = None


def _kernels():
    """Compile once per process (cupy also caches the binary on disk)."""
    global _module
    import cupy as cp
    if _module is None:
        _module = cp.RawModule(code=CUDA_SOURCE, options=("-std=c++14",))
    return {k: _module.get_function(k) for k in ("at_seed_edges", "at_half_sweep", "at_energy_chunks", "at_check")}


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
    """Sweeps from u = f on a float32 (N, H, W, C) batch (numpy or cupy) until each image has
    converged or has run p.n_iter (the rule in `energy`, checked on the device every
    CHECK_EVERY sweeps; converged images leave the launches).

    Returns (u_NHWC, s_NHW, energy_N, history, sweeps_N): u and s of the input's kind (a cupy
    input stays on the GPU), energies and sweeps as numpy; history (T + 1, N) when track_energy.
    """
    import cupy as cp
    on_host = isinstance(f_NHWC, np.ndarray)
    N, H, W, C = f_NHWC.shape
    f = cp.ascontiguousarray(cp.asarray(f_NHWC, dtype=cp.float32).transpose(0, 3, 1, 2))
    u = f.copy()
    s = cp.empty((N, H, W), cp.float32)
    k = _kernels()
    a, b, c = np.float32(p.alpha), np.float32(p.lam * p.eps), np.float32(p.lam / (4 * p.eps))
    omega = np.float32(p.omega)
    dims = (np.int32(C), np.int32(H), np.int32(W))
    chunks = -(-H * W // _CHUNK)
    blocks = lambda n: (-(-n // _THREADS),)  # noqa: E731

    k["at_seed_edges"](blocks(N * H * W), (_THREADS,), (u, s, np.int32(N), *dims, a, b, c))
    images = cp.arange(N, dtype=cp.int32)              # the images still sweeping
    sweeps = cp.zeros(N, cp.int64)
    partial = cp.empty(N * chunks, cp.float64)
    E_prev = cp.full(N, cp.inf, cp.float64)
    keep = cp.empty(N, cp.uint8)

    def half_sweeps():
        n_img = np.int32(images.size)
        for colour in (0, 1):
            k["at_half_sweep"](blocks(images.size * H * ((W + 1) // 2)), (_THREADS,),
                               (u, s, f, images, n_img, *dims, np.int32(colour), a, b, c, omega))

    def converged_now():
        """E of the active images, the rule; the flags of those that go on (no host sync)."""
        n_img = np.int32(images.size)
        k["at_energy_chunks"]((images.size * chunks,), (_THREADS,),
                              (u, s, f, images, np.int32(chunks), *dims, a, b, c, partial))
        k["at_check"](blocks(images.size), (_THREADS,),
                      (partial, np.int32(chunks), images, n_img, np.float64(p.tol), E_prev, keep))
        return keep[:images.size].astype(bool)

    check = p.tol > 0
    if check:
        converged_now()                                 # E_0
    history = [batch_energy(u, f, s, p)] if track_energy else None
    t = 0
    while t < p.n_iter and images.size:
        step = 1 if track_energy else (min(CHECK_EVERY, p.n_iter - t) if check else p.n_iter - t)
        for _ in range(step):
            half_sweeps()
        t += step
        if check and t % CHECK_EVERY == 0:
            go_on = converged_now()
            sweeps[images[~go_on]] = t
            images = images[go_on]                      # the host round trip of this check
        if track_energy:
            history.append(batch_energy(u, f, s, p))
    sweeps[images] = t

    energy = cp.asnumpy(batch_energy(u, f, s, p))      # energies always come back to the host
    history = None if history is None else cp.asnumpy(cp.stack(history))
    u_NHWC = u.transpose(0, 2, 3, 1)
    if on_host:
        return cp.asnumpy(u_NHWC), cp.asnumpy(s), energy, history, cp.asnumpy(sweeps)
    return cp.ascontiguousarray(u_NHWC), s, energy, history, cp.asnumpy(sweeps)
