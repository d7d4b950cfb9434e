"""The decomposition store: a public, documented on-disk contract (format 2), and its reader.

    STORE/bases.zarr        uint8 (N, n+1, 3, S, S), Zarr v3, dims (image, base, channel, y, x):
                            image i's bases [B_0 = I, B_1, ..., B_n], 8-bit (round(255 B_k)),
                            in shards of shard_images images (the file bases.zarr/c.k.0.0.0.0 holds
                            images k*M .. k*M+M-1), one zstd chunk per image (see shards.py).
                            Images that failed read as 0.
    STORE/manifest.parquet  one row per source image, sorted by index (manifest_schema), in row
                            groups of MANIFEST_GROUP_SHARDS whole shards, with
                            the byte size of its shard file (shard_bytes).
    STORE/meta.json         parameters, layout, counts, versions. Written last: a store without
                            it is incomplete (a job is running or died).
    STORE/_parts/           the job's journal (one manifest part per shard); gone when complete.

Details are derived on read, D_k = B_(k-1) - B_k, so for what is stored
I = B_n + D_n + ... + D_1 holds exactly (telescoping) and each stored base is within 1/510 of
the solver's output.

meta.json's "method" names the decomposition (base_detail, specular: bases B_k / A_k as above;
intrinsic: two bases, I and its shading S, as images) and "layer_order" its factors. A log-space
method's bases are stored as images too (exp of its log bases); its layers are read in the
unit-log space t(x) = ln((x + eps) / eps) / ln((1 + eps) / eps): [t(S), t(I) - t(S)], summing
to t(I) in [0, 1] (shards.layers_from_bases). The reader (`DecompositionStore`) refuses
incomplete stores, stores of another format version (format 1: float16 layers, written by
nextdetail 0.1.0 and early 0.2.0 builds) and damaged shards with a one-line `StoreError`.

The names and types both sides share (StoreParams, Source, manifest_schema, read_meta) are in
decomposition_format.py; the writer is store_check.py, manifest.py, shard_journal.py (its
protocol) and store_plan.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..decomp import method_info
# StoreError and read_meta are this module's public names too: what a reader catches and checks.
from .decomposition_format import MANIFEST, META, STATUS_OK, StoreError, read_meta
from .manifest import ManifestRows
from ..storage import as_path, is_url, open_input, read_bytes
from .shards import BASES, decode_shard, layers_from_bases, shard_count, shard_damage, shard_file, zarr_store


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# The manifest columns the reader needs. Read whole at open: index (checked to be 0..N-1), status
# (which rows are ok images) and label (`labels`), three one-value columns, about 24 bytes per
# image while read and 16 per ok image kept. The rest of a row is read with its row group when
# an image is asked for: a whole manifest in pandas is about 1 GB at ImageNet size, in every
# process that opens the store (each loader and export worker).
_REQUIRED = ("index", "id", "label", "class_name", "status", "shard_bytes")
_OPEN_COLUMNS = ("index", "status", "label")
_ROW_COLUMNS = ("id", "class_name", "shard_bytes")


@dataclass
class StoreItem:
    """One image of a store. Arrays are float32 (H, W, 3) unless said otherwise.

    image   : I = B_0, as stored (q_0 / 255)
    bases   : [B_0, B_1, ..., B_n], q_k / 255 (images, also in a log-space store: I and S)
    details : [D_1, ..., D_n], D_k = B_(k-1) - B_k, D_1 finest (log-space: t(B_(k-1)) - t(B_k))
    layers  : float32 (n+1, 3, H, W), generation order [B_n, D_n, ..., D_1]; they sum to I
              (log-space store: to t(I), shards.layers_from_bases)
    """

    index: int
    id: str
    label: int
    class_name: Optional[str]
    image: np.ndarray
    bases: List[np.ndarray]
    details: List[np.ndarray]
    layers: np.ndarray


@dataclass
class Shard:
    """The ok images of one shard, read in one sequential pass (`DecompositionStore.read_shard`).

    items : (m,) int64, their positions i in the store (what store[i] takes)
    rows  : (m,) int64, their rows (indices) in the manifest
    bases : uint8 (m, n+1, 3, S, S), q_k = round(255 B_k); `layers_from_bases(bases)` gives the
            float32 generation-order layers
    """

    index: int
    items: np.ndarray
    rows: np.ndarray
    bases: np.ndarray


class DecompositionStore:
    """Read a finished store: `len(store)` ok images, `store[i]` -> StoreItem.

    Only images with status ok are indexed (i = 0 .. len - 1, in store order); the
    manifest (all rows, errors included) is `store.manifest`, a pandas DataFrame read on first
    use. The reader itself holds the ok images' rows and labels and reads the rest of the
    manifest a row group at a time (the last one kept), as images are asked for.
    Picklable (the Zarr array and the manifest are reopened lazily), so DataLoader workers can share it.
    Whole shards (`n_shards`, `read_shard(k)`) are the fast path for loaders that stream.
    """

    def __init__(self, path):
        import pyarrow.compute as pc

        self.path = as_path(path)
        self.meta = read_meta(self.path)
        self._rows, self._pid, self._manifest = None, None, None
        rows = self._manifest_rows()
        missing = [c for c in _REQUIRED if c not in rows.file.schema_arrow.names]
        if missing:
            raise StoreError(self.path / MANIFEST, f"lacks the column(s) {', '.join(missing)}")
        table = self._manifest_read(lambda: rows.file.read(columns=list(_OPEN_COLUMNS)))
        index = table.column("index").to_numpy()
        n = self.meta["counts"]["images"]
        if len(index) != n or not (index == np.arange(n)).all():
            raise StoreError(self.path / MANIFEST, f"has {len(index)} rows, not rows 0..{n - 1} "
                                                   f"of meta.json's {n} images")
        self.order = self.meta["order"]
        self.method = self.meta["method"]
        try:
            info = method_info(self.method)
        except ValueError as e:
            raise StoreError(self.path / META, f"{e} (a store of a newer nextdetail?)") from None
        self.levels = info.levels(self.order)             # bases per image: levels + 1
        self.space = info.space                           # "log": layers add up to t(I) (shards.py)
        self.layer_names = info.layer_names(self.levels)
        self.size = self.meta["size"]
        self.shard_images = self.meta["shard_images"]
        self.n_shards = shard_count(n, self.shard_images)
        ok = pc.equal(table.column("status"), STATUS_OK).fill_null(False).to_numpy()
        self.ok_indices = index[ok]
        self.labels = table.column("label").to_numpy()[self.ok_indices]     # label of store[i] (-1: none)
        del table, index
        # Per shard: where its ok items start.
        self._shard_starts = np.searchsorted(self.ok_indices, np.arange(self.n_shards + 1) * self.shard_images)
        self._array = None
        self._checked: set = set()
        self._shard_cache = (None, None)
        shape = tuple(self._bases().shape)
        want = (n, self.levels + 1, 3, self.size, self.size)
        if shape != want:
            raise StoreError(self.path, f"{BASES} has shape {shape}, meta.json implies {want}")

    def _bases(self):
        if self._array is None:
            import zarr
            try:
                self._array = zarr.open_array(zarr_store(self.path / BASES, read_only=True), mode="r")
            except Exception as e:  # zarr raises several types for a missing/broken array
                raise StoreError(self.path, f"cannot open {BASES} ({e})") from None
        return self._array

    def _manifest_read(self, read):
        """read(), a read of the manifest; StoreError naming it when its bytes cannot be read."""
        try:
            return read()
        except Exception as e:  # missing, truncated or unreadable Parquet
            raise StoreError(self.path / MANIFEST, f"cannot read the manifest ({_first_line(e)})") from None

    def _manifest_rows(self) -> ManifestRows:
        # Opened again in each process: a forked DataLoader worker gets its own file handle and
        # row-group cache, an unpickled reader none until it reads.
        if self._rows is None or self._pid != os.getpid():
            import pyarrow.parquet as pq

            self._rows = ManifestRows(self._manifest_read(lambda: pq.ParquetFile(open_input(self.path / MANIFEST))))
            self._pid = os.getpid()
        return self._rows

    def _value(self, row: int, column: str):
        """Manifest column `column` (one of _ROW_COLUMNS) of row `row`, read with its row group."""
        rows = self._manifest_rows()
        return self._manifest_read(lambda: rows.rows_in(row, row + 1, _ROW_COLUMNS)).column(column)[0].as_py()

    @property
    def manifest(self):
        """The whole manifest (all rows, errors included), a pandas DataFrame, read on first use:
        for inspection. The reader itself never reads it (about 1 GB at ImageNet size)."""
        if self._manifest is None:
            import pyarrow.parquet as pq

            def read():
                with open_input(self.path / MANIFEST) as f:
                    return pq.read_table(f)
            self._manifest = self._manifest_read(read).to_pandas()
        return self._manifest

    def ok_column(self, name: str) -> list:
        """Manifest column `name` of the ok images, in store order (entry i is store[i]'s), read
        one row group at a time."""
        rows, out = self._manifest_rows(), []
        for g in range(len(rows.starts) - 1):
            lo, hi = np.searchsorted(self.ok_indices, rows.starts[g:g + 2])
            if hi > lo:
                group = self._manifest_read(lambda: rows.group(g, [name]))
                out += group.column(0).take(self.ok_indices[lo:hi] - rows.starts[g]).to_pylist()
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None        # zarr handles are reopened in the receiving process
        state["_checked"] = set()
        state["_shard_cache"] = (None, None)
        state["_rows"] = state["_pid"] = state["_manifest"] = None     # and so is the manifest
        return state

    def __len__(self) -> int:
        return len(self.ok_indices)

    def _row(self, i: int) -> int:
        n = len(self.ok_indices)
        if not -n <= i < n:
            raise IndexError(f"image {i} out of range for a store of {n} ok images")
        return int(self.ok_indices[i])

    def id(self, i: int) -> str:
        """The id (path relative to SRC, or as listed) of ok image i."""
        return str(self._value(self._row(i), "id"))

    def quantized(self, i: int) -> np.ndarray:
        """The stored uint8 bases (n+1, 3, H, W) of ok image i, [q_0, ..., q_n]."""
        return self._read(self._row(i))

    def layers(self, i: int) -> np.ndarray:
        """float32 layers (n+1, 3, H, W) of ok image i, generation order [B_n, D_n, ..., D_1]
        (`layer_names`; in a log-space store, of t(I): shards.layers_from_bases)."""
        return layers_from_bases(self.quantized(i), self.space)

    def _check_shard(self, k: int) -> None:
        """A shard file that is gone or not the size it was written with is refused by name:
        Zarr would read a missing shard as zeros. Checked once per shard per process (a stat, and
        the row group holding the shard's first row)."""
        if k in self._checked:
            return
        # Its file's size as written, from the shard's first row (null: no ok image, no file).
        what = shard_damage(self.path, k, self._value(k * self.shard_images, "shard_bytes") or 0)
        if what is not None:
            raise StoreError(shard_file(self.path, k), f"shard {k} is damaged ({what}); rerun the "
                                                      f"`nextdetail decompose-dataset` command that made the "
                                                      f"store to redo it")
        self._checked.add(k)

    def _read(self, row: int) -> np.ndarray:
        return self._decode(row, row)[0]

    def _decode(self, first: int, last: int) -> np.ndarray:
        """Rows first..last (one shard's) decoded; StoreError naming the shard file when it is
        gone, not its size, or its bytes fail the checksums."""
        k = first // self.shard_images
        self._check_shard(k)
        try:
            if is_url(self.path):
                lo = k * self.shard_images
                return self._remote_shard(k)[first - lo:last + 1 - lo]
            return np.asarray(self._bases()[first:last + 1])
        except Exception as e:  # zstd/crc32c/zarr raise ValueError, RuntimeError, ... for damaged bytes
            what = f"image {first} ({self._value(first, 'id')})" if first == last else f"images {first}..{last}"
            raise StoreError(shard_file(self.path, k), f"{what}: damaged shard, cannot decode it "
                                                      f"({_first_line(e)})") from None

    def _remote_shard(self, k: int) -> np.ndarray:
        """Shard k of a store on object storage, fetched whole with one GET and decoded in memory
        (Zarr would send a range request per image); the last one is kept, so reading a shard's
        images in order fetches it once."""
        if self._shard_cache[0] != k:
            data = read_bytes(shard_file(self.path, k)) if self._value(k * self.shard_images, "shard_bytes") else b""
            n = min(self.shard_images, self.meta["counts"]["images"] - k * self.shard_images)
            self._shard_cache = (k, decode_shard(data, self.shard_images, self.levels + 1, self.size)[:n])
        return self._shard_cache[1]

    @property
    def shard_starts(self) -> np.ndarray:
        """(n_shards + 1,) int64: the ok-image position where each shard's ok images start (shard k
        holds store[shard_starts[k]] .. store[shard_starts[k+1] - 1])."""
        return np.asarray(self._shard_starts, np.int64)

    def read_shard(self, k: int) -> Shard:
        """The ok images of shard k (0 <= k < n_shards), read with one sequential read of its file."""
        if not 0 <= k < self.n_shards:
            raise IndexError(f"shard {k} out of range for a store of {self.n_shards} shards")
        lo, hi = int(self._shard_starts[k]), int(self._shard_starts[k + 1])
        items = np.arange(lo, hi)
        return Shard(k, items, self.ok_indices[items], self.read_range(lo, hi))

    def read_range(self, lo: int, hi: int) -> np.ndarray:
        """The stored uint8 bases of ok images lo .. hi-1, (hi - lo, n+1, 3, H, W): one Zarr read
        per shard the range touches instead of one per image (what block readers such as
        export-tokens use)."""
        if not 0 <= lo <= hi <= len(self.ok_indices):
            raise IndexError(f"images {lo}..{hi - 1} out of range for a store of {len(self.ok_indices)} ok images")
        rows = self.ok_indices[lo:hi]
        out = np.empty((len(rows), self.levels + 1, 3, self.size, self.size), np.uint8)
        shards = rows // self.shard_images
        for k in np.unique(shards):
            sel = np.flatnonzero(shards == k)
            first = int(rows[sel[0]])
            out[sel] = self._decode(first, int(rows[sel[-1]]))[rows[sel] - first]
        return out

    def __getitem__(self, i: int) -> StoreItem:
        row = self._row(i)
        q = self._read(row)
        layers = layers_from_bases(q, self.space)
        bases = [np.moveaxis(b, 0, -1) / np.float32(255.0) for b in q]
        details = [np.moveaxis(layers[self.levels + 1 - k], 0, -1) for k in range(1, self.levels + 1)]
        return StoreItem(index=row, id=self._value(row, "id"), label=int(self.labels[i]),
                         class_name=self._value(row, "class_name"), image=bases[0], bases=bases, details=details,
                         layers=layers)

    def torch_dataset(self):
        """This store as a `torch.utils.data.Dataset` (PyTorch is imported only here).

        Item i: {"layers": float32 tensor (n+1, 3, H, W) in generation order, "label": int,
        "index": int (row in the store)}; layers.sum(0) is the image (to float32 rounding).
        """
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"DecompositionStore.torch_dataset needs PyTorch ({e}); "
                              "pip install torch") from None
        return _torch_dataset_class(torch)(self)


_TORCH_CLASS = None


def _torch_dataset_class(torch):
    """Define the Dataset subclass on first use, so importing this module never imports torch."""
    global _TORCH_CLASS
    if _TORCH_CLASS is None:
        class TorchDecompositionDataset(torch.utils.data.Dataset):
            def __init__(self, store: DecompositionStore):
                self.store = store

            def __len__(self):
                return len(self.store)

            def __getitem__(self, i):
                return {"layers": torch.from_numpy(self.store.layers(i)),
                        "label": int(self.store.labels[i]), "index": int(self.store.ok_indices[i])}

        _TORCH_CLASS = TorchDecompositionDataset
    return _TORCH_CLASS
