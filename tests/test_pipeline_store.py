"""The store contract without Ray: creation, the worker's whole-shard idempotent writes, journal
merging, resume planning at shard granularity, damaged shards, refusals, format 1, and the reader.
The worker class is called in-process here; tests/test_pipeline_job.py runs it under Ray."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from nextdetail.decomp import ATParams, decompose
from nextdetail.imageio import load_image
from nextdetail.pipelines import DecompositionStore, StoreError, StoreParams, list_sources
from nextdetail.pipelines.decompose_worker import DecomposeWorker
from nextdetail.stores.decomposition_format import FORMAT_VERSION, LAYERS_V1, MANIFEST, META, PARTS
from nextdetail.stores.store_plan import finish_store
from nextdetail.stores.shards import BASES, encode_shard, layers_from_bases, quantize_bases, shard_file
from pipeline_data import (broken_files, listing, merged_manifest, photo_paths, prepare_store, shard_rows,
                           solve_shards)

SIZE = 24
# Shards of 4: the 6 images of `src` are shard 0 (images 0-3, image 3 broken) and shard 1 (4-5).
PARAMS = StoreParams(order=2, size=SIZE, at=ATParams(n_iter=8), backend="numba", shard_images=4)


def tree_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def worker(store, run=1, params=PARAMS):
    return DecomposeWorker(str(store), params.to_dict(), run=run, batch_size=3, read_size=params.size)


def write(store, plan, shards=None, run=None):
    """Run the worker on the plan's shards (or the listed ones), as Ray would; their outputs."""
    w = worker(store, run or plan.run, plan.params)
    return solve_shards(plan, w, [row for row in shard_rows(plan) if shards is None or int(row["shard"][0]) in shards])


@pytest.fixture
def src(tmp_path):
    photos = photo_paths(5, tmp_path)
    bad = broken_files(tmp_path / "bad", photos[0])
    return list_sources(listing(photos[:3] + [bad["truncated"]] + photos[3:], tmp_path / "list.txt"))


def complete_store(tmp_path, src):
    store = tmp_path / "store"
    plan = prepare_store(store, PARAMS, src, overwrite=False)
    write(store, plan)
    finish_store(plan, src="list.txt")
    return store


def test_params_differences_are_named():
    other = StoreParams(order=3, size=SIZE, at=ATParams(n_iter=8, alpha=5.0), backend="numba", shard_images=8)
    assert PARAMS.differences(other) == ["--order 2 (store) != 3 (this run)", "--alpha 10.0 (store) != 5.0 (this run)",
                                         "--shard-images 4 (store) != 8 (this run)"]
    assert PARAMS.differences(PARAMS) == []
    assert StoreParams.from_dict(PARAMS.to_dict()) == PARAMS
    # tol is recorded; a store written before it existed ran n_iter sweeps always: tol 0, so a
    # rerun with today's default is refused, naming it
    assert PARAMS.to_dict()["at"]["tol"] == ATParams().tol > 0
    old = PARAMS.to_dict()
    del old["at"]["tol"]
    assert StoreParams.from_dict(old).at.tol == 0
    assert StoreParams.from_dict(old).differences(PARAMS) == [f"--tol 0.0 (store) != {ATParams().tol!r} (this run)"]
    assert other.layer_names() == ["B_3", "D_3", "D_2", "D_1"] and other.levels == 3
    intrinsic = StoreParams(order=3, size=SIZE, at=ATParams(), backend="numba", method="intrinsic")
    assert intrinsic.levels == 1 and intrinsic.layer_names() == ["S_1", "A_1"]
    assert PARAMS.shards(8) == 2 and PARAMS.shards(9) == 3


