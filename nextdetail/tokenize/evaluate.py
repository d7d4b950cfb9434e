"""Reconstruction quality of tokenizers on a (held-out) store: after each quantization depth (the
analogue of CART's Figure 11) and, at the final depth, the numbers tokenizer papers report.

For every run (its latest checkpoint) and every image of the store (centre crop of the run's
image_size), the image is encoded once; the reconstruction at depth m decodes the running sum
of the first m phi contributions. Per depth: MSE and PSNR = 10 log10(1 / MSE) on pixels in
[0, 1] (decoder output clamped), and LPIPS. At the final depth (`FinalRow`):

    PSNR   mean over images of each image's PSNR (the usual convention of VQGAN/VAR tables)
    SSIM   mean over images; Wang et al. 2004: Gaussian window sigma 1.5, per channel, on [0, 1]
    LPIPS  mean over images (AlexNet backbone, the common choice)
    rFID   FID of the reconstructions against their inputs, Inception features of both as 8-bit
           images (nextdetail.evaluation). Papers report it on 50,000 ImageNet val images; on a
           few hundred it is dominated by the estimator's bias and only compares runs on the
           same images.

LPIPS and rFID need pretrained weights (nextdetail.weights): `--no-lpips`, `--no-rfid` leave them
out where none can be had.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..evaluation.metrics import psnr_from_mse, ssim
from ..limits import check_max_memory, check_memory, memory_opt
from ..options import check_int, flag_of, opt
from ..runs import TrainError
from ..storage import as_path, is_local
from ..stores.decomposition import DecompositionStore, StoreError
from ..stores.layers import centre_crop
from ..weights import offline_opt
from .bases import inputs_from_bases
from .losses import build_lpips
from .tokenizer import Tokenizer, config_of, resolved, to_model
from .loader import check_store_fits
from .memory import inference_needs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Settings of `nextdetail eval-tokenizer`."""

    runs: Tuple[Path, ...] = opt(help="run folder or checkpoint file", positional=True, nargs="+", metavar="RUN",
                                 type=Path)
    data: Path = opt(help="decomposition store", metavar="STORE")
    out: Path = opt(Path("out/eval-tokenizer"), "output folder")
    images: int = opt(64, "images evaluated", metavar="N", ge=1)
    batch_size: int = opt(16, "images per encoder call", ge=1)
    lpips: bool = opt(True, "leave LPIPS out (it needs torchvision's AlexNet weights)", flag="--no-lpips")
    rfid: bool = opt(True, "leave rFID out (it needs the Inception weights)", flag="--no-rfid")
    inception_weights: Optional[Path] = opt(None, "the Inception weights file for rFID (default: the torch hub "
                                                  "cache, downloaded there when allowed)", metavar="FILE")
    offline: bool = offline_opt()
    device: str = "cpu"
    max_memory: Optional[str] = memory_opt()

    def __post_init__(self):
        check_int("images", self.images)
        check_int("batch_size", self.batch_size)
        check_max_memory(self.max_memory)


@dataclass
class FinalRow:
    """A run's reconstruction quality at its final depth (module docstring)."""

    run: str
    quantizer: str
    images: int
    psnr: float
    ssim: float
    lpips: float = float("nan")
    rfid: float = float("nan")


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
        q = np.stack([centre_crop(store.quantized(i), size) for i in range(lo, min(n, lo + batch))])
        yield inputs_from_bases(torch.from_numpy(q), n_bases, store.space)


@torch.no_grad()
def evaluate_run(run, store, *, limit: int = 64, batch: int = 16, lpips=None,
                 inception=None) -> Tuple[List[DepthRow], FinalRow]:
    """The per-depth rows and the final-depth row of one run; `inception`: the network for rFID."""
    from ..evaluation.fidelity import fid, fid_stats
    from ..evaluation.inception import inception_features
    from ..imageio import to_uint8

    path = resolved(run)                   # a model folder, or a run's latest checkpoint
    tok = Tokenizer.from_pretrained(path)
    cfg = tok.config
    check_store_fits(store, cfg, TrainError, what=str(path))
    M = len(cfg.quant.map_sizes(cfg.latent()))
    sq, lp, count = [0.0] * M, [0.0] * M, 0
    psnrs, ssims, pools_rec, pools_in = [], [], [], []
    for image, bases in centre_crops(store, cfg.image_size, tok.needs_bases, limit, batch):
        contribs = tok.quantizer.contributions(tok.encode(image, bases))
        f_hat = torch.zeros_like(contribs[0])
        image = tok.to_pixels(image)          # measured on pixels, whatever the tokenizer's space
        for m, c in enumerate(contribs):
            f_hat = f_hat + c
            rec = tok.to_pixels(tok.decode_features(f_hat))
            err_B = (rec - image).square().mean((1, 2, 3))
            sq[m] += float(err_B.sum())
            if lpips is not None:
                lp[m] += float(lpips(to_model(rec), to_model(image)).sum())
        # rec is now the final depth's, the full reconstruction.
        psnrs += [psnr_from_mse(e) for e in err_B.tolist()]
        rec_BHW3, image_BHW3 = (x.permute(0, 2, 3, 1).numpy() for x in (rec, image))
        ssims += [ssim(a, b) for a, b in zip(rec_BHW3, image_BHW3)]
        if inception is not None:
            pools_rec.append(inception_features(inception, [to_uint8(rec_BHW3)])[0])
            pools_in.append(inception_features(inception, [to_uint8(image_BHW3)])[0])
        count += image.shape[0]
    # A run folder is named by itself (its latest checkpoint), a checkpoint file by folder/file.
    name = as_path(run).name if as_path(run).is_dir() else f"{path.parent.name}/{path.stem}"
    sides = cfg.quant.map_sizes(cfg.latent())
    rows = []
    for m in range(M):
        mse = sq[m] / count
        rows.append(DepthRow(name, cfg.quant.kind, m + 1, sides[m], mse, psnr_from_mse(mse), count,
                             lp[m] / count if lpips is not None else float("nan")))
    final = FinalRow(name, cfg.quant.kind, count, float(np.mean(psnrs)), float(np.mean(ssims)), rows[-1].lpips)
    if inception is not None:
        final.rfid = fid(np.concatenate(pools_rec), fid_stats(np.concatenate(pools_in)))
    return rows, final


