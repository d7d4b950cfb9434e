"""The CuPy backend's CUDA source, run on the CPU.

No GPU is needed: the per-pixel steps are __host__ __device__, so nvcc's host compiler can
build a driver that runs them in the same order as the kernels (seed, then for each sweep
all pixels of colour 0, then of colour 1; every CHECK_EVERY sweeps each image's energy summed
as the kernels sum it, and the stopping rule). That checks the source's arithmetic and indexing
against the numpy reference on machines without a GPU; tests/test_at.py checks the real
kernels when one is present.
"""
import shutil
import subprocess

import numpy as np
import pytest

from nextdetail.decomp import ambrosio_tortorelli
from nextdetail.decomp.backend_cupy import CUDA_SOURCE
from nextdetail.decomp.energy import CHECK_EVERY

NVCC = shutil.which("nvcc") or (shutil.which("/usr/local/cuda/bin/nvcc"))
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

// E of image n as the kernels sum it: per chunk, each thread's share (at_energy_thread), then
// at_energy_chunks' tree over the block; the chunks in order (at_check).
double image_energy(const float* u, const float* s, const float* f, int n, int C, int H, int W,
                    float a, float b, float c) {
    long long HW = (long long)H * W;
    int chunks = (int)((HW + AT_CHUNK - 1) / AT_CHUNK);
    double E = 0.0, acc[AT_THREADS];
    for (int k = 0; k < chunks; ++k) {
        for (int t = 0; t < AT_THREADS; ++t) acc[t] = at_energy_thread(u, s, f, n, k, t, C, H, W, a, b, c);
        for (int half = AT_THREADS / 2; half > 0; half >>= 1)
            for (int t = 0; t < half; ++t) acc[t] += acc[t + half];
        E += acc[0];
    }
    return E;
}

