"""Runs, model folders, the output folders of sample / upscale / edit / eval-tokenizer, and ADM
.npz batches, as the viewer shows them.

A run is read from log.jsonl (streamed, thinned to at most MAX_POINTS points a series, so a
million-step log costs the same memory as a short one) and from its file names; no checkpoint is
loaded. An output folder's pictures are listed with what its record (samples.json, upscale.json,
edit.json) says they show. An .npz batch's images are memory-mapped from the zip when it is
stored uncompressed (as nextdetail and ADM write them), else streamed up to the one asked.
"""
from __future__ import annotations

import csv
import json
import struct
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..info import KINDS
from ..info_facts import facts_of

MAX_POINTS = 2000
MAX_PICTURES = 200          # pictures listed on one output page


def read_series(run: Path, keys) -> Dict[str, Tuple[List[float], List[float]]]:
    """{"key" (train records), "val key", "map k" (a per-map list): (steps, values)} of log.jsonl,
    thinned: whenever a series passes 2 x MAX_POINTS points every other one is dropped, so memory
    stays bounded for any log."""
    out: Dict[str, Tuple[list, list]] = {}
    path = run / "log.jsonl"
    if not path.is_file():
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue                   # the line a trainer is writing now
            split = "" if rec.get("split", "train") == "train" else f"{rec['split']} "
            for k in keys:
                v = rec.get(k)
                if isinstance(v, list):          # per-map values: one series per map
                    for m, x in enumerate(v):
                        _add(out, f"{split}map {m + 1}", rec.get("step", 0), x)
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    _add(out, f"{split}{k}", rec.get("step", 0), v)
    return {k: (xs, ys) for k, (xs, ys) in out.items()}


def _add(out: dict, name: str, x, y) -> None:
    xs, ys = out.setdefault(name, ([], []))
    xs.append(float(x))
    ys.append(float(y))
    if len(xs) > 2 * MAX_POINTS:
        del xs[1::2], ys[1::2]


# The charts of each kind of run: name -> (log keys, title, y label, log scale).
CHARTS = {
    "tokenizer_run": {
        "losses": (("loss", "l2", "vq", "lpips"), "tokenizer losses", "loss", True),
        "gan": (("g", "d", "r1"), "adversarial losses", "loss", False),
        "usage": (("map_usage",), "codebook usage per token map", "fraction of the codes used", False),
        "perplexity": (("perplexity",), "codebook perplexity", "perplexity", False),
    },
    "transformer_run": {
        "losses": (("loss",), "next-detail transformer: cross entropy", "cross entropy", True),
        "accuracy": (("acc",), "token accuracy", "accuracy", False),
        "maps": (("map_loss",), "cross entropy per token map", "cross entropy", True),
    },
}


class RunSource:
    """A run folder, model folder, output folder or .npz file."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key
        self.kind = "npz" if key.startswith("npz_") else "run"
        self.phrase = KINDS[key]

    @property
    def stamp(self) -> str:
        st = self.path.stat()
        log = self.path / "log.jsonl"
        extra = log.stat().st_mtime_ns if self.path.is_dir() and log.is_file() else 0
        return f"{st.st_mtime_ns}-{extra}"

    def facts(self) -> dict:
        return facts_of(self.key, self.path)

    def charts(self) -> List[str]:
        """The charts this run has data for (names of CHARTS[kind])."""
        charts = CHARTS.get(self.key, {})
        if not charts:
            return []
        have = read_series(self.path, sorted({k for keys, *_ in charts.values() for k in keys}))
        return [name for name, (keys, *_) in charts.items()
                if any(s.removeprefix("val ") in keys or (s.removeprefix("val ").startswith("map ")
                                                         and any(k.startswith("map_") for k in keys)) for s in have)]

    def chart_series(self, name: str):
        keys, title, ylabel, log_y = CHARTS[self.key][name]
        return read_series(self.path, keys), title, ylabel, log_y

    # -- pictures of output folders -------------------------------------------------------------
    def pictures(self) -> List[Dict]:
        """[{file (relative), caption, parts}] of the folder's pictures, in a reading order."""
        if not self.path.is_dir() or self.key.endswith("_run") or self.key == "run":
            return []
        record = _record(self.path, self.key)
        files = sorted(p.relative_to(self.path).as_posix() for p in self.path.glob("*.png"))
        if self.key == "samples" and (self.path / "images").is_dir():
            files += sorted(p.relative_to(self.path).as_posix() for p in (self.path / "images").glob("*.png"))
        strip = record.get("strip")
        parts = strip.split(", ") if isinstance(strip, str) else strip if isinstance(strip, list) else None
        out = []
        for f in files[:MAX_PICTURES]:
            caption, shown = f, None
            if self.key == "samples" and f.startswith("sample_"):
                shown = parts
            elif self.key == "edit" and f.startswith("edit_"):
                shown = parts
            elif self.key == "upscale" and f.endswith("_sheet.png"):
                shown = (record.get("sheet") or "").split(", ") or None
                row = next((r for r in record.get("images", []) if Path(r.get("result", "")).stem.rsplit("_x", 1)[0]
                            == f[:-len("_sheet.png")]), None)
                if row and "psnr" in row:
                    caption += f"  (PSNR {row['psnr']:.2f} dB, bicubic {row['bicubic_psnr']:.2f} dB)"
            w, h = _size(self.path / f)
            k = max(1, 160 // max(h, 1))         # small pictures (64 px samples) shown larger, pixels crisp
            out.append({"file": f, "caption": caption, "parts": shown, "width": w * k, "height": h * k})
        return out

    def eval_rows(self) -> Dict[str, List[dict]]:
        """eval-tokenizer's eval.csv and final.csv rows."""
        out = {}
        for name in ("eval", "final"):
            f = self.path / f"{name}.csv"
            out[name] = list(csv.DictReader(f.open())) if f.is_file() else []
        return out

    def card(self) -> Optional[str]:
        """A model folder's README.md (the model card), as text."""
        f = self.path / "README.md"
        return f.read_text(errors="replace")[:20000] if self.key.endswith("_model") and f.is_file() else None


def _size(path: Path) -> Tuple[int, int]:
    """(width, height) of a picture from its header (Pillow reads no pixels for this)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:       # not a picture Pillow knows: shown at whatever size the browser finds
        return 0, 0


def _record(path: Path, key: str) -> dict:
    name = {"samples": "samples.json", "upscale": "upscale.json", "edit": "edit.json"}.get(key)
    try:
        value = json.loads((path / name).read_text()) if name else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- .npz batches

def npz_images(path: Path):
    """(memmap uint8 (N, H, W, 3) or None when arr_0 is compressed, (N, H, W)) of an ADM batch."""
    from ..npz import image_count

    n, h, w = image_count(path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("arr_0.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None, (n, h, w)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        read(f)
        offset = f.tell()
    return np.memmap(path, np.uint8, "r", offset=offset, shape=(n, h, w, 3)), (n, h, w)


def npz_image(path: Path, j: int) -> Optional[np.ndarray]:
    """Image j of an ADM batch (uint8 (H, W, 3)), None when out of range."""
    from ..npz import iter_images

    mm, (n, _, _) = npz_images(path)
    if not 0 <= j < n:
        return None
    if mm is not None:
        return np.array(mm[j])
    for lo, chunk in zip(range(0, n, 64), iter_images(path, 64)):
        if lo <= j < lo + len(chunk):
            return np.array(chunk[j - lo])
    return None
