"""Checks of the exact reference (tests/exact_at.py) against the energy contract `at_energy`.

The reference is derived by hand from energy.py; these tests make sure the derivation is
right: its Laplacians reproduce the energy's quadratic forms, s*(u) and u*(s) are the
minimizers of `at_energy` itself (zero gradient by central differences, every perturbation
raises E by at least the known curvature), and the alternation never raises E.
"""
import numpy as np
import pytest

from exact_at import (_s_step_fast, exact_alternating, exact_s, exact_u, grad2, grid_links,
                      laplacian)
from nextdetail.decomp import at_energy
from nextdetail.decomp.energy import forward_diff

ALPHA, LAM, EPS = 10.0, 0.01, 0.01


def cartoon(H=24, W=29, C=3, seed=0):
    """Photo-like test image: flat regions with sharp edges (a disk, a step), a smooth ramp
    and mild noise, so s* has both edges (s ~ 1) and flat areas (s ~ 0)."""
    rng = np.random.default_rng(seed)
    i, j = np.mgrid[0:H, 0:W]
    img = np.empty((H, W, C))
    for c in range(C):
        disk = ((i - H / 2) ** 2 + (j - W / 3) ** 2 < (min(H, W) / 4) ** 2) * (0.6 - 0.2 * c)
        step = (j > 2 * W // 3) * 0.3
        img[..., c] = 0.1 + disk + step + 0.2 * i / H + 0.02 * rng.standard_normal((H, W))
    return img


def energy(u, f, s, eps=EPS):
    return at_energy(u, f, s, ALPHA, LAM, eps)


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (5, 1), (7, 9)])
def test_laplacians_reproduce_the_energy_quadratic_forms(shape):
    """x^T L x = sum Dx x^2 + Dy x^2 and u_c^T L_w u_c summed = sum (1-s)^2 G."""
    H, W = shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((H, W))
    u = rng.standard_normal((H, W, 3))
    s = rng.random((H, W))
    tail, head = grid_links(H, W)
    assert tail.size == H * (W - 1) + W * (H - 1)         # one link per nonzero forward difference
    L = laplacian(H, W)
    grad_sq = (forward_diff(x, 1) ** 2 + forward_diff(x, 0) ** 2).sum()
    assert x.ravel() @ (L @ x.ravel()) == pytest.approx(grad_sq, rel=1e-12, abs=1e-12)
    Lw = laplacian(H, W, (1 - s) ** 2)
    quad = sum(u[..., c].ravel() @ (Lw @ u[..., c].ravel()) for c in range(3))
    assert quad == pytest.approx(((1 - s) ** 2 * grad2(u)).sum(), rel=1e-12, abs=1e-12)
    assert abs(L @ np.ones(H * W)).max() < 1e-12           # constants are in the kernel (Neumann)


def _central_gradient(fun, x, points, h=1e-3):
    """Central differences of fun at x along the coordinates `points` (exact for a quadratic)."""
    out = []
    for idx in points:
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        out.append((fun(xp) - fun(xm)) / (2 * h))
    return np.array(out)


@pytest.mark.parametrize("eps", [EPS, 1.5])      # the default, and a diffuse edge set
def test_exact_s_minimizes_the_energy_over_s(eps):
    f = cartoon()
    u = cartoon(seed=1)                             # any u: s*(u) does not involve f
    s = exact_s(u, ALPHA, LAM, eps)
    H, W = s.shape
    assert s.shape == (H, W) and 0 <= s.min() and s.max() <= 1
    if eps == EPS:                                  # edges and flat parts both present
        assert s.max() > 0.9 and np.median(s) < 0.5  # (with eps = 1.5, s ~ 1 nearly everywhere)
    E0 = energy(u, f, s, eps)
    rng = np.random.default_rng(2)
    pts = [(0, 0), (H - 1, W - 1), (0, W - 1), (H - 1, 0)] + \
        [tuple(p) for p in rng.integers(0, [H, W], size=(20, 2))]
    g = _central_gradient(lambda t: energy(u, f, t, eps), s, pts)
    assert np.abs(g).max() < 1e-7 * max(1.0, E0)
    # the same check sees a non-minimizer: 0.01 off s* the gradient is ~2 (alpha G + c) 0.01
    assert np.abs(_central_gradient(lambda t: energy(u, f, t, eps), s + 0.01, pts)).max() > 1e-3
    c = LAM / (4 * eps)                              # E(u, s* + d) - E(u, s*) >= c |d|^2
    for scale in (1e-1, 1e-2, 1e-3):
        d = scale * rng.standard_normal(s.shape)
        assert energy(u, f, s + d, eps) - E0 >= (1 - 1e-6) * c * (d * d).sum() > 0


