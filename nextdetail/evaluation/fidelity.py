"""`nextdetail eval-samples SAMPLES [--ref REF]`: FID, IS, KID and precision/recall of a set of
generated images, computed on Inception-v3 features (inception.py) with torch-fidelity's metric
functions (the same estimators its own CLI uses):

    FID   ||mu_s - mu_r||^2 + Tr(S_s + S_r - 2 (S_s S_r)^(1/2))     pool features, 2048-d
    IS    exp E_x KL(p(y|x) || p(y)), mean and std over 10 splits  samples only (logits)
    KID   unbiased MMD^2, cubic polynomial kernel, 100 subsets of min(1000, N) images
    P/R   Kynkaanniemi et al. 2019: a sample is "precise" when it falls in the k-NN ball (k = 3)
          of some reference image; recall swaps the roles

FID against a REF given as statistics (mu, sigma) uses them as they are (ADM's evaluator does
the same with its reference batch's), KID and P/R then need REF's images and are left out when
it has none. Every number is written with the number of images of each set and the sha256 of
the Inception weights, so a figure can be traced to what made it.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .. import __version__
from ..errors import ConfigError
from ..npz import IMAGES, npz_keys
from ..limits import Need, check_max_memory, check_memory, memory_opt
from ..options import check_int, opt
from ..storage import as_path
from ..stores.atomic import atomic_write, write_bytes_atomic
from ..weights import offline_opt, weights_file
from .image_sets import open_image_set, read_stats
from .inception import INCEPTION, inception_features, load_inception

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSamplesConfig:
    """Settings of `nextdetail eval-samples`."""

    samples: Path = opt(help="generated images: a folder, an ADM .npz (arr_0) or a decomposition store",
                        positional=True, metavar="SAMPLES")
    ref: Optional[Path] = opt(None, "reference: a folder, an ADM .npz, a store, or statistics (an .npz "
                                    "with mu and sigma: an ADM reference batch, or --save-stats output); "
                                    "none: IS only", metavar="REF")
    size: Optional[int] = opt(None, "folders: resize the shorter side to N (Lanczos) and centre-crop N x N "
                                    "(needed when a folder's images differ in size)", metavar="N", ge=1)
    inception_weights: Optional[Path] = opt(None, "the Inception weights file (default: the torch hub "
                                                  "cache, downloaded there when allowed)", metavar="FILE")
    offline: bool = offline_opt()
    save_stats: Optional[Path] = opt(None, "write SAMPLES' FID statistics (mu, sigma) to this .npz, to be "
                                           "a REF later", metavar="FILE")
    out: Optional[Path] = opt(None, "results JSON (default: SAMPLES-eval.json beside SAMPLES)", metavar="FILE")
    batch_size: int = opt(50, "images per Inception batch", ge=1)
    kid_subsets: int = opt(100, "KID: subsets averaged", ge=1)
    kid_subset_size: int = opt(1000, "KID: images per subset (at most the smaller set's size)", ge=1)
    prc_neighborhood: int = opt(3, "precision/recall: k of the k-NN balls", ge=1)
    device: str = opt("cpu", "torch device of the Inception network")
    max_memory: Optional[str] = memory_opt()

    def __post_init__(self):
        check_max_memory(self.max_memory)
        for name in ("batch_size", "kid_subsets", "kid_subset_size", "prc_neighborhood"):
            check_int(name, getattr(self, name))
        check_int("size", self.size, optional=True)

    def out_path(self) -> Path:
        if self.out is not None:
            return as_path(self.out)        # a URL stays one: written with one upload
        s = as_path(self.samples)
        return s.parent / f"{s.stem if s.suffix == '.npz' else s.name}-eval.json"


@dataclass
class EvalReport:
    results: dict
    out: Path
    seconds: float

    def table(self) -> str:
        m = self.results["metrics"]
        rows = [("FID", m.get("fid")), ("IS", m.get("is_mean"), m.get("is_std")),
                ("KID", m.get("kid_mean"), m.get("kid_std")), ("precision", m.get("precision")),
                ("recall", m.get("recall"))]
        lines = []
        for name, *vals in rows:
            if vals[0] is None:
                continue
            text = f"{vals[0]:.4f}" + (f" +- {vals[1]:.4f}" if len(vals) > 1 and vals[1] is not None else "")
            lines.append(f"{name:<10} {text}")
        return "\n".join(lines)

    def summary(self) -> str:
        s, r = self.results["samples"], self.results.get("ref")
        against = f" against {r['images']} ({r['kind']})" if r else ""
        n = s["images"] + ((r or {}).get("images") or 0)
        return (f"evaluated {s['images']} images ({s['kind']}){against} in {self.seconds:.1f} s "
                f"({n / max(self.seconds, 1e-9):.1f} images/s through Inception); results {self.out}")


def fid_stats(pool: np.ndarray) -> dict:
    """mu (D,) and sigma (D, D), float64, of pool features (N, D): torch-fidelity's estimator."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    import torch
    return fid_features_to_statistics(torch.from_numpy(pool))


