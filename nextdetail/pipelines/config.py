"""Typed settings of the dataset decomposition job and of the store it writes."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional

from ..decomp import ATParams
from ..decomp.at import BACKENDS
from ..imageio import DEFAULT_MAX_PIXELS
from .attempts import DEFAULT_MAX_ATTEMPTS


class ConfigError(ValueError):
    """A setting that parses but makes no sense; str is one line naming the setting."""


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

    def flat(self) -> dict:
        """One level of names, as the command line spells them (for difference messages)."""
        out = {"method": self.method, "order": self.order, "size": self.size,
               "backend": self.backend, "dtype": self.dtype}
        out.update({f.name.replace("_", "-"): getattr(self.params, f.name) for f in fields(ATParams)})
        return out

    def differences(self, other: "StoreParams", *, ignore: tuple = ()) -> List[str]:
        """'name A (store) != B (this run)' for every setting that differs, in a fixed order."""
        mine, theirs = self.flat(), other.flat()
        return [f"{k} {mine[k]!r} (store) != {theirs[k]!r} (this run)"
                for k in mine if k not in ignore and mine[k] != theirs[k]]

    @property
    def layer_names(self) -> List[str]:
        """Generation order, coarse to fine: B_n, D_n, ..., D_1."""
        n = self.order
        return [f"B_{n}"] + [f"D_{k}" for k in range(n, 0, -1)]


@dataclass(frozen=True)
class JobConfig:
    """Settings of `nextdetail decompose-dataset`.

    src             : folder of images (class sub-folders give labels) or a .txt/.parquet listing.
    out             : the store folder.
    size            : square side of every stored image (shorter side resized, center-cropped).
    order           : levels n; the store holds n + 1 layers per image.
    params          : AT solver parameters.
    backend         : auto (cupy when the workers get GPUs, else numba), numba, numpy or cupy.
    address         : None starts a local Ray for this command; "auto" or "ray://host:port"
                      joins a running cluster.
    workers         : actors in the pool; None = one per CPU (numba) or per G GPUs (cupy).
    gpus_per_worker : GPUs per actor; None = 1 when the cluster has GPUs and the backend
                      is auto or cupy, else 0.
    batch_size      : images per solver call (and per manifest part file).
    overwrite       : replace an existing store made with other parameters or sources.
    num_cpus        : logical CPUs of the local Ray (None: max(os.cpu_count(), workers)).
    max_pixels      : an image with more pixels (width x height, read from its header) is an
                      error row, never decoded: decompression bombs cannot exhaust memory.
    max_attempts    : an image that killed its worker process this many times is an error row
                      (Ray would otherwise retry it forever).
    """

    src: Path
    out: Path
    size: int = 256
    order: int = 3
    params: ATParams = field(default_factory=ATParams)
    backend: str = "auto"
    address: Optional[str] = None
    workers: Optional[int] = None
    gpus_per_worker: Optional[float] = None
    batch_size: int = 8
    overwrite: bool = False
    num_cpus: Optional[int] = None
    method: str = "base_detail"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def __post_init__(self):
        object.__setattr__(self, "src", Path(self.src))
        object.__setattr__(self, "out", Path(self.out))
        if int(self.size) != self.size or self.size < 1:
            raise ConfigError(f"--size must be an integer >= 1, got {self.size!r}")
        if int(self.order) != self.order or self.order < 1:
            raise ConfigError(f"--order must be an integer >= 1, got {self.order!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.workers is not None and (int(self.workers) != self.workers or self.workers < 1):
            raise ConfigError(f"--workers must be an integer >= 1, got {self.workers!r}")
        if self.gpus_per_worker is not None and not self.gpus_per_worker >= 0:
            raise ConfigError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker!r}")
        if self.gpus_per_worker and self.backend in ("numba", "numpy"):
            raise ConfigError(f"--gpus-per-worker {self.gpus_per_worker} needs the cupy backend, "
                              f"not {self.backend!r}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ConfigError(f"--batch-size must be an integer >= 1, got {self.batch_size!r}")
        if self.num_cpus is not None and (int(self.num_cpus) != self.num_cpus or self.num_cpus < 1):
            raise ConfigError(f"num_cpus must be an integer >= 1, got {self.num_cpus!r}")
        for name in ("max_pixels", "max_attempts"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.num_cpus is not None and self.address is not None:
            raise ConfigError("num_cpus applies to the local Ray only; a cluster has its own")

    def store_params(self, backend: str) -> StoreParams:
        """The store parameters of this job once `backend` is resolved (not auto)."""
        return StoreParams(order=int(self.order), size=int(self.size), params=self.params,
                           backend=backend, method=self.method)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["src"], d["out"] = str(self.src), str(self.out)
        return d
