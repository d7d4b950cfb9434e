"""Driver side of the store: create it, decide what a (re)run still has to do, finish it.

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
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from .. import __version__
from ..decomp import method_info
from .atomic import atomic_write, commit_file, write_bytes_atomic, write_table_atomic
from .decomposition import (FORMAT, FORMAT_VERSION, LAYERS_V1, MANIFEST, MANIFEST_GROUP_SHARDS, META, PARTS,
                            STATUS_ERROR, STATUS_OK, STATUS_PENDING, Source, StoreError, StoreParams, format_refusal,
                            manifest_schema, run_parts)
from .shards import BASES, DIMENSIONS, ZSTD_LEVEL, create_bases_array, shard_file, shard_key

log = logging.getLogger(__name__)

STORE_ENTRIES = (BASES, LAYERS_V1, MANIFEST, META, PARTS)     # the only names --overwrite removes


@dataclass
class StorePlan:
    """What this run has to do: the `shards` to (re)write, holding `todo` images; `done` images
    are ok in shards that stay as they are. The images of a shard are read from the manifest
    (`shard_sources`), so the driver holds shard numbers, not images."""

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

    def shard_sources(self, k: int) -> List[Source]:
        """The images of shard k, as listed when the store was created."""
        return manifest_sources(ManifestShards(self.path, self.params.shard_images), k)


@dataclass
class StoreCheck:
    """What check_store found: the store's state ('new', or 'store' when one is there), how
    many images SRC lists, and, when the store is to be created (or replaced), the manifest of
    the listing staged beside it (all rows pending; plan_store puts it in place)."""

    state: str
    n_images: int
    staged: Optional[Path] = None


# The listing written as a manifest before Ray starts; a dot name, so that a folder holding only
# a leftover one (a driver killed while listing) still counts as new.
LISTED = ".manifest-listed.parquet"
SOURCE_COLUMNS = ("index", "id", "path", "member", "label", "class_name", "problem")


def manifest_sources(manifest: "ManifestShards", k: int) -> List[Source]:
    """Shard k's images, as listed when the store was created."""
    return [Source(**r) for r in manifest.shard(k, SOURCE_COLUMNS).to_pylist()]


class ManifestShards:
    """Shard by shard reads of manifest.parquet, whose row groups hold MANIFEST_GROUP_SHARDS whole
    shards: asked in order, each row group is read once (the last one read is kept)."""

    def __init__(self, path: Path, shard_images: int):
        self.file = open_manifest(path)
        self.path, self.m = Path(path), shard_images
        self.rows = self.file.metadata.num_rows
        starts = [0]
        for g in range(self.file.num_row_groups):
            starts.append(starts[-1] + self.file.metadata.row_group(g).num_rows)
        self._starts, self._cached = starts, (None, None)

    def shard(self, k: int, columns=None):
        """Shard k's rows (a pyarrow Table; those columns, default all)."""
        lo, hi = k * self.m, min((k + 1) * self.m, self.rows)
        g = bisect.bisect_right(self._starts, lo) - 1
        if not (0 <= lo < self.rows and g < len(self._starts) - 1 and hi <= self._starts[g + 1]):
            raise StoreError(self.path / MANIFEST, f"does not hold shard {k} within one row group ({self.rows} rows "
                                                   f"in {len(self._starts) - 1} groups); pass --overwrite to "
                                                   f"start the store over")
        key = (g, tuple(columns) if columns is not None else None)
        if self._cached[0] != key:
            self._cached = (key, self.file.read_row_group(g, columns=list(columns) if columns else None))
        return self._cached[1].slice(lo - self._starts[g], hi - lo)


