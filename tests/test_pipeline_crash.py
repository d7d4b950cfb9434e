"""Faults: the driver killed with SIGKILL mid-way and rerun, and a worker process killed
mid-way (Ray restarts it and retries its shard). Both must end with the store of an
uninterrupted run: the same Zarr bytes, the same manifest (bar timing/host columns), the
same meta.json, no image lost or written twice."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from nextdetail import cli
from nextdetail.decomp import ATParams
from nextdetail.pipelines import DecomposeDatasetConfig, DecompositionStore, run_job
from nextdetail.stores.decomposition_format import META, PARTS, RUN_DEPENDENT_COLUMNS, manifest_schema
from nextdetail.stores.shards import BASES
from conftest import kill_cli_when
from pipeline_data import SHARED_DATA, listing, synthetic_photo

# Enough solver work per image (64 px, 3 levels x 150 sweeps) that a run lasts seconds
# after its first shards are written, so the kill lands mid-way; shards of 16 make ~13.
SIZE, ORDER, N_ITER, BATCH, SHARD = 64, 3, 150, 4, 16


def tree_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """~200 images: cifar10_subset's first 20 per class when present, else generated ones."""
    tmp = tmp_path_factory.mktemp("crashdata")
    cifar = SHARED_DATA / "cifar10_subset"
    if cifar.is_dir():
        paths = [p for cls in sorted(cifar.iterdir()) if cls.is_dir() for p in sorted(cls.glob("*.jpg"))[:20]]
    else:
        paths = [synthetic_photo(tmp / f"g{i:03d}.png", i, size=48) for i in range(200)]
    return listing(paths, tmp / "list.txt")


def args(src, store):
    return ["decompose-dataset", str(src), "--out", str(store), "--size", str(SIZE), "--order", str(ORDER),
            "--n-iter", str(N_ITER), "--batch-size", str(BATCH), "--shard-images", str(SHARD), "--backend", "numba"]


@pytest.fixture(scope="module")
def reference(ray_session, dataset, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    store = tmp_path_factory.mktemp("reference") / "store"
    assert cli.main(args(dataset, store)) == 0
    return store


def assert_same_store(store: Path, reference: Path):
    assert tree_bytes(store / BASES) == tree_bytes(reference / BASES)
    got, want = (DecompositionStore(s).manifest for s in (store, reference))
    assert got["index"].tolist() == list(range(len(want)))          # each image once
    assert (got["status"] == "ok").all()
    stable = [c for c in want.columns if c not in RUN_DEPENDENT_COLUMNS]
    assert got[stable].equals(want[stable])
    assert (store / META).read_bytes() == (reference / META).read_bytes()


def journal_rows(store: Path):
    parts = store / PARTS
    if not parts.is_dir():
        return []
    try:
        files = [str(p) for p in parts.rglob("part-*.parquet")]
        return pads.dataset(files, format="parquet", schema=manifest_schema(ORDER)).to_table().to_pylist()
    except (OSError, ValueError):        # a part renamed into place while we list: look again
        return []


def kill_then_rerun(src, reference: Path, store: Path, capsys):
    """SIGKILL the CLI's driver once two shards are committed, rerun, compare with the reference."""
    kill_cli_when([*args(src, store), "--workers", "2"], lambda: len(journal_rows(store)) >= 2 * SHARD, "job")
    time.sleep(1)                                          # let its dying workers finish their writes
    assert not (store / META).exists(), "the kill came too late: the job had finished"
    done_before = {r["index"] for r in journal_rows(store) if r["status"] == "ok"}
    total = DecompositionStore(reference).manifest.shape[0]
    assert 0 < len(done_before) < total

    rc = cli.main(args(src, store))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"resuming: {len(done_before)} images already in the store" in err
    assert_same_store(store, reference)


def test_driver_killed_mid_way_then_rerun_equals_uninterrupted(reference, dataset, tmp_path, capsys):
    kill_then_rerun(dataset, reference, tmp_path / "store", capsys)


def test_sigterm_stops_the_job_in_one_line_and_a_rerun_equals_uninterrupted(reference, dataset, tmp_path, capsys):
    """Preemption (Kubernetes, Slurm, spot): exit 143, one line, no Ray stack dump, nothing lost."""
    store = tmp_path / "store"
    rc, err = kill_cli_when([*args(dataset, store), "--workers", "2"], lambda: len(journal_rows(store)) >= SHARD, "job",
                            sig=signal.SIGTERM)
    assert rc == 143, err
    assert "stopped by SIGTERM; rerun the same command to resume" in err
    assert "SIGTERM received" not in err and "Traceback" not in err, err
    time.sleep(1)
    assert not (store / META).exists(), "the signal came too late: the job had finished"
    assert cli.main(args(dataset, store)) == 0
    capsys.readouterr()
    assert_same_store(store, reference)


def test_driver_killed_mid_way_on_parquet_shards(ray_session, dataset, tmp_path_factory, tmp_path, capsys):
    """The same images as Hugging Face Parquet shards (the workers read them from the shards)."""
    from pipeline_data import hf_shard

    paths = [Path(p) for p in dataset.read_text().split()]
    src = tmp_path_factory.mktemp("hf") / "data"
    src.mkdir()
    for k in range(4):
        part = paths[k * len(paths) // 4:(k + 1) * len(paths) // 4]
        hf_shard(src / f"train-{k:05d}-of-00004.parquet", [p.read_bytes() for p in part], [k] * len(part),
                 names=["a", "b", "c", "d"], row_group_size=16)
    reference = tmp_path / "reference"
    assert cli.main(args(src, reference)) == 0
    kill_then_rerun(src, reference, tmp_path / "store", capsys)


def test_killed_worker_is_restarted_and_its_shard_retried(reference, dataset, tmp_path):
    store = tmp_path / "store"
    cfg = DecomposeDatasetConfig(src=dataset, out=store, size=SIZE, order=ORDER, params=ATParams(n_iter=N_ITER),
                                 backend="numba", workers=2, batch_size=BATCH, shard_images=SHARD)
    result = {}
    job = threading.Thread(target=lambda: result.update(report=run_job(cfg)), daemon=True)
    job.start()
    deadline = time.monotonic() + 240
    victim = None
    while victim is None:
        rows = journal_rows(store)
        if rows:
            victim = rows[0]["worker_pid"]
        assert job.is_alive(), "the job ended before a worker could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(victim, signal.SIGKILL)
    job.join(timeout=240)
    assert not job.is_alive()
    report = result["report"]
    assert (report.ok, report.error) == (report.images, 0)
    pids = set(DecompositionStore(store).manifest["worker_pid"])
    assert victim in pids and len(pids) >= 3, pids        # the restarted actor is a new process
    assert_same_store(store, reference)
    np.testing.assert_array_equal(DecompositionStore(store)[7].layers, DecompositionStore(reference)[7].layers)
