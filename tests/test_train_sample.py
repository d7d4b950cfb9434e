"""Sampling: shapes, determinism under a seed, the CFG path, top-k/top-p, files, high resolution,
and the `train` / `sample` commands end to end on a tiny real token store."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from token_data import make_token_store, tiny_transformer

from nextdetail.cli import main
from nextdetail.tokenize import config_for
from nextdetail.tokenize.quant import build_quantizer
from nextdetail.train.model import NextDetailTransformer, TransformerConfig
from nextdetail.generate.draw import filter_logits, guidance_scale
from nextdetail.generate.highres import generate_highres, patch_boxes, requantize_base
from nextdetail.generate.loop import generate
from nextdetail.generate.options import SampleError
from nextdetail.generate.run import class_label, load_run
from nextdetail.generate.sample import sample_to_folder
from nextdetail.tokenize.schedule import stage_ends
from conftest import own_lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder of `nextdetail train`, token store, tokenizer checkpoint): 3 steps of a tiny model."""
    tmp = tmp_path_factory.mktemp("sample")
    tokens, ckpt, _ = make_token_store(tmp, n=6)
    run = tiny_transformer(tokens, ckpt, tmp / "run", steps=3)
    return run, tokens, ckpt


def tiny_classes():
    """A random 3-class model over a 4x4-latent base-detail schedule, and a random quantizer."""
    cfg = config_for("basedetail", 32, 8, ch=8, num_res_blocks=1, vocab=32)
    torch.manual_seed(0)
    q = build_quantizer(cfg.quant, cfg.model.z_channels, cfg.latent()).eval()
    shapes = tuple((s, s) for s in q.sizes)
    model = NextDetailTransformer(TransformerConfig(vocab=32, map_shapes=shapes, cvae=cfg.model.z_channels,
                                                    num_classes=3, depth=1, width=32, heads=2)).eval()
    return model, q


def test_generate_shapes_and_seed_determinism():
    model, q = tiny_classes()
    labels = torch.tensor([0, 1, 2])
    draw = lambda seed, **kw: generate(model, q, labels, generator=torch.Generator().manual_seed(seed),
                                       num_base=4, order=3, **kw)
    a, b, c = draw(0), draw(0), draw(1)
    assert [tuple(m.shape) for m in a.maps] == [(3, s, s) for s in q.sizes]
    assert all(m.dtype == torch.int64 and m.min() >= 0 and m.max() < 32 for m in a.maps)
    assert all(torch.equal(x, y) for x, y in zip(a.maps, b.maps))
    assert not all(torch.equal(x, y) for x, y in zip(a.maps, c.maps))
    assert a.f_hat.shape == (3, 32, 4, 4) and len(a.f_stages) == 4          # base, +D_3, +D_2, +D_1
    torch.testing.assert_close(a.f_stages[-1], q.lookup(a.maps))
    torch.testing.assert_close(a.f_stages[0], sum(q.contributions(a.maps[:4])))


def test_cfg_doubles_the_batch_with_the_null_class_and_ramps_the_scale():
    model, q = tiny_classes()
    seen = []
    step = model.step

    def spy(k, labels, f, cache):
        out = step(k, labels, f, cache)
        seen.append((k, labels.clone(), out))
        return out
    model.step = spy
    labels = torch.tensor([2, 0])
    g = generate(model, q, labels, cfg=3.0, generator=torch.Generator().manual_seed(0), top_k=1)
    M = len(q.sizes)
    assert [k for k, _, _ in seen] == list(range(M))
    assert all(torch.equal(lab, torch.tensor([2, 0, 3, 3])) for _, lab, _ in seen)
    # top_k = 1 makes the draw the argmax of the guided logits u + s_k (c - u)
    for k, _, logits in seen:
        c, u = logits.float().chunk(2)
        want = (u + guidance_scale(3.0, k, M) * (c - u)).argmax(-1)
        assert torch.equal(g.maps[k].flatten(1), want)
    seen.clear()
    generate(model, q, labels, cfg=1.0, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(lab, labels) for _, lab, _ in seen)                 # cfg 1: no null half
    assert guidance_scale(3.0, 0, 10) == 1.0 and guidance_scale(3.0, 9, 10) == 3.0
    assert guidance_scale(3.0, 3, 7) == pytest.approx(2.0)


def test_guidance_changes_samples_but_not_their_shapes():
    model, q = tiny_classes()
    for b in model.blocks:     # make the class matter beyond the start token
        torch.nn.init.normal_(b.attn.qkv.weight, std=0.3)
    labels = torch.tensor([1, 1, 1, 1])
    a = generate(model, q, labels, cfg=1.0, generator=torch.Generator().manual_seed(5))
    b = generate(model, q, labels, cfg=4.0, generator=torch.Generator().manual_seed(5))
    assert [m.shape for m in a.maps] == [m.shape for m in b.maps]
    assert not all(torch.equal(x, y) for x, y in zip(a.maps, b.maps))


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.4)).tolist() == [[False, True, True, True]]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(filter_logits(shuffled, top_p=0.7)).tolist() == [[True, False, True, False]]
    assert torch.equal(filter_logits(logits), logits)
    assert stage_ends(14, 8, 3) == [8, 10, 12, 14] and stage_ends(8, 8, 0) == [8]