class _GroupedWriter:
    """A ParquetWriter that writes a row group per MANIFEST_GROUP_SHARDS shards of rows given a
    shard at a time (write_table alone would make a row group per call)."""

    def __init__(self, path, schema, shard_images: int):
        import pyarrow.parquet as pq

        self.writer, self.size = pq.ParquetWriter(path, schema), MANIFEST_GROUP_SHARDS * shard_images
        self.pending, self.n = [], 0

    def write(self, table) -> None:
        self.pending.append(table)
        self.n += table.num_rows
        if self.n >= self.size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.size)
        self.pending, self.n = [], 0

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            self._flush()
        self.writer.close()


def open_manifest(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path / MANIFEST)
    except Exception as e:
        raise StoreError(path, f"cannot read {MANIFEST} ({type(e).__name__}: {e}); pass --overwrite "
                               f"to start the store over") from None


def zarr_attributes(params: StoreParams, n_images: int) -> dict:
    # No timestamps or host names: a resumed store must equal an uninterrupted one byte for byte.
    return {"nextdetail": {"format": FORMAT, "format_version": FORMAT_VERSION,
                           "params": params.to_dict(), "layer_order": params.layer_names(),
                           "images": n_images}}


def _store_state(path: Path) -> str:
    """'new' (absent or empty folder), 'store' (holds store entries), or 'foreign'."""
    if not path.exists():
        return "new"
    if not path.is_dir():
        raise StoreError(path, "exists and is not a folder; choose another --out")
    names = {n for n in os.listdir(path) if not n.startswith(".")}     # temp files, LISTED
    if not names:
        return "new"
    return "store" if names & set(STORE_ENTRIES) else "foreign"


def _stored_params(path: Path) -> StoreParams:
    import zarr

    try:
        attrs = dict(zarr.open_array(path / BASES, mode="r").attrs)["nextdetail"]
    except Exception as e:  # missing folder, broken zarr.json, no attribute
        raise StoreError(path, f"cannot read the parameters in {BASES} ({type(e).__name__}: {e}); "
                               f"pass --overwrite to start the store over") from None
    if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION:
        raise StoreError(path, f"store format {attrs.get('format')!r} version {attrs.get('format_version')!r}, "
                               f"this nextdetail writes version {FORMAT_VERSION}; pass --overwrite to replace it")
    try:
        return StoreParams.from_dict(attrs["params"])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(path, f"{BASES} records incomplete parameters ({type(e).__name__}: {e}); pass "
                               f"--overwrite to start the store over") from None


def _format_1_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError):
        return {}


def _in_shards(sources: Iterable[Source], m: int) -> Iterator[List[Source]]:
    """The sources in lists of m (a store shard's images), streamed."""
    part: List[Source] = []
    for source in sources:
        part.append(source)
        if len(part) == m:
            yield part
            part = []
    if part:
        yield part


def _source_differences(path: Path, params: StoreParams, sources: Iterable[Source]) -> Tuple[int, List[str]]:
    """(images listed, how they differ from the ones the store was made for), comparing shard by
    shard with the manifest's row groups: one shard of each in memory while they agree. After a
    first difference the ids from there on are gathered to say what was added or removed."""
    manifest = ManifestShards(path, params.shard_images)
    groups, m = params.shards(manifest.rows), params.shard_images
    n, first, changed, example, ids_after = 0, None, 0, None, []
    for k, part in enumerate(_in_shards(sources, m)):
        n += len(part)
        if first is None:
            old = manifest.shard(k, ["id", "label"]).to_pydict() if k < groups else None
            if old is None or old["id"] != [s.id for s in part]:
                first = k
            else:
                bad = [s.id for s, label in zip(part, old["label"]) if s.label != label]
                changed += len(bad)
                example = example or (bad[0] if bad else None)
        if first is not None:
            ids_after += [s.id for s in part]
    if first is None and params.shards(n) != groups:
        first = params.shards(n)
    if first is None:
        return n, [f"{changed} labels changed (e.g. {example})"] if changed else []
    old_ids = [i for k in range(first, groups) for i in manifest.shard(k, ["id"]).column(0).to_pylist()]
    old_set, new_set = set(old_ids), set(ids_after)
    added = [i for i in ids_after if i not in old_set]
    removed = [i for i in old_ids if i not in new_set]
    out = []
    if added:
        out.append(f"{len(added)} images added (e.g. {added[0]})")
    if removed:
        out.append(f"{len(removed)} images removed (e.g. {removed[0]})")
    return n, out or ["the images are listed in another order"]


