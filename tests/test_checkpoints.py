"""No code runs from a checkpoint: every command reads checkpoints with
torch.load(weights_only=True) (nextdetail.runs.load_checkpoint). A crafted checkpoint whose
pickle would run code is refused in one line naming the file, and the code never runs; a
truncated one is named too; a checkpoint written before format 2 loads with a warning."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from nextdetail.cli import main
from nextdetail.runs import CHECKPOINT_FORMAT, RunError, checkpoints, load_checkpoint
from token_data import make_token_store, tiny_transformer
from conftest import own_lines


class RunsCode:
    """Unpickling this object calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A token store, its tokenizer checkpoint and a 1-step `nextdetail train` run."""
    tmp = tmp_path_factory.mktemp("ckpt")
    tokens, tok_ckpt, store = make_token_store(tmp, n=4)
    run = tiny_transformer(tokens, tok_ckpt, tmp / "run", steps=1)
    return {"tokens": tokens, "tok": tok_ckpt, "store": store, "run": run}


def commands(r, ckpt, tmp):
    """Every command that reads a checkpoint, pointed at `ckpt` (as file or as a run's latest).
    (`train --tokenizer` compares the file's sha256 with the token store's before loading it.)"""
    tok_run, train_run = tmp / "tok_run", tmp / "train_run"
    for folder in (tok_run, train_run):
        folder.mkdir()
        shutil.copy(ckpt, folder / "ckpt-0000009.pt")
    return {
        "eval-tokenizer": ["eval-tokenizer", str(ckpt), "--data", str(r["store"]), "--out", str(tmp / "eval")],
        "export-tokens": ["export-tokens", "--data", str(r["store"]), "--tokenizer", str(ckpt),
                          "--out", str(tmp / "tokens")],
        "train-tokenizer --resume": ["train-tokenizer", "--data", str(r["store"]), "--out", str(tok_run), "--resume",
                                     "--steps", "10", "--image-size", "32", "--downsample", "8",
                                     "--lpips-weight", "0"],
        "train --resume": ["train", "--tokens", str(r["tokens"]), "--tokenizer", str(r["tok"]), "--out",
                           str(train_run), "--resume", "--steps", "10", "--depth", "1", "--width", "32",
                           "--heads", "2"],
        "sample": ["sample", str(ckpt), "--out", str(tmp / "samples"), "--n", "1"],
    }


def test_a_crafted_checkpoint_is_refused_and_never_runs(runs, tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    torch.save({"config": {}, "model": {}, "payload": RunsCode(marker)}, crafted)
    with pytest.raises(RunError, match=r"crafted\.pt: refused: its pickle needs `posix\.system`"):
        load_checkpoint(crafted)
    for name, argv in commands(runs, crafted, tmp_path).items():
        assert main(argv) == 2, name
        lines = own_lines(capsys.readouterr().err)
        assert len(lines) == 1 and "refused: its pickle needs `posix.system`" in lines[0], (name, lines)
        assert "crafted.pt" in lines[0] or "ckpt-0000009.pt" in lines[0], (name, lines)
        assert not marker.exists(), f"{name} ran code from the checkpoint"


def test_a_truncated_checkpoint_is_named_in_one_line(runs, tmp_path, capsys):
    data = runs["tok"].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    for name, argv in commands(runs, cut, tmp_path).items():
        assert main(argv) == 2, name
        lines = own_lines(capsys.readouterr().err)
        assert len(lines) == 1 and "cannot read checkpoint" in lines[0], (name, lines)
        assert "cut.pt" in lines[0] or "ckpt-0000009.pt" in lines[0], (name, lines)
    assert cut.read_bytes() == data[: len(data) // 2]                  # left in place


def test_checkpoints_hold_plain_data_and_their_format(runs):
    for path in (runs["tok"], checkpoints(runs["run"])[-1]):
        ck = torch.load(path, weights_only=True)                       # no allow-listing needed
        assert ck["checkpoint"] == CHECKPOINT_FORMAT


def test_a_checkpoint_from_before_format_2_loads_with_a_warning(runs, tmp_path, caplog, capsys):
    old = torch.load(runs["tok"], weights_only=True)
    del old["checkpoint"]
    torch.save(old, tmp_path / "old.pt")
    assert main(["eval-tokenizer", str(tmp_path / "old.pt"), "--data", str(runs["store"]),
                 "--out", str(tmp_path / "eval"), "--images", "2", "--no-lpips", "--no-rfid"]) == 0
    warned = [r.getMessage() for r in caplog.records if "before checkpoint format 2" in r.getMessage()]
    assert warned and "old.pt" in warned[0]