def test_worker_writes_whole_shards_idempotently_and_reader_round_trips(tmp_path, src):
    store = tmp_path / "store"
    plan = prepare_store(store, PARAMS, src, overwrite=False)
    assert plan.created and plan.todo == 6 and plan.run == 1 and plan.shards == [0, 1]
    (out,) = write(store, plan, shards={0})
    assert out.column("index").to_pylist() == [0, 1, 2, 3]
    assert out.column("status").to_pylist() == ["ok", "ok", "ok", "error"]
    assert "corrupt or truncated" in out.column("error").to_pylist()[3]
    assert set(out.column("shard_bytes").to_pylist()) == {shard_file(store, 0).stat().st_size}
    first = tree_bytes(store / BASES)
    # A retried shard (Ray re-running it after a worker died) rewrites the same file, bytes unchanged.
    write(store, plan, shards={0})
    assert tree_bytes(store / BASES) == first
    assert [p.name for p in (store / PARTS / "run-0001").glob("part-*")] == ["part-0000000.parquet"]
    # One file per shard: shard 1 is not there until its task writes it.
    assert sorted(p.relative_to(store / BASES).as_posix() for p in (store / BASES).rglob("*") if p.is_file()) \
        == ["c.0.0.0.0.0", "zarr.json"]
    write(store, plan, shards={1})
    counts = finish_store(plan, src="list.txt")
    assert counts == {"images": 6, "ok": 5, "error": 1}
    assert not (store / PARTS).exists()

    reader = DecompositionStore(store)
    assert len(reader) == 5 and reader.ok_indices.tolist() == [0, 1, 2, 4, 5] and reader.n_shards == 2
    for i, s in enumerate([src[0], src[1], src[2], src[4], src[5]]):
        item = reader[i]
        assert (item.index, item.id) == (s.index, s.id)
        image = load_image(s.path, SIZE)
        ref = decompose(image, 2, backend="numba", **PARAMS.at.to_dict())
        assert [reader.manifest.loc[s.index, f"iterations_{k}"] for k in (1, 2)] == ref.iterations   # true sweeps
        q = reader.quantized(i)
        assert q.dtype == np.uint8 and q.shape == (3, 3, SIZE, SIZE)
        # The stored bases are the solver's rounded once to 8 bits: within 1/510, and I exactly.
        np.testing.assert_array_equal(q, quantize_bases([b[None] for b in ref.bases])[0])
        np.testing.assert_array_equal(item.image, image)
        for k in range(3):
            assert np.abs(item.bases[k] - ref.bases[k]).max() <= 1 / 510 + 1e-6
        for k in range(2):        # D_(k+1) = (q_k - q_(k+1)) / 255: exact multiples of 1/255
            np.testing.assert_array_equal(np.rint(item.details[k] * 255), np.moveaxis(q[k].astype(int) - q[k + 1], 0, -1))
            np.testing.assert_allclose(item.details[k], item.bases[k] - item.bases[k + 1], atol=1e-7)
        # Generation order [B_2, D_2, D_1], float32, and they sum to I to float32 rounding.
        assert item.layers.dtype == np.float32
        np.testing.assert_array_equal(np.moveaxis(item.layers[0], 0, -1), item.bases[2])
        np.testing.assert_allclose(np.moveaxis(item.layers.sum(0), 0, -1), image, atol=1e-6)
    m = reader.manifest
    assert m["index"].tolist() == list(range(6))
    assert m["status"].tolist() == ["ok", "ok", "ok", "error", "ok", "ok"]
    assert m["id"].tolist() == [s.id for s in src]
    assert m.loc[3, "energy_1"] != m.loc[3, "energy_1"]          # NaN: no energy for a failed image
    assert (m.loc[m.status == "ok", "energy_2"] > 0).all()
    assert m.loc[m.status == "ok", "iterations_1"].isin([5, 8]).all()      # converged, or the cap
    assert not np.asarray(reader._bases()[3]).any()             # a failed image reads as the fill value 0
    with pytest.raises(IndexError):
        reader[5]


def test_layers_from_bases_telescope_to_the_image():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (2, 4, 3, 5, 6), dtype=np.uint8)          # [q_0 = I, q_1, q_2, q_3]
    layers = layers_from_bases(q)                                     # [B_3, D_3, D_2, D_1]
    assert layers.dtype == np.float32 and layers.shape == q.shape
    np.testing.assert_array_equal(layers[:, 0] * 255, q[:, 3])
    np.testing.assert_array_equal(np.rint(layers[:, 3] * 255), q[:, 0].astype(int) - q[:, 1])   # D_1
    total = layers.sum(1)
    np.testing.assert_allclose(total, q[:, 0] / np.float32(255), atol=1e-6)
    np.testing.assert_array_equal(np.rint(total * 255), q[:, 0])     # exact to float32 rounding
    np.testing.assert_array_equal(layers_from_bases(q[0]), layers[0])  # no batch axis works too


