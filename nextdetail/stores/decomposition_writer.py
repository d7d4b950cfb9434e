"""Driver side of the store: create it, decide what a (re)run still has to do, finish it.

Resume works from the store alone, never from Ray's state:

- At creation the driver writes layers.zarr (its attributes record the parameters) and a
  manifest.parquet with every image `pending`.
- Each batch a worker finishes leaves its images' Zarr chunks and then a journal part,
  _parts/run-RRRR/part-<first index>.parquet, written atomically. A part therefore only
  ever describes chunks that are already on disk.
- A rerun reads manifest + parts: an image is done when some row says ok. Everything else
  (pending, error, or killed between chunk and part) is processed again, which rewrites
  the same bytes (the solver is deterministic per image), so a crash costs time, never data.
- Finishing merges the rows (later runs win; within a run ok wins over error), writes
  manifest.parquet, then meta.json (the "complete" mark), then drops the journal.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np

from .. import __version__
from .atomic import write_bytes_atomic, write_table_atomic
from .decomposition import (FORMAT, FORMAT_VERSION, LAYERS, MANIFEST, META, PARTS, STATUS_ERROR, STATUS_OK,
                    STATUS_PENDING, Source, StoreError, StoreParams, layer_names, manifest_schema, run_parts)

log = logging.getLogger(__name__)

STORE_ENTRIES = (LAYERS, MANIFEST, META, PARTS)     # the only names --overwrite removes
ZSTD_LEVEL = 3


@dataclass
class StorePlan:
    """What this run has to do: `todo` sources; `done` already ok in the store."""

    path: Path
    params: StoreParams
    sources: List[Source]
    todo: List[Source]
    done: int
    run: int                      # journal run number of this run (1, 2, ...)
    created: bool = False
    previous_errors: int = 0      # images retried because an earlier run marked them error


def zarr_attributes(params: StoreParams, n_images: int) -> dict:
    # No timestamps or host names: a resumed store must equal an uninterrupted one byte for byte.
    return {"nextdetail": {"format": FORMAT, "format_version": FORMAT_VERSION,
                           "params": params.to_dict(), "layer_order": layer_names(params.order),
                           "images": n_images}}


def _store_state(path: Path) -> str:
    """'new' (absent or empty folder), 'store' (holds store entries), or 'foreign'."""
    if not path.exists():
        return "new"
    if not path.is_dir():
        raise StoreError(path, "exists and is not a folder; choose another --out")
    names = set(os.listdir(path))
    if not names:
        return "new"
    return "store" if names & set(STORE_ENTRIES) else "foreign"


def _stored_params(path: Path) -> StoreParams:
    import zarr

    try:
        attrs = dict(zarr.open_array(path / LAYERS, mode="r").attrs)["nextdetail"]
    except Exception as e:  # missing folder, broken zarr.json, no attribute
        raise StoreError(path, f"cannot read the parameters in {LAYERS} ({type(e).__name__}: {e}); "
                               f"pass --overwrite to start the store over") from None
    if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION:
        raise StoreError(path, f"store format {attrs.get('format')!r} version {attrs.get('format_version')!r}, "
                               f"this nextdetail writes version {FORMAT_VERSION}; pass --overwrite to replace it")
    return StoreParams.from_dict(attrs["params"])


def _source_differences(path: Path, manifest, sources: Sequence[Source]) -> List[str]:
    """How the images listed now differ from the ones the store was made for."""
    ids = manifest["id"].tolist()
    now = [s.id for s in sources]
    if ids == now:
        labels = manifest["label"].to_numpy()
        changed = [s.id for s, old in zip(sources, labels) if s.label != old]
        return [f"{len(changed)} labels changed (e.g. {changed[0]})"] if changed else []
    old_set, new_set = set(ids), set(now)
    added = [i for i in now if i not in old_set]
    removed = [i for i in ids if i not in new_set]
    out = []
    if added:
        out.append(f"{len(added)} images added (e.g. {added[0]})")
    if removed:
        out.append(f"{len(removed)} images removed (e.g. {removed[0]})")
    return out or ["the images are listed in another order"]


def check_store(path, wanted: StoreParams, sources: Sequence[Source], *, overwrite: bool,
                ignore: tuple = ()) -> str:
    """Refuse (StoreError) a store this run may not continue; returns its state.

    ignore: parameter names not to compare yet (backend, before a cluster resolves auto).
    """
    path = Path(path)
    state = _store_state(path)
    if state == "foreign":
        raise StoreError(path, f"exists and is not a decomposition store (no {LAYERS}); choose another "
                               f"--out (--overwrite only ever replaces a store)")
    if state == "new" or overwrite:
        return state
    if not (path / LAYERS).exists():
        raise StoreError(path, f"store without {LAYERS} (damaged); pass --overwrite to start it over")
    diffs = _stored_params(path).differences(wanted, ignore=ignore)
    if diffs:
        raise StoreError(path, f"store made with other parameters: {'; '.join(diffs)}; rerun with the "
                               f"store's parameters, or pass --overwrite to replace it")
    if (path / MANIFEST).exists():
        diffs = _source_differences(path, _read_manifest(path), sources)
        if diffs:
            raise StoreError(path, f"store made from other images than SRC lists now: {'; '.join(diffs)}; "
                                   f"pass --overwrite to replace it")
    elif (path / PARTS).exists():
        raise StoreError(path, f"store without {MANIFEST} but with a journal (damaged); pass --overwrite "
                               f"to start it over")
    return state


def _read_manifest(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path / MANIFEST).to_pandas()
    except Exception as e:
        raise StoreError(path, f"cannot read {MANIFEST} ({type(e).__name__}: {e}); pass --overwrite "
                               f"to start the store over") from None


def _remove_store(path: Path) -> None:
    for name in STORE_ENTRIES:
        p = path / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def create_store(path: Path, params: StoreParams, sources: Sequence[Source]) -> None:
    """layers.zarr (all NaN, no chunk written) and an all-pending manifest."""
    import pyarrow as pa
    import zarr
    from zarr.codecs import ZstdCodec

    path.mkdir(parents=True, exist_ok=True)
    n, L, s = len(sources), params.order + 1, params.size
    # One image per chunk and no sharding: every worker writes whole chunks of its own
    # images only, so concurrent writers never read-modify-write a shared object.
    zarr.create_array(store=str(path / LAYERS), shape=(n, L, 3, s, s), chunks=(1, L, 3, s, s),
                      dtype=params.dtype, fill_value=np.nan, compressors=ZstdCodec(level=ZSTD_LEVEL),
                      dimension_names=("image", "layer", "channel", "y", "x"),
                      attributes=zarr_attributes(params, n), zarr_format=3, overwrite=True)
    schema = manifest_schema(params.order)
    cols = {"index": [x.index for x in sources], "id": [x.id for x in sources],
            "path": [x.path for x in sources], "label": [x.label for x in sources],
            "class_name": [x.class_name for x in sources], "status": [STATUS_PENDING] * n}
    table = pa.table({f.name: pa.array(cols.get(f.name, [None] * n), type=f.type) for f in schema},
                     schema=schema)
    write_table_atomic(table, path / MANIFEST)


def _runs(path: Path) -> List[int]:
    parts = path / PARTS
    if not parts.is_dir():
        return []
    return sorted(int(p.name[4:]) for p in parts.iterdir()
                  if p.is_dir() and p.name.startswith("run-") and p.name[4:].isdigit())


def merged_manifest(path: Path, order: int):
    """manifest.parquet updated by every journal part: one row per index, sorted (pandas)."""
    import pandas as pd
    import pyarrow.dataset as pads

    schema = manifest_schema(order)
    base = _read_manifest(path)
    frames = [base.assign(_run=0)]
    for run in _runs(path):
        # pyarrow.dataset skips names starting with "." or "_": half-written temp files.
        table = pads.dataset(run_parts(path, run), format="parquet", schema=schema).to_table()
        if table.num_rows:
            frames.append(table.to_pandas().assign(_run=run))
    df = pd.concat(frames, ignore_index=True)
    df["_ok"] = df["status"] == STATUS_OK
    # Later runs win; within a run an ok row beats an error row (a retried batch can leave both).
    df = df.sort_values(["index", "_run", "_ok"], kind="stable").drop_duplicates("index", keep="last")
    df = df.drop(columns=["_run", "_ok"]).reset_index(drop=True)
    # Identity columns come from the manifest the driver wrote from SRC; parts leave them null.
    ident = base.set_index("index").loc[df["index"], ["id", "label", "class_name"]]
    for col in ident.columns:
        df[col] = ident[col].to_numpy()
    return df


def prepare_store(path, params: StoreParams, sources: Sequence[Source], *, overwrite: bool) -> StorePlan:
    """Create the store or check and reopen it; work out which images this run must do."""
    path = Path(path)
    state = check_store(path, params, sources, overwrite=overwrite)
    if state == "store" and overwrite:
        log.info("%s: --overwrite: removing the existing store", path)
        _remove_store(path)
        state = "new"
    if state == "store" and not (path / MANIFEST).exists():
        state = "new"        # a creation that died before its manifest: nothing was processed
    if state == "new":
        create_store(path, params, sources)
        return StorePlan(path, params, list(sources), list(sources), done=0, run=1, created=True)
    merged = merged_manifest(path, params.order)
    status = dict(zip(merged["index"].tolist(), merged["status"].tolist()))
    todo = [s for s in sources if status.get(s.index) != STATUS_OK]
    previous_errors = sum(status.get(s.index) == STATUS_ERROR for s in todo)
    if todo and (path / META).exists():
        # The store is incomplete again until this run finishes.
        (path / META).unlink()
    run = (max(_runs(path)) if _runs(path) else 0) + 1
    return StorePlan(path, params, list(sources), todo, done=len(sources) - len(todo), run=run,
                     previous_errors=previous_errors)


def finish_store(plan: StorePlan, src: str) -> dict:
    """Merge the journal into manifest.parquet, write meta.json, drop the journal. Returns counts."""
    import pyarrow as pa

    path, params = plan.path, plan.params
    merged = merged_manifest(path, params.order)
    pending = merged["status"] == STATUS_PENDING
    if pending.any():
        raise StoreError(path, f"{int(pending.sum())} images are still pending (e.g. "
                               f"{merged.loc[pending, 'id'].iloc[0]}); rerun to complete the store")
    schema = manifest_schema(params.order)
    write_table_atomic(pa.Table.from_pandas(merged, schema=schema, preserve_index=False), path / MANIFEST)
    ok = int((merged["status"] == STATUS_OK).sum())
    counts = {"images": len(merged), "ok": ok, "error": len(merged) - ok}
    s, L = params.size, params.order + 1
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "nextdetail_version": __version__,
            "method": params.method, "order": params.order, "size": params.size,
            "backend": params.backend, "at": params.params.to_dict(), "dtype": params.dtype,
            "layout": ["image", "layer", "channel", "y", "x"], "chunks": [1, L, 3, s, s],
            "layer_order": layer_names(params.order), "fill_value": "NaN (images whose status is error)",
            "counts": counts, "src": str(src)}
    # Last: its presence is what marks the store complete.
    write_bytes_atomic(path / META, (json.dumps(meta, indent=2) + "\n").encode())
    shutil.rmtree(path / PARTS, ignore_errors=True)
    return counts
