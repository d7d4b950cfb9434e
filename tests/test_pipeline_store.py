"""The store contract without Ray: creation, the worker's idempotent writes, journal merging,
resume planning, refusals, and the reader. The worker class is called in-process here;
tests/test_pipeline_job.py runs it under Ray."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from nextdetail.decomp import ATParams, decompose
from nextdetail.imageio import load_image
from nextdetail.pipelines import DecompositionStore, StoreError, StoreParams, list_sources
from nextdetail.stores.decomposition import (FORMAT_VERSION, LAYERS, MANIFEST, META, PARTS, layer_names,
                                        layers_to_item)
from nextdetail.pipelines.worker import DecomposeWorker
from nextdetail.stores.decomposition_writer import finish_store, merged_manifest, prepare_store
from pipeline_data import batch_of, broken_files, photo_paths, listing

SIZE = 24
PARAMS = StoreParams(order=2, size=SIZE, params=ATParams(n_iter=8), backend="numba")


def tree_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tmp_path):
    photos = photo_paths(5, tmp_path)
    bad = broken_files(tmp_path / "bad", photos[0])
    return list_sources(listing(photos[:3] + [bad["truncated"]] + photos[3:], tmp_path / "list.txt"))


def test_params_differences_are_named():
    other = StoreParams(order=3, size=SIZE, params=ATParams(n_iter=8, alpha=5.0), backend="numba")
    assert PARAMS.differences(other) == ["order 2 (store) != 3 (this run)", "alpha 10.0 (store) != 5.0 (this run)"]
    assert PARAMS.differences(PARAMS) == []
    assert StoreParams.from_dict(PARAMS.to_dict()) == PARAMS
    assert layer_names(3) == ["B_3", "D_3", "D_2", "D_1"]


def test_worker_writes_whole_chunks_idempotently_and_reader_round_trips(tmp_path, src):
    store = tmp_path / "store"
    plan = prepare_store(store, PARAMS, src, overwrite=False)
    assert plan.created and len(plan.todo) == 6 and plan.run == 1
    w = DecomposeWorker(str(store), PARAMS.to_dict(), run=plan.run, read_size=SIZE)
    out = w(batch_of(src[:4]))
    assert out.column("status").to_pylist() == ["ok", "ok", "ok", "error"]
    assert "corrupt or truncated" in out.column("error").to_pylist()[3]
    first = tree_bytes(store / LAYERS)
    # A retried batch (Ray re-running it after a worker died) rewrites the same files, bytes unchanged.
    w2 = DecomposeWorker(str(store), PARAMS.to_dict(), run=plan.run, read_size=SIZE)
    w2(batch_of(src[:4]))
    assert tree_bytes(store / LAYERS) == first
    assert [p.name for p in (store / PARTS / "run-0001").glob("part-*")] == ["part-000000000.parquet"]
    # Chunks are one image each: image 3 failed, so its chunk was never written.
    chunk_files = {p.relative_to(store / LAYERS / "c").parts[0] for p in (store / LAYERS / "c").rglob("*") if p.is_file()}
    assert chunk_files == {"0", "1", "2"}
    w(batch_of(src[4:]))
    counts = finish_store(plan, src="list.txt")
    assert counts == {"images": 6, "ok": 5, "error": 1}
    assert not (store / PARTS).exists()

    reader = DecompositionStore(store)
    assert len(reader) == 5 and reader.ok_indices.tolist() == [0, 1, 2, 4, 5]
    for i, s in enumerate([src[0], src[1], src[2], src[4], src[5]]):
        item = reader[i]
        assert (item.index, item.id) == (s.index, s.id)
        image = load_image(s.path, SIZE)
        ref = decompose(image, 2, backend="numba", **PARAMS.params.to_dict())
        # The stored layers are the solver's, rounded once to float16.
        want = np.stack([np.moveaxis(layer, -1, 0) for layer in ref.layers]).astype(np.float16)
        np.testing.assert_array_equal(item.layers, want)
        np.testing.assert_allclose(item.image, image, atol=2e-3)       # I = B_n + sum D_k
        for k in range(3):
            np.testing.assert_allclose(item.bases[k], ref.bases[k], atol=2e-3)
        for k in range(2):
            np.testing.assert_allclose(item.details[k], ref.details[k], atol=1e-3)
    m = reader.manifest
    assert m["index"].tolist() == list(range(6))
    assert m["status"].tolist() == ["ok", "ok", "ok", "error", "ok", "ok"]
    assert m["id"].tolist() == [s.id for s in src]
    assert m.loc[3, "energy_1"] != m.loc[3, "energy_1"]          # NaN: no energy for a failed image
    assert (m.loc[m.status == "ok", "energy_2"] > 0).all()
    assert (m.loc[m.status == "ok", "iterations_1"] == 8).all()
    assert np.isnan(np.asarray(DecompositionStore(store)._layers()[3], np.float32)).all()
    with pytest.raises(IndexError):
        reader[5]


def test_layers_to_item_is_the_partial_sum_of_layers():
    rng = np.random.default_rng(0)
    layers = rng.normal(size=(4, 3, 5, 6)).astype(np.float16)       # [B_3, D_3, D_2, D_1]
    image, bases, details = layers_to_item(layers)
    f = np.moveaxis(layers.astype(np.float32), 1, -1)
    assert [d.shape for d in details] == [(5, 6, 3)] * 3
    np.testing.assert_array_equal(details[0], f[3])                  # D_1 is the last layer
    np.testing.assert_array_equal(bases[3], f[0])
    np.testing.assert_allclose(bases[1], f[0] + f[1] + f[2], rtol=1e-6)
    np.testing.assert_allclose(image, f.sum(0), rtol=1e-5, atol=1e-6)
    assert image is bases[0]


def test_resume_plan_skips_ok_retries_errors_and_later_runs_win(tmp_path, src):
    store = tmp_path / "store"
    plan = prepare_store(store, PARAMS, src, overwrite=False)
    w = DecomposeWorker(str(store), PARAMS.to_dict(), run=1, read_size=SIZE)
    w(batch_of(src[:4]))                                    # 3 ok, 1 error; then the "driver dies"
    again = prepare_store(store, PARAMS, src, overwrite=False)
    assert (again.created, again.run, again.done) == (False, 2, 3)
    assert [s.index for s in again.todo] == [3, 4, 5]
    assert again.previous_errors == 1
    # Suppose the truncated file was repaired before the rerun: run 2's ok row wins.
    photo = photo_paths(1, tmp_path)[0]
    (tmp_path / "bad" / "truncated.png").write_bytes(photo.read_bytes())
    w2 = DecomposeWorker(str(store), PARAMS.to_dict(), run=2, read_size=SIZE)
    w2(batch_of(src[3:]))
    merged = merged_manifest(store, PARAMS.order)
    assert merged["status"].tolist() == ["ok"] * 6
    assert merged["id"].tolist() == [s.id for s in src]       # identity columns from the driver's manifest
    assert finish_store(again, src="x") == {"images": 6, "ok": 6, "error": 0}
    done = prepare_store(store, PARAMS, src, overwrite=False)
    assert done.todo == [] and done.done == 6 and (store / META).exists()


def test_meta_json_is_written_last_and_marks_completion(tmp_path, src):
    store = tmp_path / "store"
    plan = prepare_store(store, PARAMS, src, overwrite=False)
    with pytest.raises(StoreError, match=r"incomplete store \(no meta\.json\)"):
        DecompositionStore(store)
    DecomposeWorker(str(store), PARAMS.to_dict(), run=1, read_size=SIZE)(batch_of(src[:2]))
    with pytest.raises(StoreError, match=r"4 images are still pending \(e\.g\. .*\); rerun"):
        finish_store(plan, src="x")
    assert not (store / META).exists()
    DecomposeWorker(str(store), PARAMS.to_dict(), run=1, read_size=SIZE)(batch_of(src[2:]))
    finish_store(plan, src="x")
    meta = json.loads((store / META).read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["layer_order"] == ["B_2", "D_2", "D_1"]
    assert meta["counts"] == {"images": 6, "ok": 5, "error": 1} and meta["dtype"] == "float16"
    assert meta["at"] == PARAMS.params.to_dict()
    assert pq.read_table(store / MANIFEST).num_rows == 6
    # A rerun that has work to do (the error row) makes the store incomplete until it ends.
    prepare_store(store, PARAMS, src, overwrite=False)
    assert not (store / META).exists()


def test_refusals_name_the_difference(tmp_path, src):
    store = tmp_path / "store"
    prepare_store(store, PARAMS, src, overwrite=False)
    bigger = StoreParams(order=2, size=SIZE + 8, params=PARAMS.params, backend="numba")
    with pytest.raises(StoreError) as e:
        prepare_store(store, bigger, src, overwrite=False)
    assert str(e.value) == (f"{store}: store made with other parameters: size {SIZE} (store) != {SIZE + 8} "
                            f"(this run); rerun with the store's parameters, or pass --overwrite to replace it")
    with pytest.raises(StoreError, match=r"other images than SRC lists now: 1 images removed \(e\.g\. "):
        prepare_store(store, PARAMS, src[:-1], overwrite=False)
    plan = prepare_store(store, bigger, src, overwrite=True)
    assert plan.created and plan.params.size == SIZE + 8

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match=r"is not a decomposition store \(no layers\.zarr\)"):
            prepare_store(foreign, PARAMS, src, overwrite=overwrite)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_reader_refuses_other_format_versions(tmp_path, src):
    store = tmp_path / "store"
    plan = prepare_store(store, PARAMS, src, overwrite=False)
    DecomposeWorker(str(store), PARAMS.to_dict(), run=1, read_size=SIZE)(batch_of(src))
    finish_store(plan, src="x")
    meta = json.loads((store / META).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (store / META).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=rf"store format version {FORMAT_VERSION + 1} .* reads version "
                                         rf"{FORMAT_VERSION} only"):
        DecompositionStore(store)
    with pytest.raises(StoreError, match="not a decomposition store"):
        DecompositionStore(tmp_path)


def test_reader_pickles_and_torch_adapter(tmp_path, src):
    import pickle

    store = tmp_path / "store"
    plan = prepare_store(store, PARAMS, src, overwrite=False)
    DecomposeWorker(str(store), PARAMS.to_dict(), run=1, read_size=SIZE)(batch_of(src))
    finish_store(plan, src="x")
    reader = DecompositionStore(store)
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
    prepare_store(store, PARAMS, src, overwrite=False)
    w = DecomposeWorker(str(store), PARAMS.to_dict(), run=1, read_size=SIZE)
    poisoned = load_image(src[1].path, SIZE)
    real = w._decompose

    def flaky(images, **kw):          # the solver rejects any batch holding image 1
        if any(np.array_equal(im, poisoned) for im in images):
            raise ValueError("solver diverged")
        return real(images, **kw)

    monkeypatch.setattr(w, "_decompose", flaky)
    out = w(batch_of(src[:3]))
    assert out.column("status").to_pylist() == ["ok", "error", "ok"]
    assert out.column("error").to_pylist()[1] == "decomposition failed (ValueError: solver diverged)"
    ref = decompose(load_image(src[2].path, SIZE), 2, backend="numba", **PARAMS.params.to_dict())
    want = np.stack([np.moveaxis(layer, -1, 0) for layer in ref.layers]).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(w.array[2]), want)
    assert np.isnan(np.asarray(w.array[1], np.float32)).all()