def test_highres_generation_doubles_the_latent_in_both_patch_variants():
    model, q = tiny_classes()
    labels = torch.tensor([0, 2])
    for overlap in (False, True):
        f_base, f_hat = generate_highres(model, q, labels, scale=2, overlap=overlap, num_base=4, order=3,
                                         generator=torch.Generator().manual_seed(0))
        assert f_base.shape == f_hat.shape == (2, 32, 8, 8)
        assert torch.isfinite(f_hat).all() and not torch.allclose(f_base, f_hat)
    with pytest.raises(SampleError, match="base-detail"):
        generate_highres(model, q, labels, num_base=len(q.sizes), order=0)


def test_highres_windows_and_base_requantization():
    assert patch_boxes(8, 4, overlap=False) == [(0, 0), (0, 4), (4, 0), (4, 4)]
    assert patch_boxes(8, 4, overlap=True) == [(y, x) for y in (0, 2, 4) for x in (0, 2, 4)]
    assert patch_boxes(12, 8, overlap=True) == [(y, x) for y in (0, 4) for x in (0, 4)]
    # re-quantizing a base feature gives the maps the tokenizer's own base stage gives
    cfg = config_for("basedetail", 32, 8, ch=8, num_res_blocks=1, vocab=32)
    torch.manual_seed(1)
    q = build_quantizer(cfg.quant, cfg.model.z_channels, cfg.latent()).eval()
    f = [torch.randn(2, cfg.model.z_channels, 4, 4) for _ in range(4)]        # f_I, f_B1..f_B3
    with torch.no_grad():
        want = q(f[0], f[1:]).idx[:4]
        got = requantize_base(q, f[3], 4)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_sample_to_folder_writes_grid_strips_and_is_seeded(trained, tmp_path):
    run = load_run(trained[0])
    assert run.num_base == 4 and run.order == 3
    rep = sample_to_folder(run, tmp_path / "a", n=3, batch_size=2, seed=7, cfg=1.5, top_k=20)
    sample_to_folder(run, tmp_path / "b", n=3, batch_size=2, seed=7, cfg=1.5, top_k=20)
    assert (tmp_path / "a" / "grid.png").is_file() and len(rep.files) == 4
    strip = np.asarray(Image.open(tmp_path / "a" / "sample_000.png"))
    assert strip.shape == (32, 4 * 32 + 3 * 2, 3)                # base, +D_3, +D_2, +D_1 (final)
    for name in ("grid.png", "sample_000.png", "sample_002.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / name)),
                              np.asarray(Image.open(tmp_path / "b" / name)))
    meta = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert meta["seed"] == 7 and meta["strip"] == "B_3, +D_3, +D_2, +D_1"
    with pytest.raises(SampleError, match="trained without labels"):
        sample_to_folder(run, tmp_path / "c", label=2)
    hi = sample_to_folder(run, tmp_path / "hi", n=1, highres=2, overlap=True)
    assert np.asarray(Image.open(hi.files[1])).shape == (64, 2 * 64 + 2, 3)      # upsampled base, final


def test_sample_cli_and_its_errors(trained, tmp_path, capsys):
    run, tokens, ckpt = trained
    assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--n", "2", "--seed", "1", "--top-p", "0.9"]) == 0
    assert "sampled 2 images" in capsys.readouterr().out
    assert (tmp_path / "s" / "sample_001.png").is_file()
    assert main(["sample", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["sample", str(run), "--out", str(tmp_path / "x"), "--top-p", "2"]) == 2
    assert "--top-p must be a finite number >= 0 and <= 1, got 2" in capsys.readouterr().err
    assert main(["sample", str(run), "--out", str(tmp_path / "x"), "--tokenizer", str(tokens)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    # The tiny store has no labels: a class name is refused in one line naming what there is.
    assert load_run(run).meta["class_names"] == []
    assert main(["sample", str(run), "--out", str(tmp_path / "x"), "--class", "cat"]) == 2
    err = capsys.readouterr().err.strip()
    assert "class 'cat': not a class of this model's training data; its names: none" in err
    assert len(own_lines(err)) == 1


def test_class_is_a_label_or_a_class_name():
    names = ["airplane", "bird", None, "cat"]
    assert class_label("3", names) == 3 and class_label("-1", names) == -1
    assert class_label("bird", names) == 1 and class_label("cat", names) == 3
    with pytest.raises(SampleError, match="its names: 0=airplane, 1=bird, 3=cat"):
        class_label("dog", names)


def test_train_cli_reports_resumes_and_refuses(trained, tmp_path, capsys):
    run, tokens, ckpt = trained
    args = ["train", "--tokens", str(tokens), "--tokenizer", str(ckpt), "--out", str(tmp_path / "r"),
            "--depth", "1", "--width", "32", "--heads", "2", "--batch-size", "2"]
    assert main(args + ["--steps", "2"]) == 0
    assert "trained steps 0..2" in capsys.readouterr().out
    assert main(args + ["--steps", "3", "--resume"]) == 0
    assert "trained steps 2..3" in capsys.readouterr().out
    assert main(args + ["--steps", "3"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(args[:-6] + ["--width", "30", "--heads", "4", "--out", str(tmp_path / "q")]) == 2
    assert "--width 30 is not divisible by --heads 4" in capsys.readouterr().err
    assert main(args[:2] + [str(tmp_path)] + args[3:] + ["--out", str(tmp_path / "z")]) == 2
    assert "meta.json" in capsys.readouterr().err
