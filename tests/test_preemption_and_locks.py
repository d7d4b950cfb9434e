"""Issue 24, parts 3 and 4: SIGTERM is a preemption (trainers checkpoint the step they are on,
and a resume from it is bitwise an uninterrupted run), and one job writes a folder at a time."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nextdetail import cli
from nextdetail.runs import LOG, checkpoints
from nextdetail.stores.lock import LOCK, folder_lock
from conftest import REPO, own_lines
from token_data import make_token_store

STEPS = 60


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    tokens, ckpt, store = make_token_store(tmp_path_factory.mktemp("preempt"), n=6)
    return {"tokens": tokens, "tokenizer": ckpt, "store": store}


def train_argv(t, out):
    return ["train", "--tokens", str(t["tokens"]), "--tokenizer", str(t["tokenizer"]), "--out", str(out),
            "--depth", "1", "--width", "32", "--heads", "2", "--steps", str(STEPS), "--batch-size", "2",
            "--val-every", str(STEPS), "--ckpt-every", str(STEPS)]


def logged_steps(run: Path) -> int:
    path = run / LOG
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigterm_checkpoints_the_current_step_and_resume_is_bitwise(tokens, tmp_path, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli.main(train_argv(tokens, whole)) == 0

    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    with open(tmp_path / "err.txt", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "nextdetail.cli", *train_argv(tokens, cut)], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while logged_steps(cut) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before the signal"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        err.seek(0)
        text = err.read()
    assert rc == 143, text
    assert "stopped by SIGTERM; rerun the same command to resume" in text and "Traceback" not in text
    saved = checkpoints(cut)
    assert len(saved) == 1 and 5 <= torch.load(saved[0], weights_only=True)["step"] < STEPS
    assert not (cut / LOCK).exists()

    assert cli.main([*train_argv(tokens, cut), "--resume"]) == 0
    capsys.readouterr()
    a, b = (torch.load(checkpoints(r)[-1], weights_only=True)["model"] for r in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(s)["step"] for s in (cut / LOG).read_text().splitlines() if '"train"' in s]
    assert steps == list(range(1, STEPS + 1))                       # no gap, no duplicate


HOLD = """
import sys, time
from nextdetail.stores.lock import folder_lock
with folder_lock(sys.argv[1], "folder"):
    print("held", flush=True)
    sys.stdin.read()
"""


def hold_lock(folder: Path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_job_on_a_held_folder_is_refused_naming_the_holder(tokens, tmp_path, capsys):
    store, out_tokens, run = tmp_path / "store", tmp_path / "tokens", tmp_path / "run"
    photos = tokens["store"].parent / "store.txt"
    cases = [
        (["decompose-dataset", str(photos), "--out", str(store), "--size", "32", "--n-iter", "2"], store),
        (["decompose-dataset", str(photos), "--out", str(store), "--size", "32", "--overwrite"], store),
        (["export-tokens", "--data", str(tokens["store"]), "--tokenizer", str(tokens["tokenizer"]), "--out",
          str(out_tokens)], out_tokens),
        (train_argv(tokens, run), run),
        (["train-tokenizer", "--data", str(tokens["store"]), "--out", str(run), "--image-size", "32", "--ch", "8",
          "--lpips-weight", "0", "--steps", "1"], run),
    ]
    for argv, folder in cases:
        holder = hold_lock(folder)
        try:
            rc = cli.main(argv)
            lines = own_lines(capsys.readouterr().err)
            assert rc == 2 and len(lines) == 1, (argv, lines)
            assert f"pid {holder.pid}" in lines[0] and "another nextdetail job" in lines[0], lines[0]
            assert sorted(p.name for p in folder.iterdir()) == [LOCK], argv        # nothing written
        finally:
            holder.communicate("")
    # a lock left by a dead process on this host is taken over, with a note, and the job runs
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    run.mkdir(exist_ok=True)
    (run / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "then"}))
    assert cli.main([*train_argv(tokens, run), "--steps", "1", "--ckpt-every", "1", "--val-every", "1"]) == 0
    assert "took over the lock of pid" in capsys.readouterr().err
    assert not (run / LOCK).exists()
    # a lock of another host is refused, saying how to remove it
    (run / LOCK).write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "then"}))
    assert cli.main([*train_argv(tokens, run), "--resume"]) == 2
    line = own_lines(capsys.readouterr().err)[0]
    assert "node-17" in line and f"remove {run / LOCK}" in line


def test_sigterm_waits_for_the_step_inside_a_training_loop_and_interrupts_elsewhere():
    from nextdetail.faults import Preempted, deferred_term, term_requested, terminable

    with terminable():
        with deferred_term(5.0):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            left = term_requested()
            assert left is not None and 0 < left <= 5.0          # noted, the step goes on
        assert term_requested() is None
        with pytest.raises(Preempted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)
