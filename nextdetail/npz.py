"""ADM-format sample batches: the `.npz` files OpenAI's ADM evaluator (guided-diffusion's
evaluations/evaluator.py) reads, and VAR, LlamaGen and RAR write for it.

    arr_0 : uint8 (N, H, W, 3), the images, in sample order
    arr_1 : int64 (N,), their class labels (conditional samples only)

An ADM *reference* batch (VIRTUAL_imagenet256_labeled.npz) also holds `mu` and `sigma`, the
mean (2048,) and covariance (2048, 2048) of its Inception pool features; nextdetail's own
statistics files (`eval-samples --save-stats`) hold the same two keys, so either can be a REF.

Written streamed (`NpzWriter`): 50,000 images of 256 px are 9.8 GB, more than a node should hold
in memory to call np.savez; the file is a plain (uncompressed, zip64) npz that np.load reads.
Read in chunks (`iter_images`) for the same reason.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .errors import PathError
from .storage import as_path, is_url
from .stores.atomic import commit_file

IMAGES, LABELS = "arr_0", "arr_1"


class NpzError(PathError):
    """A file that is not a usable sample batch; str is one line naming it."""


class NpzWriter:
    """Write arr_0 (uint8 (N, H, W, 3)) batch by batch, then arr_1 (labels), into an npz.

        with NpzWriter(path, n=N, size=(H, W)) as w:
            w.write(images_bHW3, labels_b)          # in sample order, N images in all

    The file is written to path + ".tmp" and moved into place on close (stores.atomic.commit_file:
    fsync, rename), so a reader never sees half a batch; a writer closed with fewer than N images
    raises and leaves no file."""

    def __init__(self, path, n: int, size, labels: bool):
        self.path, self.n, self.size, self.labels = as_path(path), int(n), tuple(size), bool(labels)
        if is_url(self.path):           # object storage: written locally, uploaded whole on close
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp")
            os.close(fd)
            self.tmp = Path(tmp)
        else:
            self.tmp = self.path.with_name(self.path.name + ".tmp")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.zf = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.member = self.zf.open(IMAGES + ".npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (self.n, *self.size, 3)}
        np.lib.format.write_array_header_2_0(self.member, header)
        self.written, self.all_labels = 0, []

    def write(self, images: np.ndarray, labels: Optional[np.ndarray] = None) -> None:
        images = np.ascontiguousarray(images, np.uint8)
        if images.shape[1:] != (*self.size, 3):
            raise ValueError(f"images of shape {images.shape[1:]}, this batch holds {(*self.size, 3)}")
        if self.written + len(images) > self.n:
            raise ValueError(f"more than the {self.n} images this batch was opened for")
        self.member.write(images.tobytes())
        self.written += len(images)
        if self.labels:
            self.all_labels.append(np.asarray(labels, np.int64).reshape(-1))

    def close(self) -> None:
        self.member.close()
        try:
            if self.written != self.n:
                raise ValueError(f"{self.written} images written, {self.n} expected")
            if self.labels:
                with self.zf.open(LABELS + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.concatenate(self.all_labels) if self.all_labels
                                              else np.zeros(0, np.int64))
            self.zf.close()
            commit_file(self.tmp, self.path)
        except BaseException:
            self.zf.close()
            self.tmp.unlink(missing_ok=True)
            raise

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.member.close()
            self.zf.close()
            self.tmp.unlink(missing_ok=True)


def write_npz(path, images: np.ndarray, labels: Optional[np.ndarray] = None) -> Path:
    """An ADM batch of images uint8 (N, H, W, 3) (and labels (N,)) in one call."""
    with NpzWriter(path, len(images), images.shape[1:3], labels is not None) as w:
        w.write(images, labels)
    return as_path(path)


def _open_member(zf: zipfile.ZipFile, name: str, path):
    try:
        f = zf.open(name + ".npy")
    except KeyError:
        raise NpzError(path, f"has no {name} (keys: {', '.join(n[:-4] for n in zf.namelist())})") from None
    fmt = np.lib.format
    major, _ = fmt.read_magic(f)
    read = {1: fmt.read_array_header_1_0, 2: fmt.read_array_header_2_0}.get(major)
    if read is None:
        raise NpzError(path, f"{name} has .npy format version {major}, not 1 or 2")
    shape, fortran, dtype = read(f)
    return f, shape, fortran, dtype


def npz_keys(path) -> list:
    """The arrays an npz holds (arr_0, arr_1, mu, sigma, ...); NpzError if it is not an npz."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as e:
        raise NpzError(path, f"cannot read it as an .npz ({e})") from None


def image_count(path) -> tuple:
    """(N, H, W) of an ADM batch's arr_0, read from its header alone."""
    with zipfile.ZipFile(path) as zf:
        f, shape, _, dtype = _open_member(zf, IMAGES, path)
        f.close()
    if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
        raise NpzError(path, f"arr_0 is {dtype} {shape}; an ADM batch holds uint8 (N, H, W, 3)")
    return shape[:3]


def iter_images(path, chunk: int = 256) -> Iterator[np.ndarray]:
    """arr_0 of an ADM batch in chunks of `chunk` images, uint8 (b, H, W, 3), without loading
    the whole array."""
    n, h, w = image_count(path)
    per = h * w * 3
    with zipfile.ZipFile(path) as zf:
        f, _, fortran, _ = _open_member(zf, IMAGES, path)
        if fortran:
            raise NpzError(path, "arr_0 is stored in Fortran order; an ADM batch is C order")
        with f:
            for lo in range(0, n, chunk):
                b = min(chunk, n - lo)
                data = f.read(b * per)
                if len(data) != b * per:
                    raise NpzError(path, f"arr_0 ends after {lo + len(data) // per} of its {n} images (truncated)")
                yield np.frombuffer(data, np.uint8).reshape(b, h, w, 3)


def read_labels(path) -> Optional[np.ndarray]:
    """arr_1 of an ADM batch (int64 (N,)), or None when it has none (unconditional samples)."""
    with np.load(path, allow_pickle=False) as z:
        return np.asarray(z[LABELS], np.int64) if LABELS in z.files else None
