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
to t(I) in [0, 1] (shards.layers_from_bases). The reader (`DecompositionStore`) refuses incomplete stores, stores of another
format version (format 1: float16 layers, nextdetail <= 0.2) and damaged shards with a one-line
`StoreError`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

from ..decomp import ATParams, method_info
from ..errors import PathError
from ..options import differences
from .atomic import PARTS
from .meta import check_keys
from .shards import BASES, DTYPE, SHARD_IMAGES, layers_from_bases, shard_count, shard_file

FORMAT = "nextdetail.decomposition_store"
FORMAT_VERSION = 2
LAYERS_V1 = "layers.zarr"      # format 1's array (float16 layers, one file per image)

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
              "shard_images": int, "counts": dict}
_COUNT_KEYS = ("images", "ok", "error")


NO_LABEL = -1


@dataclass(frozen=True, slots=True)      # slots: a million of them in the driver
class Source:
    """One image of the job. index is its row in the store, path what workers open: the image
    file, or the shard (Parquet file, tar) that holds it as `member` (row number or key).
    problem: why it cannot be used, when listing already knows (an error row, never read)."""

    index: int
    id: str
    path: str
    label: int = NO_LABEL
    class_name: Optional[str] = None
    member: Union[int, str, None] = None
    problem: Optional[str] = None


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
    shard_images: int = SHARD_IMAGES
    dtype: str = DTYPE

    def to_dict(self) -> dict:
        return {"method": self.method, "order": self.order, "size": self.size,
                "backend": self.backend, "dtype": self.dtype, "shard_images": self.shard_images,
                "at": self.params.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "StoreParams":
        return cls(order=int(d["order"]), size=int(d["size"]), params=ATParams(**d["at"]),
                   backend=str(d["backend"]), method=str(d["method"]), dtype=str(d["dtype"]),
                   shard_images=int(d["shard_images"]))

    @property
    def levels(self) -> int:
        """n: the store holds n + 1 bases per image. The order, except for a method with one
        factor pair whatever its order (intrinsic: order is its shading's smoothing levels)."""
        return method_info(self.method).levels(self.order)

    def layer_names(self) -> List[str]:
        """Generation order under the method's names: [B_3, D_3, D_2, D_1], [S_1, A_1], ..."""
        return method_info(self.method).layer_names(self.levels)

    def shards(self, n_images: int) -> int:
        """How many shards a store of n_images has."""
        return shard_count(n_images, self.shard_images)

    def differences(self, other: "StoreParams", *, ignore: tuple = ()) -> List[str]:
        """'name A (store) != B (this run)' for every setting that differs, named as the command
        line spells it, in a fixed order."""
        return differences(self, other, ignore=ignore, labels=("store", "this run"), flatten=True, value=repr)


def source_name(row: dict) -> str:
    """Where a manifest row's image came from: its file, or "<shard>#<row or key>"."""
    return row["path"] if not row.get("member") else f"{row['path']}#{row['member']}"


def run_parts(store, run: int) -> Path:
    """The journal folder of run `run` of a store being written (see decomposition_writer.py)."""
    return Path(store) / PARTS / f"run-{run:04d}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# Row group g of manifest.parquet holds the rows of shards g*G .. g*G+G-1 (G = this), whole
# shards, so a shard's rows are read with one row group. Not one row group per shard: Parquet
# keeps ~1.7 KB of metadata per column chunk in the writer's and reader's memory, which at one
# group per 64 images is ~0.5 KB per image (0.5 GB at a million).
MANIFEST_GROUP_SHARDS = 64


def manifest_schema(levels: int):
    """The pyarrow schema of manifest.parquet (and of every journal part) for `levels` levels
    (energy_k, iterations_k: level k's AT energy and sweeps; null for a method without AT).
    Its row groups hold MANIFEST_GROUP_SHARDS whole shards each."""
    import pyarrow as pa

    fields = [("index", pa.int64()), ("id", pa.string()), ("path", pa.string()), ("member", pa.string()),
              ("label", pa.int64()), ("class_name", pa.string()), ("problem", pa.string()),
              ("status", pa.string()), ("error", pa.string())]
    fields += [(f"energy_{k}", pa.float64()) for k in range(1, levels + 1)]
    fields += [(f"iterations_{k}", pa.int64()) for k in range(1, levels + 1)]
    fields += [("shard_bytes", pa.int64()), ("seconds", pa.float64()), ("backend", pa.string()),
               ("worker_host", pa.string()), ("worker_pid", pa.int64())]
    return pa.schema(fields)


def format_refusal(path, version, meta: dict) -> str:
    """The one line refusing a store of another format version, saying how to rebuild it."""
    src = meta.get("src") or "SRC"
    written = f"written by nextdetail {meta.get('nextdetail_version', '?')}"
    what = "float16 layers, one file per image; " if version == 1 else ""
    return (f"store format version {version!r} ({what}{written}); this nextdetail reads and writes "
            f"version {FORMAT_VERSION} only: rebuild it with `nextdetail decompose-dataset {src} --out "
            f"{path} --overwrite` and the same parameters")


def read_meta(path) -> dict:
    """meta.json of a store, checked: StoreError if missing (incomplete) or of another format."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(path, "no such store (not a folder)")
    meta_file = path / META
    if not meta_file.is_file():
        if (path / BASES).exists() or (path / LAYERS_V1).exists():
            raise StoreError(path, "incomplete store (no meta.json): its job has not finished; rerun "
                                   "the same `nextdetail decompose-dataset` command to complete it")
        raise StoreError(path, f"not a decomposition store (no meta.json, no {BASES})")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(meta_file, f"cannot read it as JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(path, f"meta.json does not describe a {FORMAT}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(path, format_refusal(path, version, meta))
    check_keys(meta, meta_file, _META_KEYS, StoreError)
    check_keys(meta["counts"], meta_file, dict.fromkeys(_COUNT_KEYS, int), StoreError, prefix="counts.")
    for key in ("order", "size", "shard_images"):
        if meta[key] < 1:
            raise StoreError(meta_file, f"'{key}' is {meta[key]}, must be >= 1")
    return meta


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
    manifest (all rows, errors included) is `store.manifest`, a pandas DataFrame.
    Picklable (the Zarr array is reopened lazily), so DataLoader workers can share it.
    Whole shards (`n_shards`, `read_shard(k)`) are the fast path for loaders that stream.
    """

    def __init__(self, path):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.meta = read_meta(self.path)
        try:
            table = pq.read_table(self.path / MANIFEST)
        except Exception as e:  # missing, truncated or unreadable Parquet
            raise StoreError(self.path / MANIFEST, f"cannot read the manifest ({_first_line(e)})") from None
        missing = [c for c in ("index", "id", "label", "class_name", "status", "shard_bytes")
                   if c not in table.column_names]
        if missing:
            raise StoreError(self.path / MANIFEST, f"lacks the column(s) {', '.join(missing)}")
        self.manifest = table.to_pandas()
        n = self.meta["counts"]["images"]
        if len(self.manifest) != n or not (self.manifest["index"].to_numpy() == np.arange(n)).all():
            raise StoreError(self.path / MANIFEST, f"has {len(self.manifest)} rows, not rows 0..{n - 1} "
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
        ok = (self.manifest["status"] == STATUS_OK).to_numpy()
        self.ok_indices = self.manifest["index"].to_numpy()[ok]
        self._ids = self.manifest["id"].tolist()
        self._labels = self.manifest["label"].to_numpy()
        self.labels = self._labels[self.ok_indices]     # label of store[i] (-1: none)
        self._classes = self.manifest["class_name"].tolist()
        # Per shard: its file's size as written (0: no ok image, no file) and its ok items.
        self._shard_bytes = self.manifest["shard_bytes"].fillna(0).to_numpy()[::self.shard_images].astype(np.int64)
        self._shard_starts = np.searchsorted(self.ok_indices, np.arange(self.n_shards + 1) * self.shard_images)
        self._array = None
        self._checked: set = set()
        shape = tuple(self._bases().shape)
        want = (n, self.levels + 1, 3, self.size, self.size)
        if shape != want:
            raise StoreError(self.path, f"{BASES} has shape {shape}, meta.json implies {want}")

    def _bases(self):
        if self._array is None:
            import zarr
            try:
                self._array = zarr.open_array(self.path / BASES, mode="r")
            except Exception as e:  # zarr raises several types for a missing/broken array
                raise StoreError(self.path, f"cannot open {BASES} ({e})") from None
        return self._array

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None        # zarr handles are reopened in the receiving process
        state["_checked"] = set()
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

    def quantized(self, i: int) -> np.ndarray:
        """The stored uint8 bases (n+1, 3, H, W) of ok image i, [q_0, ..., q_n]."""
        return self._read(self._row(i))

    def layers(self, i: int) -> np.ndarray:
        """float32 layers (n+1, 3, H, W) of ok image i, generation order [B_n, D_n, ..., D_1]
        (`layer_names`; in a log-space store, of t(I): shards.layers_from_bases)."""
        return layers_from_bases(self.quantized(i), self.space)

    def _check_shard(self, k: int) -> None:
        """A shard file that is gone or not the size it was written with is refused by name:
        Zarr would read a missing shard as zeros. Checked once per shard per process (a stat)."""
        if k in self._checked:
            return
        path = shard_file(self.path, k)
        want = int(self._shard_bytes[k])
        have = path.stat().st_size if path.is_file() else None
        if have != want:
            what = "missing shard file" if have is None else f"{have} bytes, written with {want}"
            raise StoreError(path, f"shard {k} is damaged ({what}); rerun the `nextdetail decompose-dataset` "
                                   f"command that made the store to redo it")
        self._checked.add(k)

    def _read(self, row: int) -> np.ndarray:
        return self._decode(row, row)[0]

    def _decode(self, first: int, last: int) -> np.ndarray:
        """Rows first..last (one shard's) decoded; StoreError naming the shard file when it is
        gone, not its size, or its bytes fail the checksums."""
        k = first // self.shard_images
        self._check_shard(k)
        try:
            return np.asarray(self._bases()[first:last + 1])
        except Exception as e:  # zstd/crc32c/zarr raise ValueError, RuntimeError, ... for damaged bytes
            what = f"image {first} ({self._ids[first]})" if first == last else f"images {first}..{last}"
            raise StoreError(shard_file(self.path, k), f"{what}: damaged shard, cannot decode it "
                                                      f"({_first_line(e)})") from None

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
        return StoreItem(index=row, id=self._ids[row], label=int(self._labels[row]),
                         class_name=self._classes[row], image=bases[0], bases=bases, details=details,
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
