"""manifest.parquet read and written a row group at a time, never whole.

The manifest has one row per image (manifest_schema) in row groups of MANIFEST_GROUP_SHARDS whole
shards. Everything that touches it, the job's driver (listing, rerun check, finish), its workers'
rows and every process that opens a store, goes through here a row group at a time, keeping at
most the last group read: a whole manifest is about 1 GB of pandas at ImageNet size, which no
driver, loader worker or export worker should hold.
"""
from __future__ import annotations

import bisect
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, List, Tuple

from ..storage import as_path, is_url, open_input
from .decomposition_format import (MANIFEST, MANIFEST_GROUP_SHARDS, STATUS_PENDING, Source, StoreError, StoreParams,
                                   manifest_schema)

# The listing written as a manifest before Ray starts; a dot name, so that a folder holding only
# a leftover one (a driver killed while listing) still counts as new.
LISTED = ".manifest-listed.parquet"
SOURCE_COLUMNS = ("index", "id", "path", "member", "label", "class_name", "problem")


class ManifestRows:
    """Row-group reads of a manifest (a pyarrow ParquetFile): rows are asked by number, and the
    last row group read (with the columns asked) is kept, so rows asked in order read each group
    once."""

    def __init__(self, file):
        self.file = file
        self.rows = file.metadata.num_rows
        starts = [0]
        for g in range(file.num_row_groups):
            starts.append(starts[-1] + file.metadata.row_group(g).num_rows)
        self.starts, self._cached = starts, (None, None)

    def group(self, g: int, columns=None):
        """Row group g (a pyarrow Table; those columns, default all)."""
        key = (g, tuple(columns) if columns is not None else None)
        if self._cached[0] != key:
            self._cached = (key, self.file.read_row_group(g, columns=list(columns) if columns else None))
        return self._cached[1]

    def rows_in(self, lo: int, hi: int, columns=None):
        """Rows lo..hi-1 (a pyarrow Table), or None unless one row group holds them all."""
        g = bisect.bisect_right(self.starts, lo) - 1
        if not (0 <= lo < self.rows and g < len(self.starts) - 1 and hi <= self.starts[g + 1]):
            return None
        return self.group(g, columns).slice(lo - self.starts[g], hi - lo)


class ManifestShards(ManifestRows):
    """Shard by shard reads of a store's manifest.parquet, for the job's driver and workers:
    asked in order, each row group is read once."""

    def __init__(self, path: Path, shard_images: int):
        super().__init__(open_manifest(path))
        self.path, self.m = as_path(path), shard_images

    def shard(self, k: int, columns=None):
        """Shard k's rows (a pyarrow Table; those columns, default all)."""
        rows = self.rows_in(k * self.m, min((k + 1) * self.m, self.rows), columns)
        if rows is None:
            raise StoreError(self.path / MANIFEST, f"does not hold shard {k} within one row group ({self.rows} rows "
                                                   f"in {len(self.starts) - 1} groups); pass --overwrite to "
                                                   f"start the store over")
        return rows


def open_manifest(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(open_input(as_path(path) / MANIFEST))
    except Exception as e:
        raise StoreError(path, f"cannot read {MANIFEST} ({type(e).__name__}: {e}); pass --overwrite "
                               f"to start the store over") from None


def manifest_sources(manifest: ManifestShards, k: int) -> List[Source]:
    """Shard k's images, as listed when the store was created."""
    return [Source(**r) for r in manifest.shard(k, SOURCE_COLUMNS).to_pylist()]


class GroupedWriter:
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


def in_shards(sources: Iterable[Source], m: int) -> Iterator[List[Source]]:
    """The sources in lists of m (a store shard's images), streamed."""
    part: List[Source] = []
    for source in sources:
        part.append(source)
        if len(part) == m:
            yield part
            part = []
    if part:
        yield part


def stage_listing(path: Path, params: StoreParams, sources: Iterable[Source]) -> Tuple[int, Path]:
    """Write the listing, streamed, as an all-pending manifest (row groups of whole shards, so
    that resuming and finishing read a shard's rows at a time) to path/LISTED. Returns (images,
    the staged file); removes it when the listing fails (SourceError)."""
    import pyarrow as pa

    schema = manifest_schema(params.levels)
    if is_url(path):
        # Written here and uploaded whole when the store is created (create_store's commit_file).
        fd, staged = tempfile.mkstemp(prefix="nextdetail-listing-", suffix=".parquet")
        os.close(fd)
        staged = Path(staged)
    else:
        path.mkdir(parents=True, exist_ok=True)
        staged = path / LISTED
    m, n = params.shard_images, 0
    try:
        with GroupedWriter(staged, schema, m) as writer:
            for part in in_shards(sources, m):
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