def test_quantize_bases_rounds_and_clips():
    b = np.array([0.0, 1 / 510 - 1e-4, 0.5, 1.0, 1.2, -0.1], np.float32).reshape(1, 2, 3)
    q = quantize_bases([np.repeat(b[..., None], 3, -1)])
    assert q.shape == (1, 1, 3, 2, 3) and q.dtype == np.uint8
    assert q[0, 0, 0].ravel().tolist() == [0, 0, 128, 255, 255, 0]


@pytest.mark.parametrize("m", [4, 3])
def test_encode_shard_gives_the_bytes_zarr_writes_itself(tmp_path, m):
    """The worker encodes a shard in memory and renames it into place; the file must be what
    Zarr itself writes for those images, the last (partial) shard included."""
    import zarr

    from nextdetail.stores.shards import create_bases_array

    rng = np.random.default_rng(1)
    n = 4 + m
    q = rng.integers(0, 256, (n, 3, 3, 8, 8), dtype=np.uint8)
    q[5 % n] = 0                                                    # an all-0 image is no chunk
    arr = create_bases_array(tmp_path / "a.zarr", n, 2, 8, 4, {})
    arr[:] = q
    for k in range(2):
        assert encode_shard(q[4 * k:4 * k + 4], 4) == (tmp_path / "a.zarr" / f"c.{k}.0.0.0.0").read_bytes()
    assert encode_shard(np.zeros((2, 3, 3, 8, 8), np.uint8), 4) == b""
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "a.zarr")[:], q)


@pytest.mark.parametrize("group_shards", [64, 1])
def test_resume_redoes_whole_shards_with_errors_and_later_runs_win(tmp_path, src, group_shards, monkeypatch):
    """(group_shards: the manifest's row groups hold that many shards; 1 makes several groups
    of these 6 images.)"""
    import pyarrow.parquet as pq
    from nextdetail.stores import manifest

    monkeypatch.setattr(manifest, "MANIFEST_GROUP_SHARDS", group_shards)     # read by its GroupedWriter
    store = tmp_path / "store"
    plan = prepare_store(store, PARAMS, src, overwrite=False)
    write(store, plan, shards={0})                              # 3 ok, 1 error; then the "driver dies"
    again = prepare_store(store, PARAMS, src, overwrite=False)
    assert (again.created, again.run, again.shards) == (False, 2, [0, 1])
    assert again.done == 0 and again.todo == 6   # shard 0 has an error
    assert again.previous_errors == 1
    # Suppose the truncated file was repaired before the rerun: run 2's ok rows win.
    photo = photo_paths(1, tmp_path)[0]
    (tmp_path / "bad" / "truncated.png").write_bytes(photo.read_bytes())
    write(store, again, shards={0})
    merged = merged_manifest(store, PARAMS, len(src))
    assert merged["status"].tolist() == ["ok"] * 4 + ["pending"] * 2
    assert merged["id"].tolist() == [s.id for s in src]       # identity columns from the driver's manifest
    third = prepare_store(store, PARAMS, src, overwrite=False)
    assert (third.shards, third.done, third.run) == ([1], 4, 3)
    write(store, third)
    assert finish_store(third, src="x") == {"images": 6, "ok": 6, "error": 0}
    assert pq.ParquetFile(store / MANIFEST).num_row_groups == (1 if group_shards == 64 else 2)
    done = prepare_store(store, PARAMS, src, overwrite=False)
    assert done.shards == [] and done.todo == 0 and done.done == 6 and (store / META).exists()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_shard_is_refused_by_the_reader_and_redone_by_a_rerun(tmp_path, src, damage):
    store = complete_store(tmp_path, src)
    good = tree_bytes(store)
    path = shard_file(store, 1)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
        what = r"shard 1 is damaged \(\d+ bytes, written with \d+\)"
    else:
        path.unlink()
        what = r"shard 1 is damaged \(missing shard file\)"
    reader = DecompositionStore(store)
    reader[0]                                                        # shard 0 is fine
    with pytest.raises(StoreError, match=rf"^{path}: {what}; rerun"):
        reader[3]                                                    # image 4, in shard 1
    with pytest.raises(StoreError, match=what):
        reader.read_shard(1)
    plan = prepare_store(store, PARAMS, src, overwrite=False)
    assert (plan.shards, plan.damaged) == ([0, 1], 1)              # 0 again for its error row
    assert not (store / META).exists()                               # incomplete until redone
    write(store, plan)
    finish_store(plan, src="list.txt")
    redone = tree_bytes(store)
    assert redone.keys() == good.keys()
    for name in good:
        if name != MANIFEST:                                         # run-dependent columns (seconds, pid)
            assert redone[name] == good[name], name


