"""Reading photographs into float arrays, finding them on disk, writing PNGs.

Every loader in the project goes through `load_image`, so that the CLI, the demo and the
dataset pipelines see the same pixels: float32, (H, W, 3), in [0, 1], EXIF-upright.
"""
from __future__ import annotations

import io
import logging
import os
import re
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, List, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import NextDetailError, PathError
from .storage import as_path
from .stores.atomic import atomic_write

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# Suffixes (lower case) that `list_images` picks up when it walks a folder.
IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
})

# Images with more pixels than this (width x height, from the header) are refused before they
# are decoded: a small file can declare a huge canvas (a decompression bomb). PIL's own limit
# (it warns above it and refuses at twice it); 268 MB as 8-bit RGB.
DEFAULT_MAX_PIXELS = 89_478_485

# Integer modes with more than 8 bits per sample; PIL's convert("L") would clip them at 255.
_HIGH_BIT_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


class FolderError(NextDetailError, ValueError):
    """A folder that cannot be walked (a symlink cycle); str is one line naming the link."""


class ImageError(PathError):
    """A file that cannot be read as an image. str(e) is one line: "<path>: <reason>"."""

    def __init__(self, path: PathLike, reason: str):
        # Decoder messages sometimes span lines; the CLI promises one line per bad file.
        super().__init__(path, " ".join(str(reason).split()))


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale `img` so its shorter side is `size` px (Lanczos), then crop the central size x size.

    This is the one square-crop transform of the project (CLI --size, dataset pipelines).
    Odd leftovers are split with the extra pixel on the right/bottom. Modes that PIL cannot
    resample with Lanczos ("1", "P", "PA") are converted first to "L", "RGBA", "RGBA";
    everything else keeps its mode.
    """
    if int(size) != size or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    size = int(size)
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    w, h = img.size
    scale = size / min(w, h)
    # max(size, ...) guards the shorter side against rounding down by one.
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _normalized_pil(img: Image.Image, path: PathLike) -> Image.Image:
    """Bring any PIL mode to "RGB" (8 bit) or "F" (grey, float in [0, 1], for > 8-bit sources)."""
    mode = img.mode
    if mode in _HIGH_BIT_GREY_MODES:
        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(path, f"{mode} samples outside 0..65535 are not supported")
        return Image.fromarray(a.astype(np.float32) / np.float32(65535.0), mode="F")
    if mode == "P":
        # Palette images carry transparency in info, not in an alpha band.
        mode = "RGBA" if "transparency" in img.info else "RGB"
        img = img.convert(mode)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    if mode == "F":
        raise ImageError(path, "floating-point (mode F) images are not supported")
    try:  # L, 1, CMYK, YCbCr, ...: PIL's own conversions (CMYK is converted naively, no ICC)
        return img.convert("RGB")
    except ValueError as e:
        raise ImageError(path, f"cannot convert pixel mode {mode} to RGB ({e})") from None


def _open_upright(path: Path, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, data: Optional[bytes] = None
                  ) -> Image.Image:
    """Open, fully decode and EXIF-rotate one image (the file `path`, or `data` named `path` in
    messages); any failure becomes an ImageError."""
    if data is None and not path.exists():
        raise ImageError(path, "no such file")
    if data is None and path.is_dir():
        raise ImageError(path, "is a directory, not an image file")
    # PIL refuses (at open) images over twice its MAX_IMAGE_PIXELS; ours is the limit that counts.
    limit = max_pixels if max_pixels is not None else 2 * Image.MAX_IMAGE_PIXELS
    try:
        with _pil_limit(limit), Image.open(path if data is None else io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > limit:
                raise ImageError(path, f"{w} x {h} = {w * h:,} pixels is over the limit of {limit:,} "
                                       f"(a decompression bomb?); not decoded (--max-pixels)")
            # Image.open only parses the header; load() decodes the pixels, which is where
            # truncated files fail (ImageFile.LOAD_TRUNCATED_IMAGES is deliberately left False).
            im.load()
            return ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (format not recognised)") from None
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "its size"
        raise ImageError(path, f"{size} is over the limit of {limit:,} (a decompression bomb?); "
                               "not decoded (--max-pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        # PIL reports broken streams as OSError ("image file is truncated"), SyntaxError
        # ("broken PNG file"), ValueError or struct.error, depending on the format.
        raise ImageError(path, f"corrupt or truncated image ({e or type(e).__name__})") from None


@contextmanager
def _pil_limit(limit: int):
    """Let PIL open what `limit` allows (PIL warns above its MAX_IMAGE_PIXELS and refuses at
    twice it); restored after. Image reading is single-threaded in every worker."""
    default = Image.MAX_IMAGE_PIXELS
    if default is None or limit <= default:
        yield
        return
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = default


def load_image_pil(path: PathLike, size: Optional[int] = None,
                   max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, data: Optional[bytes] = None) -> Image.Image:
    """`load_image` stopping short of numpy: an "RGB" or (grey, > 8-bit source) "F" image."""
    path = Path(path)
    img = _normalized_pil(_open_upright(path, max_pixels, data), path)
    if size is not None:
        img = resize_center_crop(img, size)
    return img


def load_image(path: PathLike, size: Optional[int] = None,
               max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as float32 RGB in [0, 1], shape (H, W, 3) (or (size, size, 3)).

    - Grey (1, L) and 16-bit grey (I, I;16 - e.g. 16-bit PNG) are replicated to three
      channels; 16-bit samples are divided by 65535, keeping all their precision.
      (16-bit RGB files are reduced to 8 bit by PIL's decoder.)
    - Images with transparency (LA, RGBA, palette with a transparent index) are composited
      over white, so transparent pixels read as 1.0.
    - Palette (P) images are expanded; CMYK and YCbCr are converted by PIL (no ICC profile).
    - The EXIF orientation tag is applied, so the array is upright as viewers show it.
    - size: if given, shorter side scaled to `size` (Lanczos) and the center size x size
      cropped, see `resize_center_crop`.
    - max_pixels: an image whose header declares more pixels is refused undecoded (None: no
      limit of ours; PIL still refuses above 2 x its MAX_IMAGE_PIXELS).

    Raises ImageError (a ValueError; str is "<path>: <reason>") for a missing file, a file
    that is not an image, a truncated/corrupt one, or one over max_pixels.
    """
    return _as_array(load_image_pil(path, size, max_pixels), size)


