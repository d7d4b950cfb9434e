"""Sampling from a trained next-detail transformer: KV-cached, map by map, with CFG.

    run = load_run("RUN2")                                  # model + tokenizer (decoder, quantizer)
    out = generate(run.model, run.tokenizer.quantizer, labels_B, cfg=1.5, top_k=0, top_p=0.0,
                   generator=torch.Generator().manual_seed(0))
    out.maps, out.f_hat                                     # M int64 (B, h_k, w_k); (B, Cvae, L, L)
    images = run.tokenizer.decode(out.maps)

Map k is drawn from the logits of one `model.step` over its h_k w_k tokens, all at once, given the
key/value cache of maps < k; its input is the cumulative f_hat so far at map k's size. The base
maps come first, then the detail maps.

Classifier-free guidance: the batch is doubled (true class, null class) and map k's logits are
u + s_k (c - u) with s_k = 1 + (cfg - 1) k / (M - 1), a linear ramp from no guidance on the first
map to `cfg` on the last (VAR's ramp, written so that cfg = 1 switches guidance off and skips the
unconditional half).

High resolution without retraining (CART): `generate_highres` draws the base maps at the
trained size, upsamples the base by an integer `scale` (as an image, decoded, resized and
encoded again, or as features; `upsample_base`), and draws the
detail maps patchwise on L x L windows of the (scale L)^2 latent, each window conditioned on its
own crop of the upsampled base (re-quantized into the base maps by the tokenizer's own
multi-scale residual quantization, then fed as a teacher-forced prefix). Windows either tile the
latent (`overlap=False`, CART-NOV) or step by L/2 (`overlap=True`, CART-OV), their detail
features blended with a tent window. The decoder is convolutional, so it decodes the larger
latent directly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, NextDetailError
from ..limits import check_max_memory, memory_opt
from ..options import check_int, opt
from ..tokenize import CheckpointError, Tokenizer
from .inputs import next_input, prefix_features
from .memory import check_draw
from .model import NextDetailTransformer, TransformerConfig

log = logging.getLogger(__name__)


class SampleError(NextDetailError, ValueError):
    """Sampling cannot run as asked (run folder, tokenizer, class, options); one line."""


@dataclass(frozen=True, kw_only=True)
class DrawOptions:
    """What `sample`, `upscale` and `edit` share: how tokens are drawn, where the run is loaded."""

    top_k: int = opt(0, "keep the k most likely tokens; 0: all", ge=0)
    top_p: float = opt(0.0, "nucleus sampling mass; 0: off", ge=0, le=1)
    temperature: float = opt(1.0, "softmax temperature", gt=0)
    tokenizer: Optional[Path] = opt(None, "the tokenizer run, when it moved since training (its sha256 must "
                                          "match)", metavar="RUN")
    device: str = opt("cpu", "torch device")
    max_memory: Optional[str] = memory_opt()

    def __post_init__(self):
        if not 0.0 <= self.top_p <= 1.0 or self.top_k < 0 or self.temperature <= 0:
            raise ConfigError(f"--top-p {self.top_p}, --top-k {self.top_k}, --temperature {self.temperature}: "
                              f"need 0 <= top-p <= 1, top-k >= 0, temperature > 0")
        check_max_memory(self.max_memory)

    def draw(self) -> dict:
        """The keywords of `generate` that shape each draw: top_k, top_p, temperature."""
        return {"top_k": self.top_k, "top_p": self.top_p, "temperature": self.temperature}


@dataclass(frozen=True, kw_only=True)
class SampleConfig(DrawOptions):
    """Settings of `nextdetail sample`; the generation fields are sample_to_folder's keywords."""

    run: Path = opt(help="run folder of `nextdetail train` (or a checkpoint)", positional=True, metavar="RUN2")
    out: Path = opt(Path("out/samples"), "output folder", metavar="DIR")
    label: str = opt("-1", "class label or class name (a class folder of the data)", flag="--class",
                     metavar="C", default_help="none: unconditional")
    n: int = opt(16, "images (without --per-class)", ge=1)
    cfg: float = opt(1.5, "guidance scale on the last map; 1: off", ge=0)
    seed: int = opt(0, "seed of the samples", ge=0)
    batch_size: int = opt(16, "images generated at once", ge=1)
    highres: int = opt(1, "integer upscale of the trained resolution (base upsampled, details patchwise)",
                       metavar="S", ge=1)
    overlap: bool = opt(False, "--highres: 50%% overlapping detail patches")
    highres_base: str = opt("image", "--highres: upsample the base as an image and re-encode it, or its "
                                     "features", choices=("image", "latent"))
    per_class: int = opt(0, "evaluation batch: K images of every class, seeded per sample, written as "
                            "DIR/images/NNNNNN.png and resumable DIR/parts; 0: off", metavar="K", ge=0)
    npz: Optional[Path] = opt(None, "--per-class: also write the samples as one ADM .npz batch (arr_0 images, "
                                    "arr_1 labels)", metavar="FILE")
    png: bool = opt(True, "--per-class: no DIR/images/NNNNNN.png (parts and --npz only)", flag="--no-png")

    def __post_init__(self):
        super().__post_init__()
        if self.cfg < 0:
            raise ConfigError(f"--cfg {self.cfg}: must be >= 0")
        check_int("highres", self.highres)
        check_int("n", self.n)
        check_int("batch_size", self.batch_size)
        check_int("per_class", self.per_class, 0)
        if not self.per_class and (self.npz is not None or not self.png):
            raise ConfigError(f"{'--npz' if self.npz is not None else '--no-png'}: only with --per-class K")
        if self.per_class and self.label != "-1":
            raise ConfigError(f"--class {self.label} with --per-class: every class is drawn; leave --class out")
        if self.per_class and self.highres > 1:
            raise ConfigError(f"--per-class with --highres {self.highres}: evaluation batches are drawn at "
                              "the trained resolution; leave --highres out")

    def generation(self) -> dict:
        """The keywords of sample_to_folder besides the run, the folder and the label."""
        skip = ("run", "out", "label", "tokenizer", "device", "per_class", "npz", "png")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


