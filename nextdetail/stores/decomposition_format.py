"""The decomposition store's names, parameters and row types: what its writer and reader share.

The contract these describe (files, layout, manifest columns) is documented in decomposition.py,
beside the reader; the writer's protocol (creation, journal, commit, finish) in shard_journal.py.
Kept apart from both so that the writer's modules and the reader import one definition of each
name without importing each other.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from ..decomp import ATParams, method_info
from ..errors import PathError
from ..storage import as_path
from .atomic import PARTS
from .journal import differences
from .meta import check_keys
from .shards import BASES, DTYPE, SHARD_IMAGES, shard_count

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
    file, or the source file (Parquet, tar) that holds it as `member` (row number or key).
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
    at: ATParams                # the solver's parameters (meta.json's "at")
    backend: str
    method: str = "base_detail"
    shard_images: int = SHARD_IMAGES
    dtype: str = DTYPE

    def to_dict(self) -> dict:
        return {"method": self.method, "order": self.order, "size": self.size,
                "backend": self.backend, "dtype": self.dtype, "shard_images": self.shard_images,
                "at": self.at.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "StoreParams":
        return cls(order=int(d["order"]), size=int(d["size"]), at=ATParams.from_dict(d["at"]),
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
        """'--name A (store) != B (this run)' for every setting that differs, named as the command
        line spells it, in a fixed order."""
        # Every field is decompose-dataset's option of the same name (dtype never differs).
        return differences(self, other, ignore=ignore, labels=("store", "this run"), flatten=True, value=repr,
                           spell=lambda cls, key: "--" + key.replace("_", "-"))


def source_name(row: dict) -> str:
    """Where a manifest row's image came from: its file, or "<source file>#<row or key>"."""
    return row["path"] if not row.get("member") else f"{row['path']}#{row['member']}"


def run_parts(store, run: int) -> Path:
    """The journal folder of run `run` of a store being written (see shard_journal.py)."""
    return as_path(store) / PARTS / f"run-{run:04d}"


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
    path = as_path(path)
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
