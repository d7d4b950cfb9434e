"""Super-resolution by token prefix (the later CART paper's application, its Table 3), without
retraining: `nextdetail upscale IMAGE... --run RUN2 --scale 4`.

A base-detail model generates the base maps r_1..r_B first and the details after them, so a
low-resolution image can stand in for the first maps:

    x  (N x N)  --bicubic-->  x_T (T x T, T = the tokenizer's image size)
       --AT decomposition (the token store's parameters), 8-bit bases as a store holds them-->
       --tokenizer.encode-->  r_1 .. r_M;  keep r_1 .. r_K  (K = --prefix, default B: the base)
    output side O = scale N:
       O = T      : the transformer draws r_(K+1) .. r_M after the prefix (teacher-forced into
                    its KV cache), unconditionally; decode
       O = m T    : above the training resolution, the sampler's high-resolution strategy: the
                    prefix's base features are upsampled m x (as an image: decode, bicubic,
                    encode) and the details drawn patchwise on latent-sized windows (highres.py)

Beside each result: the bicubic upscale of x and a sheet (input, bicubic, result[, reference]);
with a reference (`--reference`, or `--downscale-first`, which takes each IMAGE as the reference
and makes its input by bicubic downscaling), PSNR and SSIM of both against it.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..decomp.hierarchy import decomposition_name
from ..errors import ConfigError
from ..options import check_int, opt
from ..pretrained import model_source
from ..storage import as_path, is_local
from ..tokenize.config import quantizer_name
from ..train.inputs import prefix_features
from .highres import patchwise_details, upsample_base
from .images import decode, tile
from .loop import generate
from .memory import check_draw
from .options import DrawOptions, SampleError
from .run import load_run

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class UpscaleConfig(DrawOptions):
    """Settings of `nextdetail upscale`."""

    images: Tuple[str, ...] = opt(help="low-resolution images (or, with --downscale-first, references)",
                                  positional=True, nargs="+", metavar="IMAGE", type=str)
    run: Path = opt(help="`nextdetail train` run of a base-detail model (or a checkpoint)", metavar="RUN2")
    out: Path = opt(Path("out/upscale"), "output folder", metavar="DIR")
    scale: int = opt(4, "upscaling factor", choices=(2, 4))
    input_size: Optional[int] = opt(None, "side N of the low-resolution input, a centre crop (default: the "
                                          "tokenizer's image size / scale, so the output is its image size)",
                                    metavar="N", ge=1)
    prefix: Optional[int] = opt(None, "token maps taken from the input (default: the base maps)", metavar="K", ge=1)
    overlap: bool = opt(False, "above the training resolution: 50%% overlapping detail windows")
    reference: Optional[Tuple[str, ...]] = opt(None, "the high-resolution originals, one per IMAGE: report "
                                                     "PSNR/SSIM against them", nargs="+", metavar="REF", type=str)
    downscale_first: bool = opt(False, "take each IMAGE as the reference: its centre crop of scale x N is "
                                       "bicubic-downscaled to N, upscaled, and both compared with it")
    seed: int = opt(0, "seed (each image draws from its own generator, seeded from it and its position)", ge=0)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "images", tuple(str(i) for i in self.images))
        check_int("input_size", self.input_size, optional=True)
        check_int("prefix", self.prefix, optional=True)
        if self.reference is not None:
            object.__setattr__(self, "reference", tuple(str(r) for r in self.reference))
            if len(self.reference) != len(self.images):
                raise ConfigError(f"--reference: {len(self.reference)} files for {len(self.images)} images")
            if self.downscale_first:
                raise ConfigError("--reference with --downscale-first: the images are their own references")


@dataclass
class UpscaleReport:
    out: Path
    rows: List[dict]
    seconds: float

    def summary(self) -> str:
        n = len(self.rows)
        text = f"upscaled {n} images in {self.seconds:.1f} s; results, bicubic and sheets in {self.out}"
        scored = [r for r in self.rows if "psnr" in r]
        if scored:
            mean = lambda k: float(np.mean([r[k] for r in scored]))             # noqa: E731
            text += (f"; against the references ({len(scored)}): PSNR {mean('psnr'):.2f} dB, SSIM "
                     f"{mean('ssim'):.4f} (bicubic {mean('bicubic_psnr'):.2f} dB, {mean('bicubic_ssim'):.4f})")
        return text


def bicubic(x_B3HW: torch.Tensor, side: int) -> torch.Tensor:
    """Resize to side x side, bicubic (antialiased when shrinking), clamped to [0, 1]."""
    return F.interpolate(x_B3HW, size=(side, side), mode="bicubic", antialias=side < x_B3HW.shape[-1],
                         align_corners=False).clamp(0, 1)


def store_inputs(image_B3HW: torch.Tensor, order: int, at: dict) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(I, [B_1, ..., B_n]) of images as the tokenizer saw them in training: AT-decomposed with the
    token store's parameters, the bases 8-bit as a decomposition store holds them, then the
    store reader's arithmetic (tokenize.bases.inputs_from_bases)."""
    from ..decomp import decompose
    from ..stores.shards import quantize_bases
    from ..tokenize.bases import inputs_from_bases

    x = image_B3HW.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
    dec = decompose(x, order, method="base_detail", backend="auto", **at)
    q = torch.from_numpy(quantize_bases(dec.bases)).to(image_B3HW.device)
    return inputs_from_bases(q, order, "linear")


