"""The AT solver's public entry point and its backends.

Every backend runs the same red-black sweeps (backend_numpy's docstring), so they must agree
up to float32 rounding; every backend must report the energy of the contract (`at_energy`)
and never raise it from sweep to sweep. The quality bar against the exact minimization is
in test_at_quality.py; the exact reference itself is checked in test_at_exact.py.

Measured agreement, numpy vs numba after 100 sweeps (float32): random and grayscale inputs
max |du| ~ 1e-6, |ds| ~ 2e-5; real 256x256 RGB crops max |du| 4.8e-5, |ds| 2.4e-4, relative
energy 3e-8. s = aG / (aG + c + ...) amplifies a rounding difference in G by up to
alpha / c = 40 where G is small, hence the looser bound on s.
"""
import os

import numba
import numpy as np
import pytest

from nextdetail.decomp import ambrosio_tortorelli, at_energy
from nextdetail.decomp.at import cupy_usable
from nextdetail.decomp.energy import CHECK_EVERY, converged

GPU = cupy_usable()
needs_gpu = pytest.mark.skipif(not GPU, reason="cupy with a CUDA device not available")
BACKENDS = ["numpy", "numba", pytest.param("cupy", marks=needs_gpu)]

U_TOL, S_TOL, E_RTOL = 1e-4, 1e-3, 1e-6      # numpy vs numba (and cupy vs numba), see above
ALPHA, LAM, EPS = 10.0, 0.01, 0.01
TOL = 1e-3                                   # a convergence tolerance the test images reach