@dataclass
class Generated:
    maps: List[torch.Tensor]        # M int64 (B, h_k, w_k)
    f_hat: torch.Tensor             # (B, Cvae, L, L): sum of every map's contribution
    f_stages: List[torch.Tensor]    # f_hat after the base maps, then after each detail factor


def filter_logits(logits_NV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Keep the top_k largest logits (0: all) and the smallest set whose probability reaches
    top_p (0 or 1: all); the rest become -inf."""
    V = logits_NV.shape[-1]
    if 0 < top_k < V:
        kth = logits_NV.topk(top_k, -1).values[..., -1:]
        logits_NV = logits_NV.masked_fill(logits_NV < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_NV, order = logits_NV.sort(-1, descending=True)
        cum = sorted_NV.softmax(-1).cumsum(-1)
        drop = cum - sorted_NV.softmax(-1) >= top_p          # mass before this token already enough
        drop[..., 0] = False
        logits_NV = logits_NV.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits_NV


def inverse_cdf(probs_BNV: torch.Tensor, u_BN: torch.Tensor) -> torch.Tensor:
    """int64 (B, N): the token whose CDF interval holds u * total mass, u in [0, 1). The first
    token with cdf > u (searchsorted right), so that u = 0 skips leading zero-probability tokens;
    clamped to the last token of positive probability, in case rounding puts u at the very top."""
    cdf_BNV = probs_BNV.cumsum(-1)
    x_BN1 = (u_BN * cdf_BNV[..., -1]).unsqueeze(-1)
    idx_BN = torch.searchsorted(cdf_BNV.contiguous(), x_BN1.contiguous(), right=True).squeeze(-1)
    V = probs_BNV.shape[-1]
    last_BN = V - 1 - (probs_BNV.flip(-1) > 0).int().argmax(-1)
    return torch.minimum(idx_BN, last_BN)


def draw_per_row(probs_BNV: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per position, row b's uniforms drawn from generators[b] alone: a row's tokens do
    not depend on the other rows of the batch (given its own probabilities)."""
    B, N, _ = probs_BNV.shape
    if len(generators) != B:
        raise SampleError(f"{len(generators)} generators for a batch of {B} rows")
    u_BN = torch.stack([torch.rand(N, generator=g, device=probs_BNV.device, dtype=probs_BNV.dtype)
                        for g in generators])
    return inverse_cdf(probs_BNV, u_BN)


def guidance_scale(cfg: float, k: int, M: int) -> float:
    """s_k = 1 + (cfg - 1) k / (M - 1): no guidance on map 0, cfg on the last map."""
    return cfg if M == 1 else 1.0 + (cfg - 1.0) * k / (M - 1)


def stage_ends(M: int, num_base: int, order: int) -> List[int]:
    """Number of maps after the base and after each detail factor: [B, B + d, ..., M]."""
    if order < 1 or num_base >= M:
        return [M]
    d = (M - num_base) // order
    return [num_base + j * d for j in range(order)] + [M]


@torch.no_grad()
def generate(model: NextDetailTransformer, quantizer, labels_B: torch.Tensor, *, cfg: float = 1.5,
             top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
             generator: Optional[torch.Generator | Sequence[torch.Generator]] = None,
             prefix: Sequence[torch.Tensor] = (),
             num_base: Optional[int] = None, order: int = 0, stop: Optional[int] = None) -> Generated:
    """Draw maps len(prefix)..stop-1 (default all M) for labels_B (int64 (B,); -1: unconditional);
    `prefix` maps (B, h_k, w_k) are given, not drawn (teacher-forced into the cache).
    generator: one torch.Generator for the batch (torch.multinomial), or a list of B, one per row
    (inverse-CDF draws, `draw_per_row`: each row's tokens come from its own generator)."""
    model.eval()
    mc = model.cfg
    M = len(mc.map_shapes) if stop is None else stop
    B, dev = labels_B.shape[0], labels_B.device
    guided = cfg != 1.0
    null = torch.full_like(labels_B, mc.num_classes)
    labels_2 = torch.cat([labels_B, null]) if guided else labels_B
    cache = model.new_cache()
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if labels_B.device.type == "cuda"
           else contextlib.nullcontext())
    maps: List[torch.Tensor] = []
    f_hat, f_in = None, None
    ends = stage_ends(M, num_base if num_base is not None else M, order)
    stages = []
    for k in range(M):
        h, w = mc.map_shapes[k]
        x = None if k == 0 else (torch.cat([f_in, f_in]) if guided else f_in)
        if k < len(prefix):
            with amp:
                model.step(k, labels_2, x, cache)
            idx_Bhw = prefix[k].to(dev)
        else:
            with amp:
                logits = model.step(k, labels_2, x, cache).float()
            if guided:
                c, u = logits.chunk(2)
                logits = u + guidance_scale(cfg, k, len(mc.map_shapes)) * (c - u)
            logits = filter_logits(logits / max(temperature, 1e-6), top_k, top_p)
            if isinstance(generator, (list, tuple)):
                idx_Bhw = draw_per_row(logits.softmax(-1), generator).view(B, h, w)
            else:
                probs = logits.softmax(-1).flatten(0, 1)
                idx_Bhw = torch.multinomial(probs, 1, generator=generator).view(B, h, w)
        maps.append(idx_Bhw)
        nxt = mc.map_shapes[k + 1] if k + 1 < M else None
        f_hat, f_in = next_input(quantizer, k, idx_Bhw, f_hat, nxt)
        if k + 1 in ends:
            stages.append(f_hat)
    return Generated(maps, f_hat, stages)


