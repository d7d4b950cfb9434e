"""Training curves in TensorBoard (RUN/tb/) and W&B: both trainers' event files, read back with
TensorBoard's own reader, hold every number of log.jsonl at its step; a resumed run continues the
same curves with no gap and no duplicate step (what an interrupted segment logged past the
checkpoint is purged); the curves change no training number; a missing wandb is one line, exit 2."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

pytest.importorskip("tensorboard")

from nextdetail.cli import main
from nextdetail.errors import ConfigError
from nextdetail.runs import checkpoints, read_log
from nextdetail.tblog import Board, check_loggers, read_events, scalar_tags
from nextdetail.tokenize.train import train as train_tokenizer
from nextdetail.train.trainer import train as train_transformer
from conftest import own_lines
from pipeline_data import make_store
from test_tokenize_train import cfg as tok_cfg
from test_train_trainer import cfg as tr_cfg
from token_data import make_token_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("tbstore") / "store", n=4, size=40, order=3)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    out, ckpt, _ = make_token_store(tmp_path_factory.mktemp("tbtokens"), n=8)
    return out, ckpt


def check_curves(run, images: str, ckpt_steps):
    """Every record's numbers are in RUN/tb at their step, once (float32), and nothing else is."""
    acc = read_events(run / "tb")
    recs = read_log(run)
    want = {}
    for rec in recs:
        for tag, v in scalar_tags(rec).items():
            want.setdefault(tag, []).append((rec["step"], v))
    tags = set(acc.Tags()["scalars"])
    assert set(want) <= tags and all(t.startswith("perf/") for t in tags - set(want)), tags - set(want)
    for tag, pts in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in pts], tag           # no gap, no duplicate
        np.testing.assert_array_equal(np.float32([v for _, v in got]), np.float32([v for _, v in pts]), tag)
    steps = [r["step"] for r in recs if r.get("split", "train") == "train"]
    assert [e.step for e in acc.Scalars("perf/images_per_s")] == steps
    assert [e.step for e in acc.Images(f"images/{images}")] == ckpt_steps
    return acc


