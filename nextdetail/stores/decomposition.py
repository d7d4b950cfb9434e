"""The decomposition store: a public, documented on-disk contract, and its reader.

    STORE/layers.zarr       float16 (N, n+1, 3, H, W), Zarr v3, chunk (1, n+1, 3, H, W):
                            image i's layers in generation order [B_n, D_n, ..., D_1].
                            Rows of images that failed hold the fill value NaN.
    STORE/manifest.parquet  one row per source image, sorted by index (manifest_schema).
    STORE/meta.json         parameters, layer order, counts, versions. Written last: a
                            store without it is incomplete (a job is running or died).
    STORE/_parts/           the job's journal (per-batch manifest rows); gone when complete.

I = B_n + D_n + ... + D_1, and B_(k-1) = B_k + D_k, so every base is a partial sum of
layers. The reader (`DecompositionStore`) refuses incomplete stores and stores of another
format version with a one-line `StoreError`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..decomp import ATParams
from ..errors import PathError
from ..options import differences
from .atomic import PARTS
from .meta import check_keys

FORMAT = "nextdetail.decomposition_store"
FORMAT_VERSION = 1

LAYERS = "layers.zarr"
MANIFEST = "manifest.parquet"
META = "meta.json"

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_PENDING = "pending"     # only in incomplete stores: not processed yet

# Columns of the manifest that depend on when and where an image ran, not on what it is:
# everything else is the same for an interrupted-and-resumed run as for an uninterrupted one.
RUN_DEPENDENT_COLUMNS = ("seconds", "worker_host", "worker_pid")


class StoreError(PathError):
    """A store that cannot be used as asked; str is one line "<STORE or its file>: <reason>"."""


# What readers use of meta.json: key -> (type, check). A store whose meta.json is edited or
# damaged is refused naming the key, instead of failing later in a traceback.
_META_KEYS = {"method": str, "order": int, "size": int, "backend": str, "at": dict, "dtype": str,
              "counts": dict}
_COUNT_KEYS = ("images", "ok", "error")


NO_LABEL = -1


@dataclass(frozen=True)
class Source:
    """One image of the job. index is its row in the store, path what workers open."""

    index: int
    id: str
    path: str
    label: int = NO_LABEL
    class_name: Optional[str] = None


STORE_DTYPE = "float16"


@dataclass(frozen=True)
class StoreParams:
    """Everything that decides the bytes of a store: a rerun must ask for exactly these.

    backend is the resolved solver (numba, cupy or numpy, never auto): backends agree only
    to float32 rounding, so mixing two in one store would break byte-for-byte resumes.
    """

    order: int
    size: int
    params: ATParams
    backend: str
    method: str = "base_detail"
    dtype: str = STORE_DTYPE

    def to_dict(self) -> dict:
        return {"method": self.method, "order": self.order, "size": self.size,
                "backend": self.backend, "dtype": self.dtype, "at": self.params.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "StoreParams":
        return cls(order=int(d["order"]), size=int(d["size"]), params=ATParams(**d["at"]),
                   backend=str(d["backend"]), method=str(d["method"]), dtype=str(d["dtype"]))

    def differences(self, other: "StoreParams", *, ignore: tuple = ()) -> List[str]:
        """'name A (store) != B (this run)' for every setting that differs, named as the command
        line spells it, in a fixed order."""
        return differences(self, other, ignore=ignore, labels=("store", "this run"), flatten=True, value=repr)


def run_parts(store, run: int) -> Path:
    """The journal folder of run `run` of a store being written (see decomposition_writer.py)."""
    return Path(store) / PARTS / f"run-{run:04d}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def layer_names(order: int) -> List[str]:
    """Generation order, coarse to fine: B_n, D_n, ..., D_1."""
    return [f"B_{order}"] + [f"D_{k}" for k in range(order, 0, -1)]


def manifest_schema(order: int):
    """The pyarrow schema of manifest.parquet (and of every journal part) for `order` levels."""
    import pyarrow as pa

    fields = [("index", pa.int64()), ("id", pa.string()), ("path", pa.string()),
              ("label", pa.int64()), ("class_name", pa.string()), ("status", pa.string()),
              ("error", pa.string())]
    fields += [(f"energy_{k}", pa.float64()) for k in range(1, order + 1)]
    fields += [(f"iterations_{k}", pa.int64()) for k in range(1, order + 1)]
    fields += [("seconds", pa.float64()), ("backend", pa.string()), ("worker_host", pa.string()),
               ("worker_pid", pa.int64())]
    return pa.schema(fields)


def read_meta(path) -> dict:
    """meta.json of a store, checked: StoreError if missing (incomplete) or of another format."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(path, "no such store (not a folder)")
    meta_file = path / META
    if not meta_file.is_file():
        if (path / LAYERS).exists():
            raise StoreError(path, "incomplete store (no meta.json): its job has not finished; rerun "
                                   "the same `nextdetail decompose-dataset` command to complete it")
        raise StoreError(path, "not a decomposition store (no meta.json, no layers.zarr)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(meta_file, f"cannot read it as JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(path, f"meta.json does not describe a {FORMAT}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(path, f"store format version {version!r} (written by nextdetail "
                               f"{meta.get('nextdetail_version', '?')}); this nextdetail reads "
                               f"version {FORMAT_VERSION} only")
    check_keys(meta, meta_file, _META_KEYS, StoreError)
    check_keys(meta["counts"], meta_file, dict.fromkeys(_COUNT_KEYS, int), StoreError, prefix="counts.")
    for key in ("order", "size"):
        if meta[key] < 1:
            raise StoreError(meta_file, f"'{key}' is {meta[key]}, must be >= 1")
    return meta


@dataclass
class StoreItem:
    """One image of a store. Arrays are float32 (H, W, 3) unless said otherwise.

    image   : I = B_n + D_n + ... + D_1 (equals B_0)
    bases   : [B_0, B_1, ..., B_n]
    details : [D_1, ..., D_n], D_1 finest
    layers  : the stored float16 (n+1, 3, H, W), generation order [B_n, D_n, ..., D_1]
    """

    index: int
    id: str
    label: int
    class_name: Optional[str]
    image: np.ndarray
    bases: List[np.ndarray]
    details: List[np.ndarray]
    layers: np.ndarray


def layers_to_item(layers: np.ndarray) -> tuple:
    """(n+1, 3, H, W) generation-order layers -> (image, bases [B_0..B_n], details [D_1..D_n])."""
    hwc = np.moveaxis(np.asarray(layers, dtype=np.float32), 1, -1)     # (n+1, H, W, 3)
    n = hwc.shape[0] - 1
    details = [hwc[n + 1 - k] for k in range(1, n + 1)]                  # layers[n] is D_1
    bases = [hwc[0]]                                                     # B_n
    for k in range(n, 0, -1):                                            # B_(k-1) = B_k + D_k
        bases.append(bases[-1] + details[k - 1])
    bases.reverse()
    return bases[0], bases, details


class DecompositionStore:
    """Read a finished store: `len(store)` ok images, `store[i]` -> StoreItem.

    Only images with status ok are indexed (i = 0 .. len - 1, in store order); the
    manifest (all rows, errors included) is `store.manifest`, a pandas DataFrame.
    Picklable (the Zarr array is reopened lazily), so DataLoader workers can share it.
    """

    def __init__(self, path):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.meta = read_meta(self.path)
        try:
            table = pq.read_table(self.path / MANIFEST)
        except Exception as e:  # missing, truncated or unreadable Parquet
            raise StoreError(self.path / MANIFEST, f"cannot read the manifest ({_first_line(e)})") from None
        missing = [c for c in ("index", "id", "label", "class_name", "status") if c not in table.column_names]
        if missing:
            raise StoreError(self.path / MANIFEST, f"lacks the column(s) {', '.join(missing)}")
        self.manifest = table.to_pandas()
        n = self.meta["counts"]["images"]
        if len(self.manifest) != n or not (self.manifest["index"].to_numpy() == np.arange(n)).all():
            raise StoreError(self.path / MANIFEST, f"has {len(self.manifest)} rows, not rows 0..{n - 1} "
                                                   f"of meta.json's {n} images")
        self.order = self.meta["order"]
        self.size = self.meta["size"]
        ok = (self.manifest["status"] == STATUS_OK).to_numpy()
        self.ok_indices = self.manifest["index"].to_numpy()[ok]
        self._ids = self.manifest["id"].tolist()
        self._labels = self.manifest["label"].to_numpy()
        self.labels = self._labels[self.ok_indices]     # label of store[i] (-1: none)
        self._classes = self.manifest["class_name"].tolist()
        self._array = None
        shape = tuple(self._layers().shape)
        want = (n, self.order + 1, 3, self.size, self.size)
        if shape != want:
            raise StoreError(self.path, f"{LAYERS} has shape {shape}, meta.json implies {want}")

    def _layers(self):
        if self._array is None:
            import zarr
            try:
                self._array = zarr.open_array(self.path / LAYERS, mode="r")
            except Exception as e:  # zarr raises several types for a missing/broken array
                raise StoreError(self.path, f"cannot open {LAYERS} ({e})") from None
        return self._array

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None        # zarr handles are reopened in the receiving process
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
        return str(self._ids[self._row(i)])

    def layers(self, i: int) -> np.ndarray:
        """The stored float16 (n+1, 3, H, W) of ok image i, generation order."""
        return self._read(self._row(i))

    def _read(self, row: int) -> np.ndarray:
        """Chunk `row`, decoded; StoreError naming the chunk file when it is damaged or gone."""
        array = self._layers()
        try:
            layers = np.asarray(array[row])
        except Exception as e:  # zstd/zarr raise RuntimeError, ValueError, ... for damaged bytes
            raise StoreError(self._chunk_file(row), f"image {row} ({self._ids[row]}): damaged chunk, "
                                                    f"cannot decode it ({_first_line(e)})") from None
        # An ok image is never NaN (the solver's output is finite); the array's fill value is
        # NaN, which is what a missing chunk file reads as.
        if np.isnan(layers).any():
            what = "missing chunk file" if not self._chunk_file(row).exists() else "chunk holds NaN"
            raise StoreError(self._chunk_file(row), f"image {row} ({self._ids[row]}) is ok in the "
                                                    f"manifest but its layers are not there ({what})")
        return layers

    def _chunk_file(self, row: int) -> Path:
        key = self._layers().metadata.chunk_key_encoding.encode_chunk_key((row, 0, 0, 0, 0))
        return self.path / LAYERS / key

    def __getitem__(self, i: int) -> StoreItem:
        row = self._row(i)
        layers = self._read(row)
        image, bases, details = layers_to_item(layers)
        return StoreItem(index=row, id=self._ids[row], label=int(self._labels[row]),
                         class_name=self._classes[row], image=image, bases=bases, details=details,
                         layers=layers)

    def torch_dataset(self):
        """This store as a `torch.utils.data.Dataset` (PyTorch is imported only here).

        Item i: {"layers": float32 tensor (n+1, 3, H, W) in generation order, "label": int,
        "index": int (row in the store)}; layers.sum(0) is the image.
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
                layers = self.store.layers(i)
                return {"layers": torch.from_numpy(layers.astype(np.float32)),
                        "label": int(self.store.labels[i]), "index": int(self.store.ok_indices[i])}

        _TORCH_CLASS = TorchDecompositionDataset
    return _TORCH_CLASS
