"""Turning decomposition layers into 8-bit pictures, and a labelled contact sheet of them.

Mappings (each returns uint8, the layer's own shape):

- bases B_k: already images in [0, 1]; clipped (smoothing can overshoot slightly).
- details D_k: signed, mostly tiny. Shown around mid-grey (D = 0 -> 128) with a robust
  per-image scale: the 99.5th percentile of |D| over all pixels and channels maps to black
  (-) / white (+). A max-based scale would let a handful of strong edges make every faint
  texture invisible; the percentile keeps faint details visible and clips the top 0.5 %.
- edge fields s_k in [0, 1]: grey, white on edges (s = 1), black in smooth regions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .decomp.logspace import from_log
from .imageio import to_uint8

DETAIL_PERCENTILE = 99.5


def detail_scale(detail: np.ndarray, percentile: float = DETAIL_PERCENTILE) -> float:
    """Robust amplitude of a detail layer: the `percentile` of |D| over the whole array.

    Falls back to max |D| when at least (100 - percentile) % of the pixels are exactly 0,
    and to 1.0 for an all-zero layer, so the result is always > 0 (safe to divide by).
    """
    a = np.abs(np.asarray(detail, dtype=np.float32))
    if a.size == 0:
        return 1.0
    scale = float(np.percentile(a, percentile))
    if scale <= 0.0:
        scale = float(a.max())
    return scale if scale > 0.0 else 1.0


def detail_to_uint8(detail: np.ndarray, scale: Optional[float] = None) -> np.ndarray:
    """Detail layer (signed float) -> uint8 around mid-grey: D = 0 -> 128, +/-scale -> 255/0.

    scale defaults to `detail_scale(detail)`; |D| beyond it is clipped.
    """
    if scale is None:
        scale = detail_scale(detail)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    d = np.asarray(detail, dtype=np.float32) / np.float32(scale)
    return np.round(127.5 + 127.5 * np.clip(d, -1.0, 1.0)).astype(np.uint8)


@dataclass
class Tile:
    """One picture of the contact sheet: a label and a uint8 (H, W, 3) image."""

    label: str
    image: np.ndarray


def _rgb(a: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1) uint8 -> (H, W, 3) by repeating the grey channel."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a


def _is_batch(decomposition) -> bool:
    # Edge fields have no channel axis, so their rank tells (H, W) from (N, H, W) unambiguously.
    return decomposition.edges[0].ndim == 3 if decomposition.edges else decomposition.bases[0].ndim == 4


def _pick(decomposition, image_index: Optional[int]) -> tuple[int, Optional[int]]:
    """(index into the batch or -1 for a single image, batch size or None), validated."""
    if not _is_batch(decomposition):
        if image_index not in (None, 0):
            raise ValueError(f"image_index={image_index} given for a single-image decomposition")
        return -1, None
    n = decomposition.bases[0].shape[0]
    i = 0 if image_index is None else int(image_index)
    if not 0 <= i < n:
        raise IndexError(f"image_index {image_index} out of range for a batch of {n}")
    return i, n


def sheet_tiles(decomposition, image_index: Optional[int] = None) -> List[List[Optional[Tile]]]:
    """The grid of the contact sheet, rows x (order + 1) columns, column k = level k.

    row 0: input (B_0), B_1 .. B_n
    row 1: (empty),     D_1 .. D_n   labelled with their display scale (see module doc)
    row 2: (empty),     s_1 .. s_n   (when the method has edge fields)
    Bases and details are named as the method names them (specular: A_k, E_k). A log-space
    decomposition (intrinsic) is shown in linear space: the shading exp(log S), and the albedo
    exp(log A) divided by its 99.5th percentile (labelled with that scale).
    For a batch (N, H, W, C) decomposition, image `image_index` (default 0) is shown.
    """
    i, _ = _pick(decomposition, image_index)
    sel = (lambda a: np.asarray(a)) if i < 0 else (lambda a: np.asarray(a)[i])
    b_name, d_name = getattr(decomposition, "names", ("B", "D"))
    log_space = getattr(decomposition, "space", "linear") == "log"
    shown = from_log if log_space else (lambda a: a)
    bases = [Tile("input" if k == 0 else f"{b_name}{k}", _rgb(to_uint8(shown(sel(b)))))
             for k, b in enumerate(decomposition.bases)]
    details: List[Optional[Tile]] = [None]
    for k, d in enumerate(decomposition.details, start=1):
        d = sel(d)
        if log_space:
            a = np.exp(d)
            scale = detail_scale(a)
            details.append(Tile(f"{d_name}{k} (x1/{scale:.2g})", _rgb(to_uint8(a / scale))))
            continue
        scale = detail_scale(d)
        details.append(Tile(f"{d_name}{k} (+/-{scale:.2g})", _rgb(detail_to_uint8(d, scale))))
    if not decomposition.edges:          # specular: no edge fields, no third row
        return [bases, details]
    edges: List[Optional[Tile]] = [None] + [Tile(f"s{k}", _rgb(to_uint8(sel(s))))
                                             for k, s in enumerate(decomposition.edges, start=1)]
    return [bases, details, edges]


def _fit(img: np.ndarray, tile: int) -> Image.Image:
    """Scale so the longer side is about `tile` px: integer nearest-neighbour blow-up for small
    images (pixels stay crisp and countable), Lanczos shrink for large ones."""
    h, w = img.shape[:2]
    pil = Image.fromarray(img)
    f = tile / max(h, w)
    if f >= 1:
        k = int(f)
        return pil.resize((w * k, h * k), Image.NEAREST) if k > 1 else pil
    return pil.resize((max(1, round(w * f)), max(1, round(h * f))), Image.LANCZOS)


def _header(decomposition, title: Optional[str], i: int, n: Optional[int]) -> List[str]:
    first = title or "decomposition"
    if n is not None:
        first += f"  [image {i} of batch {n}]"
    p = decomposition.params or {}
    params = " ".join(f"{k}={p[k]:g}" for k in ("alpha", "lam", "eps", "n_iter", "tol") if k in p)
    energies = [float(e if i < 0 else np.asarray(e)[i]) for e in decomposition.energies]
    line2 = f"{decomposition.method} order={decomposition.order} {params}"
    if energies:
        line2 += "  AT energy " + " / ".join(f"{e:.4g}" for e in energies)
    return [first, line2]


def contact_sheet(decomposition, image_index: Optional[int] = None, *, title: Optional[str] = None,
                  tile: int = 512) -> Image.Image:
    """Render `sheet_tiles` as one labelled RGB image.

    decomposition : a `nextdetail.decomp.Decomposition` of one image or of a batch.
    image_index   : which image of a batch (default 0); must be None or 0 for one image.
    title         : first header line (e.g. the file name); the batch index is appended.
    tile          : longer side of each picture in px (small images are enlarged by an
                    integer factor, large ones shrunk to fit).
    """
    i, n = _pick(decomposition, image_index)
    grid = sheet_tiles(decomposition, image_index)
    font = ImageFont.load_default(size=max(11, tile // 32))   # text grows with the tiles
    pad = 6
    line_h = font.getbbox("Ag")[3] + 4
    rows = [[(t.label, _fit(t.image, tile)) if t is not None else None for t in row] for row in grid]
    pics = [c for row in rows for c in row if c is not None]
    label_w = max(int(font.getlength(label)) for label, _ in pics) + 2
    cell_w = max(max(p.width for _, p in pics), label_w)
    cell_h = max(p.height for _, p in pics) + line_h
    header = _header(decomposition, title, i, n)
    header_h = len(header) * line_h + pad
    ncols = max(len(r) for r in rows)
    width = pad + ncols * (cell_w + pad)
    width = max(width, pad + max(int(font.getlength(s)) for s in header) + pad)
    height = header_h + len(rows) * (cell_h + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, text in enumerate(header):
        draw.text((pad, pad + k * line_h), text, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            label, pic = cell
            x, y = pad + c * (cell_w + pad), header_h + r * (cell_h + pad)
            draw.text((x, y), label, fill=(0, 0, 0), font=font)
            sheet.paste(pic, (x, y + line_h))
    return sheet
