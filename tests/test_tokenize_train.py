"""Training the tokenizer on a small store: the loss falls, resume equals an uninterrupted run
bit for bit, checkpoints reload, and bad stores, run folders and configs are refused in one line."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from nextdetail.cli import main
from nextdetail.tokenize import CheckpointError, Tokenizer, config_for
from nextdetail.stores.layers import split_layers
from nextdetail.runs import checkpoints
from nextdetail.tokenize.bases import inputs_from_bases as bases_inputs
from nextdetail.tokenize.loader import StoreLoader
from nextdetail.tokenize.train import TokenizerTrainConfig, TrainError, train
from ddp import free_port, join_world
from pipeline_data import make_store
from conftest import own_lines


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("tok") / "store", n=4, size=40, order=3)


def cfg(store, out, kind="basedetail", **kw):
    tok = config_for(kind, 32, 8, ch=8, num_res_blocks=1, vocab=64, **({"depth": 4} if kind == "vanilla" else {}))
    base = dict(data=str(store), out=str(out), tokenizer=tok, steps=6, batch_size=2, lr=2e-3,
                lpips_backbone="random", disc_start=3, ckpt_every=3)
    base.update(kw)
    return TokenizerTrainConfig(**base)


def records(run):
    return [json.loads(s) for s in (run / "log.jsonl").read_text().splitlines()]


def test_split_layers_gives_the_image_and_every_base(store):
    from nextdetail.pipelines import DecompositionStore

    s = DecompositionStore(store)
    item = s[1]
    image, bases = split_layers(torch.from_numpy(item.layers.astype("float32"))[None], 3)
    torch.testing.assert_close(image[0], torch.from_numpy(item.image).permute(2, 0, 1))
    for k in (1, 2, 3):
        torch.testing.assert_close(bases[k - 1][0], torch.from_numpy(item.bases[k]).permute(2, 0, 1))
    image, bases = bases_inputs(StoreLoader(s, 32, 3, seed=0).next(), 3)
    assert image.shape == (3, 3, 32, 32) and len(bases) == 3


def test_loss_falls_on_a_tiny_set(store, tmp_path):
    report = train(cfg(store, tmp_path / "run", "multiscale", steps=60, batch_size=4, disc_start=10 ** 6,
                       ckpt_every=60, lpips_weight=0.0))
    rec = records(tmp_path / "run")
    first = sum(r["l2"] for r in rec[:5]) / 5
    last = sum(r["l2"] for r in rec[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert report.steps == 60 and (tmp_path / "run" / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("kind,ema", [("basedetail", 0.9), ("vanilla", 0.0)])
def test_resume_equals_an_uninterrupted_run(store, tmp_path, kind, ema):
    # Loader workers on, and a codebook-usage window (steps 3-4) that straddles the resume.
    kw = dict(ema=ema, loader_workers=1, usage_every=2)
    full = train(cfg(store, tmp_path / "full", kind, **kw))               # 6 steps, D on from step 3
    train(cfg(store, tmp_path / "half", kind, steps=3, **kw))             # stop at 3 ...
    train(cfg(store, tmp_path / "half", kind, **kw, resume=True))         # ... and resume to 6
    a = torch.load(checkpoints(tmp_path / "full")[-1], weights_only=True)
    b = torch.load(checkpoints(tmp_path / "half")[-1], weights_only=True)
    assert a["step"] == b["step"] == full.steps == 6
    assert ("model_ema" in a) == (ema > 0)
    for part in ("model", "disc") + (("model_ema",) if ema else ()):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert str(a["opt"]) == str(b["opt"]) and str(a["opt_d"]) == str(b["opt_d"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert records(tmp_path / "full") == records(tmp_path / "half")
    assert [r["step"] for r in records(tmp_path / "half")] == [1, 2, 3, 4, 5, 6]
    assert "g" in records(tmp_path / "full")[3] and "d" in records(tmp_path / "full")[3]
    assert [("map_usage" in r) for r in records(tmp_path / "full")] == [False, True] * 3


def test_codebook_usage_is_logged_per_map_and_a_collapse_warned_once(store, tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="nextdetail.tokenize.train")
    tok = config_for("multiscale", 32, 8, ch=8, num_res_blocks=1, vocab=4096)   # maps 1x1 .. 4x4
    train(TokenizerTrainConfig(data=str(store), out=str(tmp_path / "run"), tokenizer=tok, steps=8, batch_size=2,
                               lpips_weight=0.0, disc_start=100, usage_every=2, loader_workers=0))
    usage = [r["map_usage"] for r in records(tmp_path / "run") if "map_usage" in r]
    assert len(usage) == 4 and all(len(u) == len(tok.quant.map_sizes(4)) for u in usage)
    # The 1x1 map picks at most 2 images x 2 steps = 4 of 4096 codes in a window: under 1%.
    assert all(0 < u[0] <= round(4 / 4096, 5) for u in usage) and all(0 < x <= 1 for u in usage for x in u), usage
    warned = [r.getMessage() for r in caplog.records if "under 1% of the 4096 codes" in r.getMessage()]
    assert len(warned) == 1 and "token maps 1 (1x1)" in warned[0], warned


def test_checkpoint_reloads_as_a_tokenizer_and_refuses_another_config(store, tmp_path):
    c = cfg(store, tmp_path / "run", steps=2, ckpt_every=2)
    train(c)
    path = checkpoints(tmp_path / "run")[-1]
    tok = Tokenizer.from_checkpoint(path)
    assert tok.config == c.tokenizer and not tok.training
    from nextdetail.pipelines import DecompositionStore

    image, bases = bases_inputs(StoreLoader(DecompositionStore(store), 32, 2, seed=1).next(), 3)
    idx = tok.encode(image, bases)
    assert len(idx) == 4 + 3 * 2 and tok.decode(idx).shape == (2, 3, 32, 32)
    other = replace(c.tokenizer, quant=replace(c.tokenizer.quant, vocab=128))
    with pytest.raises(CheckpointError, match=r"another config: --vocab 64 \(checkpoint\) != 128"):
        Tokenizer.from_checkpoint(path, expect=other)
    with pytest.raises(TrainError, match="another config: --vocab 64"):
        train(replace(c, tokenizer=other, steps=4, resume=True))
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train(c)
    (tmp_path / "run" / "ckpt-0000009.pt").write_bytes(b"cut short")
    with pytest.raises(TrainError, match="ckpt-0000009.pt: cannot read checkpoint"):
        train(replace(c, steps=10, resume=True))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: cannot read checkpoint"):
        Tokenizer.from_checkpoint(tmp_path / "junk.pt")


def test_a_store_without_the_needed_bases_is_refused(tmp_path):
    low = make_store(tmp_path / "order2", n=2, size=32, order=2)
    with pytest.raises(TrainError, match=r"store of order 2 has bases B_1..B_2; the tokenizer needs order >= 3: "
                                         r"its BD quantizer \(--quantizer basedetail\) takes B_1..B_3 "
                                         r"\(decompose-dataset --order 3\)"):
        train(cfg(low, tmp_path / "run"))
    # A quantizer that uses no bases trains on it.
    assert train(cfg(low, tmp_path / "run2", "multiscale", steps=1, ckpt_every=1)).steps == 1


def test_cli_trains_resumes_and_reports(store, tmp_path, capsys, monkeypatch):
    def args(out, steps=2, *extra):
        return ["train-tokenizer", "--data", str(store), "--out", str(out), "--image-size", "32",
                "--downsample", "8", "--ch", "8", "--num-res-blocks", "1", "--vocab", "64", "--steps",
                str(steps), "--batch-size", "2", "--ckpt-every", "1", "--lpips-random-backbone", *extra]

    run = tmp_path / "run"
    assert main(args(run)) == 0
    assert "trained steps 0..2" in capsys.readouterr().out
    assert [p.name for p in checkpoints(run)] == ["ckpt-0000001.pt", "ckpt-0000002.pt"]
    assert main(args(run)) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(args(run, 3, "--resume")) == 0
    assert "trained steps 2..3" in capsys.readouterr().out
    assert main(args(run, 4, "--resume", "--vocab", "32")) == 2
    assert "--vocab 64 (checkpoint) != 32 (asked)" in capsys.readouterr().err
    assert main(["train-tokenizer", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2"),
                 "--lpips-random-backbone"]) == 2
    err = capsys.readouterr().err
    assert "no such store" in err and len(own_lines(err)) == 1
    # The documented default --lpips-weight 1 offline, without the backbone: one line naming the
    # file and the options that train without it.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    assert main(args(tmp_path / "r4")[:-1]) == 2
    err = capsys.readouterr().err
    assert len(own_lines(err)) == 1 and "alexnet-owt-7be5be79.pth" in err and str(tmp_path / "empty-hub") in err
    assert "--lpips-weight 0 trains without LPIPS, --lpips-random-backbone with a random backbone" in err
    assert not any((tmp_path / "r4").glob("ckpt-*"))
    assert main(args(tmp_path / "r3", 2, "--image-size", "36")) == 2
    assert "--image-size 36 is not divisible by --downsample 8" in capsys.readouterr().err


def test_eval_tokenizer_reports_error_after_each_depth(store, tmp_path, capsys, monkeypatch):
    import csv

    import torchvision
    from inception_standin import write_standin_inception

    from nextdetail.pipelines import DecompositionStore
    from nextdetail.evaluation.metrics import ssim
    from nextdetail.tokenize.evaluate import centre_crops
    from nextdetail.tokenize.losses import backbone_path

    for kind in ("basedetail", "multiscale"):
        train(cfg(store, tmp_path / kind, kind, steps=2, ckpt_every=2))
    out = tmp_path / "eval"
    # Stand-in weights (no network here): a random AlexNet in the hub cache, a random Inception.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    backbone_path("alex").parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), backbone_path("alex"))
    rng = np.random.default_rng(0)
    inception = write_standin_inception(tmp_path / "inception.pth", rng.integers(0, 256, (4, 32, 32, 3), np.uint8))
    assert main(["eval-tokenizer", str(tmp_path / "basedetail"), str(tmp_path / "multiscale"),
                 "--data", str(store), "--out", str(out), "--images", "3", "--batch-size", "2",
                 "--inception-weights", str(inception)]) == 0
    printed = capsys.readouterr().out
    assert "2 runs on 3 images" in printed and "final depth" in printed
    finals = {r["quantizer"]: r for r in csv.DictReader(open(out / "final.csv"))}
    assert set(finals) == {"basedetail", "multiscale"}
    for r in finals.values():
        assert int(r["images"]) == 3 and -1 < float(r["ssim"]) <= 1 and float(r["lpips"]) > 0
        assert np.isfinite(float(r["rfid"])) and float(r["rfid"]) > -1e-3
    rows = list(csv.DictReader(open(out / "eval.csv")))
    bd = [r for r in rows if r["quantizer"] == "basedetail"]
    ms = [r for r in rows if r["quantizer"] == "multiscale"]
    assert [int(r["depth"]) for r in bd] == list(range(1, 11)) and [int(r["depth"]) for r in ms] == [1, 2, 3, 4]
    assert [int(r["map_side"]) for r in ms] == [1, 2, 3, 4]
    assert (out / "eval.png").stat().st_size > 1000
    # The last depth is the full reconstruction: MSE of decode(encode(image)) on the same crops.
    tok = Tokenizer.from_checkpoint(checkpoints(tmp_path / "basedetail")[-1])
    sq, n = 0.0, 0
    for image, bases in centre_crops(DecompositionStore(store), 32, 3, limit=3, batch=2):
        sq += float((tok.decode(tok.encode(image, bases)) - image).square().mean((1, 2, 3)).sum())
        n += len(image)
    assert float(bd[-1]["mse"]) == pytest.approx(sq / n, rel=1e-4)
    assert float(finals["basedetail"]["lpips"]) == pytest.approx(float(bd[-1]["lpips"]), rel=1e-4)
    # Final PSNR and SSIM: means over the images of each image's value.
    psnr, ssims = [], []
    for image, bases in centre_crops(DecompositionStore(store), 32, 3, limit=3, batch=3):
        rec = tok.decode(tok.encode(image, bases))
        psnr += (10 * torch.log10(1 / (rec - image).square().mean((1, 2, 3)))).tolist()
        ssims += [ssim(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy()) for a, b in zip(rec, image)]
    assert float(finals["basedetail"]["psnr"]) == pytest.approx(np.mean(psnr), abs=1e-3)
    assert float(finals["basedetail"]["ssim"]) == pytest.approx(np.mean(ssims), abs=1e-4)
    # Without weights: one line naming the file, exit status 2, unless they are left out.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    assert main(["eval-tokenizer", str(tmp_path / "multiscale"), "--data", str(store), "--out", str(out)]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and "alexnet-owt-7be5be79.pth" in err[0] and "--no-lpips leaves LPIPS out" in err[0]
    assert "or pass --inception-weights FILE" in err[0] and "--no-rfid leaves rFID out" in err[0]
    assert main(["eval-tokenizer", str(tmp_path / "multiscale"), "--data", str(store), "--out", str(out),
                 "--no-lpips"]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and "LPIPS" not in err[0] and "--no-rfid leaves rFID out" in err[0]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "inception.pth").unlink()
    assert main(["eval-tokenizer", str(tmp_path / "multiscale"), "--data", str(store), "--out", str(out),
                 "--images", "2", "--inception-weights", str(tmp_path / "inception.pth")]) == 2
    assert f"{tmp_path / 'inception.pth'}: no such file" in capsys.readouterr().err
    assert main(["eval-tokenizer", str(tmp_path / "multiscale"), "--data", str(store), "--out", str(out),
                 "--images", "2", "--no-rfid", "--no-lpips"]) == 0
    assert main(["eval-tokenizer", str(tmp_path / "nope"), "--data", str(store), "--out", str(out)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_adaptive_gan_weight_balances_the_gradients(store, tmp_path):
    def run(name, **kw):
        train(cfg(store, tmp_path / name, steps=2, disc_start=0, **kw))
        return records(tmp_path / name)

    # Step 1 starts from the same weights and batch in both runs, so the adaptive factor is the
    # same and the logged weight scales exactly with --disc-weight; without it the weight is fixed.
    a = run("a", adaptive_gan=True, disc_weight=0.1)
    b = run("b", adaptive_gan=True, disc_weight=0.2)
    assert a[0]["gan_w"] == pytest.approx(b[0]["gan_w"] / 2, rel=1e-6)
    assert a[0]["gan_w"] != pytest.approx(0.1) and 0 < a[0]["gan_w"] < 1e3
    assert [r["gan_w"] for r in run("c")] == [0.1, 0.1]


def test_ema_weights_follow_the_recurrence_and_are_what_from_checkpoint_loads(store, tmp_path):
    d = 0.5
    c = cfg(store, tmp_path / "run", steps=2, ckpt_every=1, ema=d, disc_start=10 ** 6)
    train(c)
    c1, c2 = [torch.load(p, weights_only=True) for p in checkpoints(tmp_path / "run")]
    torch.manual_seed(c.seed)
    init = Tokenizer(c.tokenizer).state_dict()        # the run's seeded starting weights
    k = next(k for k, v in c2["model"].items() if v.is_floating_point() and v.numel() > 1)
    want1 = d * init[k] + (1 - d) * c1["model"][k]
    want2 = d * want1 + (1 - d) * c2["model"][k]
    torch.testing.assert_close(c1["model_ema"][k], want1)
    torch.testing.assert_close(c2["model_ema"][k], want2)
    assert not torch.equal(c2["model_ema"][k], c2["model"][k])
    last = checkpoints(tmp_path / "run")[-1]
    torch.testing.assert_close(Tokenizer.from_checkpoint(last).state_dict()[k], c2["model_ema"][k])
    torch.testing.assert_close(Tokenizer.from_checkpoint(last, ema=False).state_dict()[k], c2["model"][k])


def _steps(config, dist_=None) -> dict:
    """Train config.steps steps by hand; the gradients of the first step (DDP: averaged over the
    ranks), the weights and restart counts at the end, the losses of every step."""
    from nextdetail.tokenize.train import TokenizerTrainer

    torch.set_num_threads(1)
    tr = TokenizerTrainer(config, dist_=dist_)
    grads, losses, first = None, [], None
    for _ in range(config.steps):
        losses.append(tr.step()["loss"])
        if grads is None:
            first = tr.restarted
            grads = {f"{m}.{k}": p.grad.clone() for m, net in (("tok", tr.tok), ("disc", tr.disc))
                     for k, p in net.named_parameters() if p.grad is not None}
    return {"grads": grads, "tok": tr.tok.state_dict(), "disc": tr.disc.state_dict(), "losses": losses,
            "restarted": tr.restarted, "restarted_first": first}


def _ddp_worker(rank, world, port, config, result):
    from nextdetail.distributed import run

    join_world(rank, world, port)
    out = run("cpu", lambda d: _steps(config, d))
    torch.save(out, f"{result}-{rank}.pt")


@pytest.mark.parametrize("disc", ["patchgan", "stylegan"])
def test_ddp_two_cpu_processes_match_one_process_with_the_doubled_batch(tmp_path, disc):
    """Generator and discriminator under DDP, LPIPS, the adaptive GAN weight and dead-code
    restarts from the first step: two gloo ranks of batch 2 stay identical, and their averaged
    gradients and loss equal those of one process of batch 4 reading the same two lanes, to
    float32 rounding. (Later steps are compared loosely: Adam turns the rounding noise of
    parameters whose gradient is zero in exact arithmetic, biases before a GroupNorm, into steps
    of ~lr, and the runs drift apart from there.)"""
    import torch.multiprocessing as mp

    store = make_store(tmp_path / "store", n=8, size=40, order=3, shard_images=2)
    tok = config_for("basedetail", 32, 8, ch=8, num_res_blocks=1, vocab=64, dead_after=1, usage_decay=0.5)
    common = dict(data=str(store), tokenizer=tok, steps=3, lr=2e-3, lpips_backbone="random", disc_start=0,
                  adaptive_gan=True, loader_lanes=2, loader_workers=0, shuffle_buffer=3, disc=disc,
                  # StyleGAN: R1 through DDP (double backward), minibatch-std groups within a rank
                  **({"r1_gamma": 1.0, "disc_mbstd_group": 2, "disc_ch": 8} if disc == "stylegan" else {}))
    ddp = TokenizerTrainConfig(out=str(tmp_path / "ddp"), batch_size=2, **common)
    mp.spawn(_ddp_worker, args=(2, free_port(), ddp, str(tmp_path / "w")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"w-{r}.pt", weights_only=True) for r in range(2))
    one = _steps(TokenizerTrainConfig(out=str(tmp_path / "single"), batch_size=4, **common))
    for part in ("tok", "disc"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)       # the ranks never drift apart
    assert r0["grads"].keys() == one["grads"].keys() and any(k.startswith("disc.") for k in one["grads"])
    top = max(float(g.abs().max()) for g in one["grads"].values())
    for k, g in one["grads"].items():
        # Relative to the tensor's largest gradient (summation order differs between the runs),
        # or to 1e-3 of the largest of all where a tensor's is zero in exact arithmetic.
        err = float((r0["grads"][k] - g).abs().max()) / max(float(g.abs().max()), 1e-3 * top)
        assert err < 1e-3, (k, err)
    assert r0["restarted"] == r1["restarted"]                             # the same codes restarted
    assert r0["restarted_first"] == one["restarted_first"] > 0
    for k in one["tok"]:           # (codebook rows restarted after step 1 may take other features)
        if k != "quantizer.codebook.embed.weight":
            torch.testing.assert_close(r0["tok"][k], one["tok"][k], rtol=0, atol=0.02, msg=k)
    assert r0["losses"][0] == pytest.approx(one["losses"][0], rel=1e-4)  # logged losses are global


def test_stylegan_discriminator_trains_with_r1(store, tmp_path):
    import math

    train(cfg(store, tmp_path / "run", disc="stylegan", disc_ch=8, r1_gamma=1.0, disc_start=0, steps=5,
              batch_size=4, adaptive_gan=True, lpips_weight=0.0))
    rec = records(tmp_path / "run")
    assert all(math.isfinite(r[k]) for r in rec for k in ("loss", "g", "d", "r1", "gan_w")), rec
    assert len({r["d"] for r in rec}) == 5 and len({r["g"] for r in rec}) == 5       # it trains
    ckpt = torch.load(checkpoints(tmp_path / "run")[-1], weights_only=True)
    assert any(k.startswith("blocks.") for k in ckpt["disc"])                     # the residual D was saved


def test_stylegan_discriminator_shapes_and_minibatch_std():
    from nextdetail.tokenize.disc_stylegan import StyleGANDiscriminator, minibatch_std

    for size in (32, 40, 64):                      # 40: not a power of 2, pooled to 4x4 at the end
        d = StyleGANDiscriminator(ch=4, image_size=size)
        assert d(torch.rand(6, 3, size, size)).shape == (6, 1)
    x = torch.randn(6, 5, 4, 4)
    y = minibatch_std(x, 4)                        # groups of 4 and 2
    assert y.shape == (6, 6, 4, 4) and torch.equal(y[:, :5], x)
    assert torch.allclose(y[0, 5], (x[:4].var(0, unbiased=False) + 1e-8).sqrt().mean().expand(4, 4))
    assert torch.allclose(y[5, 5], (x[4:].var(0, unbiased=False) + 1e-8).sqrt().mean().expand(4, 4))
    with pytest.raises(ValueError, match="at least 8 px"):
        StyleGANDiscriminator(image_size=4)


def test_compile_trains_the_same_model_with_the_same_checkpoint_keys(store, tmp_path):
    """--compile compiles encoder, decoder and discriminator in place: same first-step loss as
    eager (to float32 rounding; kernels differ), checkpoints keyed as before."""
    eager = train(cfg(store, tmp_path / "eager", steps=2, disc_start=1, lpips_weight=0.0, loader_workers=0))
    comp = train(cfg(store, tmp_path / "comp", steps=2, disc_start=1, lpips_weight=0.0, loader_workers=0,
                     compile=True))
    a, b = records(tmp_path / "eager"), records(tmp_path / "comp")
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-4) and "d" in b[1]
    ka = torch.load(checkpoints(tmp_path / "eager")[-1], weights_only=True)
    kb = torch.load(checkpoints(tmp_path / "comp")[-1], weights_only=True)
    assert ka["model"].keys() == kb["model"].keys() and ka["disc"].keys() == kb["disc"].keys()
    assert comp.trainer.tok.encoder._compiled_call_impl is not None          # it was compiled
    assert eager.steps == comp.steps == 2
