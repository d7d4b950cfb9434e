"""Decompose image files into folders of layers: the `nextdetail decompose` command.

    cfg = DecomposeConfig(inputs=["photos/"], out="out/", size=256)
    report = decompose_files(cfg, on_failure=print)     # out/<name>/base_k.npy, detail_k.npy, ...

Images go to the solver one at a time, or `batch_size` at a time when `size` makes them the
same shape. A bad input is reported once through `on_failure` and the run goes on.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..errors import ConfigError, NextDetailError
from ..imageio import ImageError, list_images, load_image, save_png, to_uint8
from ..limits import Need, check_max_memory, check_memory, memory_opt
from ..options import check_int, nested, opt
from ..stores.atomic import atomic_write, write_bytes_atomic
from ..viz import contact_sheet, detail_scale, detail_to_uint8
from .at import BACKENDS, resolve_backend, to_host
from .hierarchy import Decomposition, available_decompositions, decompose, decomposition_bytes, method_info
from .logspace import from_log
from .params import ATParams

log = logging.getLogger(__name__)


class NoImages(NextDetailError):
    """The inputs hold no image file: nothing done, exit status 1 (as for images that failed)."""

    exit_status = 1


def method_opt():
    """The --method option of `decompose` and `decompose-dataset` (one field, written once)."""
    names = available_decompositions()
    return opt("base_detail", "decomposition: " + "; ".join(f"{m} ({method_info(m).summary})" for m in names),
               choices=tuple(names))


@dataclass(frozen=True)
class DecomposeConfig:
    """Settings of `nextdetail decompose`; validated on construction (ConfigError)."""

    inputs: Tuple[str, ...] = opt(help="image files or folders (searched recursively)", positional=True,
                                  nargs="+", metavar="INPUT", type=str)
    out: Path = opt(help="output folder; one sub-folder per image", metavar="DIR")
    method: str = method_opt()
    order: int = opt(3, "levels n", ge=1)
    params: ATParams = nested(ATParams)
    backend: str = opt("auto", "auto = cupy with a GPU, else numba (numpy if numba is unavailable)",
                       choices=BACKENDS)
    size: Optional[int] = opt(None, "resize shorter side to N and center-crop N x N (enables batching)",
                              metavar="N", ge=1)
    batch_size: int = opt(8, "images per solver call with --size", metavar="B", ge=1)
    max_memory: Optional[str] = memory_opt()

    def __post_init__(self):
        check_max_memory(self.max_memory)
        object.__setattr__(self, "inputs", tuple(str(i) for i in self.inputs))
        object.__setattr__(self, "out", Path(self.out))
        check_int("order", self.order)
        check_int("size", self.size, optional=True)
        check_int("batch_size", self.batch_size)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} exists and is not a folder")


@dataclass
class DecomposeReport:
    """What a run did: output folder per finished image, failure lines, timing, energies."""

    written: List[Path] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)
    seconds: float = 0.0
    energies: List[float] = field(default_factory=list)   # per image: mean over levels
    sweeps: List[List[int]] = field(default_factory=list)  # per image: AT sweeps of each level

    def summary(self, out: Path) -> str:
        ok, bad = len(self.written), len(self.failures)
        rate = ok / self.seconds if self.seconds > 0 else 0.0
        energy = f"{np.mean(self.energies):.6g}" if self.energies else "n/a"
        return (f"{ok} images ok, {bad} failed, {self.seconds:.1f} s, {rate:.2f} images/s, "
                f"mean AT energy {energy}, {mean_sweeps_text(self.sweeps)}; output in {out}")


def mean_sweeps_text(sweeps: Sequence[Sequence[float]]) -> str:
    """'mean AT sweeps per level 31.2 / 24.0 / 18.5' over images' [T_1, ..., T_n] (a ragged list
    is averaged level by level over the images that have it)."""
    levels = max((len(s) for s in sweeps), default=0)
    return sweeps_text([np.mean([s[k] for s in sweeps if len(s) > k]) for k in range(levels)])


def sweeps_text(means: Sequence[float]) -> str:
    """'mean AT sweeps per level 31.2 / 24.0 / 18.5' ('... n/a' for no level), for the
    summaries of `decompose` and `decompose-dataset`."""
    return "mean AT sweeps per level " + (" / ".join(f"{m:.1f}" for m in means) if len(means) else "n/a")


def output_names(paths: Sequence[Path]) -> List[str]:
    """Folder name per input: the file stem, made unique by -2, -3, ... in input order.

    Compared case-insensitively, so the folders also stay apart on macOS/Windows disks.
    Each folder's meta.json records the source path, so the mapping is never ambiguous.
    """
    names, used = [], set()
    for p in paths:
        stem = p.stem or "image"
        name, k = stem, 1
        while name.lower() in used:
            k += 1
            name = f"{stem}-{k}"
        used.add(name.lower())
        names.append(name)
    return names


def select_image(dec: Decomposition, i: Optional[int]) -> Decomposition:
    """Image i of a batch decomposition as a single-image one (i=None: dec itself, on the host)."""
    pick = to_host if i is None else (lambda a: to_host(a)[i])
    energy = (lambda e: float(e)) if i is None else (lambda e: float(np.asarray(e)[i]))
    sweeps = (lambda t: int(t)) if i is None else (lambda t: int(np.asarray(t)[i]))
    return Decomposition(bases=[pick(b) for b in dec.bases], details=[pick(d) for d in dec.details],
                         edges=[pick(s) for s in dec.edges], energies=[energy(e) for e in dec.energies],
                         method=dec.method, params=dict(dec.params), names=dec.names, space=dec.space,
                         iterations=[sweeps(t) for t in dec.iterations])


def write_decomposition(dec: Decomposition, folder: Path, *, source: Path, backend: str) -> None:
    """Write one image's layers into `folder`.

    base_k.npy / detail_k.npy : float32 (H, W, 3), k = 1..n;  edges_k.npy : float32 (H, W)
    base_k.png, detail_k.png (mid-grey = 0, see nextdetail.viz), edges_k.png, input.png,
    contact.png, meta.json (source, shape, method, layer names, parameters, energies, AT
    sweeps per level, detail display scales). Intrinsic (log space): the .npy files hold log S
    and log A; base_1.png is the shading S and detail_1.png the albedo A / (its 99.5th
    percentile, in meta.json).
    Methods without edge fields (specular) write no edges_k files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    log_space = dec.space == "log"
    save_png(from_log(dec.bases[0]) if log_space else dec.bases[0], folder / "input.png")
    scales = []
    for k in range(1, dec.order + 1):
        base, detail = dec.bases[k], dec.details[k - 1]
        _save_npy(folder / f"base_{k}.npy", base)
        _save_npy(folder / f"detail_{k}.npy", detail)
        if log_space:
            save_png(from_log(base), folder / f"base_{k}.png")
            albedo = np.exp(detail)
            scales.append(detail_scale(albedo))
            save_png(albedo / scales[-1], folder / f"detail_{k}.png")
        else:
            save_png(base, folder / f"base_{k}.png")
            scales.append(detail_scale(detail))
            save_png(detail_to_uint8(detail, scales[-1]), folder / f"detail_{k}.png")
        if k <= len(dec.edges):
            _save_npy(folder / f"edges_{k}.npy", dec.edges[k - 1])
            save_png(to_uint8(dec.edges[k - 1]), folder / f"edges_{k}.png")
    with atomic_write(folder / "contact.png") as tmp:
        contact_sheet(dec, title=source.name).save(tmp, format="PNG")
    meta = {"source": str(source), "shape": list(dec.bases[0].shape), "method": dec.method,
            "order": dec.order, "space": dec.space, "layer_names": dec.layer_names,
            "params": dec.params, "backend": backend,
            "energies": [float(e) for e in dec.energies], "sweeps": [int(t) for t in dec.iterations],
            # detail_k.png shows clip(D / scale, -1, 1) * 127.5 + 127.5 (log space: exp(D) / scale)
            "detail_png_scales": scales}
    write_bytes_atomic(folder / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())