def test_a_shard_damaged_inside_is_named_by_the_reader(tmp_path, src):
    store = complete_store(tmp_path, src)
    path = shard_file(store, 0)
    raw = bytearray(path.read_bytes())
    raw[40] ^= 0xFF                                                  # same size, one flipped bit in image 0
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=rf"^{path}: image 0 \(.*\): damaged shard, cannot decode it"):
        DecompositionStore(store)[0]


def test_read_shard_returns_the_ok_images_of_a_shard(tmp_path, src):
    reader = DecompositionStore(complete_store(tmp_path, src))
    first, second = reader.read_shard(0), reader.read_shard(1)
    assert first.items.tolist() == [0, 1, 2] and first.rows.tolist() == [0, 1, 2]      # image 3 failed
    assert second.items.tolist() == [3, 4] and second.rows.tolist() == [4, 5]
    for shard in (first, second):
        for i, q in zip(shard.items, shard.bases):
            np.testing.assert_array_equal(q, reader.quantized(int(i)))
    with pytest.raises(IndexError):
        reader.read_shard(2)
    # A range across both shards and the failed image 3, read one shard at a time.
    np.testing.assert_array_equal(reader.read_range(1, 5), np.stack([reader.quantized(i) for i in range(1, 5)]))
    assert reader.read_range(2, 2).shape == (0, 3, 3, SIZE, SIZE)
    with pytest.raises(IndexError):
        reader.read_range(0, 6)


def test_meta_json_is_written_last_and_marks_completion(tmp_path, src):
    store = tmp_path / "store"
    plan = prepare_store(store, PARAMS, src, overwrite=False)
    with pytest.raises(StoreError, match=r"incomplete store \(no meta\.json\)"):
        DecompositionStore(store)
    write(store, plan, shards={1})
    with pytest.raises(StoreError, match=r"4 images are still pending \(e\.g\. .*\); rerun"):
        finish_store(plan, src="x")
    assert not (store / META).exists()
    write(store, plan, shards={0})
    finish_store(plan, src="x")
    meta = json.loads((store / META).read_text())
    assert meta["format_version"] == FORMAT_VERSION == 2 and meta["layer_order"] == ["B_2", "D_2", "D_1"]
    assert meta["counts"] == {"images": 6, "ok": 5, "error": 1} and meta["dtype"] == "uint8"
    assert meta["shard_images"] == 4 and meta["shards"] == [4, 3, 3, SIZE, SIZE]
    assert meta["at"] == PARAMS.at.to_dict()
    assert pq.read_table(store / MANIFEST).num_rows == 6
    # A rerun that has work to do (the error row) makes the store incomplete until it ends.
    prepare_store(store, PARAMS, src, overwrite=False)
    assert not (store / META).exists()


