"""The CuPy backend's CUDA source, run on the CPU.

No GPU is needed: the per-pixel steps are __host__ __device__, so nvcc's host compiler can
build a driver that runs them in the same order as the kernels (seed, then for each sweep
all pixels of colour 0, then of colour 1). That checks the source's arithmetic and indexing
against the numpy reference on machines without a GPU; tests/test_at.py checks the real
kernels when one is present.
"""
import shutil
import subprocess

import numpy as np
import pytest

from nextdetail.decomp import ambrosio_tortorelli
from nextdetail.decomp.backend_cupy import CUDA_SOURCE

NVCC = shutil.which("nvcc") or (shutil.which("/usr/local/cuda/bin/nvcc"))
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
int main(int argc, char** argv) {
    int N = atoi(argv[1]), C = atoi(argv[2]), H = atoi(argv[3]), W = atoi(argv[4]), iters = atoi(argv[5]);
    float a = atof(argv[6]), b = atof(argv[7]), c = atof(argv[8]), omega = atof(argv[9]);
    size_t nu = (size_t)N * C * H * W, ns = (size_t)N * H * W;
    std::vector<float> f(nu), u(nu), s(ns);
    FILE* in = fopen(argv[10], "rb");
    if (fread(f.data(), sizeof(float), nu, in) != nu) return 3;
    fclose(in);
    u = f;
    for (int n = 0; n < N; ++n) for (int i = 0; i < H; ++i) for (int j = 0; j < W; ++j)
        at_seed_pixel(u.data(), s.data(), n, i, j, C, H, W, a, b, c);
    for (int it = 0; it < iters; ++it)
        for (int colour = 0; colour < 2; ++colour)
            for (int n = 0; n < N; ++n) for (int i = 0; i < H; ++i)
                for (int j = (i + colour) & 1; j < W; j += 2)
                    at_relax_pixel(u.data(), s.data(), f.data(), n, i, j, C, H, W, a, b, c, omega);
    FILE* out = fopen(argv[11], "wb");
    fwrite(u.data(), sizeof(float), nu, out);
    fwrite(s.data(), sizeof(float), ns, out);
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


@pytest.mark.parametrize("shape", [(2, 13, 17, 3), (1, 1, 1, 3), (1, 1, 9, 1), (1, 8, 1, 2), (3, 16, 16, 3)])
def test_cuda_source_matches_numpy_reference(driver, tmp_path, shape):
    rng = np.random.default_rng(0)
    f = rng.random(shape, dtype=np.float32)
    N, H, W, C = shape
    alpha, lam, eps, omega, iters = 10.0, 0.01, 0.01, 1.6, 25
    np.ascontiguousarray(f.transpose(0, 3, 1, 2)).tofile(tmp_path / "f.bin")
    subprocess.run([str(driver), *map(str, (N, C, H, W, iters, alpha, lam * eps, lam / (4 * eps), omega)),
                    str(tmp_path / "f.bin"), str(tmp_path / "out.bin")], check=True)
    raw = np.fromfile(tmp_path / "out.bin", np.float32)
    u = raw[:N * C * H * W].reshape(N, C, H, W).transpose(0, 2, 3, 1)
    s = raw[N * C * H * W:].reshape(N, H, W)
    ref = ambrosio_tortorelli(f, alpha, lam, eps, omega=omega, n_iter=iters, backend="numpy")
    np.testing.assert_allclose(u, ref.u, atol=2e-5)
    np.testing.assert_allclose(s, ref.s, atol=2e-5)