def load_image_bytes(data: bytes, name: str, size: Optional[int] = None,
                     max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`load_image` of an encoded image held in memory (a Parquet cell, a tar member); `name`
    (e.g. "train-00003.parquet#1234") names it in errors."""
    return _as_array(load_image_pil(name, size, max_pixels, data=bytes(data)), size)


def _as_array(img: Image.Image, size: Optional[int]) -> np.ndarray:
    if img.mode == "F":
        grey = np.asarray(img, dtype=np.float32)
        # Lanczos overshoots near sharp edges; 8-bit images are clipped by PIL itself.
        grey = np.clip(grey, 0.0, 1.0) if size is not None else grey
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(img, dtype=np.float32) / np.float32(255.0)


def list_images(inputs: Iterable[PathLike]) -> List[Path]:
    """Expand command-line inputs into a list of image paths.

    A folder is walked recursively for files whose suffix is in IMAGE_EXTENSIONS (any case),
    skipping hidden files and folders (names starting with "."), sorted by their path
    relative to the folder, so the order is the same on every machine. Symlinked folders and
    files are followed (ImageNet subsets are usually built from links); a link back to one
    of its own ancestors raises FolderError. Anything else - a file of any extension, or a
    path that does not exist - passes through as given, so that it fails visibly when loaded
    instead of vanishing. A path met twice is kept once (the first time).
    """
    out: List[Path] = []
    seen = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = [Path(path) for _, path in walk_image_files(p)]
            if not found:
                log.warning("%s: folder holds no image files", p)
        else:
            found = [p]
        for f in found:
            key = os.path.abspath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def walk_image_files(root: Path) -> List[tuple]:
    """(path relative to root with "/", path) strings of the image files under root, following
    symlinks, sorted by relative path. Strings, not Path objects: a million of them is the
    listing of an ImageNet-sized folder. Each folder's (device, inode) is checked against its
    ancestors': a link to an ancestor is a cycle, which os.walk(followlinks=True) would follow
    forever. Two links to one folder are not a cycle (its files are listed under both names, as
    torchvision's ImageFolder does)."""
    found: List[tuple] = []
    root = Path(root)
    st = root.stat()
    stack = [(str(root), "", ((st.st_dev, st.st_ino),))]
    while stack:
        folder, rel, ancestors = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            log.warning("%s: cannot list folder (%s)", folder, e.strerror or e)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = os.path.join(folder, entry.name)
            sub = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()               # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                st = os.stat(path)
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    raise FolderError(f"symlink cycle: {path} leads back to {os.path.realpath(path)}, "
                                      "a folder that contains it")
                stack.append((path, sub, ancestors + (key,)))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                try:
                    if entry.is_file():               # follows symlinks; a dangling link is skipped
                        found.append((sub, path))
                except OSError:
                    pass
    found.sort(key=lambda t: t[0])
    return found


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8 (values outside are clipped, rounded to nearest)."""
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a
    return np.round(np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def save_png(array: np.ndarray, path: PathLike) -> Path:
    """Write a float image in [0, 1] (or uint8) as an 8-bit PNG, atomically (stores.atomic);
    parent folders are created.

    array: (H, W) or (H, W, 1) grey, (H, W, 3) RGB or (H, W, 4) RGBA.
    """
    a = to_uint8(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"save_png: expected (H,W), (H,W,1), (H,W,3) or (H,W,4), got {a.shape}")
    path = as_path(path)                            # a URL: one upload (stores.atomic)
    with atomic_write(path) as tmp:                 # creates the parent folders
        Image.fromarray(a).save(tmp, format="PNG")
    return path
