"""Inputs for the pipeline tests: real photos from <repo>/../shared/data by path (never
copied), or generated images when that folder is absent, plus deliberately broken files;
`make_store`, a small finished decomposition store written in-process, without Ray
(the tokenizer tests train on it); and the store writer's steps as the tests call them
(`prepare_store`, `merged_manifest`, `plan_sources`)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

from conftest import SHARED_DATA

PHOTO_FOLDERS = ("set5", "set14", "kodak24", "bsd100")


def synthetic_photo(path: Path, seed: int, size: int = 80) -> Path:
    """A smooth random image with a few sharp-edged discs: something AT has work to do on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.5 + 0.3 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y
                                                     + rng.uniform())) for _ in range(3)], -1)
    for _ in range(3):
        cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.25)]
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.03, img.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def photo_paths(n: int, tmp: Path) -> List[Path]:
    """n real photos (sorted, from the shared folders) or n generated ones in tmp."""
    if SHARED_DATA.is_dir():
        found = []
        for folder in PHOTO_FOLDERS:
            found += sorted((SHARED_DATA / folder).glob("*.png"))
        if len(found) >= n:
            return found[:n]
    return [synthetic_photo(tmp / "generated" / f"img_{i:03d}.png", i) for i in range(n)]


def listing(paths, path: Path, labels=None) -> Path:
    """A .txt listing of absolute paths (optionally "path label")."""
    lines = [f"{p}" if labels is None else f"{p} {lab}" for p, lab in zip(paths, labels or [None] * len(paths))]
    path.write_text("\n".join(lines) + "\n")
    return path


def class_folder(tmp: Path, classes=("cat", "dog", "eel"), per_class: int = 4) -> Path:
    """cifar10_subset when present (10 classes of 32x32 JPGs), else generated class folders."""
    if (SHARED_DATA / "cifar10_subset").is_dir():
        return SHARED_DATA / "cifar10_subset"
    root = tmp / "classes"
    for k, cls in enumerate(classes):
        for i in range(per_class):
            synthetic_photo(root / cls / f"{i:04d}.png", 100 * k + i, size=32)
    return root


def broken_files(folder: Path, good: Path) -> dict:
    """Files that must become error rows: {name: path}. `good` is a real image to damage."""
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    files = {"truncated": folder / "truncated.png", "not_image": folder / "notes.png",
             "empty": folder / "empty.jpg", "garbage": folder / "garbage.jpg"}
    files["truncated"].write_bytes(data[: len(data) // 3])
    files["not_image"].write_text("this is not a picture\n")
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)   # JPEG magic, then noise
    return files


def prepare_store(path, params, sources, *, overwrite: bool):
    """check_store, then plan_store: what the job does, split by Ray's start-up. A StorePlan."""
    from nextdetail.stores.store_check import check_store
    from nextdetail.stores.store_plan import plan_store

    return plan_store(path, params, check_store(path, params, sources, overwrite=overwrite), overwrite=overwrite)


def merged_manifest(path, params, n_images: int):
    """The whole manifest as it stands (manifest + journal), a pandas DataFrame (the job itself
    goes shard by shard)."""
    import pyarrow as pa
    from nextdetail.stores.shard_journal import shard_tables

    return pa.concat_tables(list(shard_tables(path, params, n_images))).to_pandas()


def plan_sources(plan, k: int):
    """The images (Sources) of shard k of a StorePlan, as listed when the store was created."""
    from nextdetail.stores.manifest import ManifestShards, manifest_sources

    return manifest_sources(ManifestShards(plan.path, plan.params.shard_images), k)


def shard_rows(plan):
    """The one-row batches Ray Data hands a DecomposeWorker: one per shard the plan writes."""
    from nextdetail.pipelines.decompose_worker import shard_items

    return [{"shard": np.array([item["shard"]]), "sources": np.array([item["sources"]], object)}
            for item in shard_items(plan)]


def solve_shards(plan, worker, rows=None) -> list:
    """Run a DecomposeWorker on the plan's shard rows (or the given ones) and commit each result,
    as the job's driver does; returns the worker's tables."""
    from nextdetail.stores.shard_journal import commit_shards

    out = []
    for row in shard_rows(plan) if rows is None else rows:
        table = worker(row)
        commit_shards(plan.path, plan.params, worker.run, table)
        out.append(table)
    return out


def make_store(path: Path, n: int = 4, size: int = 32, order: int = 3, n_iter: int = 8,
               shard_images: int = 64, method: str = "base_detail", batch_size: int = 8) -> Path:
    """A finished store of n images (real photos when present) at size x size, in-process:
    the job's own writer and worker, called the way Ray would call them."""
    from nextdetail.decomp import ATParams
    from nextdetail.pipelines import StoreParams, list_sources
    from nextdetail.pipelines.decompose_worker import DecomposeWorker
    from nextdetail.stores.store_plan import finish_store

    params = StoreParams(order=order, size=size, at=ATParams(n_iter=n_iter), backend="numba",
                         shard_images=shard_images, method=method)
    src = list_sources(listing(photo_paths(n, path.parent), path.parent / f"{path.name}.txt"))
    plan = prepare_store(path, params, src, overwrite=False)
    solve_shards(plan, DecomposeWorker(str(path), params.to_dict(), run=plan.run, batch_size=batch_size,
                                       read_size=size))
    finish_store(plan, src=f"{path.name}.txt")
    return path


NAMES = ["tench", "goldfish", "shark"]


def hf_shard(path, images, labels, names=NAMES, row_group_size=2):
    """A Parquet shard as the `datasets` library writes an image dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64())],
                       metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    cells = [None if b is None else {"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)]
    pq.write_table(pa.table({"image": cells, "label": labels}, schema=schema), path, row_group_size=row_group_size)
    return path


def wds_shard(path, groups):
    """A WebDataset tar: groups = [(key, {ext: bytes})], members in that order."""
    with tarfile.open(path, "w") as tar:
        for key, members in groups:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
