"""Hierarchical decompositions: I = B_n + D_n + ... + D_1 and the strategy registry.

Base-detail (CART): B_0 = I, B_k = AT(B_(k-1)).u, D_k = B_(k-1) - B_k; layers in generation
order are [B_n, D_n, ..., D_1].
"""
import numpy as np
import pytest

from nextdetail.decomp import (ATParams, Decomposition, ambrosio_tortorelli, at_energy,
                               available_decompositions, decompose, hierarchy,
                               register_decomposition)

N_ITER = 30     # fewer sweeps than the default: the layer algebra does not depend on them


def image(H=24, W=30, C=3, seed=0):
    """Flat regions, a step edge, a ramp and noise: every level removes something."""
    rng = np.random.default_rng(seed)
    img = np.where(np.arange(W) < W // 2, 0.25, 0.75)[None, :, None] + 0.3 * np.arange(H)[:, None, None] / H
    img = img + 0.05 * rng.standard_normal((H, W, C))
    return np.clip(img, 0, 1).astype(np.float32)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("order", [1, 3])
def test_base_detail_layers_rebuild_the_image(backend, order):
    I = image()
    d = decompose(I, order, backend=backend, n_iter=N_ITER)
    assert isinstance(d, Decomposition) and d.method == "base_detail" and d.order == order
    assert len(d.bases) == order + 1 and len(d.details) == len(d.edges) == len(d.energies) == order
    assert np.array_equal(d.bases[0], I)
    assert np.abs(d.reconstruct() - I).max() < 1e-6
    for k in range(1, order + 1):                                # D_k = B_(k-1) - B_k
        assert np.array_equal(d.details[k - 1], d.bases[k - 1] - d.bases[k])
    layers = d.layers                                            # [B_n, D_n, ..., D_1]
    assert len(layers) == order + 1 and layers[0] is d.base is d.bases[-1]
    for pos, k in enumerate(range(order, 0, -1), start=1):
        assert layers[pos] is d.details[k - 1]
    assert np.abs(sum(layers) - I).max() < 1e-6
    assert d.params == ATParams(n_iter=N_ITER).to_dict()


def test_each_level_is_one_at_smoothing_of_the_previous_base():
    I = image(seed=1)
    d = decompose(I, 3, backend="numba", alpha=5.0, lam=0.02, eps=0.05, n_iter=N_ITER)
    for k in range(1, 4):
        r = ambrosio_tortorelli(d.bases[k - 1], 5.0, 0.02, 0.05, backend="numba", n_iter=N_ITER)
        np.testing.assert_allclose(d.bases[k], r.u, atol=1e-6)
        np.testing.assert_allclose(d.edges[k - 1], r.s, atol=1e-6)
        assert d.energies[k - 1] == pytest.approx(
            at_energy(d.bases[k], d.bases[k - 1], d.edges[k - 1], 5.0, 0.02, 0.05), rel=1e-5)
    # coarser bases are smoother: each level removes detail energy
    tv = [np.abs(np.diff(b, axis=1)).sum() for b in d.bases]
    assert tv[0] > tv[1] > tv[2] > tv[3]


def test_grayscale_and_batch_decompositions():
    gray = image(C=1)[..., 0]
    d = decompose(gray, 2, backend="numba", n_iter=N_ITER)
    assert d.base.shape == gray.shape and d.edges[0].shape == gray.shape
    assert np.abs(d.reconstruct() - gray).max() < 1e-6

    batch = np.stack([image(seed=k) for k in range(3)])
    db = decompose(batch, 2, backend="numba", n_iter=N_ITER)
    assert db.base.shape == batch.shape and db.edges[0].shape == batch.shape[:3]
    assert db.energies[0].shape == (3,) and db.iterations[0].shape == (3,)
    assert np.abs(db.reconstruct() - batch).max() < 1e-6
    for n in range(3):                                           # each image as if alone
        one = decompose(batch[n], 2, backend="numba", n_iter=N_ITER)
        assert [int(t[n]) for t in db.iterations] == one.iterations
        for k in range(2):
            np.testing.assert_allclose(db.details[k][n], one.details[k], atol=1e-6)
        np.testing.assert_allclose(db.base[n], one.base, atol=1e-6)


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry for this test, so strategies registered here do not leak."""
    monkeypatch.setattr(hierarchy, "_REGISTRY", dict(hierarchy._REGISTRY))


def test_registry_accepts_a_new_strategy(scratch_registry):
    calls = []

    @register_decomposition("halves_test")
    def halves(image, order, params, backend):
        """Toy strategy: B_k = B_(k-1) / 2."""
        calls.append((image.shape, order, params, backend))
        bases = [image]
        for _ in range(order):
            bases.append(bases[-1] / 2)
        details = [a - b for a, b in zip(bases, bases[1:])]
        return Decomposition(bases, details, [None] * order, [0.0] * order, "halves_test", params.to_dict())

    assert "halves_test" in available_decompositions() and "base_detail" in available_decompositions()
    I = image()
    d = decompose(I, 2, method="halves_test", backend="numpy", alpha=3.0)
    assert d.method == "halves_test" and np.allclose(d.base, I / 4)
    assert np.abs(d.reconstruct() - I).max() < 1e-6
    (shape, order, params, backend), = calls
    assert shape == I.shape and order == 2 and backend == "numpy"
    assert isinstance(params, ATParams) and params.alpha == 3.0
    with pytest.raises(ValueError, match="already registered"):
        register_decomposition("halves_test")(halves)


def test_registry_rejects_unknown_names_and_bad_arguments():
    I = image()
    with pytest.raises(ValueError, match="unknown decomposition 'nope'.*base_detail"):
        decompose(I, 2, method="nope")
    for order in (0, -1, 1.5):
        with pytest.raises(ValueError, match="order"):
            decompose(I, order, backend="numpy")
    with pytest.raises(TypeError, match="decompose"):
        decompose(I, 2, backend="numpy", sigma=1.0)               # not an ATParams field
    with pytest.raises(ValueError, match="eps"):
        decompose(I, 2, backend="numpy", eps=0.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        decompose(np.full((4, 4, 3), np.nan, np.float32), 2, backend="numpy")
    with pytest.raises(TypeError, match="integer"):
        decompose(np.zeros((4, 4, 3), np.uint8), 2, backend="numpy")
