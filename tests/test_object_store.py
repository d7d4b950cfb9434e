"""decompose-dataset with SRC and STORE on object storage: a real S3-protocol server on 127.0.0.1
(moto's, tests/s3_server.py), reached only through the standard AWS environment variables.

The store on the bucket must hold the bytes the same job writes to a local disk, survive a
killed driver, a shard object cut short, a server that goes away mid-job and throttling, and
refuse wrong credentials in one line naming the bucket."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nextdetail import cli
from nextdetail.pipelines.decompose_worker import read_batch
from nextdetail.pipelines.sources import scan_source
from nextdetail.pipelines.source_files import SourceFileOptions
from nextdetail.stores.decomposition import DecompositionStore
from nextdetail.stores.decomposition_format import RUN_DEPENDENT_COLUMNS, StoreError
from nextdetail.stores.shards import BASES
from conftest import kill_cli_when, own_lines
from pipeline_data import hf_shard, synthetic_photo, wds_shard

SIZE, ORDER, SHARD = 32, 2, 4


def fs_of():
    import s3fs

    return s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)


@pytest.fixture(scope="module")
def classes(tmp_path_factory) -> Path:
    """A folder of class folders (the ImageNet layout): 3 classes x 5 generated photos."""
    root = tmp_path_factory.mktemp("objsrc") / "train"
    for k, cls in enumerate(("cat", "dog", "eel")):
        for i in range(5):
            synthetic_photo(root / cls / f"{i:03d}.png", 10 * k + i, size=40)
    return root


def upload(local: Path, url: str) -> str:
    fs_of().put(str(local), url.partition("://")[2], recursive=True)
    return url


def args(src, store, *more):
    return ["decompose-dataset", str(src), "--out", str(store), "--size", str(SIZE), "--order", str(ORDER),
            "--n-iter", "400", "--shard-images", str(SHARD), "--backend", "numba", "--workers", "2", *more]


def bucket_bytes(url: str) -> dict:
    fs, base = fs_of(), url.partition("://")[2].rstrip("/") + "/"
    return {k[len(base):]: fs.cat_file(k) for k in sorted(fs.find(base))}


def assert_same_store(url: str, local: Path):
    """The bucket's store equals the local one: every shard and zarr.json byte for byte, the
    manifest's columns (paths aside: one is a URL) and the images read back."""
    shards = {k: v for k, v in bucket_bytes(url).items() if k.startswith(BASES + "/")}
    assert shards == {f"{BASES}/{p.name}": p.read_bytes() for p in sorted((local / BASES).iterdir())}
    got, want = DecompositionStore(url), DecompositionStore(local)
    stable = [c for c in want.manifest.columns if c not in RUN_DEPENDENT_COLUMNS + ("path",)]
    assert got.manifest[stable].equals(want.manifest[stable])
    assert len(got) == len(want) == 15
    assert all((got.quantized(i) == want.quantized(i)).all() for i in range(len(got)))


