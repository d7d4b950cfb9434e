"""Training the next-detail transformer on a real (tiny) token store: overfitting, resume,
validation split, logs, refusals, and DDP with 2 CPU processes (gloo)."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ddp import free_port, join_world
from token_data import make_token_store

from nextdetail.runs import TrainError, checkpoints, read_log
from nextdetail.train.model import TransformerShape
from nextdetail.train.trainer import TransformerTrainConfig, label_dropout, lr_at, split_indices, train


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """(token store, tokenizer checkpoint): 8 samples, 10 maps, L = 126, V = 64, no labels."""
    out, ckpt, _ = make_token_store(tmp_path_factory.mktemp("tokens"), n=8)
    return out, ckpt


def relabel(src, dst, labels):
    """A copy of a token store with other class labels (index.parquet and meta.json's num_classes)."""
    shutil.copytree(src, dst)
    table = pq.read_table(dst / "index.parquet")
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
    pq.write_table(table, dst / "index.parquet")
    meta = json.loads((dst / "meta.json").read_text())
    meta["num_classes"] = int(max(labels)) + 1
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def cfg(tokens, out, **kw):
    shape = {"depth": 2, "width": 32, "heads": 2, **{k: kw.pop(k) for k in ("depth", "width", "heads") if k in kw}}
    base = dict(tokens=str(tokens[0]), tokenizer=str(tokens[1]), out=str(out),
                steps=4, batch_size=4, lr=1e-3, warmup=2, val_fraction=0.25, val_every=2, ckpt_every=2)
    return TransformerTrainConfig(**{**base, **kw}, model=TransformerShape(**shape))


def test_schedule_split_and_label_dropout_are_deterministic():
    c = TransformerTrainConfig(tokens="t", tokenizer="r", out="o", lr=1.0, warmup=10, steps=110, min_lr=0.1)
    assert lr_at(c, 0) == pytest.approx(0.1) and lr_at(c, 9) == pytest.approx(1.0)
    assert lr_at(c, 60) == pytest.approx(0.55) and lr_at(c, 110) == pytest.approx(0.1)
    tr, va = split_indices(20, 0.25, seed=3)
    assert len(va) == 5 and sorted(np.concatenate([tr, va]).tolist()) == list(range(20))
    assert np.array_equal(va, split_indices(20, 0.25, seed=3)[1])
    assert len(split_indices(5, 0.0, 0)[1]) == 0 and len(split_indices(2, 0.9, 0)[0]) == 1
    labels = torch.arange(8)
    a = label_dropout(labels, 99, 0.5, seed=0, step=7, rank=0)
    assert torch.equal(a, label_dropout(labels, 99, 0.5, seed=0, step=7, rank=0))
    assert set(a.tolist()) - set(range(8)) == {99}
    # rank r of world 2 with batch 4 sees the same draws as one process with batch 8
    halves = [label_dropout(labels[4 * r:4 * r + 4], 99, 0.5, 0, 7, r) for r in range(2)]
    assert torch.equal(torch.cat(halves), a)


def test_overfits_a_tiny_token_set(tokens, tmp_path):
    """8 samples, each its own class: teacher-forced loss falls to near zero."""
    labelled = relabel(tokens[0], tmp_path / "labelled", list(range(8)))
    report = train(cfg((labelled, tokens[1]), tmp_path / "run", steps=200, batch_size=8, lr=1e-2, warmup=10,
                       width=64, heads=2, grad_clip=0.0, val_fraction=0.0, cond_drop=0.0, val_every=1000, ckpt_every=1000,
                       min_lr=1.0))
    recs = read_log(tmp_path / "run")
    assert recs[0]["loss"] > 3.0                       # ~ ln 64 at the start
    assert report.last["loss"] < 0.05 and report.last["acc"] > 0.99
    assert len(report.last["map_loss"]) == 10 and max(report.last["map_loss"]) < 0.2


def test_resume_is_bitwise_an_uninterrupted_run(tokens, tmp_path):
    train(cfg(tokens, tmp_path / "full", steps=6, ckpt_every=3))
    part = train(cfg(tokens, tmp_path / "part", steps=3, ckpt_every=3))
    assert part.steps == 3
    resumed = train(cfg(tokens, tmp_path / "part", steps=6, ckpt_every=3, resume=True))
    assert resumed.start_step == 3
    a = torch.load(checkpoints(tmp_path / "full")[-1], weights_only=True)
    b = torch.load(checkpoints(tmp_path / "part")[-1], weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["sampler"] == b["sampler"]
    # the same training records; the interrupted run also validated where it stopped (step 3)
    strip = lambda recs, split: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs
                                 if r["split"] == split]
    full_log, part_log = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert strip(full_log, "train") == strip(part_log, "train")
    assert [r["step"] for r in strip(part_log, "val")] == [2, 3, 4, 6]
    assert strip(full_log, "val") == [r for r in strip(part_log, "val") if r["step"] != 3]


def test_log_validation_plot_and_checkpoint_contents(tokens, tmp_path):
    report = train(cfg(tokens, tmp_path / "run"))
    recs = read_log(tmp_path / "run")
    train_recs = [r for r in recs if r["split"] == "train"]
    val_recs = [r for r in recs if r["split"] == "val"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4] and [r["step"] for r in val_recs] == [2, 4]
    for r in train_recs:
        assert len(r["map_loss"]) == len(r["map_acc"]) == 10 and r["tokens_per_s"] > 0 and r["lr"] > 0
    assert (tmp_path / "run" / "loss.png").is_file()
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["ckpt-0000002.pt", "ckpt-0000004.pt"]
    ck = torch.load(checkpoints(tmp_path / "run")[-1], weights_only=True)
    assert ck["data"]["val_samples"] == 2 and ck["data"]["num_base"] == 4 and ck["data"]["order"] == 3
    assert ck["model_config"]["map_shapes"][0] == [1, 1] or ck["model_config"]["map_shapes"][0] == (1, 1)
    assert report.val is not None and "trained steps 0..4" in report.summary()


def test_refusals_name_the_problem(tokens, tmp_path):
    train(cfg(tokens, tmp_path / "run", steps=2))
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train(cfg(tokens, tmp_path / "run", steps=2))
    with pytest.raises(TrainError, match="width 32 \\(checkpoint\\) != 64"):
        train(cfg(tokens, tmp_path / "run", steps=3, width=64, resume=True))
    other = tmp_path / "other.pt"
    other.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="not the one these tokens were exported with"):
        train(cfg((tokens[0], other), tmp_path / "run2"))
    with pytest.raises(TrainError, match="--batch-size 0"):
        cfg(tokens, tmp_path / "run3", batch_size=0)
    with pytest.raises(TrainError, match="--cond-drop 1.0"):
        cfg(tokens, tmp_path / "run3", cond_drop=1.0)
    with pytest.raises(TrainError, match="--min-lr 1.5"):
        cfg(tokens, tmp_path / "run3", min_lr=1.5)


