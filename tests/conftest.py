"""Shared test fixtures. Real photos live outside the repository, in <repo>/../shared/data."""
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Never try to download pretrained weights (nextdetail.weights): CI has no network, and a test of
# the download path says so itself (monkeypatch.delenv).
os.environ["NEXTDETAIL_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    """One local Ray for the whole test session (ray.init costs ~5 s), started before the first
    test, so that no command run in-process starts and stops a Ray of its own: a raylet started
    seconds after another one stopped died twice in CI on a message meant for the old one (Ray's
    "Check failed: binary.size() == T::Size()" in HandleFreeLocalObjects), taking pytest with it.

    4 logical CPUs on any machine: the job's actor pools need a CPU slot each, and the
    tests use up to 3 actors; Ray only schedules by these numbers, the cores are shared.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")        # Ray 2.60 turns token auth on
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_FORWARDED = re.compile(r"^\((?:raylet|gcs_server)\)|^\(.*?\bpid=\w+\)")


def own_lines(text: str) -> list:
    """The non-empty lines of captured stderr that our code wrote. Once a test has started Ray
    (the session's Ray stays up), Ray forwards log lines of its workers and daemons to the
    driver's stderr at any moment, prefixed "(pid=...)", "(raylet)" or "(<actor> pid=...)";
    assertions about our own one-line errors must not depend on when those arrive."""
    lines = []
    for line in text.splitlines():
        plain = _ANSI.sub("", line).strip()
        if plain and not _RAY_FORWARDED.match(plain):
            lines.append(plain)
    return lines


def kill_cli_when(argv, ready, what: str, timeout: float = 240, sig=signal.SIGKILL) -> tuple:
    """Run `python -m nextdetail.cli ARGV` in a session of its own and send the driver alone
    `sig` as soon as `ready()` holds: SIGKILL as a crash would, SIGTERM as a preemption does;
    then kill the Ray helpers it left behind. Returns (exit status, stderr text)."""
    import tempfile

    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "nextdetail.cli", *map(str, argv)], cwd=REPO, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"the {what} ended before it could be killed"
            assert time.monotonic() < deadline, f"the {what} wrote nothing to wait for"
            time.sleep(0.01)
        os.kill(proc.pid, sig)
        rc = proc.wait(timeout=60)
        err.seek(0)
        return rc, err.read().decode(errors="replace")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def s3_server():
    """One S3-protocol server on 127.0.0.1 for the session (moto's, tests/s3_server.py)."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e .[test])")
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e .[test])")
    from s3_server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


_BUCKETS = iter(range(1, 1 << 30))


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the session's S3 server; the code under test finds the server only
    through the standard AWS environment variables. Yields the server; `s3.bucket` is 's3://NAME'."""
    from s3_server import make_bucket

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("NEXTDETAIL_STORAGE_OPTIONS", raising=False)
    name = f"test-{os.getpid()}-{next(_BUCKETS)}"
    make_bucket(name)
    s3_server.bucket = f"s3://{name}"
    s3_server.reset_counts()
    s3_server.throttle = 0
    yield s3_server
