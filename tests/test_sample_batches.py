"""`nextdetail sample --per-class`: the evaluation batch (K images of every class), per-sample
seeds, resumable part files, the ADM npz, and a split (2-process) run equal to a single one."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddp import free_port, join_world
from token_data import make_token_store, tiny_transformer

from nextdetail.cli import main
from nextdetail.errors import ConfigError
from nextdetail.runs import checkpoint_name, latest_checkpoint, load_checkpoint, save_checkpoint
from nextdetail.generate.batches import part_path, sample_batches, sample_per_class, sample_seed
from nextdetail.generate.draw import draw_per_row, inverse_cdf
from nextdetail.generate.loop import generate
from nextdetail.generate.options import SampleError
from nextdetail.generate.run import load_run
from nextdetail.generate.sample import SampleConfig
from conftest import own_lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(conditional run, unconditional run): 2 steps of a tiny model on an unlabelled token store,
    and the same checkpoint made a 3-class model (class embeddings drawn at random)."""
    tmp = tmp_path_factory.mktemp("batches")
    tokens, ckpt, _ = make_token_store(tmp, n=4)
    plain = tiny_transformer(tokens, ckpt, tmp / "plain", steps=2)
    state = load_checkpoint(latest_checkpoint(plain))
    state["model_config"]["num_classes"] = 3
    state["model"]["class_emb.weight"] = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    state["data"]["class_names"] = ["cat", "dog", "eel"]
    cond = tmp / "cond"
    cond.mkdir()
    save_checkpoint(cond / checkpoint_name(2), state)
    return cond, plain


def pngs(folder, n):
    return np.stack([np.asarray(Image.open(folder / "images" / f"{j:06d}.png")) for j in range(n)])


def test_per_class_cli_writes_pngs_parts_and_the_adm_npz(runs, tmp_path, capsys):
    out, npz = tmp_path / "s", tmp_path / "s.npz"
    assert main(["sample", str(runs[0]), "--out", str(out), "--per-class", "2", "--batch-size", "4",
                 "--npz", str(npz), "--seed", "3", "--top-k", "20"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("sampled 6 images (3 classes x 2; 6 generated, 0 from earlier parts)") and str(npz) in line
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{j:06d}.png" for j in range(6)]
    assert part_path(out, 0).is_file() and part_path(out, 1).is_file() and not part_path(out, 2).exists()
    with np.load(npz) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (6, 32, 32, 3)
    assert np.array_equal(images, pngs(out, 6))
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 1, 1, 2, 2]
    meta = json.loads((out / "samples.json").read_text())
    assert (meta["n"], meta["per_class"], meta["classes"], meta["seed"], meta["npz"]) == (6, 2, 3, 3, str(npz))
    # --no-png: parts only
    assert main(["sample", str(runs[0]), "--out", str(tmp_path / "p"), "--per-class", "2", "--batch-size", "2",
                 "--no-png", "--seed", "3", "--top-k", "20"]) == 0
    assert not (tmp_path / "p" / "images").exists() and part_path(tmp_path / "p", 2).is_file()


def test_each_row_draws_from_its_own_generator():
    torch.manual_seed(0)
    probs = torch.rand(3, 50, 8).masked_fill(torch.rand(3, 50, 8) < 0.4, 0.0)
    probs[..., 5] += 0.1                                       # no row without a possible token
    probs = probs / probs.sum(-1, keepdim=True)
    gen = lambda s: torch.Generator().manual_seed(s)
    alone = draw_per_row(probs[:1], [gen(1)])
    assert torch.equal(draw_per_row(probs, [gen(1), gen(2), gen(3)])[0], alone[0])
    assert torch.equal(draw_per_row(probs[[0, 2]], [gen(1), gen(9)])[0], alone[0])
    assert not torch.equal(draw_per_row(probs[:1], [gen(2)]), alone)
    drawn = draw_per_row(probs, [gen(1), gen(2), gen(3)])
    assert (probs.gather(-1, drawn[..., None]) > 0).all()     # never a zero-probability token
    with pytest.raises(SampleError, match="2 generators for a batch of 3 rows"):
        draw_per_row(probs, [gen(1), gen(2)])
    # the ends of [0, 1): the first and the last token of positive probability
    p = torch.tensor([[[0.0, 0.5, 0.0, 0.5, 0.0]]])
    assert inverse_cdf(p, torch.zeros(1, 1)).item() == 1
    assert inverse_cdf(p, torch.full((1, 1), 1.0)).item() == 3
    assert inverse_cdf(p, torch.full((1, 1), 0.49)).item() == 1 and inverse_cdf(p, torch.full((1, 1), 0.51)).item() == 3
    # the draw follows the probabilities
    want = torch.tensor([0.1, 0.2, 0.3, 0.4])
    got = draw_per_row(want.expand(1, 20000, 4), [gen(0)]).flatten().bincount(minlength=4) / 20000
    torch.testing.assert_close(got, want, atol=0.02, rtol=0)
    # sample seeds: 63-bit, one per (seed, class, index)
    seeds = {sample_seed(s, c, i) for s in (0, 1) for c in range(3) for i in range(4)}
    assert len(seeds) == 24 and all(0 <= s < 2 ** 63 for s in seeds) and sample_seed(0, 1, 2) == sample_seed(0, 1, 2)


def test_generate_takes_one_generator_per_row(runs):
    run = load_run(runs[0])
    q = run.tokenizer.quantizer
    labels = torch.tensor([0, 2])
    draw = lambda seeds, **kw: generate(run.model, q, labels, generator=[torch.Generator().manual_seed(s) for s in seeds],
                                        **kw)
    a, b = draw([5, 6]), draw([5, 6])
    assert all(torch.equal(x, y) for x, y in zip(a.maps, b.maps))
    assert [m.shape for m in a.maps] == [(2, *s) for s in run.model.cfg.map_shapes]
    c = draw([7, 6])          # row 0 reseeded: row 0 changes, row 1 (same shapes, own generator) does not
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a.maps, c.maps))
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a.maps, c.maps))