def _ddp_worker(rank, world, port, config, result):
    join_world(rank, world, port)
    torch.set_num_threads(1)
    report = train(config)
    torch.save(report.trainer.model.state_dict(), f"{result}-{rank}.pt")


def test_ddp_two_cpu_processes_match_one_process_with_the_doubled_batch(tokens, tmp_path):
    import torch.multiprocessing as mp

    ddp = cfg(tokens, tmp_path / "ddp", steps=3, batch_size=2, ckpt_every=3, val_every=3)
    mp.spawn(_ddp_worker, args=(2, free_port(), ddp, str(tmp_path / "params")), nprocs=2, join=True)
    p0, p1 = (torch.load(tmp_path / f"params-{r}.pt", weights_only=True) for r in range(2))
    single = train(cfg(tokens, tmp_path / "single", steps=3, batch_size=4, ckpt_every=3, val_every=3))
    ref = single.trainer.model.state_dict()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k                       # the ranks never drift apart
        torch.testing.assert_close(p0[k], ref[k], rtol=1e-4, atol=1e-5)   # = one process, batch 2 x 2
    d, s = read_log(tmp_path / "ddp"), read_log(tmp_path / "single")
    assert [r["step"] for r in d] == [r["step"] for r in s]
    for a, b in zip(d, s):                                      # the logged metrics are global
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_a_config_saved_before_0_2_reads_back(tokens, tmp_path):
    """Checkpoints of nextdetail 0.1.0 and early 0.2.0 builds kept the model's shape as
    top-level config keys."""
    c = cfg(tokens, tmp_path / "run", depth=3)
    flat = {k: v for k, v in c.to_dict().items() if k != "model"}
    flat.update(c.to_dict()["model"])
    assert TransformerTrainConfig.from_dict(flat) == c == TransformerTrainConfig.from_dict(c.to_dict())