def _save_npy(path: Path, array: np.ndarray) -> None:
    """A float32 .npy, atomically (np.save on an open file: the same bytes as on the path)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array.astype(np.float32, copy=False))


def run_decompose(paths: Sequence[Path], cfg: DecomposeConfig, backend: str,
                  on_failure: Callable[[str], None]) -> DecomposeReport:
    """Decompose `paths` into cfg.out/<name>/. A bad input calls on_failure("<path>: <reason>")
    once and the run goes on. Images go to the solver one at a time, or cfg.batch_size at
    a time when cfg.size makes them the same shape."""
    report = DecomposeReport()
    names = output_names(paths)
    chunk = cfg.batch_size if cfg.size is not None else 1
    start_time = time.perf_counter()

    def fail(msg: str) -> None:
        report.failures.append(msg)
        on_failure(msg)

    with logging_redirect_tqdm(), tqdm(total=len(paths), unit="img", desc="decompose",
                                       file=sys.stderr, disable=None) as bar:
        for start in range(0, len(paths), chunk):
            loaded = []
            for path, name in zip(paths[start:start + chunk], names[start:start + chunk]):
                try:
                    loaded.append((path, name, load_image(path, cfg.size)))
                except ImageError as e:
                    fail(str(e))
                    bar.update(1)
            if not loaded:
                continue
            batched = len(loaded) > 1
            images = np.stack([im for _, _, im in loaded]) if batched else loaded[0][2]
            try:
                dec = decompose(images, cfg.order, method=cfg.method, backend=backend, **cfg.params.to_dict())
            except (ValueError, RuntimeError, MemoryError) as e:
                for path, _, _ in loaded:
                    fail(f"{path}: decomposition failed ({type(e).__name__}: {e})")
                bar.update(len(loaded))
                continue
            for i, (path, name, _) in enumerate(loaded):
                one = select_image(dec, i if batched else None)
                try:
                    write_decomposition(one, cfg.out / name, source=path, backend=backend)
                except OSError as e:
                    fail(f"{path}: cannot write {cfg.out / name} ({e})")
                else:
                    report.written.append(cfg.out / name)
                    if one.energies:
                        report.energies.append(float(np.mean(one.energies)))
                    if one.iterations:
                        report.sweeps.append(list(one.iterations))
                bar.update(1)
    report.seconds = time.perf_counter() - start_time
    return report


def decompose_files(cfg: DecomposeConfig, on_failure: Callable[[str], None]) -> DecomposeReport:
    """List cfg.inputs, resolve the backend and decompose every image (see run_decompose).
    ConfigError for a backend that cannot run or a --size that cannot fit; FolderError for a
    folder that cannot be walked."""
    if cfg.size is not None:            # without --size each image is solved at its own size
        S = int(cfg.size)
        check_memory([Need(f"--size {S}", f"the AT solve of {cfg.batch_size} images at {S} x {S} px",
                           decomposition_bytes(S, int(cfg.order), int(cfg.batch_size)))], max_memory=cfg.max_memory)
    try:
        backend = resolve_backend(cfg.backend)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    paths = list_images(cfg.inputs)
    if not paths:
        raise NoImages(f"no image files in {' '.join(cfg.inputs)}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    return run_decompose(paths, cfg, backend, on_failure)
