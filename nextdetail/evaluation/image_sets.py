"""The sets of images eval-samples compares, read in batches of uint8 (b, H, W, 3):

    folder   image files (searched recursively, sorted); --size N resizes and centre-crops them
             like decompose-dataset does (needed when their sizes differ)
    .npz     an ADM batch (arr_0 uint8 (N, H, W, 3)), read in chunks (nextdetail.npz)
    store    a decomposition store: its images I = B_0, as stored

and the precomputed statistics a REF may be instead: an .npz with `mu` (2048,) and `sigma`
(2048, 2048), an ADM reference batch or a file written by `eval-samples --save-stats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from ..errors import PathError
from ..imageio import ImageError, list_images, load_image, to_uint8
from ..npz import IMAGES, image_count, iter_images, npz_keys


class ImageSetError(PathError):
    """A SAMPLES or REF that cannot be read as a set of images; one line naming it."""


@dataclass
class ImageSet:
    """n images of one size, read in batches by `batches(b)`."""

    path: Path
    kind: str                  # "folder", "npz" or "store"
    n: int
    files: Optional[List[Path]] = None
    size: Optional[int] = None

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "images": self.n}

    def batches(self, batch: int) -> Iterator[np.ndarray]:
        if self.kind == "npz":
            yield from iter_images(self.path, batch)
        elif self.kind == "store":
            from ..stores.decomposition import DecompositionStore
            store = DecompositionStore(self.path)
            for lo in range(0, self.n, batch):
                q = store.read_range(lo, min(self.n, lo + batch))[:, 0]          # I = B_0, uint8 (b, 3, S, S)
                yield np.ascontiguousarray(q.transpose(0, 2, 3, 1))
        else:
            shape = None
            for lo in range(0, self.n, batch):
                out = []
                for f in self.files[lo:lo + batch]:
                    try:
                        im = to_uint8(load_image(f, self.size))
                    except ImageError as e:
                        raise ImageSetError(f, e.reason) from None
                    if shape is not None and im.shape != shape:
                        raise ImageSetError(f, f"is {im.shape[1]}x{im.shape[0]}, the set's first image "
                                               f"{shape[1]}x{shape[0]}: pass --size N to resize and crop them all")
                    shape = im.shape
                    out.append(im)
                yield np.stack(out)


def open_image_set(path, size: Optional[int] = None) -> ImageSet:
    """A folder, an ADM .npz or a decomposition store as an ImageSet; ImageSetError otherwise."""
    path = Path(path)
    if path.is_dir() and (path / "meta.json").is_file() and (path / "bases.zarr").exists():
        from ..stores.decomposition import DecompositionStore, StoreError
        try:
            store = DecompositionStore(path)
        except StoreError as e:
            raise ImageSetError(path, f"cannot read the store ({e.reason})") from None
        return ImageSet(path, "store", len(store))
    if path.is_dir():
        from ..info import identify
        kind = identify(path)          # what it is, said the way `nextdetail info` says it
        if kind is not None:
            raise ImageSetError(path, f"{kind.phrase}, not a folder of images, an ADM .npz or a decomposition store")
        files = [f for f in list_images([path]) if f.is_file()]
        if not files:
            raise ImageSetError(path, "no image files in this folder")
        return ImageSet(path, "folder", len(files), files=files, size=size)
    if path.suffix == ".npz":
        if IMAGES not in npz_keys(path):
            raise ImageSetError(path, "has no arr_0 (images); statistics alone can only be a --ref")
        return ImageSet(path, "npz", int(image_count(path)[0]))
    if not path.exists():
        raise ImageSetError(path, "no such file or folder")
    raise ImageSetError(path, "not a folder of images, an ADM .npz or a decomposition store")


def read_stats(path) -> Optional[dict]:
    """{"mu": (D,), "sigma": (D, D)} float64 of an .npz that holds them, else None."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file() or not {"mu", "sigma"} <= set(npz_keys(path)):
        return None
    with np.load(path, allow_pickle=False) as z:
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ImageSetError(path, f"mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    return {"mu": mu, "sigma": sigma}