def check_store(path, wanted: StoreParams, sources: Iterable[Source], *, overwrite: bool,
                ignore: tuple = ()) -> StoreCheck:
    """Refuse (StoreError) a store this run may not continue; consume the listing once, streamed:
    compared with the manifest of a store to continue, else staged as the manifest of the store
    to create (see StoreCheck).

    ignore: parameter names not to compare yet (backend, before a cluster resolves auto).
    """
    path = Path(path)
    state = _store_state(path)
    if state == "foreign":
        raise StoreError(path, f"exists and is not a decomposition store (no {BASES}); choose another "
                               f"--out (--overwrite only ever replaces a store)")
    if state == "new" or overwrite:
        return StoreCheck(state, *_stage_listing(path, wanted, sources))
    if (path / LAYERS_V1).exists() and not (path / BASES).exists():
        raise StoreError(path, format_refusal(path, 1, _format_1_meta(path)))
    _check_params(path, wanted, ignore)
    if (path / MANIFEST).exists():
        n, diffs = _source_differences(path, wanted, sources)
        if diffs:
            raise StoreError(path, f"store made from other images than SRC lists now: {'; '.join(diffs)}; "
                                   f"pass --overwrite to replace it")
        return StoreCheck(state, n)
    if (path / PARTS).exists():
        raise StoreError(path, f"store without {MANIFEST} but with a journal (damaged); pass --overwrite "
                               f"to start it over")
    # A creation that died before its manifest: nothing was processed; create it again.
    return StoreCheck(state, *_stage_listing(path, wanted, sources))


def _check_params(path: Path, wanted: StoreParams, ignore: tuple = ()) -> None:
    if not (path / BASES).exists():
        raise StoreError(path, f"store without {BASES} (damaged); pass --overwrite to start it over")
    diffs = _stored_params(path).differences(wanted, ignore=ignore)
    if diffs:
        raise StoreError(path, f"store made with other parameters: {'; '.join(diffs)}; rerun with the "
                               f"store's parameters, or pass --overwrite to replace it")


def _remove_store(path: Path) -> None:
    for name in STORE_ENTRIES:
        p = path / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _stage_listing(path: Path, params: StoreParams, sources: Iterable[Source]) -> Tuple[int, Path]:
    """Write the listing, streamed, as an all-pending manifest (row groups of whole shards, so
    that resuming and finishing read a shard's rows at a time) to path/LISTED. Returns (images,
    the staged file); removes it when the listing fails (SourceError)."""
    import pyarrow as pa

    path.mkdir(parents=True, exist_ok=True)
    schema = manifest_schema(params.levels)
    m, n, staged = params.shard_images, 0, path / LISTED
    try:
        with _GroupedWriter(staged, schema, m) as writer:
            for part in _in_shards(sources, m):
                cols = {"index": [x.index for x in part], "id": [x.id for x in part],
                        "path": [x.path for x in part],
                        "member": [None if x.member is None else str(x.member) for x in part],
                        "label": [x.label for x in part], "class_name": [x.class_name for x in part],
                        "problem": [x.problem for x in part], "status": [STATUS_PENDING] * len(part)}
                writer.write(pa.table({f.name: pa.array(cols.get(f.name, [None] * len(part)), type=f.type)
                                       for f in schema}, schema=schema))
                n += len(part)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return n, staged


def create_store(path: Path, params: StoreParams, n_images: int, staged: Path) -> None:
    """bases.zarr (zarr.json only: no shard written), then the staged listing becomes the
    manifest: a folder with bases.zarr and no manifest is a creation that died."""
    create_bases_array(path / BASES, n_images, params.levels, params.size, params.shard_images,
                       zarr_attributes(params, n_images))
    commit_file(staged, path / MANIFEST)


