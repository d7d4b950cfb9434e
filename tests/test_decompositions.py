"""The paper's other two decompositions, intrinsic (log albedo + log shading) and specular
(diffuse base + achromatic specular terms): exact reconstruction, what each factor takes on
synthetic scenes whose answer is known, determinism in a batch or alone, refusals, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nextdetail import cli
from nextdetail.decomp import available_decompositions, decompose
from nextdetail.decomp.logspace import LOG_EPS, from_log, to_log
from pipeline_data import photo_paths


def photos(n, tmp_path, size=48):
    from nextdetail.imageio import load_image
    return np.stack([load_image(p, size) for p in photo_paths(n, tmp_path)])


def test_both_are_registered():
    assert {"base_detail", "intrinsic", "specular"} <= set(available_decompositions())


@pytest.mark.parametrize("method,order", [("specular", 4), ("intrinsic", 2)])
def test_reconstruction_shapes_and_the_same_bytes_in_a_batch_or_alone(tmp_path, method, order):
    f = photos(3, tmp_path)
    dec = decompose(f, order, method=method, backend="numba", n_iter=10)
    levels = order if method == "specular" else 1
    assert dec.order == levels and len(dec.bases) == levels + 1 and len(dec.layers) == levels + 1
    assert all(x.dtype == np.float32 and x.shape == f.shape for x in dec.bases + dec.details)
    if method == "specular":
        np.testing.assert_allclose(dec.reconstruct(), f, atol=2e-6)              # I = A_n + sum E_k
        assert dec.layer_names == ["A_4", "E_4", "E_3", "E_2", "E_1"]
        for E in dec.details:                                                 # achromatic, >= 0
            assert (E >= 0).all() and (E == E[..., :1]).all()
        assert all((A >= -1e-7).all() for A in dec.bases)
    else:
        np.testing.assert_allclose(dec.reconstruct(), dec.bases[0], atol=1e-5)   # log I = log S + log A
        np.testing.assert_allclose(from_log(dec.reconstruct()), f, atol=2e-5)   # exp(...) - eps = I
        assert dec.space == "log" and dec.layer_names == ["S_1", "A_1"]
        assert (dec.bases[1] == dec.bases[1][..., :1]).all()                  # the shading is grey
    for i in range(len(f)):                                                   # batch == alone, bitwise
        alone = decompose(f[i], order, method=method, backend="numba", n_iter=10)
        for a, b in zip(alone.bases + alone.details, dec.bases + dec.details):
            assert a.tobytes() == b[i].tobytes()


def test_specular_takes_a_small_white_highlight_and_leaves_the_colours():
    y, x = np.mgrid[0:32, 0:32] / 31.0
    diffuse = np.stack([0.6 * x + 0.2, 0.3 + 0.0 * y, 0.5 * y + 0.1], -1).astype(np.float32)   # chromatic, smooth
    image = diffuse.copy()
    image[14:17, 20:23] += 0.3                                                 # a 3x3 glint, white
    dec = decompose(image, 4, method="specular")
    np.testing.assert_allclose(dec.details[0][14:17, 20:23], 0.3, atol=1e-5)   # E_1 is the glint
    np.testing.assert_allclose(dec.bases[1], diffuse, atol=0.02)               # A_1: the diffuse image
    assert float(np.abs(dec.details[0][:10]).max()) < 1e-6                     # nothing taken elsewhere
    np.testing.assert_allclose(dec.bases[1] - dec.bases[1].min(-1, keepdims=True),
                               image - image.min(-1, keepdims=True), atol=1e-6)   # chroma kept


def test_intrinsic_puts_a_cast_shadow_in_the_shading_and_texture_in_the_albedo():
    rng = np.random.default_rng(0)
    albedo = np.where(rng.random((48, 48, 1)) < 0.5, [0.8, 0.4, 0.2], [0.6, 0.5, 0.3]).astype(np.float32)
    shading = np.ones((48, 48, 1), np.float32)
    shading[:, 24:] = 0.35                                                     # a shadow over the right half
    dec = decompose(albedo * shading, 3, method="intrinsic")
    L_S = dec.bases[1][..., 0]
    step = L_S[:, :20].mean() - L_S[:, 28:].mean()
    assert step == pytest.approx(np.log(1 / 0.35), abs=0.1)                  # the shadow is in S
    L_A = dec.details[0]
    lit, dark = L_A[:, :20].reshape(-1, 3), L_A[:, 28:].reshape(-1, 3)
    assert abs(lit.mean() - dark.mean()) < 0.1                                # ... not in A
    assert L_A[:, :20].std() > 3 * L_S[:, :20].std()                          # texture is in A


def test_bad_input_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"specular decomposition needs RGB images \(3 channels\), got 1"):
        decompose(np.zeros((8, 8, 1), np.float32), 2, method="specular")
    with pytest.raises(ValueError, match=r"intrinsic decomposition needs RGB images"):
        decompose(np.zeros((8, 8), np.float32), 2, method="intrinsic")
    with pytest.raises(ValueError, match="unknown decomposition 'retinex'"):
        decompose(np.zeros((8, 8, 3), np.float32), 2, method="retinex")


def test_log_mapping_round_trips():
    x = np.linspace(0, 1, 256, dtype=np.float32)
    np.testing.assert_allclose(from_log(to_log(x)), x, atol=1e-6)
    assert to_log(np.zeros(1))[0] == pytest.approx(np.log(LOG_EPS))


@pytest.mark.parametrize("method", ["specular", "intrinsic"])
def test_the_decompose_command_writes_layers_and_a_contact_sheet(tmp_path, method, capsys):
    src = photo_paths(1, tmp_path)[0]
    rc = cli.main(["decompose", str(src), "--out", str(tmp_path / "out"), "--method", method, "--order", "2",
                   "--size", "40", "--n-iter", "5"])
    assert rc == 0, capsys.readouterr().err
    folder = tmp_path / "out" / src.stem
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["method"] == method and (folder / "contact.png").stat().st_size > 1000
    if method == "specular":
        assert meta["layer_names"] == ["A_2", "E_2", "E_1"] and meta["space"] == "linear"
        assert not list(folder.glob("edges_*"))                              # no edge fields to write
        assert (folder / "detail_2.png").exists()
    else:
        assert meta["layer_names"] == ["S_1", "A_1"] and meta["space"] == "log"
        assert (folder / "edges_1.png").exists() and not (folder / "base_2.npy").exists()


def test_demo_decompositions_runs_the_three_methods_and_names_the_sheets(tmp_path, capsys):
    from nextdetail import demo

    src = photo_paths(1, tmp_path)[0]
    assert demo.main(["--decompositions", "--images", str(src), "--out", str(tmp_path / "demo"), "--size", "32"]) == 0
    out = capsys.readouterr().out
    for method in ("base_detail", "intrinsic", "specular"):
        sheet = tmp_path / "demo" / method / src.stem / "contact.png"
        assert sheet.is_file() and str(sheet) in out
