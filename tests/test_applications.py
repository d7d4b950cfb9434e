"""The paper's applications on tiny runs of each decomposition (the chain as `make demo` runs it):
super-resolution by token prefix (`upscale`), recolouring and relighting (`edit`)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_data import photo_paths

from nextdetail import cli, demo
from nextdetail.generate.edit import edit_samples
from nextdetail.train.inputs import teacher_inputs
from nextdetail.generate.loop import generate
from nextdetail.generate.options import SampleError
from nextdetail.generate.run import load_run
from nextdetail.generate.upscale import bicubic, store_inputs, upscale_tensor

SIZE = 32


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("apps")
    photos = [str(p) for p in photo_paths(3, root)]
    out = {}
    for method in ("base_detail", "intrinsic", "specular"):
        assert demo.run_chain(photos, root / method, size=SIZE, backend="numba", tokenizer_steps=2,
                              train_steps=2, method=method) == 0
        out[method] = root / method / "transformer"
    out["photos"] = photos
    return out


def low_res(n=1, side=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return bicubic(torch.rand(n, 3, 4, 4, generator=g), side)          # smooth, like a small photo


def test_the_prefix_is_the_encoded_input_and_the_cached_draw_matches_a_full_forward(runs):
    run = load_run(runs["base_detail"])
    tok, model, q, B = run.tokenizer, run.model, run.tokenizer.quantizer, run.num_base
    x = low_res(2)
    image, bases = store_inputs(bicubic(x, SIZE), tok.needs_bases, {"n_iter": 50})
    encoded = tok.encode(image, bases)
    labels = torch.full((2,), -1, dtype=torch.int64)
    g = generate(model, q, labels, prefix=encoded[:B], cfg=1.0, top_k=1, num_base=B, order=run.order,
                 generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(g.maps[:B], encoded[:B]))          # kept exactly
    # Greedy draws after the prefix: each drawn token is the full forward's top token (teacher
    # forcing over the whole sequence, no cache), up to float rounding between the two paths.
    logits_BLV = model(labels, teacher_inputs(q, g.maps))
    off = model.cfg.offsets()
    for k in range(B, len(g.maps)):
        lg = logits_BLV[:, off[k]:off[k + 1]]
        drawn = lg.gather(-1, g.maps[k].flatten(1)[..., None])[..., 0]
        assert (lg.max(-1).values - drawn).max() < 1e-4, k
    # upscale_tensor keeps the same prefix.
    f, maps = upscale_tensor(run, x, 4, at={"n_iter": 50}, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(maps, encoded[:B])) and f.shape[-1] == q.latent


@pytest.mark.parametrize("scale,side,overlap", [(4, 8, False), (2, 16, False), (4, 16, False), (4, 16, True),
                                                (2, 32, True)])
def test_upscale_shapes(runs, scale, side, overlap):
    run = load_run(runs["base_detail"])
    f, _ = upscale_tensor(run, low_res(1, side), scale, overlap=overlap, at={"n_iter": 10},
                          generator=torch.Generator().manual_seed(1))
    L = run.tokenizer.quantizer.latent
    assert f.shape == (1, f.shape[1], L * scale * side // SIZE, L * scale * side // SIZE)
    img = run.tokenizer.decode_features(f)
    assert img.shape[-1] == scale * side


def test_upscale_command_measures_against_the_originals_and_is_seeded(runs, tmp_path, capsys):
    argv = ["upscale", *runs["photos"][:2], "--run", str(runs["base_detail"]), "--scale", "4",
            "--downscale-first", "--seed", "3"]
    assert cli.main(argv + ["--out", str(tmp_path / "a")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("upscaled 2 images") and "PSNR" in line and "bicubic" in line
    meta = json.loads((tmp_path / "a" / "upscale.json").read_text())
    assert (meta["input_size"], meta["output_size"]) == (8, 32) and len(meta["images"]) == 2
    for row in meta["images"]:
        assert np.isfinite([row["psnr"], row["ssim"], row["bicubic_psnr"], row["bicubic_ssim"]]).all()
    results = sorted((tmp_path / "a").glob("*_x4.png"))
    assert len(results) == 2 and Image.open(results[0]).size == (32, 32)
    assert Image.open(next((tmp_path / "a").glob("000_*_sheet.png"))).size == (4 * 32 + 3 * 2, 32)
    assert cli.main(argv + ["--out", str(tmp_path / "b")]) == 0             # same seed, same bytes
    assert all((tmp_path / "a" / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "b").glob("*.png"))


def test_upscale_refusals_are_one_line(runs, tmp_path, capsys):
    img = runs["photos"][0]
    assert cli.main(["upscale", img, "--run", str(runs["intrinsic"]), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "upscale needs a run of the base-detail decomposition with the BD quantizer" in err[0]
    assert "is a run of the intrinsic decomposition" in err[0]
    assert cli.main(["upscale", img, "--run", str(runs["base_detail"]), "--out", str(tmp_path),
                     "--input-size", "10"]) == 2
    assert "the output must be a multiple of the tokenizer's 32 px" in capsys.readouterr().err
    assert cli.main(["upscale", img, "--run", str(runs["base_detail"]), "--out", str(tmp_path),
                     "--input-size", "16", "--prefix", "2"]) == 2
    assert "above the training resolution" in capsys.readouterr().err
    # --highres, the same strategy, refuses the same runs (intrinsic albedo is no local detail).
    assert cli.main(["sample", str(runs["intrinsic"]), "--out", str(tmp_path / "hi"), "--n", "1", "--highres", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--highres 2 needs a run of the base-detail decomposition" in err[0]
    assert "is a run of the intrinsic decomposition" in err[0]


def test_recolor_keeps_the_shading_maps_and_changes_the_albedo(runs, tmp_path):
    run = load_run(runs["intrinsic"])
    B = run.num_base
    r = edit_samples(run, tmp_path, edit="recolor", n=3, variants=2, seed=5)
    assert r.names == ["original", "albedo of the next sample", "new albedo 1", "new albedo 2"]
    swap = r.edited["albedo of the next sample"]
    for name, maps in r.edited.items():
        assert all(torch.equal(a, b) for a, b in zip(maps[:B], r.original[:B])), name      # shading kept
    assert all(torch.equal(s, o[[1, 2, 0]]) for s, o in zip(swap[B:], r.original[B:]))       # next's albedo
    redrawn = r.edited["new albedo 1"]
    assert any(not torch.equal(a, b) for a, b in zip(redrawn[B:], r.original[B:]))
    assert len(r.files) == 3 and Image.open(r.files[0]).size == (4 * SIZE + 3 * 2, SIZE)


def test_relight_keeps_the_diffuse_base_maps(runs, tmp_path):
    run = load_run(runs["specular"])
    B = run.num_base
    r = edit_samples(run, tmp_path, edit="relight", n=2, variants=1, gains=(0.0, 2.0), seed=1)
    assert r.names == ["original", "specular x0", "specular x2", "new specular 1"]
    maps = r.edited["new specular 1"]
    assert all(torch.equal(a, b) for a, b in zip(maps[:B], r.original[:B]))
    assert any(not torch.equal(a, b) for a, b in zip(maps[B:], r.original[B:]))
    assert json.loads((tmp_path / "edit.json").read_text())["strip"] == r.names


def test_edits_are_seeded_and_refused_for_runs_without_the_factors(runs, tmp_path, capsys):
    base = ["edit", str(runs["intrinsic"]), "--edit", "recolor", "--n", "2", "--variants", "1"]
    assert cli.main(base + ["--out", str(tmp_path / "a"), "--seed", "4"]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "b"), "--seed", "4"]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "c"), "--seed", "5"]) == 0
    a, b, c = ((tmp_path / x / "edit_000.png").read_bytes() for x in "abc")
    assert a == b and a != c
    capsys.readouterr()
    assert cli.main(["edit", str(runs["specular"]), "--edit", "recolor", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--edit recolor needs a run of the intrinsic decomposition" in err[0]
    assert "is a run of the specular decomposition" in err[0]
    assert cli.main(["edit", str(runs["base_detail"]), "--edit", "relight", "--out", str(tmp_path / "e")]) == 2
    assert "--edit relight needs a run of the specular decomposition" in capsys.readouterr().err
    with pytest.raises(SampleError, match="needs a run of the specular"):
        edit_samples(load_run(runs["intrinsic"]), tmp_path / "f", edit="relight")