def decomposition_params(run) -> Tuple[int, dict]:
    """(order, AT parameters) of the store the run's tokens came from (its token store's
    meta.json); the tokenizer's order and the default parameters, with a warning, when that
    token store cannot be read."""
    from ..decomp import ATParams
    from ..stores.tokens import read_token_meta

    order = run.tokenizer.needs_bases
    tokens = run.meta.get("tokens")
    try:
        # a store written before `tol` ran n_iter sweeps always: its missing tol is 0
        return order, ATParams.from_dict(read_token_meta(tokens)["decomposition"]["at"]).to_dict()
    except (TypeError, OSError, ValueError, KeyError) as e:
        log.warning("the run's token store (%s) is not readable (%s): decomposing with the default AT "
                    "parameters", tokens, e)
        return order, ATParams().to_dict()


@torch.no_grad()
def upscale_tensor(run, low_B3HW: torch.Tensor, scale: int, *, prefix: Optional[int] = None, overlap: bool = False,
                   generator=None, at: Optional[dict] = None, **kw) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Low-resolution images (B, 3, N, N) in [0, 1] -> (features of the result (B, Cvae, S, S), the
    prefix maps taken from the input). kw: top_k, top_p, temperature for the drawn maps."""
    tok, model, q = run.tokenizer, run.model, run.tokenizer.quantizer
    T, N = tok.config.image_size, low_B3HW.shape[-1]
    out_side = scale * N
    if tok.config.decomposition != "base_detail" or not q.order:
        raise SampleError(f"upscale needs a run of {decomposition_name('base_detail')} with the "
                          f"{quantizer_name('basedetail')}; {run.checkpoint} is a run of "
                          f"{decomposition_name(tok.config.decomposition)} with the {quantizer_name(tok.config.quant.kind)}")
    if out_side % T:
        raise SampleError(f"--input-size {N} x --scale {scale} = {out_side} px: the output must be a multiple of "
                          f"the tokenizer's {T} px (input {T // scale} for {T} px out)")
    K = q.num_base if prefix is None else int(prefix)
    M = len(model.cfg.map_shapes)
    m = out_side // T
    if not 1 <= K < M:
        raise SampleError(f"--prefix {K}: must be in 1..{M - 1} (the model has {M} maps)")
    if m > 1 and K != q.num_base:
        raise SampleError(f"--prefix {K} above the training resolution: the upsampled base is the "
                          f"{q.num_base} base maps; leave --prefix out")
    order, at = decomposition_params(run) if at is None else (tok.needs_bases, at)
    image, bases = store_inputs(bicubic(low_B3HW, T), order, at)
    maps = tok.encode(image, bases)[:K]
    labels = torch.full((low_B3HW.shape[0],), -1, dtype=torch.int64, device=low_B3HW.device)
    kw = dict(kw, cfg=1.0, generator=generator)                 # unconditional: no guidance
    if m == 1:
        return generate(model, q, labels, prefix=maps, num_base=q.num_base, order=q.order, **kw).f_hat, maps
    f_base = prefix_features(q, maps)
    f_up = upsample_base(f_base, m, tok)
    return patchwise_details(model, q, f_up, labels, num_base=q.num_base, overlap=overlap, **kw), maps


def upscale_files(cfg: UpscaleConfig, progress=None) -> UpscaleReport:
    """`nextdetail upscale`: each IMAGE alone (its own generator), results written as it goes."""
    from ..imageio import ImageError, load_image, save_png, to_uint8
    from ..stores.atomic import write_bytes_atomic
    from ..evaluation.metrics import psnr, ssim
    from .batches import sample_seed

    t0 = time.perf_counter()
    run = load_run(cfg.run, tokenizer=cfg.tokenizer, device=cfg.device)
    dev = next(run.model.parameters()).device
    T = run.tokenizer.config.image_size
    N = cfg.input_size or T // cfg.scale
    O = cfg.scale * N
    check_draw(run, 1, guidance=False, option=f"--input-size {N}", scale=max(1, O // T),
               scale_option=f"--input-size {N} x --scale {cfg.scale}", device=str(dev), max_memory=cfg.max_memory)
    out = as_path(cfg.out)              # a URL (s3://...): each file is one upload (stores.atomic)
    if is_local(out):
        out.mkdir(parents=True, exist_ok=True)
    order, at = decomposition_params(run)
    kw = cfg.draw()
    rows = []
    for i, path in enumerate(cfg.images):
        try:
            if cfg.downscale_first:
                ref = load_image(path, O)
                low = bicubic(torch.from_numpy(ref).permute(2, 0, 1)[None], N)[0].permute(1, 2, 0).numpy()
            else:
                low = load_image(path, N)
                ref = load_image(cfg.reference[i], O) if cfg.reference else None
        except ImageError as e:
            raise SampleError(str(e)) from None
        low = to_uint8(low).astype(np.float32) / 255        # the input as an 8-bit image, as a user has it
        x = torch.from_numpy(low).permute(2, 0, 1)[None].to(dev)
        gen = torch.Generator(device=dev).manual_seed(sample_seed(cfg.seed, -1, i))
        f, _ = upscale_tensor(run, x, cfg.scale, prefix=cfg.prefix, overlap=cfg.overlap, generator=gen, at=at, **kw)
        result = decode(run.tokenizer, f)[0]
        bic = to_uint8(bicubic(x, O)[0].permute(1, 2, 0).cpu().numpy())
        stem = f"{i:03d}_{Path(path).stem}"
        save_png(result, out / f"{stem}_x{cfg.scale}.png")
        save_png(bic, out / f"{stem}_bicubic.png")
        nearest = np.repeat(np.repeat(to_uint8(low), cfg.scale, 0), cfg.scale, 1)
        panels = [nearest, bic, result] + ([to_uint8(ref)] if ref is not None else [])
        save_png(tile(panels, cols=len(panels)), out / f"{stem}_sheet.png")
        row = {"image": str(path), "input": N, "output": O, "result": str(out / f"{stem}_x{cfg.scale}.png")}
        if ref is not None:
            r = to_uint8(ref).astype(np.float32) / 255
            a, b = result.astype(np.float32) / 255, bic.astype(np.float32) / 255
            row.update(psnr=psnr(a, r), ssim=ssim(a, r), bicubic_psnr=psnr(b, r), bicubic_ssim=ssim(b, r))
        rows.append(row)
        if progress is not None:
            progress(1)
    meta = {"run": model_source(run.checkpoint), "scale": cfg.scale, "input_size": N, "output_size": O,
            "prefix": cfg.prefix or run.num_base, "overlap": cfg.overlap, "seed": cfg.seed, "order": order, "at": at,
            "sheet": "input (nearest), bicubic, result" + (", reference" if rows and "psnr" in rows[0] else ""),
            "images": rows}
    write_bytes_atomic(out / "upscale.json", json.dumps(meta, indent=1).encode())
    return UpscaleReport(out, rows, time.perf_counter() - t0)
