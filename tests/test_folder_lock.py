"""The exclusive lock on a job's output folder (nextdetail.stores.lock)."""
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nextdetail.stores.lock import LOCK, FolderLocked, _process_start, folder_lock, read_lock

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": 1, "process_start": None,
              "started": "2020-01-01T00:00:00+00:00", "command": "nextdetail old job"}
    record.update(fields)
    (folder / LOCK).write_text(json.dumps(record))


def test_acquire_records_holder_and_release_removes_the_file(tmp_path):
    folder = tmp_path / "a" / "store"
    with folder_lock(folder, "store"):
        assert folder.is_dir()
        info = read_lock(folder)
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
        assert info["process_start"] == _process_start(os.getpid())
        assert info["started"].endswith("+00:00") and isinstance(info["command"], str)
        assert [p.name for p in folder.iterdir()] == [LOCK]     # no temp file left behind
    assert not folder.exists()          # the lock made the folder and the job wrote nothing: gone
    folder.mkdir()
    with folder_lock(folder, "store"):
        (folder / "work").write_text("done")
    assert [p.name for p in folder.iterdir()] == ["work"]      # a folder it did not make stays


def test_a_live_holder_in_another_process_is_refused(tmp_path):
    code = ("import sys\nfrom nextdetail.stores.lock import folder_lock\n"
            f"with folder_lock({str(tmp_path)!r}, 'store'):\n"
            "    print('held', flush=True)\n    sys.stdin.read()\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FolderLocked) as e:
            with folder_lock(tmp_path, "token store", "--tokens"):
                pass
        msg = str(e.value)
        assert "\n" not in msg and f"pid {proc.pid} " in msg and "another" in msg
        assert "this token store" in msg and "--tokens" in msg
    finally:
        proc.communicate(timeout=30)          # closes stdin: the holder leaves its block
    assert proc.returncode == 0
    with folder_lock(tmp_path, "store"):
        assert read_lock(tmp_path)["pid"] == os.getpid()


def test_a_nested_acquire_in_the_same_process_is_refused(tmp_path):
    with folder_lock(tmp_path, "run"):
        with pytest.raises(FolderLocked) as e:
            with folder_lock(tmp_path, "run", "--run"):
                pass
        assert "\n" not in str(e.value) and f"pid {os.getpid()} " in str(e.value)
        assert read_lock(tmp_path)["pid"] == os.getpid()       # the outer lock stays
    assert not (tmp_path / LOCK).exists()


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead)
    with caplog.at_level(logging.WARNING, logger="nextdetail.stores.lock"):
        with folder_lock(tmp_path, "store"):
            assert read_lock(tmp_path)["pid"] == os.getpid()
    warnings = [r.getMessage() for r in caplog.records if r.name == "nextdetail.stores.lock"]
    assert len(warnings) == 1 and f"pid {dead} " in warnings[0]
    assert "no longer running" in warnings[0]
    assert not (tmp_path / LOCK).exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc")
def test_a_reused_pid_is_stale_and_a_live_one_is_not(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = _process_start(proc.pid)
        _write_lock(tmp_path, pid=proc.pid, process_start=start)   # alive, flock not carried
        with pytest.raises(FolderLocked, match=f"pid {proc.pid} on"):
            with folder_lock(tmp_path, "store"):
                pass
        _write_lock(tmp_path, pid=proc.pid, process_start=start + 12345)   # pid reused
        with folder_lock(tmp_path, "store"):
            assert read_lock(tmp_path)["pid"] == os.getpid()
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_from_another_host_is_refused_with_a_removal_hint(tmp_path):
    _write_lock(tmp_path, host="some-other-host", pid=_dead_pid())
    with pytest.raises(FolderLocked) as e:
        with folder_lock(tmp_path, "run"):
            pass
    msg = str(e.value)
    assert "\n" not in msg and "some-other-host" in msg and str(tmp_path / LOCK) in msg
    assert "remove" in msg
    assert read_lock(tmp_path)["host"] == "some-other-host"      # left as it was
    assert e.value.exit_status == 2


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_an_unreadable_lock_file_without_holder_is_taken_over(tmp_path, content, caplog):
    (tmp_path / LOCK).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="nextdetail.stores.lock"):
        with folder_lock(tmp_path, "store"):
            assert read_lock(tmp_path)["pid"] == os.getpid()
    assert "unreadable" in caplog.text
    assert not (tmp_path / LOCK).exists()


def test_an_exception_in_the_block_releases_the_lock(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with folder_lock(tmp_path, "store"):
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK).exists()
    with folder_lock(tmp_path, "store"):
        pass


def test_release_survives_the_folder_being_removed(tmp_path):
    import shutil

    folder = tmp_path / "run"
    with folder_lock(folder, "run"):
        shutil.rmtree(folder)
    assert not folder.exists()