def test_a_rerun_resumes_from_the_parts(runs, tmp_path):
    run = load_run(runs[0])
    out, npz = tmp_path / "r", tmp_path / "r.npz"
    kw = dict(per_class=2, batch_size=2, seed=1, npz=npz)
    first = sample_batches(run, out, **kw)
    assert (first.generated, first.reused) == (6, 0)
    data = npz.read_bytes()
    stamp = {b: part_path(out, b).stat().st_mtime_ns for b in range(3)}
    part_path(out, 1).unlink()
    for j in (2, 3):
        (out / "images" / f"{j:06d}.png").unlink()
    again = sample_batches(run, out, **kw)
    assert (again.generated, again.reused) == (2, 4)
    assert npz.read_bytes() == data                              # the same file, byte for byte
    assert [part_path(out, b).stat().st_mtime_ns == stamp[b] for b in range(3)] == [True, False, True]
    assert np.array_equal(pngs(out, 6), np.load(npz)["arr_0"])
    # a PNG lost, its part kept: written back from the part, nothing drawn
    (out / "images" / "000004.png").unlink()
    assert sample_batches(run, out, **kw).generated == 0 and (out / "images" / "000004.png").is_file()
    with pytest.raises(SampleError, match=r"other settings \(seed 1 != 2\); use another --out"):
        sample_batches(run, out, **{**kw, "seed": 2})


def _split_worker(rank, world, port, threads, config):
    join_world(rank, world, port)
    torch.set_num_threads(threads)
    rep = sample_per_class(config)
    assert rep.generated == 6 and rep.n == 6


def test_a_split_run_equals_a_single_process_run(runs, tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = lambda name: SampleConfig(run=runs[0], out=tmp_path / name, per_class=2, batch_size=2, seed=4,
                                    npz=tmp_path / f"{name}.npz")
    threads = max(1, torch.get_num_threads() // 2)
    mp.spawn(_split_worker, args=(2, free_port(), threads, cfg("split")), nprocs=2, join=True)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)                  # the same arithmetic as each rank's
    try:
        single = sample_per_class(cfg("single"))
    finally:
        torch.set_num_threads(torch_threads)
    assert (single.generated, single.n) == (6, 6)
    assert (tmp_path / "split.npz").read_bytes() == (tmp_path / "single.npz").read_bytes()
    assert np.array_equal(pngs(tmp_path / "split", 6), pngs(tmp_path / "single", 6))


def test_refusals_are_one_line(runs, tmp_path, capsys):
    cond, plain = runs
    assert main(["sample", str(plain), "--out", str(tmp_path / "u"), "--per-class", "2"]) == 2
    err = own_lines(capsys.readouterr().err)
    assert err == ["nextdetail sample: error: --per-class: this model was trained without labels; "
                   "use --n for unconditional samples"]
    for extra, want in ((["--per-class", "2", "--highres", "2"], "--per-class with --highres 2"),
                        (["--per-class", "2", "--class", "1"], "--class 1 with --per-class"),
                        (["--per-class", "-1"], "--per-class must be an integer >= 0"),
                        (["--npz", str(tmp_path / "x.npz")], "--npz: only with --per-class K"),
                        (["--no-png"], "--no-png: only with --per-class K")):
        assert main(["sample", str(cond), "--out", str(tmp_path / "x")] + extra) == 2
        err = own_lines(capsys.readouterr().err)
        assert len(err) == 1 and want in err[0], (extra, err)
    with pytest.raises(ConfigError, match="--per-class with --highres 2"):
        SampleConfig(run=cond, per_class=1, highres=2)
    with pytest.raises(SampleError, match="trained without labels"):
        sample_batches(load_run(plain), tmp_path / "v", per_class=1)
