"""The driver's three steps around the job: create the store, plan what a (re)run still has to
do, and finish it with meta.json.

plan_store takes what check_store (store_check.py) found and either creates the store (bases.zarr's
zarr.json, then the staged listing as its manifest) or works out, from manifest + journal, which
shards a rerun must write again; finish_store merges the journal into the manifest and writes
meta.json last, the mark of a complete store. The protocol they follow is in shard_journal.py.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List

from .. import __version__
from ..decomp import method_info
from ..storage import as_path, remove_tree, sizes
from .atomic import atomic_write, commit_file, write_bytes_atomic
from .decomposition_format import (FORMAT, FORMAT_VERSION, MANIFEST, META, PARTS, STATUS_ERROR, STATUS_OK,
                                   STATUS_PENDING, StoreError, StoreParams, manifest_schema)
from .manifest import GroupedWriter
from .shard_journal import runs, shard_tables
from .shards import BASES, DIMENSIONS, ZSTD_LEVEL, create_bases_array, shard_damage, shard_file
from .store_check import STORE, StoreCheck, check_params, zarr_attributes

log = logging.getLogger(__name__)


@dataclass
class StorePlan:
    """What this run has to do: the `shards` to (re)write, holding `todo` images; `done` images
    are ok in shards that stay as they are. The images of a shard are read from the manifest
    (manifest.manifest_sources), so the driver holds shard numbers, not images."""

    path: Path
    params: StoreParams
    n_images: int
    shards: List[int]
    todo: int
    done: int
    run: int                      # journal run number of this run (1, 2, ...)
    created: bool = False
    previous_errors: int = 0      # images retried because an earlier run marked them error
    damaged: int = 0              # shards redone because their file is gone or not its size


def create_store(path: Path, params: StoreParams, n_images: int, staged: Path) -> None:
    """bases.zarr (zarr.json only: no shard written), then the staged listing becomes the
    manifest: a folder with bases.zarr and no manifest is a creation that died."""
    create_bases_array(path / BASES, n_images, params.levels, params.size, params.shard_images,
                       zarr_attributes(params, n_images))
    commit_file(staged, path / MANIFEST)


def plan_store(path, params: StoreParams, check: StoreCheck, *, overwrite: bool) -> StorePlan:
    """Create the store (from the listing check_store staged) or reopen it; work out which shards
    this run must (re)write. params are checked again: the backend may only now be resolved."""
    path = as_path(path)
    n = check.n_images
    if check.staged is not None:
        if check.state == "ours":
            log.info("%s: %s: removing the existing store", path,
                     "--overwrite" if overwrite else "a creation that died")
            STORE.remove(path)
        create_store(path, params, n, check.staged)
        return StorePlan(path, params, n, list(range(params.shards(n))), todo=n, done=0, run=1, created=True)
    check_params(path, params)
    shards, damaged, previous_errors, todo = [], 0, 0, 0
    have = sizes(path / BASES)          # every shard's size from one listing, not a stat each
    for k, rows in enumerate(shard_tables(path, params, n)):
        status = rows.column("status").to_pylist()
        written = rows.column("shard_bytes")[0].as_py()
        if not all(s == STATUS_OK for s in status):
            shards.append(k)
            todo += len(status)
            previous_errors += sum(s == STATUS_ERROR for s in status)
        elif shard_damage(path, k, written, have) is not None:
            # Every image ok, and the file is not the size its part said when it was written.
            shards.append(k)
            todo += len(status)
            damaged += 1
            log.warning("%s: shard %d is gone or not the size it was written with; redoing it",
                        shard_file(path, k), k)
    if shards and (path / META).exists():
        # The store is incomplete again until this run finishes.
        (path / META).unlink()
    run = (max(runs(path)) if runs(path) else 0) + 1
    return StorePlan(path, params, n, shards, todo=todo, done=n - todo, run=run,
                     previous_errors=previous_errors, damaged=damaged)


def finish_store(plan: StorePlan, src: str) -> dict:
    """Write the merged manifest shard by shard, then meta.json, then drop the journal. Returns
    counts. The driver holds one shard's rows at a time."""
    path, params = plan.path, plan.params
    schema = manifest_schema(params.levels)
    counts = {"images": 0, "ok": 0, "error": 0}
    pending, example = 0, None
    with atomic_write(path / MANIFEST) as tmp:
        with GroupedWriter(tmp, schema, params.shard_images) as writer:
            for rows in shard_tables(path, params, plan.n_images):
                status = rows.column("status").to_pylist()
                if STATUS_PENDING in status:
                    pending += sum(s == STATUS_PENDING for s in status)
                    example = example or rows.column("id")[status.index(STATUS_PENDING)].as_py()
                counts["images"] += len(status)
                counts["ok"] += sum(s == STATUS_OK for s in status)
                writer.write(rows)
            if pending:        # raised inside atomic_write: the manifest is left as it was
                raise StoreError(path, f"{pending} images are still pending (e.g. {example}); rerun to "
                                       f"complete the store")
    counts["error"] = counts["images"] - counts["ok"]
    s, n_bases, m = params.size, params.levels + 1, params.shard_images
    info = method_info(params.method)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "nextdetail_version": __version__,
            "method": params.method, "order": params.order, "size": params.size,
            "backend": params.backend, "at": params.at.to_dict(), "dtype": params.dtype,
            "array": BASES, "layout": list(DIMENSIONS), "levels": params.levels, "space": info.space,
            "base_order": info.base_names(params.levels),
            "quantization": "q = round(255 * clip(B, 0, 1))" + (
                " of the bases as images, B = exp(L) - eps_I" if info.space == "log" else ""), "shard_images": m,
            "shards": [m, n_bases, 3, s, s], "chunks": [1, n_bases, 3, s, s], "codec": f"zstd {ZSTD_LEVEL} (checksum)",
            "layer_order": params.layer_names(), "fill_value": "0 (images whose status is error)",
            "counts": counts, "src": str(src)}
    # Last: its presence is what marks the store complete.
    write_bytes_atomic(path / META, (json.dumps(meta, indent=2) + "\n").encode())
    remove_tree(path / PARTS)
    return counts