@pytest.fixture(scope="module")
def local_store(ray_session, classes, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("local") / "store"
    assert cli.main(args(classes, store)) == 0
    return store


def test_store_on_s3_equals_local_and_survives_throttling(s3, classes, local_store, capsys):
    src = upload(classes, f"{s3.bucket}/imagenet/train")
    s3.throttle = 6                      # 503 SlowDown on the first requests: retried with backoff
    assert cli.main(args(src, f"{s3.bucket}/stores/s32")) == 0, capsys.readouterr().err
    assert s3.throttled == 6
    assert_same_store(f"{s3.bucket}/stores/s32", local_store)
    err = capsys.readouterr().err
    assert not [line for line in own_lines(err) if "error" in line.lower() or "warning" in line.lower()], err

    # Reading: one request per shard (fetched whole), not one per image.
    s3.reset_counts()
    store = DecompositionStore(f"{s3.bucket}/stores/s32")
    opened = s3.total_requests()
    for k in range(store.n_shards):
        store.read_shard(k)
    assert s3.requests["GET"] - 0 <= opened + 2 * store.n_shards


def test_killed_driver_then_truncated_shard(s3, ray_session, classes, local_store, capsys):
    """kill -9 of the driver mid-job, a rerun: the store of an uninterrupted run. Then a shard
    object cut short in the bucket: the reader refuses it, a rerun redoes it."""
    src = upload(classes, f"{s3.bucket}/src")
    url = f"{s3.bucket}/store"
    fs, parts = fs_of(), url.partition("://")[2] + "/_parts"

    def committed() -> int:
        return sum(1 for k in fs.find(parts) if k.endswith(".parquet")) if fs.exists(parts) else 0

    # The driver joins the session's Ray, as a driver joins a cluster (no Ray start of its own).
    address = ray_session.get_runtime_context().gcs_address
    rc, err = kill_cli_when([*args(src, url), "--address", address], lambda: committed() >= 1, "job")
    time.sleep(1)
    assert not fs.exists(url.partition("://")[2] + "/meta.json"), "the kill came too late"
    assert cli.main(args(src, url, "--n-iter", "20")) == 2          # other parameters: refused, named
    assert "--n-iter 400 (store) != 20 (this run)" in capsys.readouterr().err
    assert cli.main(args(src, url)) == 0, capsys.readouterr().err
    assert "resuming:" in capsys.readouterr().err
    assert_same_store(url, local_store)

    key = url.partition("://")[2] + f"/{BASES}/c.1.0.0.0.0"
    whole = fs.cat_file(key)
    fs.pipe_file(key, whole[: len(whole) // 2])
    with pytest.raises(StoreError, match="shard 1 is damaged"):
        DecompositionStore(url).read_shard(1)
    assert cli.main(args(src, url)) == 0
    assert f"resuming: 11 images already in the store, {SHARD} to do" in capsys.readouterr().err
    assert fs.cat_file(key) == whole


def test_server_gone_mid_job_exits_3_naming_the_endpoint_and_a_rerun_resumes(s3, classes, local_store, capsys,
                                                                              monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    src = upload(classes, f"{s3.bucket}/src")
    url = f"{s3.bucket}/store"
    fs, parts = fs_of(), url.partition("://")[2] + "/_parts"
    stopped = threading.Event()

    def stop_when_a_shard_is_in():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if fs.exists(parts) and any(k.endswith(".parquet") for k in fs.find(parts)):
                    break
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.05)
        s3.stop()
        stopped.set()

    watcher = threading.Thread(target=stop_when_a_shard_is_in, daemon=True)
    watcher.start()
    try:
        rc = cli.main(args(src, url))
        err = capsys.readouterr().err
    finally:
        watcher.join()
        s3.start()                       # the same port: the same endpoint comes back
    assert stopped.is_set()
    assert rc == 3, err
    lines = [line for line in own_lines(err) if "error" in line]
    assert len(lines) == 1 and s3.url in lines[0] and "rerun" in lines[0], err
    assert cli.main(args(src, url)) == 0, capsys.readouterr().err
    assert "resuming:" in capsys.readouterr().err
    assert_same_store(url, local_store)


def test_wrong_credentials_are_one_line_naming_the_bucket(s3, classes, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
    rc = cli.main(args(classes, f"{s3.bucket}/store"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(own_lines(err)) == 1 and s3.bucket in err and "access denied" in err, err


def test_sources_of_each_kind_listed_and_read_from_the_bucket(s3, tmp_path):
    """A .txt listing with paths relative to it, Hugging Face Parquet shards, WebDataset tars:
    listed from the bucket as from a disk (same ids, labels, members) and read by a worker."""
    photos = [synthetic_photo(tmp_path / "img" / f"{i}.png", i, size=24) for i in range(4)]
    data = [p.read_bytes() for p in photos]
    (tmp_path / "img" / "list.txt").write_text("".join(f"{p.name} {i % 2}\n" for i, p in enumerate(photos)))
    hf = tmp_path / "hf"
    hf.mkdir()
    hf_shard(hf / "train-00000-of-00002.parquet", data[:2], [0, 1])
    hf_shard(hf / "train-00001-of-00002.parquet", data[2:], [1, 0])
    wds = tmp_path / "wds"
    wds.mkdir()
    wds_shard(wds / "shard-000.tar", [(f"s{i}", {"png": d, "cls": str(i).encode()}) for i, d in enumerate(data)])
    options = SourceFileOptions()
    for local, remote in ((tmp_path / "img" / "list.txt", f"{s3.bucket}/img/list.txt"), (hf, f"{s3.bucket}/hf"),
                          (wds, f"{s3.bucket}/wds")):
        upload(local.parent if local.is_file() else local, remote.rsplit("/", 1)[0] if local.is_file() else remote)
        want, got = list(scan_source(local, options)), list(scan_source(remote, options))
        assert [(s.id, s.label, s.class_name, s.member) for s in got] == \
               [(s.id, s.label, s.class_name, s.member) for s in want]
        assert all(s.path.startswith(s3.bucket) for s in got)
        batch = {"index": np.arange(len(got)), "path": np.asarray([s.path for s in got], object),
                 "member": np.asarray([s.member for s in got], object),
                 "problem": np.asarray([s.problem for s in got], object)}
        read = read_batch(batch, 16)
        assert list(read["error"]) == [""] * len(got)
        local_read = read_batch({**batch, "path": np.asarray([s.path for s in want], object)}, 16)
        assert (read["image"] == local_read["image"]).all()