def test_fast_s_step_matches_the_direct_solve():
    """The alternation's CG s-step is the direct solve, for both the strongly diagonally
    dominant default eps and a large eps (where it may fall back to SuperLU)."""
    u = cartoon(40, 37)
    L = laplacian(40, 37)
    for eps in (EPS, 3.0):
        direct = exact_s(u, ALPHA, LAM, eps)
        fast = _s_step_fast(u, ALPHA, LAM, eps, L, np.zeros((40, 37)))
        assert np.abs(fast - direct).max() < 1e-9


def test_exact_u_minimizes_the_energy_over_u():
    f = cartoon()
    rng = np.random.default_rng(3)
    s = rng.random(f.shape[:2])
    u = exact_u(f, s, ALPHA)
    assert u.shape == f.shape
    E0 = energy(u, f, s)
    H, W, C = f.shape
    pts = [(0, 0, 0), (H - 1, W - 1, 2), (3, W - 1, 1)] + \
        [tuple(p) for p in rng.integers(0, [H, W, C], size=(20, 3))]
    g = _central_gradient(lambda t: energy(t, f, s), u, pts)
    assert np.abs(g).max() < 1e-7 * max(1.0, E0)
    for scale in (1e-1, 1e-2, 1e-3):               # Hessian/2 = I + alpha L_w >= I
        d = scale * rng.standard_normal(u.shape)
        assert energy(u + d, f, s) - E0 >= (1 - 1e-6) * (d * d).sum() > 0
    gray = exact_u(f[..., 0], s, ALPHA)             # (H, W) in, (H, W) out, channel 0's answer
    assert gray.shape == (H, W) and np.allclose(gray, u[..., 0], atol=1e-12)


def test_alternation_never_raises_the_energy_and_ends_at_a_fixed_point():
    f = cartoon(32, 40)
    hist = []
    u, s, E, it = exact_alternating(f, ALPHA, LAM, EPS, history=hist)
    assert 1 < it < 2000 and len(hist) == it + 1
    assert E == hist[-1] == pytest.approx(energy(u, f, s), rel=1e-14)
    steps = np.diff(hist)
    assert steps.max() <= 1e-12 * hist[0]           # non-increasing up to float64 rounding
    assert hist[-1] < 0.5 * hist[0]                 # and it does real work from s*(f)
    assert hist[0] == pytest.approx(energy(f, f, exact_s(f, ALPHA, LAM, EPS)), rel=1e-12)
    # a fixed point of both steps: s is s*(u), and one more u-step barely moves u
    assert np.abs(s - exact_s(u, ALPHA, LAM, EPS)).max() < 1e-9
    assert np.abs(exact_u(f, s, ALPHA) - u).max() < 1e-3


def test_alternation_handles_degenerate_shapes():
    f1 = np.full((1, 1, 3), 0.4)
    u, s, E, it = exact_alternating(f1)             # a single pixel has no difference at all
    assert np.array_equal(u, f1) and s.shape == (1, 1) and s[0, 0] == 0 and E == 0
    row = cartoon(1, 30, 1)[..., 0]                 # (1, W) grayscale: one chain of links
    u, s, E, it = exact_alternating(row)
    assert u.shape == (1, 30) and s.shape == (1, 30)
    assert E <= energy(row, row, exact_s(row, ALPHA, LAM, EPS))