def test_refusals_name_the_difference(tmp_path, src):
    store = tmp_path / "store"
    prepare_store(store, PARAMS, src, overwrite=False)
    bigger = StoreParams(order=2, size=SIZE + 8, at=PARAMS.at, backend="numba", shard_images=4)
    with pytest.raises(StoreError) as e:
        prepare_store(store, bigger, src, overwrite=False)
    assert str(e.value) == (f"{store}: store made with other parameters: --size {SIZE} (store) != {SIZE + 8} "
                            f"(this run); rerun with the store's parameters, or pass --overwrite to replace it")
    with pytest.raises(StoreError, match=r"other images than SRC lists now: 1 images removed \(e\.g\. "):
        prepare_store(store, PARAMS, src[:-1], overwrite=False)
    relabelled = src[:2] + [dataclasses.replace(src[2], label=7)] + src[3:]
    with pytest.raises(StoreError, match=rf"other images than SRC lists now: 1 labels changed \(e\.g\. "
                                         rf"{re.escape(src[2].id)}\)"):
        prepare_store(store, PARAMS, relabelled, overwrite=False)
    plan = prepare_store(store, bigger, src, overwrite=True)
    assert plan.created and plan.params.size == SIZE + 8

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match=r"is not a decomposition store \(no bases\.zarr\)"):
            prepare_store(foreign, PARAMS, src, overwrite=overwrite)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_reader_refuses_other_format_versions(tmp_path, src):
    store = complete_store(tmp_path, src)
    meta = json.loads((store / META).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (store / META).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=rf"store format version {FORMAT_VERSION + 1} .* reads and writes "
                                         rf"version {FORMAT_VERSION} only"):
        DecompositionStore(store)
    with pytest.raises(StoreError, match="not a decomposition store"):
        DecompositionStore(tmp_path)


def test_a_format_1_store_is_refused_with_the_command_that_rebuilds_it(tmp_path, src):
    """Format 1 (nextdetail 0.1.0 and early 0.2.0: float16 layers in layers.zarr, one file per
    image) is not read: the reader and a rerun name the command that rebuilds it, and
    --overwrite replaces it."""
    old = tmp_path / "old"
    (old / LAYERS_V1 / "c" / "0" / "0" / "0" / "0").mkdir(parents=True)
    (old / LAYERS_V1 / "zarr.json").write_text("{}")
    (old / MANIFEST).write_bytes(b"PAR1")
    meta = {"format": "nextdetail.decomposition_store", "format_version": 1, "nextdetail_version": "0.2.0",
            "src": "photos/", "counts": {"images": 6, "ok": 6, "error": 0}}
    (old / META).write_text(json.dumps(meta))
    want = (f"{old}: store format version 1 (float16 layers, one file per image; written by nextdetail 0.2.0); "
            f"this nextdetail reads and writes version 2 only: rebuild it with `nextdetail decompose-dataset "
            f"photos/ --out {old} --overwrite` and the same parameters")
    with pytest.raises(StoreError) as e:
        DecompositionStore(old)
    assert str(e.value) == want
    with pytest.raises(StoreError) as e:
        prepare_store(old, PARAMS, src, overwrite=False)
    assert str(e.value) == want
    plan = prepare_store(old, PARAMS, src, overwrite=True)
    assert plan.created and not (old / LAYERS_V1).exists() and (old / BASES / "zarr.json").is_file()


def test_a_store_of_a_few_hundred_images_is_a_few_files(tmp_path):
    """The file-count bound of format 2: at most N/64 + 20 files and folders in a complete store."""
    from PIL import Image

    folder = tmp_path / "src"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    params = StoreParams(order=1, size=8, at=ATParams(n_iter=1), backend="numpy")
    src = list_sources(folder)
    store = tmp_path / "store"
    plan = prepare_store(store, params, src, overwrite=False)
    write(store, plan)
    finish_store(plan, src=str(folder))
    entries = list(store.rglob("*"))
    assert len(entries) <= 300 / 64 + 20, sorted(p.relative_to(store).as_posix() for p in entries)
    assert sorted(p.name for p in (store / BASES).iterdir()) == [f"c.{k}.0.0.0.0" for k in range(5)] + ["zarr.json"]
    assert len(DecompositionStore(store)) == 300


def test_reader_pickles_and_torch_adapter(tmp_path, src):
    import pickle

    reader = DecompositionStore(complete_store(tmp_path, src))
    reader[0]
    clone = pickle.loads(pickle.dumps(reader))             # as DataLoader workers receive it
    np.testing.assert_array_equal(clone[1].layers, reader[1].layers)
    try:
        import torch
    except ImportError:
        with pytest.raises(ImportError, match="torch_dataset needs PyTorch"):
            reader.torch_dataset()
        return
    ds = reader.torch_dataset()
    assert len(ds) == len(reader)
    item = ds[2]
    assert item["layers"].dtype == torch.float32 and tuple(item["layers"].shape) == (3, 3, SIZE, SIZE)
    np.testing.assert_allclose(item["layers"].sum(0).permute(1, 2, 0).numpy(), reader[2].image, atol=1e-6)
    assert item["index"] == int(reader.ok_indices[2])