def _runs(path: Path) -> List[int]:
    parts = path / PARTS
    if not parts.is_dir():
        return []
    return sorted(int(p.name[4:]) for p in parts.iterdir()
                  if p.is_dir() and p.name.startswith("run-") and p.name[4:].isdigit())


def part_file(path, run: int, k: int) -> Path:
    """The journal part of shard k in run `run` (written by the driver when it commits the shard)."""
    return run_parts(path, run) / f"part-{k:07d}.parquet"


def _latest_parts(path: Path) -> Dict[int, Path]:
    """{shard: its part in the latest run that wrote one}. A shard is written whole per run, so
    the latest part replaces every earlier row of the shard."""
    latest: Dict[int, Path] = {}
    for run in _runs(path):
        for p in run_parts(path, run).glob("part-*.parquet"):    # glob skips dot-named temp files
            stem = p.stem[5:]
            if stem.isdigit():
                latest[int(stem)] = p
    return latest


def shard_tables(path, params: StoreParams, n_images: int) -> Iterator:
    """Shard k's manifest rows as a pyarrow Table, k = 0, 1, ...: its latest journal part when
    there is one (identity columns from the manifest), else its manifest rows. One shard in
    memory at a time."""
    import pyarrow.parquet as pq

    path = Path(path)
    schema = manifest_schema(params.levels)
    latest = _latest_parts(path)
    base = ManifestShards(path, params.shard_images)
    if base.rows != n_images:
        raise StoreError(path / MANIFEST, f"has {base.rows} rows, not {n_images}; pass --overwrite to start the "
                                          f"store over")
    for k in range(params.shards(n_images)):
        rows = base.shard(k).select(schema.names).cast(schema)
        if k in latest:
            part = pq.read_table(latest[k], schema=schema)
            if part.column("index").to_pylist() != rows.column("index").to_pylist():
                raise StoreError(latest[k], f"does not hold the rows of shard {k}; pass --overwrite to start "
                                            f"the store over")
            for name in ("id", "label", "class_name"):       # the driver's, from SRC
                part = part.set_column(schema.get_field_index(name), name, rows.column(name))
            rows = part
        yield rows


STAGED = "_staged"     # "_": readers that list the journal as a Parquet dataset skip it


def staged_shard_file(path, run: int, k: int) -> Path:
    """Where the task that owns shard k in run `run` writes it, for the driver to commit."""
    return run_parts(path, run) / STAGED / shard_key(k)


def commit_shards(path, params: StoreParams, run: int, table) -> None:
    """The driver's half of a shard write: for each shard in `table` (manifest rows a task
    returned), move its staged file into bases.zarr, then write its journal part. Idempotent: a
    result seen twice (Ray ran the task twice) commits the same bytes again, or finds them
    committed."""
    import numpy as np

    path = Path(path)
    schema = manifest_schema(params.levels)
    table = table.select(schema.names).cast(schema)
    shards = table.column("index").to_numpy() // params.shard_images
    for k in sorted(set(shards.tolist())):
        rows = table.filter(np.asarray(shards == k))
        size = rows.column("shard_bytes")[0].as_py()
        staged, final = staged_shard_file(path, run, k), shard_file(path, k)
        if size == 0:
            final.unlink(missing_ok=True)
        elif staged.is_file():
            os.replace(staged, final)
        elif _file_size(final) != size:
            raise StoreError(staged, f"shard {k}: the task reported {size} bytes written, but its staged file is "
                                     f"gone; rerun to redo it")
        write_table_atomic(rows, part_file(path, run, k))


def merged_manifest(path, params: StoreParams, n_images: int):
    """The whole manifest as it stands (manifest + journal), a pandas DataFrame: for inspection
    and tests; the job itself goes shard by shard."""
    import pyarrow as pa

    return pa.concat_tables(list(shard_tables(path, params, n_images))).to_pandas()


