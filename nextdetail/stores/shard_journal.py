"""The job's journal (runs, parts, staged shards, their commit): how a store is written and resumed.

Resume works from the store alone, never from Ray's state, at shard granularity:

- At creation the driver writes bases.zarr's zarr.json (its attributes record the parameters;
  no shard yet) and a manifest.parquet with every image `pending`.
- The unit of work is a shard (shard_images consecutive images). The task that owns it solves
  its images and writes the shard file whole and atomically to a staging path in its run's
  folder, _parts/run-RRRR/_staged/c.<shard>.0.0.0.0, and returns the shard's manifest rows.
  The driver, as each result reaches it, commits the shard (`commit_shards`): renames the staged file into
  bases.zarr, then writes the journal part _parts/run-RRRR/part-<shard>.parquet (atomic), whose
  rows record the shard file's size. A part therefore only ever describes a shard that is
  already in place, complete; and since only a live driver commits, a worker that outlives a
  killed driver (Ray helpers can linger for seconds) leaves at most a staged file that no run
  ever uses.
- A rerun reads manifest + parts: a shard is done when every image of it is ok and its file has
  the size recorded. Every other shard (pending, an error row, killed between shard and part, a
  file truncated or deleted since) is done again, whole, which rewrites the same bytes (the
  solver is deterministic per image), so a crash costs time, never data. A no-op rerun costs
  one manifest read and one stat per shard.
- Finishing goes shard by shard (`shard_tables`): each shard's rows from its latest part (a
  run writes a shard's part whole, so the latest run wins), or from the manifest, into a new
  manifest.parquet (row groups of MANIFEST_GROUP_SHARDS shards); then meta.json (the "complete"
  mark); then it drops the journal. The driver holds one row group's rows at a time.

On object storage (STORE a URL) the same protocol holds with the object store's own atomic
operations, since there is no rename: a task writes its staged shard with one PUT (an object
appears whole or not at all); the driver commits it with a server-side copy into bases.zarr (all
or nothing, no bytes through the driver) and deletes the staged object, then PUTs the part. A
shard object that was cut short or replaced since (another size than its part records) is found
by the size check of a rerun, from one listing of bases.zarr, and redone. The staged object of a
worker that outlived its driver stays in that run's folder, which no later run reads, and goes
with the journal when the store is finished. The attempt journals of a URL store are kept on
each worker's node (pipelines/attempts.journal_folder): only appends, which objects do not have.

The steps around the journal: store_check.py (may this run continue the store), manifest.py
(the listing staged as the manifest, read back a row group at a time), store_plan.py (creation,
what a rerun redoes, the finish and its meta.json).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator, List

from ..storage import as_path, copy, is_url, open_input, sizes
from ..storage import size as storage_size
from .atomic import write_table_atomic
from .decomposition_format import MANIFEST, PARTS, StoreError, StoreParams, manifest_schema, run_parts
from .manifest import ManifestShards
from .shards import shard_damage, shard_file, shard_key

STAGED = "_staged"     # "_": readers that list the journal as a Parquet dataset skip it


def runs(path: Path) -> List[int]:
    """The journal's run numbers, in order (none before the first run commits)."""
    parts = as_path(path) / PARTS
    if not parts.is_dir():
        return []
    return sorted(int(p.name[4:]) for p in parts.iterdir()
                  if p.name.startswith("run-") and p.name[4:].isdigit() and p.is_dir())


def part_file(path, run: int, k: int) -> Path:
    """The journal part of shard k in run `run` (written by the driver when it commits the shard)."""
    return run_parts(path, run) / f"part-{k:07d}.parquet"


def _latest_parts(path: Path) -> Dict[int, Path]:
    """{shard: its part in the latest run that wrote one}. A shard is written whole per run, so
    the latest part replaces every earlier row of the shard."""
    latest: Dict[int, Path] = {}
    for run in runs(path):
        folder = run_parts(path, run)
        for name in sizes(folder):         # one listing (a request per 1,000 parts on S3)
            stem = name[5:-len(".parquet")]
            if name.startswith("part-") and name.endswith(".parquet") and stem.isdigit():
                latest[int(stem)] = folder / name
    return latest


def shard_tables(path, params: StoreParams, n_images: int) -> Iterator:
    """Shard k's manifest rows as a pyarrow Table, k = 0, 1, ...: its latest journal part when
    there is one (identity columns from the manifest), else its manifest rows. One shard in
    memory at a time."""
    import pyarrow.parquet as pq

    path = as_path(path)
    schema = manifest_schema(params.levels)
    latest = _latest_parts(path)
    base = ManifestShards(path, params.shard_images)
    if base.rows != n_images:
        raise StoreError(path / MANIFEST, f"has {base.rows} rows, not {n_images}; pass --overwrite to start the "
                                          f"store over")
    for k in range(params.shards(n_images)):
        rows = base.shard(k).select(schema.names).cast(schema)
        if k in latest:
            with open_input(latest[k]) as f:
                part = pq.read_table(f, schema=schema)
            if part.column("index").to_pylist() != rows.column("index").to_pylist():
                raise StoreError(latest[k], f"does not hold the rows of shard {k}; pass --overwrite to start "
                                            f"the store over")
            for name in ("id", "label", "class_name"):       # the driver's, from SRC
                part = part.set_column(schema.get_field_index(name), name, rows.column(name))
            rows = part
        yield rows


def staged_shard_file(path, run: int, k: int) -> Path:
    """Where the task that owns shard k in run `run` writes it, for the driver to commit."""
    return run_parts(path, run) / STAGED / shard_key(k)


def commit_shards(path, params: StoreParams, run: int, table) -> None:
    """The driver's half of a shard write: for each shard in `table` (manifest rows a task
    returned), move its staged file into bases.zarr, then write its journal part. Idempotent: a
    result seen twice (Ray ran the task twice) commits the same bytes again, or finds them
    committed."""
    import numpy as np

    path = as_path(path)
    schema = manifest_schema(params.levels)
    table = table.select(schema.names).cast(schema)
    shards = table.column("index").to_numpy() // params.shard_images
    for k in sorted(set(shards.tolist())):
        rows = table.filter(np.asarray(shards == k))
        size = rows.column("shard_bytes")[0].as_py()
        staged, final = staged_shard_file(path, run, k), shard_file(path, k)
        if size == 0:
            final.unlink(missing_ok=True)
        elif is_url(path):
            # No rename on object storage: a server-side copy (no bytes through the driver),
            # then the staged object is deleted. A copy is all or nothing, like the PUT before.
            if storage_size(staged) == size:
                copy(staged, final)
                staged.unlink(missing_ok=True)
            elif shard_damage(path, k, size) is not None:
                raise StoreError(staged, f"shard {k}: the task reported {size} bytes written, but its staged "
                                         f"object is gone or another size; rerun to redo it")
        elif staged.is_file():
            os.replace(staged, final)
        elif shard_damage(path, k, size) is not None:
            raise StoreError(staged, f"shard {k}: the task reported {size} bytes written, but its staged file is "
                                     f"gone; rerun to redo it")
        write_table_atomic(rows, part_file(path, run, k))
