"""Issue 24, part 2: a full disk is named in one line (the errno, the path, the space still
needed and the fix), exit 3, and a rerun after freeing space gives the same bytes as an
uninterrupted run. A real tmpfs fills up (mounting needs root, as CI has; else skipped)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from nextdetail import cli
from nextdetail.runs import checkpoints
from conftest import own_lines
from pipeline_data import listing, synthetic_photo
from test_pipeline_crash import assert_same_store, tree_bytes
from token_data import make_token_store


@pytest.fixture
def disk(tmp_path):
    """A 320 KB tmpfs; yields (path, resize(kb)) and unmounts it after."""
    path = tmp_path / "disk"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def resize(kb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kb}k", str(path)], check=True)

    yield path, resize
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """Fill the file system of `folder` but `leave` bytes with one file (removed to free space)."""
    import os

    st = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def full_disk_line(capsys, argv, where: Path) -> str:
    rc = cli.main([str(a) for a in argv])
    lines = own_lines(capsys.readouterr().err)
    error = [line for line in lines if ": error: " in line]
    assert rc == 3 and len(error) == 1, lines
    assert "no space left on device writing " + str(where) in error[0], error[0]
    assert "free space and rerun the same command" in error[0] and "Traceback" not in "\n".join(lines)
    return error[0]


def test_decomposition_store_on_a_full_disk(ray_session, disk, tmp_path, capsys):
    path, resize = disk
    src = listing([synthetic_photo(tmp_path / f"p{i:02d}.png", i, size=72) for i in range(24)], tmp_path / "l.txt")
    argv = ["decompose-dataset", src, "--size", "64", "--n-iter", "5", "--shard-images", "4", "--workers", "1"]
    reference = tmp_path / "reference"
    assert cli.main([str(a) for a in [*argv, "--out", reference]]) == 0
    line = full_disk_line(capsys, [*argv, "--out", path / "store"], path / "store")
    assert "more for" in line                      # the space still needed
    resize(16 * 1024)
    assert cli.main([str(a) for a in [*argv, "--out", path / "store"]]) == 0
    capsys.readouterr()
    assert_same_store(path / "store", reference)


def test_token_store_and_checkpoint_on_a_full_disk(ray_session, disk, tmp_path, capsys):
    path, _ = disk
    tokens, ckpt, store = make_token_store(tmp_path, n=6)
    filler = fill(path, leave=8192)           # the lock and the plan fit, the parts do not
    export = ["export-tokens", "--data", store, "--tokenizer", ckpt, "--workers", "1"]
    full_disk_line(capsys, [*export, "--out", path / "tokens"], path / "tokens")
    filler.unlink()
    assert cli.main([str(a) for a in [*export, "--out", path / "tokens"]]) == 0
    assert tree_bytes(path / "tokens") == tree_bytes(tokens)

    train = ["train", "--tokens", tokens, "--tokenizer", ckpt, "--depth", "1", "--width", "32", "--heads", "2",
             "--steps", "3", "--batch-size", "2", "--val-every", "3", "--ckpt-every", "3"]
    assert cli.main([str(a) for a in [*train, "--out", tmp_path / "whole"]]) == 0
    filler = fill(path, leave=16 * 1024)           # the log fits, the checkpoint does not
    full_disk_line(capsys, [*train, "--out", path / "run"], path / "run")
    filler.unlink()
    assert cli.main([str(a) for a in [*train, "--out", path / "run", "--resume"]]) == 0
    capsys.readouterr()
    a, b = (torch.load(checkpoints(r)[-1], weights_only=True)["model"] for r in (tmp_path / "whole", path / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