def prepare_store(path, params: StoreParams, sources: Iterable[Source], *, overwrite: bool) -> StorePlan:
    """check_store, then plan_store: what the job does, split by Ray's start-up."""
    return plan_store(path, params, check_store(path, params, sources, overwrite=overwrite), overwrite=overwrite)


def plan_store(path, params: StoreParams, check: StoreCheck, *, overwrite: bool) -> StorePlan:
    """Create the store (from the listing check_store staged) or reopen it; work out which shards
    this run must (re)write. params are checked again: the backend may only now be resolved."""
    path = Path(path)
    n = check.n_images
    if check.staged is not None:
        if check.state == "store":
            log.info("%s: %s: removing the existing store", path,
                     "--overwrite" if overwrite else "a creation that died")
            _remove_store(path)
        create_store(path, params, n, check.staged)
        return StorePlan(path, params, n, list(range(params.shards(n))), todo=n, done=0, run=1, created=True)
    _check_params(path, params)
    shards, damaged, previous_errors, todo = [], 0, 0, 0
    for k, rows in enumerate(shard_tables(path, params, n)):
        status = rows.column("status").to_pylist()
        written = rows.column("shard_bytes")[0].as_py()
        if not all(s == STATUS_OK for s in status):
            shards.append(k)
            todo += len(status)
            previous_errors += sum(s == STATUS_ERROR for s in status)
        elif _file_size(shard_file(path, k)) != written:
            # Every image ok, and the file is not the size its part said when it was written.
            shards.append(k)
            todo += len(status)
            damaged += 1
            log.warning("%s: shard %d is gone or not the size it was written with; redoing it",
                        shard_file(path, k), k)
    if shards and (path / META).exists():
        # The store is incomplete again until this run finishes.
        (path / META).unlink()
    run = (max(_runs(path)) if _runs(path) else 0) + 1
    return StorePlan(path, params, n, shards, todo=todo, done=n - todo, run=run,
                     previous_errors=previous_errors, damaged=damaged)


def _file_size(path: Path) -> int:
    """Bytes of a shard file; 0 when absent (a shard of images that are all 0 has no file)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def finish_store(plan: StorePlan, src: str) -> dict:
    """Write the merged manifest shard by shard, then meta.json, then drop the journal. Returns
    counts. The driver holds one shard's rows at a time."""
    path, params = plan.path, plan.params
    schema = manifest_schema(params.levels)
    counts = {"images": 0, "ok": 0, "error": 0}
    pending, example = 0, None
    with atomic_write(path / MANIFEST) as tmp:
        with _GroupedWriter(tmp, schema, params.shard_images) as writer:
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
    s, L, m = params.size, params.levels + 1, params.shard_images
    info = method_info(params.method)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "nextdetail_version": __version__,
            "method": params.method, "order": params.order, "size": params.size,
            "backend": params.backend, "at": params.params.to_dict(), "dtype": params.dtype,
            "array": BASES, "layout": list(DIMENSIONS), "levels": params.levels, "space": info.space,
            "base_order": info.base_names(params.levels),
            "quantization": "q = round(255 * clip(B, 0, 1))" + (
                " of the bases as images, B = exp(L) - eps_I" if info.space == "log" else ""), "shard_images": m,
            "shards": [m, L, 3, s, s], "chunks": [1, L, 3, s, s], "codec": f"zstd {ZSTD_LEVEL} (checksum)",
            "layer_order": params.layer_names(), "fill_value": "0 (images whose status is error)",
            "counts": counts, "src": str(src)}
    # Last: its presence is what marks the store complete.
    write_bytes_atomic(path / META, (json.dumps(meta, indent=2) + "\n").encode())
    shutil.rmtree(path / PARTS, ignore_errors=True)
    return counts
