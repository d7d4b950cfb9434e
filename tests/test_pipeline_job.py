"""`nextdetail decompose-dataset` end to end under Ray: real photos, labels, bad files, the
summary and exit status, reruns (resume, refusal, --overwrite), the reader round trip.

All tests share one local Ray (the ray_session fixture); the command joins it. Small
images and few sweeps keep the file to about a minute.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from nextdetail import cli
from nextdetail.imageio import load_image
from nextdetail.pipelines import DecomposeDatasetConfig, DecompositionStore, list_sources, run_job
from nextdetail.stores.decomposition_format import MANIFEST, META, RUN_DEPENDENT_COLUMNS
from nextdetail.stores.shards import BASES
from pipeline_data import broken_files, class_folder, listing, photo_paths
from conftest import own_lines

SUMMARY = re.compile(r"^(\d+) images: (\d+) ok, (\d+) error(?: \((\d+) already done\))?; processed (\d+) "
                     r"in [\d.]+ s = [\d.]+ images/s on (\d+) (\w+) workers; Ray start-up [\d.]+ s, "
                     r"total [\d.]+ s; mean AT sweeps per level (?:[\d.]+(?: / [\d.]+)*|n/a); "
                     r"read an? (?:folder|listing) of image files; store (.+)$")
FAST = ["--order", "2", "--n-iter", "10", "--backend", "numba"]


def run_cli(capsys, *argv):
    rc = cli.main(["decompose-dataset", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return rc, out, err


def summary(out: str) -> re.Match:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    m = SUMMARY.match(lines[0])
    assert m, lines[0]
    return m


def tree_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_class_folder_end_to_end(ray_session, tmp_path, capsys):
    src = class_folder(tmp_path)
    sources = list_sources(src)
    store = tmp_path / "store"
    rc, out, err = run_cli(capsys, src, "--out", store, "--size", 32, "--workers", 2, "--batch-size", 16,
                           "--shard-images", 4, *FAST)
    assert rc == 0, err
    m = summary(out)
    n = len(sources)
    assert m.groups()[:3] == (str(n), str(n), "0") and m.group(5) == str(n)
    assert (m.group(6), m.group(7), m.group(8)) == ("2", "numba", str(store))
    reader = DecompositionStore(store)
    assert len(reader) == n
    assert reader.labels.tolist() == [s.label for s in sources]
    assert reader.manifest["class_name"].tolist() == [s.class_name for s in sources]
    assert set(reader.manifest["backend"]) == {"numba"} and reader.manifest["worker_host"].notna().all()
    assert (reader.manifest["seconds"] > 0).all()
    for i in (0, n // 2, n - 1):
        item = reader[i]
        assert (item.id, item.label) == (sources[i].id, sources[i].label)
        np.testing.assert_array_equal(item.image, load_image(sources[i].path, 32))     # I is stored exactly
        assert item.layers.dtype == np.float32 and item.layers.shape == (3, 3, 32, 32)


def test_bad_files_become_error_rows_and_exit_1(ray_session, tmp_path, capsys):
    photos = photo_paths(4, tmp_path)
    bad = broken_files(tmp_path / "bad", photos[0])
    (tmp_path / "folder.png").mkdir()
    paths = photos[:2] + list(bad.values()) + [tmp_path / "missing.png", tmp_path / "folder.png"] + photos[2:]
    store = tmp_path / "store"
    rc, out, err = run_cli(capsys, listing(paths, tmp_path / "l.txt"), "--out", store, "--size", 40,
                           "--batch-size", 3, *FAST)
    assert rc == 1
    m = summary(out)
    assert m.groups()[:3] == ("10", "4", "6")
    for name in ("truncated.png", "notes.png", "empty.jpg", "garbage.jpg", "missing.png", "folder.png"):
        assert re.search(rf"^\S*{re.escape(name)}: .+$", err, re.M), (name, err)
    manifest = DecompositionStore(store).manifest.set_index("id")
    errors = manifest.loc[manifest.status == "error", "error"]
    assert errors[str(tmp_path / "missing.png")] == "no such file"
    assert errors[str(tmp_path / "folder.png")] == "is a directory, not an image file"
    assert "not an image" in errors[str(bad["not_image"])]
    assert "corrupt or truncated" in errors[str(bad["truncated"])]
    assert manifest.loc[manifest.status == "ok", "error"].isna().all()
    assert len(DecompositionStore(store)) == 4


def test_rerun_resumes_refuses_other_parameters_and_overwrites(ray_session, tmp_path, capsys):
    photos = photo_paths(6, tmp_path)
    lst = listing(photos, tmp_path / "l.txt")
    store = tmp_path / "store"
    args = [lst, "--out", store, "--size", 32, "--batch-size", 2, *FAST]
    assert run_cli(capsys, *args)[0] == 0
    before = tree_bytes(store / BASES)
    meta = (store / META).read_bytes()

    rc, out, err = run_cli(capsys, *args)                # same command again: nothing left to do
    assert rc == 0
    m = summary(out)
    assert (m.group(4), m.group(5)) == ("6", "0")
    assert tree_bytes(store / BASES) == before and (store / META).read_bytes() == meta

    rc, out, err = run_cli(capsys, lst, "--out", store, "--size", 48, "--alpha", 5, *FAST[2:], "--order", 2)
    assert (rc, out) == (2, "")
    assert own_lines(err) == [f"nextdetail decompose-dataset: error: {store}: store made with other parameters: "
                              f"--size 32 (store) != 48 (this run); --alpha 10.0 (store) != 5.0 (this run); rerun "
                              f"with the store's parameters, or pass --overwrite to replace it"]
    assert tree_bytes(store / BASES) == before            # refused before touching anything

    rc, out, err = run_cli(capsys, listing(photos[:5], tmp_path / "l5.txt"), "--out", store, "--size", 32, *FAST)
    assert rc == 2 and "other images than SRC lists now: 1 images removed" in err

    rc, out, err = run_cli(capsys, lst, "--out", store, "--size", 48, "--overwrite", *FAST)
    assert rc == 0, err
    assert DecompositionStore(store)[0].layers.shape == (3, 3, 48, 48)


def test_errors_are_retried_by_a_rerun(ray_session, tmp_path, capsys):
    photos = photo_paths(3, tmp_path)
    late = tmp_path / "late.png"
    lst = listing(photos + [late], tmp_path / "l.txt")
    args = [lst, "--out", tmp_path / "store", "--size", 32, "--shard-images", 1, *FAST]
    assert run_cli(capsys, *args)[0] == 1
    late.write_bytes(photos[0].read_bytes())               # the missing file turns up
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    m = summary(out)
    assert m.groups()[:5] == ("4", "4", "0", "3", "1")
    assert "resuming: 3 images already in the store, 1 to do" in err


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    for argv, message in [
        ([tmp_path / "nope", "--out", tmp_path / "s"], f"{tmp_path / 'nope'}: no such file or folder"),
        ([tmp_path, "--out", tmp_path / "s", "--size", 0], "--size must be an integer >= 1, got 0"),
        ([tmp_path, "--out", tmp_path / "s", "--omega", 2.5], "--omega must be a finite number > 0 and < 2, got 2.5"),
        ([tmp_path, "--out", tmp_path / "s", "--backend", "numba", "--gpus-per-worker", 1],
         "--gpus-per-worker 1.0 needs the cupy backend, not 'numba'"),
    ]:
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2 and out == ""
        assert len(own_lines(err)) == 1 and message in err, err


def test_job_failure_exits_3(monkeypatch, tmp_path, capsys):
    from nextdetail.pipelines import JobError

    def failing(cfg, progress=None):
        raise JobError("the job failed; the store is resumable, rerun the same command (OSError: disk full)")

    monkeypatch.setattr("nextdetail.pipelines.run_job", failing)
    rc, out, err = run_cli(capsys, tmp_path, "--out", tmp_path / "s")
    assert rc == 3 and "rerun the same command (OSError: disk full)" in err


def test_run_dependent_columns_are_the_only_unstable_ones(ray_session, tmp_path):
    """Two runs with different batching and workers give the same bytes (numba backend), and
    every shard is written by one task (one worker process made all its rows)."""
    photos = photo_paths(6, tmp_path)
    lst = listing(photos, tmp_path / "l.txt")
    from nextdetail.decomp import ATParams
    stores = []
    for k, (workers, batch) in enumerate([(1, 6), (3, 1)]):
        cfg = DecomposeDatasetConfig(src=lst, out=tmp_path / f"s{k}", size=32, order=2,
                                     params=ATParams(n_iter=10), backend="numba", workers=workers,
                                     batch_size=batch, shard_images=2)
        report = run_job(cfg)
        assert (report.ok, report.workers) == (6, workers)
        stores.append(cfg.out)
    assert tree_bytes(stores[0] / BASES) == tree_bytes(stores[1] / BASES)
    for s in stores:
        m = DecompositionStore(s).manifest
        assert (m.groupby(m["index"] // 2)["worker_pid"].nunique() == 1).all()
    # Which actor takes which shard is Ray's choice: with 3 tiny shards the first actor up may
    # take them all (seen in CI), so only "one process per shard" is asserted, above.
    a, b = (DecompositionStore(s).manifest.drop(columns=list(RUN_DEPENDENT_COLUMNS)) for s in stores)
    assert a.equals(b)
    assert (stores[0] / MANIFEST).exists()


def test_demo_writes_a_store_and_a_contact_sheet_read_back_from_it(ray_session, tmp_path, capsys):
    from PIL import Image

    from nextdetail import demo

    photos = photo_paths(2, tmp_path)
    out = tmp_path / "demo"
    rc = demo.main(["--out", str(out), "--images", *map(str, photos), "--size", "24", "--backend", "numba",
                    "--no-chain"])
    stdout = capsys.readouterr().out
    store, sheet = out / demo.STORE_NAME, out / f"{demo.STORE_NAME}-contact.png"
    assert rc == 0
    assert f"store: {store} (2 of 2 images ok" in stdout
    assert f"contact sheet of {photos[0].name} from the store (bases B_k, details D_k): {sheet}" in stdout
    assert len(DecompositionStore(store)) == 2
    assert Image.open(sheet).size[0] > 4 * 24          # input + 3 bases side by side, enlarged


def test_a_local_ray_that_fails_to_start_is_started_once_more(monkeypatch):
    """A local start times out now and then: one more start, in a temp folder of its own."""
    import signal

    import ray
    from nextdetail.pipelines import JobError
    from nextdetail.pipelines.config import RayJobConfig
    from nextdetail.pipelines.ray_job import connect

    calls = []

    def flaky(**kw):
        calls.append(kw)
        if len(calls) == 1:
            raise RuntimeError("The current node timed out during startup")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "init", flaky)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert connect(RayJobConfig())[0] and len(calls) == 2 and "_temp_dir" in calls[1]

        def never(**kw):
            raise RuntimeError("The current node timed out during startup")

        monkeypatch.setattr(ray, "init", never)
        with pytest.raises(JobError, match="cannot start a local Ray, also when started a second time"):
            connect(RayJobConfig())
    finally:
        signal.signal(signal.SIGTERM, handler)