def rand(*shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def noisy_step(H=40, W=48, C=3, seed=0):
    """Two flat halves (0.2 | 0.8) with noise of std 0.03: the textbook AT input."""
    img = np.where(np.arange(W) < W // 2, 0.2, 0.8)[None, :, None] * np.ones((H, 1, C))
    img = img + 0.03 * np.random.default_rng(seed).standard_normal((H, W, C))
    return np.clip(img, 0, 1).astype(np.float32)


def seed_edges(f, alpha=ALPHA, lam=LAM, eps=EPS):
    """s before the first sweep: the s-step from u = f with all neighbours of s at 0,
    aG / (aG + lam/(4 eps) + lam eps deg), deg the in-image neighbour count (float64)."""
    f = np.asarray(f, np.float64)
    f = f[..., None] if f.ndim == 2 else f
    H, W = f.shape[:2]
    dx = np.zeros_like(f); dx[:, :-1] = f[:, 1:] - f[:, :-1]
    dy = np.zeros_like(f); dy[:-1] = f[1:] - f[:-1]
    aG = alpha * (dx ** 2 + dy ** 2).sum(-1)
    deg = np.zeros((H, W)); deg[:, :-1] += 1; deg[:, 1:] += 1; deg[:-1] += 1; deg[1:] += 1
    return aG / (aG + lam / (4 * eps) + lam * eps * deg)


def assert_agree(a, b):
    """Two ATResults of one input agree up to float32 rounding after the sweeps."""
    assert a.u.shape == b.u.shape and a.s.shape == b.s.shape
    assert np.abs(np.asarray(a.u) - np.asarray(b.u)).max() < U_TOL
    assert np.abs(np.asarray(a.s) - np.asarray(b.s)).max() < S_TOL
    np.testing.assert_allclose(a.energy, b.energy, rtol=E_RTOL)


# ---------------------------------------------------------------- backend agreement

AGREEMENT_INPUTS = {
    "1x1": rand(1, 1, 3),
    "1xN": rand(1, 17, 3),
    "Nx1": rand(23, 1, 3),
    "odd": rand(31, 47, 3),
    "gray": rand(40, 33),
    "4ch": rand(9, 12, 4),
    "batch": rand(3, 20, 25, 3),
    "step": noisy_step(),
}


@pytest.mark.parametrize("name", list(AGREEMENT_INPUTS))
def test_numba_agrees_with_numpy(name):
    f = AGREEMENT_INPUTS[name]
    a = ambrosio_tortorelli(f, backend="numpy")
    b = ambrosio_tortorelli(f, backend="numba")
    assert (a.backend, b.backend) == ("numpy", "numba")
    assert_agree(a, b)


@pytest.fixture(scope="module")
def real_crops(shared_data):
    """Real pictures at awkward sizes: an odd RGB crop and a crop of a grayscale-only file."""
    from PIL import Image
    rgb = np.asarray(Image.open(shared_data / "kodak24" / "kodim05.png").convert("RGB"), np.float32) / 255
    gray = np.asarray(Image.open(shared_data / "set14" / "bridge.png").convert("L"), np.float32) / 255
    return {"rgb_97x131": np.ascontiguousarray(rgb[200:297, 300:431]),
            "gray_128x101": np.ascontiguousarray(gray[100:228, 50:151])}


@pytest.mark.parametrize("name", ["rgb_97x131", "gray_128x101"])
def test_numba_agrees_with_numpy_on_real_crops(real_crops, name):
    f = real_crops[name]
    assert_agree(ambrosio_tortorelli(f, backend="numpy"), ambrosio_tortorelli(f, backend="numba"))


# ---------------------------------------------------------------- energy and descent

@pytest.mark.parametrize("backend", BACKENDS)
def test_reported_energy_is_the_contract_energy(backend):
    f = np.stack([noisy_step(seed=k) for k in range(2)] + [rand(40, 48, 3)])
    r = ambrosio_tortorelli(f, backend=backend, n_iter=30)
    assert r.energy.shape == (3,)
    for n in range(3):
        assert r.energy[n] == pytest.approx(at_energy(r.u[n], f[n], r.s[n], ALPHA, LAM, EPS), rel=1e-5)
    g = rand(21, 19)                                     # grayscale, one image: a float
    r = ambrosio_tortorelli(g, alpha=3.0, lam=0.05, eps=0.5, backend=backend, n_iter=10)
    assert isinstance(r.energy, float)
    assert r.energy == pytest.approx(at_energy(r.u, g, r.s, 3.0, 0.05, 0.5), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_energy_never_increases_from_sweep_to_sweep(backend):
    f = np.stack([noisy_step(48, 40, seed=1), rand(48, 40, 3)])
    r = ambrosio_tortorelli(f, backend=backend, n_iter=60, tol=0, track_energy=True)
    h = r.energy_history
    assert h.shape == (61, 2)
    # Each half-sweep is an exact block minimization in s and an SOR step in u (0 < omega < 2),
    # so in exact arithmetic E cannot rise. The state is float32, though: rounding each u and s
    # to float32 can move E by ~1e-7 relative, so allow rises below 1e-6 of E and no more (a
    # wrong update, e.g. a mis-indexed link weight, raises E by orders of magnitude more).
    rises = np.diff(h, axis=0)
    assert (rises <= 1e-6 * h[1:]).all()
    assert (h[-1] < h[0]).all() and h[-1, 0] < 0.5 * h[0, 0]   # and it does descend
    for n in range(2):
        assert h[0, n] == pytest.approx(at_energy(f[n], f[n], seed_edges(f[n]), ALPHA, LAM, EPS), rel=1e-5)
    np.testing.assert_allclose(h[-1], r.energy, rtol=1e-12)
    single = ambrosio_tortorelli(f[0], backend=backend, n_iter=5, track_energy=True)
    assert single.energy_history.shape == (6,)
    assert ambrosio_tortorelli(f[0], backend=backend, n_iter=5).energy_history is None
    # With the convergence test on, the history ends with the last image to stop and an image
    # that stopped keeps its energy; until then each image runs the sweeps of the run above.
    c = ambrosio_tortorelli(f, backend=backend, n_iter=60, tol=TOL, track_energy=True)
    T = c.iterations.max()
    assert c.energy_history.shape == (T + 1, 2) and T < 60
    for n, t in enumerate(c.iterations):
        assert (c.energy_history[t:, n] == c.energy_history[t, n]).all()
        np.testing.assert_allclose(c.energy_history[:t + 1, n], h[:t + 1, n], rtol=1e-12)


# ---------------------------------------------------------------- convergence

def stop_by_rule(h, tol):
    """The sweeps after which the rule of energy.py stops an image whose energy after each
    sweep is h (from a run without the test): the first t = k, 2k, ... with E_(t-k) - E_t <= tol E_t."""
    for t in range(CHECK_EVERY, len(h), CHECK_EVERY):
        if converged(h[t - CHECK_EVERY], h[t], tol):
            return t
    return len(h) - 1


def converging_batch():
    """Images that converge after different sweep counts: noisy steps, noise, a flat image."""
    return np.stack([noisy_step(24, 32, seed=3), rand(24, 32, 3, seed=4), noisy_step(24, 32, seed=5)[:, ::-1] * 0.5,
                     np.full((24, 32, 3), 0.3, np.float32)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_image_stops_by_the_rule_on_its_own_energy(backend):
    f = converging_batch()
    h = ambrosio_tortorelli(f, backend=backend, n_iter=120, tol=0, track_energy=True).energy_history
    r = ambrosio_tortorelli(f, backend=backend, n_iter=120, tol=TOL)
    expected = [stop_by_rule(h[:, n], TOL) for n in range(len(f))]
    assert list(r.iterations) == expected and len(set(expected)) >= 3
    assert r.iterations[3] == CHECK_EVERY                       # flat: E_0 = E_5 = 0
    assert (ambrosio_tortorelli(f, backend=backend, n_iter=120, tol=0).iterations == 120).all()
    capped = ambrosio_tortorelli(f, backend=backend, n_iter=12, tol=TOL)
    assert list(capped.iterations) == [min(12, e) for e in expected]


def pick(r, k):
    """(sweeps, u bytes, s bytes, energy) of image k of a batch result."""
    return r.iterations[k], r.u[k].tobytes(), r.s[k].tobytes(), r.energy[k]


def test_the_stop_depends_on_the_image_alone_bitwise():
    """numba: an image's sweeps, u, s and energy are the same bits alone or in any batch (with
    images that stop earlier or later, in any order), with 1 thread or 2 (the row-banded
    schedule: test_numba_row_banded_schedule_matches_per_image_and_numpy)."""
    f = converging_batch()
    batch = ambrosio_tortorelli(f, backend="numba", n_iter=120, tol=TOL)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one_thread = ambrosio_tortorelli(f[::-1], backend="numba", n_iter=120, tol=TOL)
    finally:
        numba.set_num_threads(threads)
    last = len(f) - 1
    for n in range(len(f)):
        alone = ambrosio_tortorelli(f[n], backend="numba", n_iter=120, tol=TOL)
        pair = ambrosio_tortorelli(f[[n, 0]], backend="numba", n_iter=120, tol=TOL)
        assert (alone.iterations, alone.u.tobytes(), alone.s.tobytes(), alone.energy) == pick(batch, n)
        assert pick(one_thread, last - n) == pick(batch, n) == pick(pair, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_sweeps_return_f_and_the_seed_edges(backend):
    f = noisy_step(17, 23)
    r = ambrosio_tortorelli(f, backend=backend, n_iter=0)
    assert np.array_equal(r.u, f) and r.iterations == 0
    np.testing.assert_allclose(r.s, seed_edges(f), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smooths_flat_regions_and_keeps_the_edge(backend):
    """What AT is for: noise in the flat halves is removed, the step between them stays sharp
    and is marked by s ~ 1 there, s ~ 0 elsewhere."""
    f = noisy_step(40, 48)
    r = ambrosio_tortorelli(f, backend=backend)
    left, right = r.u[:, 2:20], r.u[:, 28:46]
    assert left.std() < 0.3 * f[:, 2:20].std() and right.std() < 0.3 * f[:, 28:46].std()
    assert abs(left.mean() - 0.2) < 0.01 and abs(right.mean() - 0.8) < 0.01
    assert (r.u[:, 24] - r.u[:, 23]).mean() > 0.5              # the step is not blurred away
    assert r.s[:, 23].min() > 0.9                                # the link across the step
    assert np.median(r.s[:, :20]) < 0.1 and np.median(r.s[:, 28:]) < 0.1


# ---------------------------------------------------------------- shapes and batches

@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_gives_each_image_its_single_call_result(backend):
    f = np.stack([noisy_step(seed=0), rand(40, 48, 3, seed=1), noisy_step(seed=2)[::-1]])
    batch = ambrosio_tortorelli(f, backend=backend, n_iter=40)
    for n in range(3):
        one = ambrosio_tortorelli(f[n], backend=backend, n_iter=40)
        assert batch.iterations[n] == one.iterations             # each stops on its own
        # same operations on the same numbers: equal up to at most a last-bit difference
        np.testing.assert_allclose(batch.u[n], one.u, atol=1e-6, rtol=0)
        np.testing.assert_allclose(batch.s[n], one.s, atol=1e-6, rtol=0)
        assert batch.energy[n] == pytest.approx(one.energy, rel=1e-9)


def test_numba_row_banded_schedule_matches_per_image_and_numpy():
    """numba splits the sweeps of one large image (>= 512x512, fewer images than threads)
    into bands of rows across threads; in a batch of >= threads images each thread runs one
    image. Both schedules must give the numpy answer (odd sizes: partial bands and rows)."""
    H, W = 515, 523
    rng = np.random.default_rng(6)
    i, j = np.mgrid[0:H, 0:W]
    disk = ((i - 250) ** 2 + (j - 260) ** 2 < 150 ** 2) * 0.5 + 0.2
    f = np.clip(disk[..., None] + 0.05 * rng.standard_normal((H, W, 3)), 0, 1).astype(np.float32)
    banded = ambrosio_tortorelli(f, backend="numba", n_iter=30)
    n = max(2, numba.get_num_threads())                  # enough images for one per thread
    per_image = ambrosio_tortorelli(np.stack([f] + [f[::-1]] * (n - 1)), backend="numba", n_iter=30)
    assert banded.iterations == per_image.iterations[0]         # the check's sums: the same bits
    assert banded.u.tobytes() == per_image.u[0].tobytes() and banded.s.tobytes() == per_image.s[0].tobytes()
    assert_agree(banded, ambrosio_tortorelli(f, backend="numpy", n_iter=30))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, s_shape", [((13, 11), (13, 11)), ((13, 11, 3), (13, 11)),
                                            ((2, 13, 11, 3), (2, 13, 11)), ((1, 1), (1, 1))])
def test_output_shapes_types_and_input_untouched(backend, shape, s_shape):
    f64 = np.random.default_rng(4).random(shape)         # float64 in: converted, not rejected
    keep = f64.copy()
    r = ambrosio_tortorelli(f64, backend=backend, n_iter=3)
    assert r.u.shape == shape and r.s.shape == s_shape
    assert r.u.dtype == np.float32 and r.s.dtype == np.float32
    assert np.all(r.iterations == 3) and r.backend == backend
    assert np.array_equal(f64, keep)
    if len(shape) == 4:
        assert isinstance(r.energy, np.ndarray) and r.energy.shape == (shape[0],)
    else:
        assert isinstance(r.energy, float)


def test_auto_backend_picks_cupy_with_a_gpu_else_numba():
    r = ambrosio_tortorelli(rand(8, 8, 3), n_iter=2)
    assert r.backend == ("cupy" if GPU else "numba")


# ---------------------------------------------------------------- input and parameter errors

@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_a_value_error(backend, bad):
    f = rand(6, 7, 3)
    f[2, 3, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        ambrosio_tortorelli(f, backend=backend)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_integer_input_is_a_type_error(dtype):
    with pytest.raises(TypeError, match="integer"):
        ambrosio_tortorelli(np.zeros((4, 4, 3), dtype), backend="numpy")


@pytest.mark.parametrize("f", [np.zeros((4, 4, 3), bool), np.zeros((4, 4), complex)])
def test_non_real_input_is_a_type_error(f):
    with pytest.raises(TypeError):
        ambrosio_tortorelli(f, backend="numpy")


@pytest.mark.parametrize("shape", [(5,), (1, 2, 3, 4, 3), (0, 4, 3), (4, 0), (2, 4, 4, 0), ()])
def test_bad_shapes_are_value_errors(shape):
    with pytest.raises(ValueError, match="shape"):
        ambrosio_tortorelli(np.zeros(shape, np.float32), backend="numpy")


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.0), "eps"), (dict(eps=-0.1), "eps"), (dict(eps=float("nan")), "eps"),
    (dict(omega=0.0), "omega"), (dict(omega=2.0), "omega"), (dict(omega=-1.0), "omega"),
    (dict(omega=2.5), "omega"), (dict(lam=0.0), "lam"), (dict(alpha=-1.0), "alpha"),
    (dict(alpha=float("inf")), "alpha"), (dict(n_iter=-1), "n_iter"), (dict(n_iter=2.5), "n_iter"),
    (dict(tol=-1e-3), "tol"), (dict(tol=1.0), "tol"), (dict(tol=float("nan")), "tol"),
    (dict(backend="torch"), "backend"), (dict(backend="NUMBA"), "backend"),
])
def test_bad_parameters_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ambrosio_tortorelli(rand(4, 4, 3), **kwargs)


@pytest.mark.skipif(GPU, reason="a GPU is present")
def test_cupy_backend_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="cupy"):
        ambrosio_tortorelli(rand(4, 4, 3), backend="cupy")


# ---------------------------------------------------------------- CuPy

@pytest.fixture
def cp():
    cupy = pytest.importorskip("cupy")
    if not GPU:
        pytest.skip("cupy imports but sees no CUDA device")
    return cupy


def test_cupy_agrees_with_numba_on_a_batch(cp):
    f = np.stack([noisy_step(seed=k) for k in range(3)] + [rand(40, 48, 3), rand(40, 48, 3, seed=9)])
    g = ambrosio_tortorelli(f, backend="cupy")
    c = ambrosio_tortorelli(f, backend="numba")
    assert isinstance(g.u, np.ndarray) and isinstance(g.s, np.ndarray)   # numpy in, numpy out
    assert_agree(g, c)
    odd = rand(2, 31, 47, 3, seed=5)                     # odd sizes: partial colour rows
    assert_agree(ambrosio_tortorelli(odd, backend="cupy"), ambrosio_tortorelli(odd, backend="numba"))


def test_cupy_input_stays_on_the_gpu(cp):
    f = noisy_step()
    r = ambrosio_tortorelli(cp.asarray(f), backend="cupy", n_iter=20)
    assert isinstance(r.u, cp.ndarray) and isinstance(r.s, cp.ndarray)
    assert r.u.shape == f.shape and r.s.shape == f.shape[:2]
    ref = ambrosio_tortorelli(f, backend="numba", n_iter=20)
    assert np.abs(cp.asnumpy(r.u) - ref.u).max() < U_TOL
    assert r.energy == pytest.approx(ref.energy, rel=E_RTOL)


def test_numba_gives_the_same_bits_with_its_loops_vectorized_or_not(tmp_path):
    """LLVM runs a loop's vector body or its scalar fallback as run-time pointer checks decide,
    so the two must round alike, or results depend on where the heap put the arrays (a resumed
    store once differed from an uninterrupted one in one pixel). Compiled here with loop
    vectorization off (a cache of its own) and compared with this process's vectorized kernels,
    for 3 channels and for 1 (the intrinsic decomposition's luminance)."""
    import subprocess
    import sys

    rng = np.random.default_rng(7)
    f = rng.random((3, 24, 40, 3)).astype(np.float32)
    np.save(tmp_path / "f.npy", f)
    script = ("import sys, numpy as np; from nextdetail.decomp import ambrosio_tortorelli as at; "
              "f = np.load(sys.argv[1]); "
              "np.save(sys.argv[2], np.stack([at(f, backend='numba', n_iter=20).u, "
              "np.repeat(at(f[..., :1], backend='numba', n_iter=20).u, 3, -1)]))")
    env = dict(os.environ, NUMBA_LOOP_VECTORIZE="0", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.npy"), str(tmp_path / "scalar.npy")],
                   check=True, env=env)
    scalar = np.load(tmp_path / "scalar.npy")
    vector = np.stack([ambrosio_tortorelli(f, backend="numba", n_iter=20).u,
                       np.repeat(ambrosio_tortorelli(f[..., :1], backend="numba", n_iter=20).u, 3, -1)])
    assert scalar.tobytes() == vector.tobytes()