def fid(pool: np.ndarray, ref_stats: dict) -> float:
    """FID of pool features (N, 2048) against reference statistics {mu, sigma}."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    return float(fid_statistics_to_metric(fid_stats(pool), ref_stats, verbose=False)["frechet_inception_distance"])


def fidelity_metrics(pool_s: np.ndarray, logits_s: np.ndarray, ref_pool: Optional[np.ndarray],
                     ref_stats: Optional[dict], *, kid_subsets: int = 100, kid_subset_size: int = 1000,
                     prc_neighborhood: int = 3) -> dict:
    """The metrics of samples (pool features (N, 2048), logits (N, 1008)) against a reference
    given as features and/or statistics; a metric whose inputs are missing is left out."""
    import torch
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    n = len(pool_s)
    out = {}
    isc = isc_features_to_metric(torch.from_numpy(logits_s), splits=min(10, n))
    out["is_mean"], out["is_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    if ref_stats is None and ref_pool is not None:
        ref_stats = fid_stats(ref_pool)
    if ref_stats is not None:
        out["fid"] = fid(pool_s, ref_stats)
    if ref_pool is not None:
        f_s, f_r = torch.from_numpy(pool_s), torch.from_numpy(ref_pool)
        kid = kid_features_to_metric(f_s, f_r, kid_subsets=kid_subsets, verbose=False,
                                     kid_subset_size=min(kid_subset_size, n, len(ref_pool)))
        out["kid_mean"], out["kid_std"] = kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]
        prc = prc_features_to_metric(f_s, f_r, prc_neighborhood=prc_neighborhood, verbose=False)
        out["precision"], out["recall"], out["f_score"] = prc["precision"], prc["recall"], prc["f_score"]
    return out


def evaluate_samples(cfg: EvalSamplesConfig, progress=None) -> EvalReport:
    """Read both sets, extract their features, compute the metrics, write the JSON."""
    from ..checksum import file_sha256

    t0 = time.perf_counter()
    samples = open_image_set(cfg.samples, cfg.size)
    ref = ref_stats = None
    if cfg.ref is not None:
        ref_stats = read_stats(cfg.ref)                 # mu, sigma when the file holds them
        statistics_only = Path(cfg.ref).suffix == ".npz" and IMAGES not in npz_keys(cfg.ref)
        ref = None if statistics_only else open_image_set(cfg.ref, cfg.size)
    small = min(samples.n, ref.n) if ref is not None else samples.n
    if ref is not None and small <= cfg.prc_neighborhood:
        raise ConfigError(f"--prc-neighborhood {cfg.prc_neighborhood}: the sets need more images than that "
                          f"(the smaller has {small})")
    B = cfg.batch_size
    # Inception-v3 at 299 px: the batch, and its widest step (64 channels at 147 x 147, in and out).
    check_memory([Need(f"--batch-size {B}", f"Inception-v3 on {B} images", B * (3 * 299 * 299 + 2 * 64 * 147 * 147) * 4)],
                 device=cfg.device, max_memory=cfg.max_memory)
    weights = weights_file(INCEPTION, cfg.inception_weights, no_download=cfg.offline, option="--inception-weights")
    net = load_inception(weights, cfg.device)
    pool_s, logits_s = inception_features(net, samples.batches(cfg.batch_size), cfg.device, progress)
    ref_pool = inception_features(net, ref.batches(cfg.batch_size), cfg.device, progress)[0] if ref else None
    if cfg.save_stats is not None:
        st = fid_stats(pool_s)
        with atomic_write(cfg.save_stats) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=st["mu"], sigma=st["sigma"])
    metrics = fidelity_metrics(pool_s, logits_s, ref_pool, ref_stats, kid_subsets=cfg.kid_subsets,
                               kid_subset_size=cfg.kid_subset_size, prc_neighborhood=cfg.prc_neighborhood)
    ref_about = None
    if cfg.ref is not None:
        ref_about = ref.describe() if ref is not None else {"path": str(cfg.ref), "kind": "statistics",
                                                            "images": None}
        ref_about["fid_from"] = "its mu, sigma" if ref_stats is not None else "its images"
    results = {"nextdetail_version": __version__, "metrics": metrics, "samples": samples.describe(),
               "ref": ref_about,
               "inception": {"file": str(weights), "sha256": file_sha256(weights),
                             "features": "pool 2048, logits_unbiased 1008 (torch-fidelity inception-v3-compat)"},
               "settings": {"size": cfg.size, "kid_subsets": cfg.kid_subsets,
                            "kid_subset_size": min(cfg.kid_subset_size, small),
                            "prc_neighborhood": cfg.prc_neighborhood, "is_splits": min(10, samples.n)},
               "save_stats": None if cfg.save_stats is None else str(cfg.save_stats)}
    out = cfg.out_path()
    write_bytes_atomic(out, (json.dumps(results, indent=1) + "\n").encode())
    return EvalReport(results, out, time.perf_counter() - t0)
