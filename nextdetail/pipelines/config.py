"""Typed settings of the dataset decomposition job and of the store it writes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import os
from typing import Optional, Tuple

from ..decomp import ATParams
from ..decomp.at import BACKENDS
from ..decomp.hierarchy import decomposition_bytes
from ..decomp.files import method_opt
from ..errors import ConfigError
from ..imageio import DEFAULT_MAX_PIXELS
from ..limits import Need, check_max_memory, check_memory, memory_opt
from ..options import check_int, nested, opt
from ..storage import as_path
from ..stores.decomposition_format import StoreParams
from ..stores.shards import SHARD_IMAGES
from .attempts import DEFAULT_MAX_ATTEMPTS
from .source_files import SourceFileOptions


@dataclass(frozen=True, kw_only=True)
class RayJobConfig:
    """What every Ray job of nextdetail takes (decompose-dataset, export-tokens): where it runs,
    how many actors, how often a dying input is retried, whether an old output is replaced.
    num_cpus is for tests and benchmarks (logical CPUs of the local Ray), not an option."""

    address: Optional[str] = opt(None, "join a Ray cluster ('auto' or ray://host:port); default: start a "
                                       "local Ray", metavar="ADDR")
    workers: Optional[int] = opt(None, "Ray actors (default: one per CPU, or one per G GPUs); at most one per "
                                       "unit of work (decompose-dataset: a store shard of --shard-images "
                                       "images; export-tokens: a block of --block-rows images)", metavar="N", ge=1)
    gpus_per_worker: Optional[float] = opt(None, "GPUs per actor (default 1 when the cluster has GPUs, else 0)",
                                           metavar="G", ge=0)
    max_attempts: int = opt(DEFAULT_MAX_ATTEMPTS, "an input whose worker process died K times is given up "
                                                  "on, so that the job ends", metavar="K", ge=1)
    overwrite: bool = opt(False, "replace an output made from other inputs or with other parameters "
                                 "(only ever an output of this command)")
    max_memory: Optional[str] = memory_opt()
    num_cpus: Optional[int] = None

    def __post_init__(self):
        check_int("workers", self.workers, optional=True)
        check_int("max_attempts", self.max_attempts)
        if self.gpus_per_worker is not None and not self.gpus_per_worker >= 0:
            raise ConfigError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker!r}")
        if self.num_cpus is not None and (int(self.num_cpus) != self.num_cpus or self.num_cpus < 1):
            raise ConfigError(f"num_cpus must be an integer >= 1, got {self.num_cpus!r}")
        if self.num_cpus is not None and self.address is not None:
            raise ConfigError("num_cpus applies to the local Ray only; a cluster has its own")
        check_max_memory(self.max_memory)

    def local_workers(self) -> int:
        """The actors a local Ray gets (resolve_workers' default: one per CPU)."""
        return int(self.workers or self.num_cpus or os.cpu_count() or 1)

    def check_memory(self, per_worker, workers: int, node: Optional[Tuple[int, str]] = None) -> None:
        """Refuse (MemoryRefusal) a job whose actors cannot fit: `workers` actors of `per_worker`
        Needs on this machine, or one actor on a cluster node of `node` (bytes, name)."""
        if node is None:
            scaled = [Need(n.option, f"{n.what} x {workers} workers", n.bytes * workers) for n in per_worker]
            check_memory(scaled, max_memory=self.max_memory)
        else:
            if node[0] > 0:             # Ray reports no memory resource for some nodes
                check_memory(per_worker, max_memory=self.max_memory or str(node[0]), per=f"per worker ({node[1]})")


@dataclass(frozen=True, kw_only=True)
class DecomposeDatasetConfig(RayJobConfig):
    """Settings of `nextdetail decompose-dataset` (and the RayJobConfig ones).

    backend 'auto' is cupy when the workers get GPUs, else numba; gpus_per_worker None is 1
    when the cluster has GPUs and the backend is auto or cupy, else 0.
    """

    src: Path = opt(help="folder of images (class sub-folders give labels) or a .txt/.parquet listing",
                    positional=True, metavar="SRC")
    out: Path = opt(help="store folder", metavar="STORE")
    size: int = opt(256, "shorter side resized to N (LANCZOS), center-cropped N x N", metavar="N", ge=1)
    order: int = opt(3, "levels n; the store holds n + 1 bases per image (B_0 = I .. B_n); intrinsic: AT "
                        "levels of the shading, 2 bases (I, S)", ge=1)
    params: ATParams = nested(ATParams)
    backend: str = opt("auto", "auto = cupy on GPU workers, else numba", choices=BACKENDS)
    batch_size: int = opt(8, "images per solver call", metavar="B", ge=1)
    shard_images: int = opt(SHARD_IMAGES, "images per shard file of the store (one Ray task writes one "
                                          "shard); 64 is ~25 MB at 256 px, order 3", metavar="M", ge=1)
    max_pixels: int = opt(DEFAULT_MAX_PIXELS, "an image whose header declares more pixels is an error row, "
                                              "never decoded (decompression bombs)", metavar="P", ge=1)
    image_column: str = opt("image", "Parquet files: the column holding the encoded images (a "
                                     "{bytes, path} struct as Hugging Face writes it, or binary)", metavar="NAME")
    label_column: str = opt("label", "Parquet files: the integer label column (absent: no labels)", metavar="NAME")
    class_names: Optional[Path] = opt(None, "a file with one class name per line, in label order (default: "
                                            "the Parquet files' ClassLabel names, if any)", metavar="FILE")
    label_key: str = opt("cls", "WebDataset tars: the member extension holding the integer label as text",
                         metavar="EXT")
    method: str = method_opt()

    def __post_init__(self):
        super().__post_init__()
        # a path, or a URL of object storage (nextdetail.storage)
        object.__setattr__(self, "src", as_path(self.src))
        object.__setattr__(self, "out", as_path(self.out))
        for name in ("size", "order", "batch_size", "shard_images", "max_pixels"):
            check_int(name, getattr(self, name))
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.gpus_per_worker and self.backend in ("numba", "numpy"):
            raise ConfigError(f"--gpus-per-worker {self.gpus_per_worker} needs the cupy backend, "
                              f"not {self.backend!r}")

    def memory_needs(self) -> list:
        """What one actor holds: a solver batch at --size and the shard it writes whole."""
        S, n = int(self.size), int(self.order)
        return [Need(f"--size {S}", f"the AT solve of {self.batch_size} images at {S} x {S} px",
                     decomposition_bytes(S, n, int(self.batch_size))),
                Need(f"--size {S}", f"a shard of {self.shard_images} images", self.shard_images * 3 * S * S * (n + 2))]

    def source_file_options(self) -> SourceFileOptions:
        """How to read Parquet and tar source files; ConfigError naming --class-names if unreadable."""
        names = None
        if self.class_names is not None:
            try:
                lines = as_path(self.class_names).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"--class-names {self.class_names}: cannot read it ({e})") from None
            names = tuple(line.strip() for line in lines if line.strip())
        return SourceFileOptions(image_column=self.image_column, label_column=self.label_column, class_names=names,
                            label_key=self.label_key.lstrip("."))

    def store_params(self, backend: str) -> StoreParams:
        """The store parameters of this job once `backend` is resolved (not auto)."""
        return StoreParams(order=int(self.order), size=int(self.size), at=self.params,
                           backend=backend, method=self.method, shard_images=int(self.shard_images))
