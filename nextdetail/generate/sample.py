"""`nextdetail sample`: images of one class from a trained run, each as a strip of its stages.

    run = load_run("RUN2")
    report = sample_to_folder(run, "DIR", label=3, n=8, cfg=1.5, highres=2)

`SampleSettings` holds how `sample` draws, its defaults and checks written once; both
sample_to_folder (strips) and batches.sample_batches (--per-class evaluation batches) run with
it, given as the command's config or as keywords.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..pretrained import model_source
from ..storage import as_path, is_local
from typing import List, Optional

import torch

from ..errors import ConfigError
from ..options import check_int, opt
from .highres import generate_highres
from .images import decode, tile
from .loop import generate
from .memory import check_draw
from .options import DrawOptions, SampleError, settings_of
from .run import Run, strip_names


@dataclass(frozen=True, kw_only=True)
class SampleSettings(DrawOptions):
    """How `sample` draws (what sample_to_folder and sample_batches take)."""

    n: int = opt(16, "images (without --per-class)", ge=1)
    cfg: float = opt(1.5, "guidance scale on the last map; 1: off", ge=0)
    seed: int = opt(0, "seed of the samples", ge=0)
    batch_size: int = opt(16, "images generated at once", ge=1)
    highres: int = opt(1, "integer upscale of the trained resolution (base upsampled, details patchwise; runs "
                          "of the base-detail decomposition only)",
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
        if self.per_class and self.highres > 1:
            raise ConfigError(f"--per-class with --highres {self.highres}: evaluation batches are drawn at "
                              "the trained resolution; leave --highres out")


@dataclass(frozen=True, kw_only=True)
class SampleConfig(SampleSettings):
    """Settings of `nextdetail sample`: the run, the folder and the class, and how to draw."""

    run: Path = opt(help="run folder of `nextdetail train` (or a checkpoint)", positional=True, metavar="RUN2")
    out: Path = opt(Path("out/samples"), "output folder", metavar="DIR")
    label: str = opt("-1", "class label or class name (a class folder of the data)", flag="--class",
                     metavar="C", default_help="none: unconditional")

    def __post_init__(self):
        super().__post_init__()
        if self.per_class and self.label != "-1":
            raise ConfigError(f"--class {self.label} with --per-class: every class is drawn; leave --class out")


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


def check_highres(run: Run, option: str) -> None:
    """One line unless the run can be drawn above its training size. CART's strategy upsamples
    the base and draws the detail maps patchwise, which assumes a window of the base determines
    what its details add: true of the base-detail decomposition's D_k (texture on a base holding
    the colours), not of intrinsic albedo (the colours themselves, which a shading window does
    not fix, so patches would disagree), and untested for specular terms; both are refused
    (docs/transformer.md)."""
    from ..decomp.hierarchy import decomposition_name
    from ..tokenize.config import quantizer_name

    dec, kind = run.tokenizer.config.decomposition, run.tokenizer.config.quant.kind
    if dec != "base_detail" or run.num_base >= len(run.model.cfg.map_shapes):
        raise SampleError(f"{option} needs a run of {decomposition_name('base_detail')} with detail maps (the "
                          f"{quantizer_name('basedetail')}); {run.checkpoint} is a run of "
                          f"{decomposition_name(dec)} with the {quantizer_name(kind)}")


@torch.no_grad()
def sample_to_folder(run: Run, out, settings: Optional[SampleSettings] = None, *, label: int = -1, progress=None,
                     **fields) -> SampleReport:
    """Generate settings.n images of class `label` into `out`: grid.png (final images), sample_XXX.png
    per sample (base only, then + each detail factor, the last is the final image), samples.json.
    settings: a SampleSettings (the command's SampleConfig is one); fields: SampleSettings fields
    by name, over it (`settings_of`)."""
    from ..imageio import save_png
    from ..stores.atomic import write_bytes_atomic

    s = settings_of(SampleSettings, settings, fields)
    nc = run.model.cfg.num_classes
    if label >= nc or label < -1:
        raise SampleError(f"--class {label}: this model knows classes 0..{nc - 1}" if nc else
                          f"--class {label}: this model was trained without labels; leave --class out")
    if s.highres > 1:
        check_highres(run, f"--highres {s.highres}")
    check_draw(run, min(s.n, s.batch_size), guidance=s.cfg != 1, option=f"--batch-size {s.batch_size}",
               scale=s.highres, scale_option=f"--highres {s.highres}", device=str(next(run.model.parameters()).device),
               max_memory=s.max_memory)
    out = as_path(out)                  # a URL (s3://...): each file is one upload (stores.atomic)
    if is_local(out):
        out.mkdir(parents=True, exist_ok=True)
    dev = next(run.model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(s.seed)
    q = run.tokenizer.quantizer
    t0 = time.perf_counter()
    finals, files = [], []
    for lo in range(0, s.n, s.batch_size):
        labels = torch.full((min(s.batch_size, s.n - lo),), label, dtype=torch.int64, device=dev)
        kw = dict(cfg=s.cfg, generator=gen, **s.draw())
        if s.highres > 1:
            f_base, f_final = generate_highres(run.model, q, labels, scale=s.highres, overlap=s.overlap,
                                               num_base=q.num_base, order=q.order,
                                               tokenizer=run.tokenizer if s.highres_base == "image" else None, **kw)
            stages = [f_base, f_final]
        else:
            stages = generate(run.model, q, labels, num_base=q.num_base, order=q.order, **kw).f_stages
        imgs = [decode(run.tokenizer, f) for f in stages]            # each (b, H, W, 3)
        for j in range(labels.shape[0]):
            path = out / f"sample_{lo + j:03d}.png"
            save_png(tile([im[j] for im in imgs], cols=len(imgs)), path)
            files.append(path)
            finals.append(imgs[-1][j])
        if progress is not None:
            progress(labels.shape[0])
    grid = out / "grid.png"
    save_png(tile(finals, cols=math.ceil(math.sqrt(len(finals)))), grid)
    strip = (", ".join(strip_names(run)) if s.highres == 1 and len(stages) > 1 else
             ("upsampled base, final" if s.highres > 1 else "final"))
    meta = {"checkpoint": model_source(run.checkpoint), "step": run.meta["step"], "class": label, "n": s.n, "cfg": s.cfg,
            "top_k": s.top_k, "top_p": s.top_p, "temperature": s.temperature, "seed": s.seed, "highres": s.highres,
            "overlap": s.overlap, "highres_base": s.highres_base, "strip": strip}
    write_bytes_atomic(out / "samples.json", json.dumps(meta, indent=1).encode())
    return SampleReport(out, s.n, time.perf_counter() - t0, [grid] + files)
