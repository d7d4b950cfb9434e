"""Pages of a manifest (a Parquet file written in row groups), filtered and sorted, in memory that
does not grow with the number of rows.

- Unfiltered, in store order: a page is rows [p*n, p*n+n), read from the one or two row groups
  that hold them (the row group's offsets come from the file's footer).
- Filtered (status, class name, label): the first request for a filter counts its matches in every
  row group, reading only the filter's columns a group at a time, and keeps those counts (one
  int per row group, a few KB at a million rows) in a small LRU; a page then reads the row groups
  that hold its matches.
- Sorted by an AT energy column: that column (and the filter's) is read whole for the request
  (8 bytes a row: 8 MB at a million), the page's rows picked with argpartition and the arrays
  dropped. Nothing of the sort is kept: memory after the request is what it was before.
"""
from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

FILTER_COLUMNS = ("status", "class_name", "label")


@dataclass(frozen=True)
class Query:
    """What a grid page asks for. Empty strings / None: no filter."""

    status: str = ""
    class_name: str = ""
    label: Optional[int] = None
    sort: str = ""          # "" store order, or "energy_k" (highest first) / "energy_k_asc"

    @property
    def filtered(self) -> bool:
        return bool(self.status or self.class_name or self.label is not None)

    def columns(self) -> List[str]:
        return [c for c, v in (("status", self.status), ("class_name", self.class_name), ("label", self.label))
                if v not in ("", None)]

    def sort_column(self) -> Optional[str]:
        return self.sort[:-4] if self.sort.endswith("_asc") else (self.sort or None)


def _mask(table, q: Query) -> np.ndarray:
    """bool (rows,): which rows of a table (holding q's filter columns) match q."""
    import pyarrow.compute as pc

    m = np.ones(table.num_rows, bool)
    for col, value in (("status", q.status), ("class_name", q.class_name)):
        if value:
            m &= pc.equal(table.column(col), value).fill_null(False).to_numpy(zero_copy_only=False)
    if q.label is not None:
        m &= pc.equal(table.column("label"), q.label).fill_null(False).to_numpy(zero_copy_only=False)
    return m


def _release() -> None:
    """Hand the column buffers pyarrow's allocator kept back to the system: a sort reads whole
    columns, and without this the server's RSS would keep their high-water mark."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


class ManifestPages:
    """Pages of a Parquet file's rows under a Query. `page(q, lo, n)` -> (row numbers, total)."""

    def __init__(self, file, cache: int = 32):
        self.file = file                              # a pyarrow.parquet.ParquetFile
        meta = file.metadata
        self.starts = [0]
        for g in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(g).num_rows)
        self.rows = self.starts[-1]
        self.names = set(file.schema_arrow.names)
        self._counts: "OrderedDict[Query, np.ndarray]" = OrderedDict()
        self._cache = cache
        self._lock = threading.Lock()                 # pyarrow file reads from the server's threads

    def group_of(self, row: int) -> int:
        return bisect.bisect_right(self.starts, row) - 1

    def read(self, g: int, columns) -> "object":
        with self._lock:
            return self.file.read_row_group(g, columns=list(columns))

    def take(self, rows: np.ndarray, columns) -> List[dict]:
        """The rows (sorted or not) as dicts of `columns`, reading each row group they touch once."""
        out: dict = {}
        groups = np.asarray([self.group_of(int(r)) for r in rows], np.int64)
        for g in np.unique(groups):
            sel = rows[groups == g]
            t = self.read(int(g), columns).take(np.asarray(sel - self.starts[g], np.int64))
            for r, rec in zip(sel.tolist(), t.to_pylist()):
                out[r] = rec
        return [out[int(r)] for r in rows]

    def _group_counts(self, q: Query) -> np.ndarray:
        with self._lock:
            if q in self._counts:
                self._counts.move_to_end(q)
                return self._counts[q]
        counts = np.zeros(len(self.starts) - 1, np.int64)
        for g in range(len(counts)):
            counts[g] = int(_mask(self.read(g, q.columns()), q).sum())
        with self._lock:
            self._counts[q] = counts
            while len(self._counts) > self._cache:
                self._counts.popitem(last=False)
        return counts

    def page(self, q: Query, lo: int, n: int) -> Tuple[np.ndarray, int]:
        """(row numbers of matches lo..lo+n-1 in q's order, number of matches)."""
        for c in q.columns() + ([q.sort_column()] if q.sort_column() else []):
            if c not in self.names:
                return np.zeros(0, np.int64), 0
        if q.sort_column():
            return self._sorted(q, lo, n)
        if not q.filtered:
            return np.arange(min(lo, self.rows), min(lo + n, self.rows), dtype=np.int64), self.rows
        counts = self._group_counts(q)
        total = int(counts.sum())
        ends = np.cumsum(counts)
        found: List[np.ndarray] = []
        need, g = min(n, max(0, total - lo)), int(np.searchsorted(ends, lo, side="right"))
        skip = lo - (int(ends[g - 1]) if g > 0 else 0)
        while need > 0 and g < len(counts):
            if counts[g]:
                hits = np.flatnonzero(_mask(self.read(g, q.columns()), q))[skip:skip + need] + self.starts[g]
                found.append(hits)
                need -= len(hits)
            skip, g = 0, g + 1
        return (np.concatenate(found) if found else np.zeros(0, np.int64)), total

    def _sorted(self, q: Query, lo: int, n: int) -> Tuple[np.ndarray, int]:
        column = q.sort_column()
        values = np.empty(self.rows, np.float64)
        keep = np.ones(self.rows, bool)
        for g in range(len(self.starts) - 1):
            t = self.read(g, [column] + q.columns())
            v = t.column(column).to_numpy(zero_copy_only=False).astype(np.float64)   # nulls -> nan
            values[self.starts[g]:self.starts[g + 1]] = v
            keep[self.starts[g]:self.starts[g + 1]] = _mask(t, q) & np.isfinite(v)
        rows = np.flatnonzero(keep)
        total = len(rows)
        key = values[rows] if q.sort.endswith("_asc") else -values[rows]
        del values, keep
        hi = min(lo + n, total)
        if lo >= hi:
            return np.zeros(0, np.int64), total
        # Only the page's ranks are ordered: argpartition at lo and hi, then sort that slice.
        kth = [k for k in (lo, hi - 1) if 0 <= k < total]
        part = np.argpartition(key, kth)
        window = part[lo:hi]
        order = window[np.argsort(key[window], kind="stable")]
        out = rows[order]
        del rows, key, part
        _release()
        return out, total