int main(int argc, char** argv) {
    int N = atoi(argv[1]), C = atoi(argv[2]), H = atoi(argv[3]), W = atoi(argv[4]), iters = atoi(argv[5]);
    float a = atof(argv[6]), b = atof(argv[7]), c = atof(argv[8]), omega = atof(argv[9]);
    double tol = atof(argv[12]);
    int every = atoi(argv[13]);
    size_t nu = (size_t)N * C * H * W, ns = (size_t)N * H * W;
    std::vector<float> f(nu), u(nu), s(ns);
    FILE* in = fopen(argv[10], "rb");
    if (fread(f.data(), sizeof(float), nu, in) != nu) return 3;
    fclose(in);
    u = f;
    for (int n = 0; n < N; ++n) for (int i = 0; i < H; ++i) for (int j = 0; j < W; ++j)
        at_seed_pixel(u.data(), s.data(), n, i, j, C, H, W, a, b, c);
    // the host loop of backend_cupy.solve: E_prev from +inf, a check every `every` sweeps
    std::vector<double> E_prev(N, INFINITY), E(N);
    std::vector<long long> sweeps(N, 0);
    std::vector<int> active(N, 1);
    if (tol > 0)
        for (int n = 0; n < N; ++n) {
            E[n] = image_energy(u.data(), s.data(), f.data(), n, C, H, W, a, b, c);
            active[n] = !at_converged(E_prev[n], E[n], tol);
            E_prev[n] = E[n];
        }
    for (int it = 1; it <= iters; ++it) {
        for (int colour = 0; colour < 2; ++colour)
            for (int n = 0; n < N; ++n) if (active[n]) for (int i = 0; i < H; ++i)
                for (int j = (i + colour) & 1; j < W; j += 2)
                    at_relax_pixel(u.data(), s.data(), f.data(), n, i, j, C, H, W, a, b, c, omega);
        for (int n = 0; n < N; ++n) if (active[n]) sweeps[n] = it;
        if (tol > 0 && it % every == 0)
            for (int n = 0; n < N; ++n) if (active[n]) {
                double e = image_energy(u.data(), s.data(), f.data(), n, C, H, W, a, b, c);
                active[n] = !at_converged(E_prev[n], e, tol);
                E_prev[n] = e;
            }
    }
    for (int n = 0; n < N; ++n) E[n] = image_energy(u.data(), s.data(), f.data(), n, C, H, W, a, b, c);
    FILE* out = fopen(argv[11], "wb");
    fwrite(u.data(), sizeof(float), nu, out);
    fwrite(s.data(), sizeof(float), ns, out);
    fwrite(sweeps.data(), sizeof(long long), N, out);
    fwrite(E.data(), sizeof(double), N, out);
    fclose(out);
    return 0;
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda_src")
    (d / "at.cu").write_text(CUDA_SOURCE + DRIVER)
    res = subprocess.run([NVCC, "-std=c++14", "-x", "cu", str(d / "at.cu"), "-o", str(d / "at")],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail("nvcc could not compile the CUDA source:\n" + res.stderr[-3000:])
    return d / "at"


def run_source(driver, tmp_path, f, iters, tol, alpha=10.0, lam=0.01, eps=0.01, omega=1.6):
    """The driver on f (N, H, W, C): u, s, sweeps and energies as numpy arrays."""
    N, H, W, C = f.shape
    np.ascontiguousarray(f.transpose(0, 3, 1, 2)).tofile(tmp_path / "f.bin")
    subprocess.run([str(driver), *map(str, (N, C, H, W, iters, alpha, lam * eps, lam / (4 * eps), omega)),
                    str(tmp_path / "f.bin"), str(tmp_path / "out.bin"), repr(tol), str(CHECK_EVERY)], check=True)
    raw = (tmp_path / "out.bin").read_bytes()
    nu, ns = 4 * N * C * H * W, 4 * N * H * W
    u = np.frombuffer(raw[:nu], np.float32).reshape(N, C, H, W).transpose(0, 2, 3, 1)
    s = np.frombuffer(raw[nu:nu + ns], np.float32).reshape(N, H, W)
    sweeps = np.frombuffer(raw[nu + ns:nu + ns + 8 * N], np.int64)
    energy = np.frombuffer(raw[nu + ns + 8 * N:], np.float64)
    return u, s, sweeps, energy


@pytest.mark.parametrize("shape", [(2, 13, 17, 3), (1, 1, 1, 3), (1, 1, 9, 1), (1, 8, 1, 2), (3, 16, 16, 3)])
def test_cuda_source_matches_numpy_reference(driver, tmp_path, shape):
    rng = np.random.default_rng(0)
    f = rng.random(shape, dtype=np.float32)
    u, s, sweeps, energy = run_source(driver, tmp_path, f, 25, 0.0)
    ref = ambrosio_tortorelli(f, 10.0, 0.01, 0.01, omega=1.6, n_iter=25, tol=0, backend="numpy")
    np.testing.assert_allclose(u, ref.u.reshape(u.shape), atol=2e-5)
    np.testing.assert_allclose(s, ref.s.reshape(s.shape), atol=2e-5)
    assert (sweeps == 25).all()
    np.testing.assert_allclose(energy, np.reshape(ref.energy, -1), rtol=1e-6)


def test_cuda_source_stops_each_image_where_the_numpy_reference_does(driver, tmp_path):
    """The device-side energy (per-pixel terms, chunked sums over a fixed tree) and the stopping
    rule: on images that converge after different sweep counts, and one of two energy chunks
    (H W > AT_CHUNK), each image stops at the reference's sweep and ends at its u, s and E."""
    rng = np.random.default_rng(1)
    H, W = 67, 71
    step = np.where(np.arange(W) < W // 2, 0.2, 0.8)[None, :, None] * np.ones((H, 1, 3))
    f = np.stack([step + 0.03 * rng.standard_normal((H, W, 3)), rng.random((H, W, 3)),
                  0.5 + 0.05 * rng.random((H, W, 3)), np.full((H, W, 3), 0.4)])
    f = np.clip(f, 0, 1).astype(np.float32)
    tol = 2e-4
    u, s, sweeps, energy = run_source(driver, tmp_path, f, 200, tol)
    ref = ambrosio_tortorelli(f, n_iter=200, tol=tol, backend="numpy")
    assert len(set(ref.iterations)) >= 3 and ref.iterations.min() == CHECK_EVERY   # the flat image
    np.testing.assert_array_equal(sweeps, ref.iterations)
    np.testing.assert_allclose(u, ref.u, atol=2e-5)
    np.testing.assert_allclose(s, ref.s, atol=2e-5)
    np.testing.assert_allclose(energy, ref.energy, rtol=1e-6, atol=1e-7)      # the flat one: ~1e-9
