"""A decomposition store as the viewer reads it: by manifest row, a row group or a shard's image at
a time, complete or still being written.

Why not `DecompositionStore`: its constructor reads the manifest's index, status and label columns
whole (checking them, and keeping the ok rows' positions: 16 bytes per image, held for good) and
refuses a store without meta.json; the viewer addresses rows of every status, must open a million-
image store in constant memory and must show a store that another job is still writing. So this
reads the same files by the same rules, a row at a time: Zarr opened lazily, read-only; a shard
file checked against its manifest row's `shard_bytes` (stores.shards.shard_damage) before Zarr
reads it, since Zarr reads a missing shard as zeros; layers from stored bases by the reader's own
`layers_from_bases`.

The store is reopened when meta.json or manifest.parquet change (a job finishing, or an
--overwrite), found by a stat per request.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..decomp import method_info
from ..decomp.logspace import LOG_RANGE
from ..storage import as_path, is_url, open_input
from ..stores.shards import BASES, layers_from_bases, shard_damage, shard_file, zarr_store
from . import images
from .store_query import ManifestPages, Query

log = logging.getLogger(__name__)

GRID_COLUMNS = ("index", "id", "label", "class_name", "status", "error", "problem")


@dataclass
class Layout:
    """What the store's files say of it (meta.json, or Zarr's attributes while it is written)."""

    complete: bool
    meta: dict
    method: str
    levels: int
    size: int
    shard_images: int
    space: str
    base_names: List[str]       # [I, B_1, .., B_n]
    detail_names: List[str]     # [D_1, .., D_n]


def _layout(path: Path) -> Layout:
    meta_file = path / "meta.json"
    complete = meta_file.is_file()
    if complete:
        meta = json.loads(meta_file.read_text())
        params = meta
    else:
        zarr_json = json.loads((path / BASES / "zarr.json").read_text())
        meta = zarr_json.get("attributes", {}).get("nextdetail", {})
        params = meta.get("params", {})
    info = method_info(params.get("method", "base_detail"))
    levels = info.levels(int(params["order"]))
    return Layout(complete, meta, params.get("method", "base_detail"), levels, int(params["size"]),
                  int(params["shard_images"]), info.space, info.base_names(levels),
                  [f"{info.names[1]}_{k}" for k in range(1, levels + 1)])


class StoreSource:
    """A decomposition store, read-only, by manifest row."""

    kind = "store"

    def __init__(self, path: Path):
        self.path = as_path(path)          # a folder, or a URL: read in place, by range
        self._lock = threading.Lock()
        self._stamp = None
        self._layout: Optional[Layout] = None
        self._pages: Optional[ManifestPages] = None
        self._array = None
        self._classes: Optional[List[str]] = None

    # -- opening and reopening -------------------------------------------------------------------
    def _fingerprint(self):
        out = []
        for name in ("meta.json", "manifest.parquet"):
            try:
                if is_url(self.path):
                    info = self.path.fs.info((self.path / name).path)
                    out.append((info.get("ETag") or info.get("LastModified"), info.get("size")))
                    continue
                st = (self.path / name).stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def _open(self) -> None:
        import pyarrow.parquet as pq

        stamp = self._fingerprint()
        if stamp == self._stamp and self._layout is not None:
            return
        with self._lock:
            if stamp == self._stamp and self._layout is not None:
                return
            self._layout = _layout(self.path)
            self._pages = ManifestPages(pq.ParquetFile(open_input(self.path / "manifest.parquet")))
            self._array, self._classes, self._stamp = None, None, stamp

    @property
    def layout(self) -> Layout:
        self._open()
        return self._layout

    @property
    def pages(self) -> ManifestPages:
        self._open()
        return self._pages

    @property
    def stamp(self) -> str:
        """Changes when the store does: part of every picture's ETag."""
        self._open()
        return str(self._stamp)

    def _bases(self):
        if self._array is None:
            import zarr

            self._array = zarr.open_array(zarr_store(self.path / BASES, read_only=True), mode="r")
        return self._array

    def warm(self) -> None:
        """Open what the first page would (the manifest, Zarr and its codecs), so that it is quick."""
        self._open()
        if (self.path / BASES / "zarr.json").is_file():
            self._bases()

    # -- rows ------------------------------------------------------------------------------------
    def energy_columns(self) -> List[str]:
        return [c for c in (f"energy_{k}" for k in range(1, self.layout.levels + 1)) if c in self.pages.names]

    def grid(self, q: Query, page: int, per_page: int) -> Tuple[List[dict], int]:
        """The rows of grid page `page` (dicts of GRID_COLUMNS and the energies) and the number of
        rows matching q."""
        rows, total = self.pages.page(q, page * per_page, per_page)
        cols = [c for c in GRID_COLUMNS if c in self.pages.names] + self.energy_columns()
        return (self.pages.take(rows, cols) if len(rows) else []), total

    def row(self, r: int) -> Optional[dict]:
        """Manifest row r, every column; None when out of range."""
        if not 0 <= r < self.pages.rows:
            return None
        return self.pages.take(np.asarray([r]), sorted(self.pages.names, key=_column_order))[0]

    def classes(self, limit: int = 2000) -> List[str]:
        """The class names in the manifest (at most `limit`), for the filter's suggestions; read once
        per opening, a row group at a time (dictionary-encoded: a few values per group)."""
        if self._classes is None:
            found: set = set()
            if "class_name" in self.pages.names:
                for g in range(len(self.pages.starts) - 1):
                    col = self.pages.read(g, ["class_name"]).column(0)
                    import pyarrow.compute as pc
                    found.update(v for v in pc.unique(col).to_pylist() if v is not None)
                    if len(found) >= limit:
                        break
            self._classes = sorted(found)[:limit]
        return self._classes

    # -- pictures --------------------------------------------------------------------------------
    def quantized(self, r: int, row: Optional[dict] = None) -> Tuple[Optional[np.ndarray], str]:
        """(uint8 (n+1, 3, H, W) bases of row r, "") or (None, why there is no picture)."""
        row = row or self.row(r)
        if row is None:
            return None, "no such row"
        if row.get("status") == "error":
            return None, "error row: no image"
        k = r // self.layout.shard_images
        written = row.get("shard_bytes")
        if written is None or not self.layout.complete:
            if not shard_file(self.path, k).is_file():
                return None, "not written yet"
        else:
            damage = shard_damage(self.path, k, written)
            if damage is not None:
                return None, f"shard {k}: {damage}"
        try:
            return np.asarray(self._bases()[r]), ""
        except Exception as e:          # damaged bytes: zstd / crc32c / zarr raise various types
            log.warning("%s: row %d: cannot decode its shard (%s)", self.path, r, e)
            return None, f"shard {k} cannot be decoded"

    def thumbnail(self, r: int) -> np.ndarray:
        q, _ = self.quantized(r)
        return images.grey() if q is None else images.thumbnail(q[0])

    def layer_names(self) -> List[str]:
        """The pictures of an image page: every base (I first), then every detail."""
        return self.layout.base_names + self.layout.detail_names

    def layer(self, r: int, name: str) -> Optional[Tuple[np.ndarray, Optional[float]]]:
        """(uint8 (H, W, 3), scale of a signed layer or None) of layer `name` of row r; None when
        the row has no image or the name is not one of layer_names()."""
        if name not in self.layer_names():
            return None
        q, _ = self.quantized(r)
        return None if q is None else self.picture_of(q, name)

    def picture_of(self, q: np.ndarray, name: str) -> Tuple[np.ndarray, Optional[float]]:
        """Layer `name` (one of layer_names()) of stored bases q, as layer() returns it."""
        lay = self.layout
        if name in lay.base_names:
            return images.hwc(q[lay.base_names.index(name)]), None
        k = lay.detail_names.index(name) + 1                 # D_k: generation-order layer n + 1 - k
        layer = layers_from_bases(q, lay.space)[lay.levels + 1 - k]
        if lay.space == "log":                               # unit-log albedo: shown as exp, scaled
            return images.log_picture(layer * np.float32(LOG_RANGE))
        return images.detail_picture(layer)


def _column_order(name: str) -> tuple:
    """The manifest's columns in a reading order: identity, outcome, per-level numbers, the rest."""
    first = ("index", "id", "status", "error", "problem", "label", "class_name", "path", "member")
    return (first.index(name), "") if name in first else (len(first), name)