def event_steps(path):
    """The steps of an event file's events, read with TensorBoard's own loader (no purging)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [e.step for e in EventFileLoader(str(path)).Load()]


def interrupted(run, ckpt_past):
    """A segment that logged past its last checkpoint, then died: drop the checkpoint at ckpt_past."""
    (run / f"ckpt-{ckpt_past:07d}.pt").unlink()


def test_tokenizer_curves_match_the_log_and_resume_continues_them(store, tmp_path):
    full = tmp_path / "full"
    train_tokenizer(tok_cfg(store, full, usage_every=2, loader_workers=0))      # 6 steps, ckpts 3, 6
    acc = check_curves(full, "reconstructions", [3, 6])
    for tag in ("train/l2", "train/vq", "train/lpips", "train/g", "train/d", "opt/lr", "opt/grad_norm",
                "codebook/perplexity", "codebook/map_usage/01"):
        assert tag in acc.Tags()["scalars"], tag
    im = acc.Images("images/reconstructions")[0]
    assert im.width == 2 * 32 + 2 and im.height == 2 * 32 + 2         # 2 images above their reconstructions

    # Stopped at 4 with checkpoints at 3 and 4; the one of 4 lost: the resume from 3 purges step 4.
    part = tmp_path / "part"
    train_tokenizer(tok_cfg(store, part, usage_every=2, loader_workers=0, steps=4))
    interrupted(part, 4)
    train_tokenizer(tok_cfg(store, part, usage_every=2, loader_workers=0, resume=True))
    first, second = sorted((part / "tb").iterdir())                          # one event file per segment
    assert max(event_steps(first)) == 3 and min(s for s in event_steps(second) if s) == 4   # step 4 trimmed
    check_curves(part, "reconstructions", [3, 6])
    assert (part / "log.jsonl").read_bytes() == (full / "log.jsonl").read_bytes()

    # No curves: the same log, bit for bit, and the same weights.
    none = tmp_path / "none"
    train_tokenizer(tok_cfg(store, none, usage_every=2, loader_workers=0, log="none"))
    assert not (none / "tb").exists()
    assert (none / "log.jsonl").read_bytes() == (full / "log.jsonl").read_bytes()
    import torch
    a, b = (torch.load(checkpoints(r)[-1], weights_only=True) for r in (full, none))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_transformer_curves_match_the_log_and_resume_continues_them(tokens, tmp_path):
    full = tmp_path / "full"
    train_transformer(tr_cfg(tokens, full, steps=4, ckpt_every=2, val_every=2))
    acc = check_curves(full, "samples", [2, 4])
    for tag in ("train/loss", "train/map_loss/01", "train/map_loss/10", "val/loss", "val/map_acc/10", "opt/lr",
                "opt/grad_norm", "perf/tokens_per_s"):
        assert tag in acc.Tags()["scalars"], tag
    assert acc.Images("images/samples")[0].width == 4 * 32 + 3 * 2               # 4 samples in a row

    part = tmp_path / "part"
    train_transformer(tr_cfg(tokens, part, steps=3, ckpt_every=2, val_every=2))   # ckpts 2, 3
    interrupted(part, 3)
    train_transformer(tr_cfg(tokens, part, steps=4, ckpt_every=2, val_every=2, resume=True))
    check_curves(part, "samples", [2, 4])
    timeless = lambda run: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_log(run)]
    assert timeless(part) == timeless(full)

    none = tmp_path / "none"
    train_transformer(tr_cfg(tokens, none, steps=4, ckpt_every=2, val_every=2, log="none", log_images=0))
    assert timeless(none) == timeless(full) and not (none / "tb").exists()
    import torch
    a, b = (torch.load(checkpoints(r)[-1], weights_only=True)["model"] for r in (full, none))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_wandb_gets_the_same_numbers_and_images(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or fake_run,
        Image=lambda a: ("image", a.shape))
    fake_run = types.SimpleNamespace(log=lambda d, step: calls.append(("log", step, d)),
                                     finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    board = Board(tmp_path / "run", 3, log="wandb", config={"lr": 1.0})
    board.scalars({"step": 4, "split": "train", "loss": 2.0, "map_loss": [1.0, 3.0]}, perf={"images_per_s": 9.0})
    board.images(4, {"samples": np.zeros((8, 8, 3), np.uint8)})
    board.close()
    init = calls[0][1]
    assert init["group"] == "run" and init["name"] == "run-from-3" and init["dir"] == str(tmp_path / "run")
    assert calls[1] == ("log", 4, {"train/loss": 2.0, "train/map_loss/01": 1.0, "train/map_loss/02": 3.0,
                                   "perf/images_per_s": 9.0})
    assert calls[2] == ("log", 4, {"images/samples": ("image", (8, 8, 3))}) and calls[3] == ("finish",)
    assert [e.step for e in read_events(tmp_path / "run" / "tb").Scalars("train/loss")] == [4]


def test_a_missing_wandb_is_one_line_and_exit_2(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)          # import wandb raises ImportError
    with pytest.raises(ConfigError, match="--log wandb: the wandb package is not installed: pip install wandb"):
        check_loggers("wandb")
    run = tmp_path / "run"
    assert main(["train-tokenizer", "--data", str(store), "--out", str(run), "--image-size", "32", "--ch", "8",
                 "--steps", "1", "--lpips-random-backbone", "--log", "wandb"]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and "pip install wandb" in err[0] and "WANDB_MODE=offline" in err[0]
    assert not run.exists()


def test_a_new_segment_trims_what_no_checkpoint_kept(tmp_path):
    """A run killed before its first checkpoint restarts at 0: its curves go; a cut-short last
    record (a killed writer) is dropped from the file a resume keeps."""
    for value in (1.0, 2.0):
        board = Board(tmp_path, 0)
        board.scalars({"step": 1, "loss": value})
        board.scalars({"step": 2, "loss": value})
        board.close()
    (f,) = (tmp_path / "tb").iterdir()
    f.write_bytes(f.read_bytes() + b"\x40\x00\x00\x00\x00\x00\x00\x00abcd")     # half a record
    Board(tmp_path, 1).close()
    assert max(event_steps(f)) == 1
    assert [(e.step, e.value) for e in read_events(tmp_path / "tb").Scalars("train/loss")] == [(1, 2.0)]
