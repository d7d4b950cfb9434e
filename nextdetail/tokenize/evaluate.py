"""Reconstruction error after each quantization depth (the analogue of CART's Figure 11).

For every run (its latest checkpoint) and every image of the store (centre crop of the run's
image_size), the image is encoded once; the reconstruction at depth m decodes the running sum
of the first m phi contributions. MSE and PSNR are on pixels in [0, 1] (decoder output clamped);
LPIPS is added when its pretrained backbone is in the torch hub cache.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from ..options import check_int, opt
from ..runs import TrainError, latest_checkpoint
from ..stores.decomposition import DecompositionStore, StoreError
from ..stores.layers import centre_crop, split_layers
from .losses import backbone_path, build_lpips
from .tokenizer import Tokenizer, to_model
from .train import check_store_fits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Settings of `nextdetail eval-tokenizer`."""

    runs: Tuple[Path, ...] = opt(help="run folder or checkpoint file", positional=True, nargs="+", metavar="RUN",
                                 type=Path)
    data: Path = opt(help="decomposition store", metavar="STORE")
    out: Path = opt(Path("out/eval-tokenizer"), "output folder")
    images: int = opt(64, "images evaluated", metavar="N")
    batch_size: int = opt(16, "images per encoder call")

    def __post_init__(self):
        check_int("images", self.images)
        check_int("batch_size", self.batch_size)


@dataclass
class DepthRow:
    run: str
    quantizer: str
    depth: int
    map_side: int
    mse: float
    psnr: float
    images: int
    lpips: float = float("nan")


def centre_crops(store, size: int, n_bases: int, limit: int, batch: int):
    """(image, bases) batches of the first `limit` ok images, centre-cropped to size."""
    n = min(len(store), limit)
    for lo in range(0, n, batch):
        layers = torch.stack([torch.from_numpy(centre_crop(store.layers(i), size).astype("float32"))
                              for i in range(lo, min(n, lo + batch))])
        yield split_layers(layers, n_bases)


@torch.no_grad()
def evaluate_run(run, store, *, limit: int = 64, batch: int = 16, lpips=None) -> List[DepthRow]:
    path = latest_checkpoint(run)
    tok = Tokenizer.from_checkpoint(path)
    cfg = tok.config
    check_store_fits(store, cfg, TrainError, what=str(path))
    M = len(cfg.quant.map_sizes(cfg.latent()))
    sq, lp, count = [0.0] * M, [0.0] * M, 0
    for image, bases in centre_crops(store, cfg.image_size, tok.needs_bases, limit, batch):
        contribs = tok.quantizer.contributions(tok.encode(image, bases))
        f_hat = torch.zeros_like(contribs[0])
        image = tok.to_pixels(image)          # measured on pixels, whatever the tokenizer's space
        for m, c in enumerate(contribs):
            f_hat = f_hat + c
            rec = tok.to_pixels(tok.decode_features(f_hat))
            sq[m] += float((rec - image).square().mean((1, 2, 3)).sum())
            if lpips is not None:
                lp[m] += float(lpips(to_model(rec), to_model(image)).sum())
        count += image.shape[0]
    # A run folder is named by itself (its latest checkpoint), a checkpoint file by folder/file.
    name = Path(run).name if Path(run).is_dir() else f"{path.parent.name}/{path.stem}"
    sides = cfg.quant.map_sizes(cfg.latent())
    rows = []
    for m in range(M):
        mse = sq[m] / count
        rows.append(DepthRow(name, cfg.quant.kind, m + 1, sides[m], mse,
                             10 * math.log10(1 / mse) if mse > 0 else float("inf"), count,
                             lp[m] / count if lpips is not None else float("nan")))
    return rows


def evaluate(runs: Sequence, store_path, *, limit: int = 64, batch: int = 16) -> List[DepthRow]:

    try:
        store = DecompositionStore(store_path)
    except StoreError as e:
        raise TrainError(str(e)) from None
    lpips = build_lpips("alex") if backbone_path("alex").is_file() else None
    if lpips is None:
        log.info("LPIPS column left out: no pretrained backbone at %s", backbone_path("alex"))
    rows: List[DepthRow] = []
    for run in runs:
        rows += evaluate_run(run, store, limit=limit, batch=batch, lpips=lpips)
    return rows


def write_results(rows: Sequence[DepthRow], out: Path) -> Dict[str, Path]:
    from ..plots import line_plot

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "quantizer", "depth", "map_side", "mse", "psnr", "lpips"])
        for r in rows:
            w.writerow([r.run, r.quantizer, r.depth, r.map_side, f"{r.mse:.6g}", f"{r.psnr:.4f}",
                        "" if math.isnan(r.lpips) else f"{r.lpips:.6g}"])
    series = {}
    for r in rows:
        xs, ys = series.setdefault(f"{r.run} ({r.quantizer})", ([], []))
        xs.append(r.depth)
        ys.append(r.mse)
    line_plot(series, out / "eval.png", title="reconstruction MSE after each quantization depth",
              xlabel="quantization depth", ylabel="MSE")
    return {"csv": out / "eval.csv", "png": out / "eval.png"}


def table(rows: Sequence[DepthRow]) -> str:
    lines = [f"{'run':<28} {'quantizer':<11} {'depth':>5} {'side':>4} {'MSE':>10} {'PSNR dB':>8}"]
    lines += [f"{r.run:<28} {r.quantizer:<11} {r.depth:>5} {r.map_side:>4} {r.mse:>10.5f} {r.psnr:>8.2f}"
              for r in rows]
    return "\n".join(lines)