# ----------------------------------------------------------------------------- high resolution

def requantize_base(quantizer, f_BCLL: torch.Tensor, num_base: int) -> List[torch.Tensor]:
    """The base maps of a base feature: the quantizer's multi-scale residual quantization
    (Algorithm 1's base stage) of f, maps 0..num_base-1."""
    part, maps = torch.zeros_like(f_BCLL), []
    for k in range(num_base):
        idx, c = quantizer.quantize_map(k, f_BCLL - part)
        maps.append(idx)
        part = part + c
    return maps


def patch_boxes(S: int, L: int, overlap: bool) -> List[tuple]:
    """Top-left corners (y, x) of the L x L windows over an S x S latent: a tiling (stride L) or
    50 % overlapping windows (stride L/2); the last row/column is moved in to end at S."""
    stride = max(1, L // 2) if overlap else L
    starts = list(range(0, S - L + 1, stride))
    if starts[-1] != S - L:
        starts.append(S - L)
    return [(y, x) for y in starts for x in starts]


def tent(L: int, device) -> torch.Tensor:
    """(L, L) separable tent window, > 0 everywhere, for blending 50%-overlapping patches."""
    t = 1.0 - (2 * (torch.arange(L, device=device) + 0.5) / L - 1).abs() + 1.0 / L
    return t[:, None] * t[None, :]


@torch.no_grad()
def upsample_base(f_base_BCLL: torch.Tensor, scale: int, tokenizer=None) -> torch.Tensor:
    """The base features at scale x the latent side. With a tokenizer (the default path): decode
    the base to an image, bicubic-upsample the image, and encode it again, which is how a base
    image's features f_Bn are made in training; without one: bicubic upsampling of the features."""
    if scale == 1:
        return f_base_BCLL
    if tokenizer is None:
        return F.interpolate(f_base_BCLL, scale_factor=scale, mode="bicubic")
    from ..tokenize.tokenizer import to_model
    img = tokenizer.decode_features(f_base_BCLL)          # the tokenizer's own space, as encode takes
    img = F.interpolate(img, scale_factor=scale, mode="bicubic").clamp(0, 1)
    return tokenizer.encoder(to_model(img))


@torch.no_grad()
def generate_highres(model, quantizer, labels_B, *, scale: int = 2, overlap: bool = False, num_base: int,
                     order: int, patch_batch: int = 64, tokenizer=None, **kw):
    """(f_base_up, f_hat) at (B, Cvae, scale L, scale L): the upsampled base and base + patchwise details.
    tokenizer: upsample the base as an image (decode, resize, encode; see `upsample_base`), else
    the features. kw: cfg, top_k, top_p, temperature, generator as in `generate`."""
    M = len(model.cfg.map_shapes)
    if num_base >= M:
        raise SampleError("high-resolution generation needs a base-detail model (detail maps after the base)")
    if scale < 1:
        raise SampleError(f"scale {scale}: must be >= 1")
    base = generate(model, quantizer, labels_B, stop=num_base, **kw)
    f_up = upsample_base(base.f_hat, scale, tokenizer)
    return f_up, patchwise_details(model, quantizer, f_up, labels_B, num_base=num_base, overlap=overlap,
                                   patch_batch=patch_batch, **kw)


@torch.no_grad()
def patchwise_details(model, quantizer, f_up: torch.Tensor, labels_B, *, num_base: int, overlap: bool = False,
                      patch_batch: int = 64, **kw) -> torch.Tensor:
    """f_up + details drawn on L x L windows of a base feature f_up (B, Cvae, S, S), S a multiple
    of the latent side L: each window's crop of f_up is re-quantized into the base maps and fed as
    a teacher-forced prefix, the detail maps drawn after it; overlapping windows are blended with
    a tent. kw: cfg, top_k, top_p, temperature, generator as in `generate`."""
    L, S = quantizer.latent, f_up.shape[-1]
    boxes = patch_boxes(S, L, overlap)
    B = labels_B.shape[0]
    win = tent(L, f_up.device) if overlap else torch.ones(L, L, device=f_up.device)
    acc, wsum = torch.zeros_like(f_up), torch.zeros(S, S, device=f_up.device)
    crops = torch.cat([f_up[:, :, y:y + L, x:x + L] for y, x in boxes])      # (P B, C, L, L), patch-major
    labels_P = labels_B.repeat(len(boxes))
    for lo in range(0, crops.shape[0], patch_batch):
        f_p = crops[lo:lo + patch_batch]
        prefix = requantize_base(quantizer, f_p, num_base)
        out = generate(model, quantizer, labels_P[lo:lo + patch_batch], prefix=prefix, **kw)
        detail = out.f_hat - prefix_features(quantizer, prefix)
        for j in range(detail.shape[0]):
            p, b = divmod(lo + j, B)
            y, x = boxes[p]
            acc[b, :, y:y + L, x:x + L] += detail[j] * win
            wsum[y:y + L, x:x + L] += win
    return f_up + acc / wsum


# ----------------------------------------------------------------------------- runs and files

@dataclass
class Run:
    model: NextDetailTransformer
    tokenizer: Tokenizer
    num_base: int
    order: int
    checkpoint: Path
    meta: dict


def load_run(run, tokenizer=None, device="cpu") -> Run:
    """The latest checkpoint of a training run folder (or a checkpoint file) and its tokenizer
    (the recorded checkpoint, or `tokenizer`: a run folder or checkpoint with the same sha256)."""
    from ..runs import RunError, checkpoint_kind, latest_checkpoint, load_checkpoint
    from ..stores.tokens import file_sha256

    try:
        path = latest_checkpoint(run)
        ck = load_checkpoint(path, device, what="`nextdetail train` checkpoint")
    except RunError as e:
        raise SampleError(f"{e} (a `nextdetail train` run)") from None
    kind = checkpoint_kind(ck)
    if not kind.startswith("transformer"):
        raise SampleError(f"{path}: a {kind}, not a transformer run (nextdetail train)")
    try:
        mcfg = TransformerConfig.from_dict(ck["model_config"])
    except Exception as e:  # missing keys, wrong types
        raise SampleError(f"{path}: not a `nextdetail train` checkpoint ({type(e).__name__}: {e})") from None
    model = NextDetailTransformer(mcfg).to(device)
    model.load_state_dict(ck["model"])
    model.eval()
    try:
        tok_path = latest_checkpoint(tokenizer) if tokenizer is not None else Path(ck["tokenizer"]["checkpoint"])
    except RunError as e:
        raise SampleError(str(e)) from None
    if not tok_path.is_file():
        raise SampleError(f"{path}: its tokenizer {tok_path} is not here; pass --tokenizer RUN")
    if file_sha256(tok_path) != ck["tokenizer"]["sha256"]:
        raise SampleError(f"tokenizer {tok_path} is not the one {path} was trained with "
                          f"({ck['tokenizer']['checkpoint']})")
    try:
        tok = Tokenizer.from_checkpoint(tok_path, map_location=device).to(device)
    except CheckpointError as e:
        raise SampleError(str(e)) from None
    return Run(model, tok, int(ck["data"]["num_base"]), int(ck["data"]["order"]), path,
               {"step": ck["step"], "tokenizer": str(tok_path), "tokens": ck["data"].get("tokens"),
                "class_names": list(ck["data"].get("class_names") or [])})


def strip_names(run: Run) -> List[str]:
    """What each image of a sample's strip shows, under its decomposition's factor names: the
    base, then the factors added one by one (B_3, +D_3, +D_2, +D_1; A_4, +E_4, ...; S_1, +A_1)."""
    from ..decomp import method_info

    names = method_info(run.tokenizer.config.decomposition).layer_names(run.order)
    return [names[0]] + [f"+{n}" for n in names[1:]]


def class_label(value: str, class_names: Sequence[Optional[str]]) -> int:
    """--class as given: an integer label, or a class name of the training data (its folder name)."""
    try:
        return int(value)
    except ValueError:
        pass
    if value in class_names:
        return list(class_names).index(value)
    known = ", ".join(f"{i}={c}" for i, c in enumerate(class_names) if c) or "none (integer labels only)"
    raise SampleError(f"class {value!r}: not a class of this model's training data; its names: {known}")


@torch.no_grad()
def decode(tok: Tokenizer, f_hat_BCHW: torch.Tensor) -> np.ndarray:
    """Features -> uint8 images (B, H, W, 3), pixels (a log-space tokenizer's converted)."""
    img = tok.to_pixels(tok.decode_features(f_hat_BCHW))
    return (img.permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def tile(images: Sequence[np.ndarray], cols: int, gap: int = 2) -> np.ndarray:
    """uint8 (H, W, 3) images of one size -> one grid image, white gaps."""
    h, w = images[0].shape[:2]
    rows = math.ceil(len(images) / cols)
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = im
    return out


@dataclass
class SampleReport:
    out: Path
    n: int
    seconds: float
    files: List[Path]

    def summary(self) -> str:
        rate = self.n / self.seconds if self.seconds > 0 else float("nan")
        return (f"sampled {self.n} images in {self.seconds:.1f} s ({rate:.2f} images/s); "
                f"grid {self.files[0]}; per-sample strips in {self.out}")


@torch.no_grad()
def sample_to_folder(run: Run, out, *, label: int = -1, n: int = 16, cfg: float = 1.5, top_k: int = 0,
                     top_p: float = 0.0, temperature: float = 1.0, seed: int = 0, batch_size: int = 16,
                     highres: int = 1, overlap: bool = False, highres_base: str = "image",
                     max_memory: Optional[str] = None, progress=None) -> SampleReport:
    """Generate n images of class `label` into `out`: grid.png (final images), sample_XXX.png per
    sample (base only, then + each detail factor, the last is the final image), samples.json."""
    import time
    from PIL import Image

    nc = run.model.cfg.num_classes
    if label >= nc or label < -1:
        raise SampleError(f"class {label}: this model knows classes 0..{nc - 1}" if nc else
                          f"class {label}: this model was trained without labels; leave --class out")
    if n < 1 or batch_size < 1:
        raise SampleError(f"--n {n}, --batch-size {batch_size}: must be >= 1")
    if highres > 1 and run.num_base >= len(run.model.cfg.map_shapes):
        raise SampleError("--highres needs a base-detail model (its tokens have detail maps after the base)")
    check_draw(run, min(n, batch_size), guidance=cfg != 1, option=f"--batch-size {batch_size}", scale=highres,
               scale_option=f"--highres {highres}", device=str(next(run.model.parameters()).device),
               max_memory=max_memory)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = next(run.model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    q = run.tokenizer.quantizer
    t0 = time.perf_counter()
    finals, files = [], []
    for lo in range(0, n, batch_size):
        labels = torch.full((min(batch_size, n - lo),), label, dtype=torch.int64, device=dev)
        kw = dict(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, generator=gen)
        if highres > 1:
            f_base, f_final = generate_highres(run.model, q, labels, scale=highres, overlap=overlap,
                                               num_base=run.num_base, order=run.order,
                                               tokenizer=run.tokenizer if highres_base == "image" else None, **kw)
            stages = [f_base, f_final]
        else:
            g = generate(run.model, q, labels, num_base=run.num_base, order=run.order, **kw)
            stages = g.f_stages
        imgs = [decode(run.tokenizer, f) for f in stages]            # each (b, H, W, 3)
        for j in range(labels.shape[0]):
            path = out / f"sample_{lo + j:03d}.png"
            Image.fromarray(tile([im[j] for im in imgs], cols=len(imgs))).save(path)
            files.append(path)
            finals.append(imgs[-1][j])
        if progress is not None:
            progress(labels.shape[0])
    grid = out / "grid.png"
    Image.fromarray(tile(finals, cols=math.ceil(math.sqrt(len(finals))))).save(grid)
    meta = {"checkpoint": str(run.checkpoint), "step": run.meta["step"], "class": label, "n": n, "cfg": cfg,
            "top_k": top_k, "top_p": top_p, "temperature": temperature, "seed": seed, "highres": highres,
            "overlap": overlap, "highres_base": highres_base, "strip": (", ".join(strip_names(run))
                                          if highres == 1 and len(stages) > 1 else
                                          ("upsampled base, final" if highres > 1 else "final"))}
    (out / "samples.json").write_text(json.dumps(meta, indent=1))
    return SampleReport(out, n, time.perf_counter() - t0, [grid] + files)
