"""A Ray cluster of two nodes on this machine whose only shared storage is a bucket: the head
(the driver's node, no CPU for tasks) and a worker node with a working directory and a temp
folder of its own. decompose-dataset reads SRC from the bucket and writes the store there; the
workers never touch a path of the driver's."""
from __future__ import annotations

import os
import socket
import subprocess
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from nextdetail.stores.decomposition import DecompositionStore
from conftest import REPO
from pipeline_data import synthetic_photo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def ray_start(args, **kwargs) -> None:
    done = subprocess.run([ray_bin(), "start", *args], capture_output=True, text=True, timeout=120, **kwargs)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture
def two_nodes(tmp_path, s3):
    """(address, worker node's temp folder, the driver's environment)."""
    port = free_port()
    # Short temp folders: Ray's socket paths must fit AF_UNIX's 107 bytes.
    head_tmp, worker_tmp = (Path(tempfile.mkdtemp(prefix=p, dir="/tmp")) for p in ("ndh-", "ndw-"))
    worker_cwd = tmp_path / "worker-cwd"
    worker_cwd.mkdir()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    started = []
    try:
        ray_start(["--head", "--port", str(port), "--num-cpus", "0", "--node-ip-address", "127.0.0.1",
                   "--include-dashboard", "false", "--disable-usage-stats"], env=dict(env, TMPDIR=str(head_tmp)))
        started.append(True)
        # The worker node: another working directory and temp folder, and no AWS variables of its
        # own: it reaches the bucket with what the driver forwards (ray_job.worker_env).
        worker_env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
        ray_start(["--address", f"127.0.0.1:{port}", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
                   "--disable-usage-stats"], env=dict(worker_env, TMPDIR=str(worker_tmp)), cwd=worker_cwd)
        yield f"127.0.0.1:{port}", worker_tmp, dict(env, TMPDIR=str(head_tmp))
    finally:
        if started:
            # Stop only this cluster's processes (`ray stop` would stop the session's Ray too):
            # its daemons name the head's temp folder; every Ray process of it descends from them.
            import psutil

            daemons = [p for p in psutil.process_iter(["cmdline"]) if str(head_tmp) in " ".join(p.info["cmdline"] or [])]
            tree = {c for d in daemons for c in d.children(recursive=True)} | set(daemons)
            for proc in tree:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(list(tree), timeout=10)
        for p in (head_tmp, worker_tmp):
            shutil.rmtree(p, ignore_errors=True)


def test_decompose_dataset_on_two_nodes_with_only_a_bucket_shared(s3, two_nodes, tmp_path):
    import s3fs

    address, worker_tmp, env = two_nodes
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    local = tmp_path / "src"
    for k, cls in enumerate(("a", "b")):
        for i in range(4):
            synthetic_photo(local / cls / f"{i}.png", 7 * k + i, size=32)
    fs.put(str(local), f"{s3.bucket[5:]}/src", recursive=True)
    driver_cwd = tmp_path / "driver-cwd"
    driver_cwd.mkdir()
    out = f"{s3.bucket}/stores/two-nodes"
    run = subprocess.run([sys.executable, "-m", "nextdetail.cli", "decompose-dataset", f"{s3.bucket}/src", "--out", out,
                          "--size", "24", "--order", "2", "--shard-images", "4", "--backend", "numba",
                          "--address", address],
                         cwd=driver_cwd, env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    store = DecompositionStore(out)
    assert len(store) == 8 and store.meta["counts"]["error"] == 0
    assert set(store.manifest["path"].str.slice(0, len(s3.bucket))) == {s3.bucket}
    # The workers kept their journals on their own node and nothing of theirs reached the
    # driver's working directory or temp folder.
    assert (worker_tmp / "nextdetail-attempts").is_dir()
    assert not (Path(env["TMPDIR"]) / "nextdetail-attempts").exists()
    assert list(driver_cwd.iterdir()) == []