def test_a_batch_that_fails_to_solve_is_split_so_one_image_cannot_sink_the_others(tmp_path, src, monkeypatch):
    store = tmp_path / "store"
    plan = prepare_store(store, PARAMS, src, overwrite=False)
    w = worker(store)
    poisoned = load_image(src[1].path, SIZE)
    real = w._decompose

    def flaky(images, **kw):          # the solver rejects any batch holding image 1
        if any(np.array_equal(im, poisoned) for im in images):
            raise ValueError("solver diverged")
        return real(images, **kw)

    monkeypatch.setattr(w, "_decompose", flaky)
    (out,) = solve_shards(plan, w, shard_rows(plan)[:1])
    assert out.column("status").to_pylist() == ["ok", "error", "ok", "error"]
    assert out.column("error").to_pylist()[1] == "decomposition failed (ValueError: solver diverged)"
    ref = decompose(load_image(src[2].path, SIZE), 2, backend="numba", **PARAMS.at.to_dict())
    import zarr
    stored = zarr.open_array(store / BASES, mode="r")
    np.testing.assert_array_equal(stored[2], quantize_bases([b[None] for b in ref.bases])[0])
    assert not np.asarray(stored[1]).any()


def test_the_gpu_paths_read_tasks_feed_the_worker_the_same_shard(tmp_path, src):
    """GPU actors get their pixels from CPU read tasks (read_source_images); the shard they write
    must be the one a CPU actor that reads for itself writes."""
    from nextdetail.pipelines.decompose_worker import read_source_images

    cpu, fed = tmp_path / "cpu", tmp_path / "fed"
    for store in (cpu, fed):
        plan = prepare_store(store, PARAMS, src, overwrite=False)
        if store == cpu:
            write(store, plan)
        else:
            w = DecomposeWorker(str(store), PARAMS.to_dict(), run=plan.run, batch_size=3, read_size=None)
            for row in shard_rows(plan):
                read = read_source_images(row, SIZE, journal=store / PARTS / "run-0001" / "_attempts")
                assert read["image"].shape == (1, 4 if row["shard"][0] == 0 else 2, SIZE, SIZE, 3)
                solve_shards(plan, w, [read])
        finish_store(plan, src="list.txt")
    assert tree_bytes(cpu / BASES) == tree_bytes(fed / BASES)
    assert DecompositionStore(fed).manifest["status"].tolist() == ["ok", "ok", "ok", "error", "ok", "ok"]


def test_only_the_driver_commits_so_a_worker_that_outlives_it_cannot_change_the_store(tmp_path, src):
    """A worker of a killed job can run on for seconds (Ray helpers linger). Its shard is staged
    in its run's folder and only a live driver moves it into bases.zarr, so what it writes after
    its driver died is never read: the store ends as an uninterrupted run's."""
    from nextdetail.stores.shard_journal import staged_shard_file
    from nextdetail.stores.shards import write_shard

    reference = tree_bytes(complete_store(tmp_path / "ref", src) / BASES)
    store = tmp_path / "store"
    plan = prepare_store(store, PARAMS, src, overwrite=False)
    worker(store)(shard_rows(plan)[1])            # shard 1 solved and staged; the driver died first
    assert staged_shard_file(store, 1, 1).is_file() and not shard_file(store, 1).exists()
    again = prepare_store(store, PARAMS, src, overwrite=False)
    assert again.shards == [0, 1] and again.run == 2        # nothing was committed: all redone
    solve_shards(again, worker(store, again.run))
    # The lingering worker of run 1 now writes shard 0 with other bytes: staged, never committed.
    write_shard(staged_shard_file(store, 1, 0), np.full((4, 3, 3, SIZE, SIZE), 7, np.uint8), 4)
    finish_store(again, src="list.txt")
    assert tree_bytes(store / BASES) == reference
