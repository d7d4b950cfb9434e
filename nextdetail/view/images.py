"""Arrays -> encoded pictures for the page: PNG (exact: layers, token maps) or WebP (thumbnails),
made on the fly with Pillow. The mappings of layers to 8 bits are viz.py's (bases clipped,
details around mid-grey with their robust scale), so the page shows what the contact sheets show.
"""
from __future__ import annotations

import colorsys
import io
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from ..viz import detail_scale, detail_to_uint8

THUMB = 128            # the grid's thumbnails: longer side in px
MAP_SIDE = 96          # a token map drawn about this large (nearest-neighbour, codes stay visible)


def encode(rgb: np.ndarray, fmt: str = "png") -> bytes:
    """uint8 (H, W, 3) or (H, W) -> PNG or WebP bytes."""
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(rgb))
    if fmt == "webp":
        img.save(buf, format="WEBP", quality=82, method=2)     # method 2: fast, thumbnails need no more
    else:
        img.save(buf, format="PNG", compress_level=1)          # exact pixels; speed over size
    return buf.getvalue()


def hwc(chw: np.ndarray) -> np.ndarray:
    """(3, H, W) -> (H, W, 3), as the store holds images channel first."""
    return np.ascontiguousarray(np.moveaxis(chw, 0, -1))


def thumbnail(q0_chw: np.ndarray, side: int = THUMB) -> np.ndarray:
    """B_0 (uint8 (3, H, W)) shrunk to `side` px on its longer side (box filter: fast, no ringing)."""
    img = Image.fromarray(hwc(q0_chw))
    if max(img.size) > side:
        img.thumbnail((side, side), Image.BOX)
    return np.asarray(img)


def detail_picture(detail_chw: np.ndarray) -> Tuple[np.ndarray, float]:
    """A signed detail layer (float (3, H, W)) -> (uint8 (H, W, 3) around mid-grey, its scale):
    +/- scale maps to white/black (viz.detail_to_uint8)."""
    d = np.moveaxis(detail_chw, 0, -1)
    scale = detail_scale(d)
    return detail_to_uint8(d, scale), scale


def log_picture(layer_chw: np.ndarray) -> Tuple[np.ndarray, float]:
    """A layer of a log-space store (intrinsic: unit-log albedo) shown as viz.sheet_tiles shows it:
    exp, divided by its 99.5th percentile. Returns (uint8 (H, W, 3), that scale)."""
    from ..imageio import to_uint8

    a = np.exp(np.moveaxis(layer_chw, 0, -1))
    scale = detail_scale(a)
    return to_uint8(a / scale), scale


_PALETTE: dict = {}


def palette(vocab: int) -> np.ndarray:
    """uint8 (vocab, 3): a colour per code, neighbouring codes far apart in hue (golden-ratio
    steps) so that a map's distinct codes read as distinct colours."""
    if vocab not in _PALETTE:
        rows = []
        for c in range(vocab):
            h = (c * 0.61803398875) % 1.0
            s = 0.45 + 0.4 * ((c * 7) % 5) / 4
            v = 0.55 + 0.4 * ((c * 3) % 4) / 3
            rows.append([round(255 * x) for x in colorsys.hsv_to_rgb(h, s, v)])
        _PALETTE[vocab] = np.asarray(rows, np.uint8)
    return _PALETTE[vocab]


def token_map_picture(codes: np.ndarray, vocab: int, side: int = MAP_SIDE) -> np.ndarray:
    """A token map (h, w) of codes -> uint8 RGB, each code its palette colour, each cell an
    integer block of about side / max(h, w) px."""
    codes = np.clip(codes.astype(np.int64), 0, vocab - 1)
    k = max(1, side // max(codes.shape))
    rgb = palette(vocab)[codes]
    return np.repeat(np.repeat(rgb, k, 0), k, 1)


def enlarge(rgb: np.ndarray, side: int) -> np.ndarray:
    """Small pictures (a 32 px store, a token store's 64 px decodings) blown up by an integer
    factor to about `side` px, nearest-neighbour, so pixels stay crisp."""
    k = side // max(rgb.shape[:2])
    return np.repeat(np.repeat(rgb, k, 0), k, 1) if k > 1 else rgb


def grey(message_side: int = THUMB, level: int = 232) -> np.ndarray:
    """A plain light-grey square: the picture of a row with no image (error, not written yet)."""
    return np.full((message_side, message_side, 3), level, np.uint8)


def etag(*parts: object) -> str:
    """A strong ETag from what decides a picture's bytes."""
    import hashlib

    return '"' + hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:20] + '"'


def maybe_scale(scale: Optional[float]) -> str:
    """The scale of a signed layer as the page labels it."""
    return "" if scale is None else f"±{scale:.2g}"
