"""`nextdetail decompose`, its outputs, the layer visualisation and the demo entry point.

Small images and few sweeps keep the whole file to seconds; the numpy backend is used where
a test is about the CLI rather than the solver, the compiled one on real photos.
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nextdetail import cli, demo
from nextdetail.decomp import Decomposition
from nextdetail.decomp.files import output_names
from nextdetail.imageio import load_image, to_uint8
from nextdetail.viz import contact_sheet, detail_scale, detail_to_uint8, sheet_tiles
from conftest import own_lines

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FAST = ["--order", "2", "--n-iter", "5", "--backend", "numpy"]
SUMMARY = re.compile(r"^(\d+) images ok, (\d+) failed, [\d.]+ s, [\d.]+ images/s, "
                     r"mean AT energy (\S+), mean AT sweeps per level (?:[\d.]+(?: / [\d.]+)*|n/a); "
                     r"output in (.+)$")


def compiled_or_numpy() -> str:
    try:
        importlib.import_module("nextdetail.decomp.backend_numba")
        return "numba"
    except ImportError:
        return "numpy"


def write_rgb(path: Path, h: int, w: int, seed: int = 0) -> Path:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2])
    return dst


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def summary(stdout: str) -> re.Match:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    m = SUMMARY.match(lines[0])
    assert m, lines[0]
    return m


# --------------------------------------------------------------------------- decompose

def test_bad_inputs_get_one_line_each_and_the_rest_is_processed(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    good = write_rgb(src / "good.png", 12, 16)
    one = write_rgb(src / "one.png", 1, 1, seed=1)
    row = write_rgb(src / "row.png", 1, 9, seed=2)
    jpg = src / "photo.jpg"
    Image.open(write_rgb(src / "big.png", 64, 64, seed=3)).save(jpg, quality=90)
    bad = [src / "missing.png", truncated(good, src / "cut.png"), truncated(jpg, src / "cut.jpg")]
    (src / "words.png").write_text("this is text\n")
    bad.append(src / "words.png")
    out = tmp_path / "out"
    rc, stdout, stderr = run(capsys, "decompose", good, bad[0], one, bad[1], row, bad[2], bad[3],
                             "--out", out, *FAST)
    assert rc == 1
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == len(bad), stderr
    for path in bad:
        assert sum(str(path) in ln for ln in lines) == 1, (path, stderr)
    assert "no such file" in stderr and "truncated" in stderr and "not an image" in stderr
    m = summary(stdout)
    assert (m[1], m[2]) == ("3", "4")
    assert sorted(p.name for p in out.iterdir()) == ["good", "one", "row"]
    assert np.load(out / "one" / "base_2.npy").shape == (1, 1, 3)
    assert np.load(out / "row" / "edges_1.npy").shape == (1, 9)
    np.testing.assert_allclose(np.load(out / "row" / "base_2.npy") + np.load(out / "row" / "detail_2.npy")
                               + np.load(out / "row" / "detail_1.npy"), load_image(row), atol=1e-5)
    assert Image.open(out / "one" / "contact.png").size[0] > 100


def test_all_good_exits_zero_and_writes_the_layout(tmp_path, capsys):
    img = write_rgb(tmp_path / "pic.png", 10, 14)
    out = tmp_path / "out"
    rc, stdout, stderr = run(capsys, "decompose", img, "--out", out, *FAST)
    assert rc == 0 and own_lines(stderr) == []
    m = summary(stdout)
    assert (m[1], m[2]) == ("1", "0") and float(m[3]) > 0 and m[4] == str(out)
    files = {p.name for p in (out / "pic").iterdir()}
    for k in (1, 2):
        for stem in ("base", "detail", "edges"):
            assert {f"{stem}_{k}.npy", f"{stem}_{k}.png"} <= files
    assert {"input.png", "contact.png", "meta.json"} <= files
    assert "base_3.npy" not in files                  # --order 2
    meta = json.loads((out / "pic" / "meta.json").read_text())
    assert meta["source"] == str(img) and meta["shape"] == [10, 14, 3]
    assert meta["params"]["n_iter"] == 5 and len(meta["energies"]) == 2
    assert meta["sweeps"] == [5, 5] and "mean AT sweeps per level 5.0 / 5.0;" in stdout      # the cap
    assert float(m[3]) == pytest.approx(np.mean(meta["energies"]), rel=1e-4)
    # detail_k.png is the viz mapping of detail_k.npy with the scale recorded in meta.json
    d1 = np.load(out / "pic" / "detail_1.npy")
    png = np.asarray(Image.open(out / "pic" / "detail_1.png"))
    np.testing.assert_array_equal(png, detail_to_uint8(d1, meta["detail_png_scales"][0]))
    assert np.load(out / "pic" / "base_1.npy").dtype == np.float32


@pytest.mark.parametrize("args,word", [
    (["--eps", "0"], "eps"), (["--order", "0"], "order"), (["--n-iter", "-1"], "--n-iter"),
    (["--size", "0"], "size"), (["--alpha", "nan"], "alpha"), (["--omega", "2"], "omega"),
    (["--lam", "-1"], "lam"), (["--batch-size", "0"], "batch-size"), (["--tol", "1"], "--tol"),
    (["--tol", "-0.1"], "--tol")])
def test_bad_parameters_give_one_line_and_exit_2(tmp_path, capsys, args, word):
    img = write_rgb(tmp_path / "pic.png", 4, 4)
    rc, stdout, stderr = run(capsys, "decompose", img, "--out", tmp_path / "out", *args)
    assert rc == 2 and stdout == ""
    assert len(own_lines(stderr)) == 1 and word in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [[], ["decompose", "x.png"], ["decompose", "--out", "o"],
                                  ["decompose", "x.png", "--out", "o", "--backend", "fortran"],
                                  ["decompose", "x.png", "--out", "o", "--order", "two"]])
def test_usage_errors_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    lines = own_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--help lists the options" in lines[0]


def test_out_must_not_be_a_file(tmp_path, capsys):
    img = write_rgb(tmp_path / "pic.png", 4, 4)
    (tmp_path / "taken").write_text("")
    rc, _, stderr = run(capsys, "decompose", img, "--out", tmp_path / "taken", *FAST)
    assert rc == 2 and "not a folder" in stderr


def test_empty_folder_fails(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, stdout, stderr = run(capsys, "decompose", tmp_path / "empty", "--out", tmp_path / "o", *FAST)
    assert rc == 1 and "no image files" in stderr and stdout == ""


def test_size_crops_every_image_and_batching_matches_one_by_one(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i, (h, w) in enumerate([(24, 40), (40, 24), (30, 30)]):
        write_rgb(src / f"im{i}.png", h, w, seed=i)
    outs = {}
    for bs in ("1", "2"):       # 2: a batch of two, then a batch of one
        outs[bs] = tmp_path / f"out{bs}"
        rc, _, _ = run(capsys, "decompose", src, "--out", outs[bs], "--size", "16", "--batch-size", bs, *FAST)
        assert rc == 0
    for i in range(3):
        for name in ("base_2", "detail_1", "detail_2", "edges_1", "edges_2"):
            a = np.load(outs["1"] / f"im{i}" / f"{name}.npy")
            b = np.load(outs["2"] / f"im{i}" / f"{name}.npy")
            assert a.shape == ((16, 16) if name.startswith("edges") else (16, 16, 3))
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=f"im{i}/{name}")
        np.testing.assert_allclose(np.load(outs["2"] / f"im{i}" / "base_2.npy")
                                   + np.load(outs["2"] / f"im{i}" / "detail_2.npy")
                                   + np.load(outs["2"] / f"im{i}" / "detail_1.npy"),
                                   load_image(src / f"im{i}.png", size=16), atol=1e-5)


def test_inputs_sharing_a_stem_get_separate_folders(tmp_path, capsys):
    paths = []
    for sub, name in [("a", "x.png"), ("b", "x.png"), ("a", "X.jpg")]:
        (tmp_path / sub).mkdir(exist_ok=True)
        paths.append(write_rgb(tmp_path / sub / name, 4, 5, seed=len(paths)))
    out = tmp_path / "out"
    rc, _, _ = run(capsys, "decompose", *paths, "--out", out, *FAST)
    assert rc == 0
    assert output_names(paths) == ["x", "x-2", "X-3"]
    for folder, src in zip(["x", "x-2", "X-3"], paths):
        assert json.loads((out / folder / "meta.json").read_text())["source"] == str(src)
        np.testing.assert_allclose(np.load(out / folder / "base_2.npy") + np.load(out / folder / "detail_2.npy")
                                   + np.load(out / folder / "detail_1.npy"), load_image(src), atol=1e-5)


def test_auto_backend_falls_back_to_numpy_only_for_auto(monkeypatch, caplog):
    from nextdetail.decomp import at

    monkeypatch.setattr(at, "cupy_usable", lambda: False)
    real_import = importlib.import_module

    def no_numba(name, *a):
        if name.endswith("backend_numba"):
            raise ImportError("numba is broken here")
        return real_import(name, *a)

    monkeypatch.setattr(at.importlib, "import_module", no_numba)
    assert at.resolve_backend("auto") == "numpy"
    assert "numba is broken here" in caplog.text
    with pytest.raises(RuntimeError, match="numba"):
        at.resolve_backend("numba")
    assert at.resolve_backend("numpy") == "numpy"


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")
def test_real_photos_end_to_end(tmp_path, capsys):
    photos = [DATA / "kodak24" / "kodim01.png", DATA / "kodak24" / "kodim23.png",
              DATA / "set14" / "bridge.png"]            # bridge is a grayscale PNG
    out = tmp_path / "out"
    rc, stdout, stderr = run(capsys, "decompose", *photos, "--out", out, "--size", "64",
                             "--n-iter", "20", "--backend", compiled_or_numpy())
    assert rc == 0, stderr
    m = summary(stdout)
    assert (m[1], m[2]) == ("3", "0")
    for photo in photos:
        d = out / photo.stem
        image = load_image(photo, size=64)
        total = np.load(d / "base_3.npy").astype(np.float32)
        for k in (3, 2, 1):
            total += np.load(d / f"detail_{k}.npy")
        np.testing.assert_allclose(total, image, atol=1e-5)
        s = np.load(d / "edges_1.npy")
        assert s.shape == (64, 64) and s.min() >= 0 and s.max() <= 1 and s.max() > 0.5
        # smoothing: each base is flatter than the previous one
        tv = [np.abs(np.diff(np.load(d / f"base_{k}.npy"), axis=1)).mean() for k in (1, 2, 3)]
        assert np.abs(np.diff(image, axis=1)).mean() > tv[0] > tv[2]
        with Image.open(d / "contact.png") as sheet:
            sheet.load()
            assert sheet.mode == "RGB" and sheet.width > 4 * 64 and sheet.height > 3 * 64
        assert np.asarray(Image.open(d / "input.png")).shape == (64, 64, 3)


# --------------------------------------------------------------------------- visualisation

def test_detail_mapping_is_symmetric_around_mid_grey():
    d = np.array([[-0.2, -0.1, 0.0, 0.1, 0.2, 0.4]], np.float32)
    u8 = detail_to_uint8(d, scale=0.2)
    assert u8.dtype == np.uint8
    assert u8.tolist() == [[0, 64, 128, 191, 255, 255]]
    np.testing.assert_array_equal(detail_to_uint8(np.zeros((3, 3))), np.full((3, 3), 128))


def test_detail_scale_is_robust_to_a_few_strong_pixels():
    # Faint texture (+/-0.005) plus one bright outlier: a max-based scale would map the
    # texture to 128 +/- 1 (invisible); the 99.5th percentile keeps it near black/white.
    rng = np.random.default_rng(0)
    d = (0.005 * rng.choice([-1.0, 1.0], size=(100, 100))).astype(np.float32)
    d[0, 0] = 1.0
    assert detail_scale(d) == pytest.approx(0.005, rel=1e-3)
    u8 = detail_to_uint8(d)
    faint = np.delete(u8.ravel(), 0)
    assert set(np.unique(faint)) <= {0, 255}
    assert detail_scale(np.zeros((4, 4))) == 1.0                 # no division by zero
    sparse = np.zeros((100, 100), np.float32)
    sparse[3, 3] = -0.3                                           # mostly exactly zero
    assert detail_scale(sparse) == pytest.approx(0.3)


def test_base_and_edge_mappings_clip_to_unit_range():
    assert to_uint8(np.array([-0.1, 0.0, 0.5, 1.2])).tolist() == [0, 0, 128, 255]
    assert to_uint8(np.array([[0.0, 1.0]])).tolist() == [[0, 255]]


def fake_decomposition(n_images=None, order=2, h=6, w=9) -> Decomposition:
    """Layers with known values (no solver): image index i shows up as B_0 = i / 10."""
    lead = () if n_images is None else (n_images,)
    ramp = np.arange(n_images or 1, dtype=np.float32).reshape((-1, 1, 1, 1)) / 10
    ramp = ramp if n_images else ramp[0]
    bases = [np.broadcast_to(ramp + 0.5 - 0.1 * k, lead + (h, w, 3)).astype(np.float32)
             for k in range(order + 1)]
    details = [bases[k - 1] - bases[k] for k in range(1, order + 1)]
    edges = [np.full(lead + (h, w), 0.25 * k, np.float32) for k in range(1, order + 1)]
    energies = [np.arange(n_images, dtype=float) + k if n_images else float(k) for k in range(1, order + 1)]
    return Decomposition(bases, details, edges, energies, "base_detail",
                         {"alpha": 10.0, "lam": 0.01, "eps": 0.01, "omega": 1.6, "n_iter": 3})


def test_sheet_tiles_layout_and_batch_selection():
    grid = sheet_tiles(fake_decomposition(order=3))
    assert [len(row) for row in grid] == [4, 4, 4]
    assert [t.label for t in grid[0]] == ["input", "B1", "B2", "B3"]
    assert grid[1][0] is None and grid[2][0] is None
    assert grid[1][1].label.startswith("D1") and [t.label for t in grid[2][1:]] == ["s1", "s2", "s3"]
    assert all(t.image.shape == (6, 9, 3) and t.image.dtype == np.uint8 for row in grid for t in row if t)
    assert grid[2][2].image.max() == round(0.5 * 255)               # s2 = 0.5 as grey
    batch = fake_decomposition(n_images=3)
    for i in range(3):
        tiles = sheet_tiles(batch, image_index=i)
        assert tiles[0][0].image[0, 0, 0] == round((0.5 + i / 10) * 255)
    with pytest.raises(IndexError):
        sheet_tiles(batch, image_index=3)
    with pytest.raises(ValueError):
        sheet_tiles(fake_decomposition(), image_index=1)


def test_contact_sheet_renders_the_grid_and_marks_the_batch_index():
    # 8 x 8 layers are blown up 8x to 64 x 64 tiles.
    single = contact_sheet(fake_decomposition(order=2, h=8, w=8), tile=64)
    assert single.mode == "RGB"
    assert single.width >= 3 * 64 and single.height >= 3 * 64         # 3 columns, 3 rows of 64 px
    # Row 0, column 0 is the input: its flat grey (0.5) must appear as a 64 x 64 block.
    a = np.asarray(single)
    assert (np.all(a == 128, axis=2)).sum() >= 64 * 64
    batch = fake_decomposition(n_images=2, order=2, h=8, w=8)
    s0, s1 = contact_sheet(batch, 0, tile=64), contact_sheet(batch, 1, tile=64)
    assert s0.size == s1.size and not np.array_equal(np.asarray(s0), np.asarray(s1))
    # 0.6 is the input of image 1 only (its B1, B2 are 0.5, 0.4); image 0 never reaches it.
    assert (np.all(np.asarray(s1) == round(0.6 * 255), axis=2)).sum() >= 64 * 64
    assert (np.all(np.asarray(s0) == round(0.6 * 255), axis=2)).sum() < 64 * 64


# --------------------------------------------------------------------------- demo

def test_demo_bundled_photos_run_through_the_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = demo.main(["--out", str(out), "--size", "16", "--backend", "numpy", "--no-chain"])
    stdout = capsys.readouterr().out
    assert rc == 0
    for name in demo.BUNDLED_PHOTOS:
        assert load_image(out / "inputs" / f"{name}.png").shape[2] == 3
        sheet = out / name / "contact.png"
        assert sheet.is_file() and str(sheet) in stdout
        assert np.load(out / name / "base_3.npy").shape == (16, 16, 3)
    assert summary(stdout.splitlines()[0])[1] == str(len(demo.BUNDLED_PHOTOS))


def test_demo_with_images_reports_failures(tmp_path, capsys):
    good = write_rgb(tmp_path / "good.png", 8, 8)
    rc = demo.main(["--out", str(tmp_path / "o"), "--images", str(good), str(tmp_path / "gone.png"),
                    "--size", "8", "--backend", "numpy", "--no-chain"])
    captured = capsys.readouterr()
    assert rc == 1 and "gone.png" in captured.err
    assert str(tmp_path / "o" / "good" / "contact.png") in captured.out
    assert not (tmp_path / "o" / "inputs").exists()