def evaluate(cfg: "EvalConfig") -> Tuple[List[DepthRow], List[FinalRow]]:
    """Every run of cfg on its store: per-depth rows and one final row per run."""
    from ..evaluation.inception import INCEPTION, load_inception
    from ..weights import WeightsError, weights_file

    try:
        store = DecompositionStore(cfg.data)
    except StoreError as e:
        raise TrainError(str(e)) from None
    for run in cfg.runs:            # a bad RUN is named before any weights are looked for
        tcfg = config_of(run)
        check_memory(inference_needs(tcfg, cfg.batch_size, f"--batch-size {cfg.batch_size}"),
                     device=cfg.device, max_memory=cfg.max_memory)
    # Both weights are looked for before either is refused, so that one line names every missing
    # file and the option that does without it (not one failure per rerun).
    missing, lpips, inception = [], None, None
    if cfg.lpips:
        try:
            lpips = build_lpips("alex", no_download=cfg.offline,
                                without=f"{flag_of(EvalConfig, 'lpips')} leaves LPIPS out")
        except WeightsError as e:
            missing.append(str(e))
    if cfg.rfid:
        try:
            inception = load_inception(weights_file(
                INCEPTION, cfg.inception_weights, no_download=cfg.offline,
                option=flag_of(EvalConfig, "inception_weights"),
                without=f"{flag_of(EvalConfig, 'rfid')} leaves rFID out"))
        except WeightsError as e:
            missing.append(str(e))
    if missing:
        raise WeightsError("; and ".join(missing))
    rows: List[DepthRow] = []
    finals: List[FinalRow] = []
    for run in cfg.runs:
        r, f = evaluate_run(run, store, limit=cfg.images, batch=cfg.batch_size, lpips=lpips, inception=inception)
        rows += r
        finals.append(f)
    return rows, finals


def write_results(rows: Sequence[DepthRow], finals: Sequence[FinalRow], out: Path) -> Dict[str, Path]:
    """OUT/eval.csv (per depth), OUT/final.csv (final depth), OUT/eval.png (MSE against depth)."""
    from ..plots import line_plot
    from ..stores.atomic import atomic_write

    out = as_path(out)                  # a URL (s3://...): each file is one upload (stores.atomic)
    if is_local(out):
        out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "final.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "quantizer", "images", "psnr", "ssim", "lpips", "rfid"])
        for r in finals:
            w.writerow([r.run, r.quantizer, r.images, f"{r.psnr:.4f}", f"{r.ssim:.5f}",
                        "" if math.isnan(r.lpips) else f"{r.lpips:.6g}", "" if math.isnan(r.rfid) else f"{r.rfid:.4f}"])
    with atomic_write(out / "eval.csv") as tmp, open(tmp, "w", newline="") as f:
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
    return {"csv": out / "eval.csv", "final": out / "final.csv", "png": out / "eval.png"}


def table(rows: Sequence[DepthRow], finals: Sequence[FinalRow] = ()) -> str:
    lines = [f"{'run':<28} {'quantizer':<11} {'depth':>5} {'side':>4} {'MSE':>10} {'PSNR dB':>8}"]
    lines += [f"{r.run:<28} {r.quantizer:<11} {r.depth:>5} {r.map_side:>4} {r.mse:>10.5f} {r.psnr:>8.2f}"
              for r in rows]
    if finals:
        num = lambda v, f: "-" if math.isnan(v) else format(v, f)        # noqa: E731
        lines += ["", f"{'final depth':<28} {'quantizer':<11} {'images':>6} {'PSNR dB':>8} {'SSIM':>6} "
                      f"{'LPIPS':>6} {'rFID':>8}"]
        lines += [f"{r.run:<28} {r.quantizer:<11} {r.images:>6} {r.psnr:>8.2f} {r.ssim:>6.4f} "
                  f"{num(r.lpips, '6.4f'):>6} {num(r.rfid, '8.2f'):>8}" for r in finals]
    return "\n".join(lines)
