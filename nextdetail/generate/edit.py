"""Editing generated samples through their factors, without retraining (the later CART paper's
applications): `nextdetail edit RUN2 --out DIR --edit recolor|relight`.

A next-detail model's token maps are an ordered sum of interpretable factors, base maps first:

    recolor (an intrinsic run: base maps = shading S, detail maps = albedo A)
        keep a sample's shading maps and change its albedo maps:
        swap      the albedo maps of the next sample (f = f_S(i) + f_A(i+1))
        redraw    new albedo maps drawn after the shading prefix, with another seed
                  (and --to-class, another class)
    relight (a specular run: base maps = diffuse base A_n, detail maps = specular terms E_k)
        keep the diffuse base maps and change the specular part f_E = f_hat - f_A:
        gain g    f = f_A + g f_E for each g of --gains (0 drops the highlights)
        redraw    new specular maps drawn after the diffuse prefix, with another seed

Each sample gets a strip DIR/edit_XXX.png: the original, then each edit (edit.json names them).
The kept maps are the original's, bit for bit (teacher-forced into the KV cache when redrawing).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..decomp.hierarchy import decomposition_name
from ..errors import ConfigError
from ..options import check_int, opt
from ..pretrained import model_source
from ..storage import as_path, is_local
from ..train.inputs import prefix_features
from .images import decode, tile
from .loop import generate
from .memory import check_draw
from .options import DrawOptions, SampleError, settings_of
from .run import class_label, load_run

EDITS = {"recolor": "intrinsic", "relight": "specular"}      # edit -> the decomposition it needs


@dataclass(frozen=True, kw_only=True)
class EditSettings(DrawOptions):
    """How `edit` draws and edits (what edit_samples takes)."""

    edit: str = opt(help="recolor (intrinsic runs: new albedo, same shading) or relight (specular runs: "
                         "scaled, dropped or redrawn specular terms, same diffuse base)", choices=tuple(EDITS))
    n: int = opt(4, "samples", ge=1)
    variants: int = opt(2, "redrawn variants per sample (new seeds)", ge=1)
    gains: Tuple[float, ...] = opt((0.0, 0.5, 2.0), "relight: gains of the specular part (0: none)",
                                   type=lambda t: tuple(float(v) for v in t.split(",")), metavar="G,G,...")
    seed: int = opt(0, "seed", ge=0)
    guidance: float = opt(1.5, "guidance scale on the last map; 1: off", flag="--cfg", ge=0)

    def __post_init__(self):
        super().__post_init__()
        check_int("n", self.n)
        check_int("variants", self.variants, 0)
        object.__setattr__(self, "gains", tuple(float(g) for g in self.gains))


@dataclass(frozen=True, kw_only=True)
class EditConfig(EditSettings):
    """Settings of `nextdetail edit`: the run, the folder and the classes, and the edit."""

    run: Path = opt(help="`nextdetail train` run (or a checkpoint) of an intrinsic or specular model",
                    positional=True, metavar="RUN2")
    out: Path = opt(Path("out/edit"), "output folder", metavar="DIR")
    label: str = opt("-1", "class of the samples (label or class name)", flag="--class", metavar="C",
                     default_help="none: unconditional")
    to_class: Optional[str] = opt(None, "recolor: draw the new albedo under this class", metavar="C")

    def __post_init__(self):
        super().__post_init__()
        if self.to_class is not None and self.edit != "recolor":
            raise ConfigError(f"--to-class with --edit {self.edit}: only recolor draws under another class")


@dataclass
class EditResult:
    """Token maps of the originals and of each edit that has maps (for checks), and the strips."""

    names: List[str]                               # columns of a strip: original, then the edits
    original: List[torch.Tensor]                   # M maps (n, h_k, w_k)
    edited: Dict[str, List[torch.Tensor]]          # edit name -> its M maps (swap and redraws)
    files: List[Path]
    seconds: float
    out: Path

    def summary(self) -> str:
        return (f"edited {self.original[0].shape[0]} samples ({', '.join(self.names[1:])}) in {self.seconds:.1f} s; "
                f"strips in {self.out}")


def check_edit(edit: str, decomposition: str, run) -> None:
    """One line when the run's decomposition has no factors for this edit."""
    need = EDITS[edit]
    if decomposition != need:
        raise SampleError(f"--edit {edit} needs a run of {decomposition_name(need)}; {run} is a run of "
                          f"{decomposition_name(decomposition)}")


def _generators(seed: int, stream: int, n: int, dev) -> List[torch.Generator]:
    from .batches import sample_seed
    return [torch.Generator(device=dev).manual_seed(sample_seed(seed, stream, i)) for i in range(n)]


@torch.no_grad()
def edit_samples(run, out, settings: Optional[EditSettings] = None, *, label: int = -1,
                 to_label: Optional[int] = None, **fields) -> EditResult:
    """Draw settings.n samples and their edits (module docstring). settings: an EditSettings (the
    command's EditConfig is one); fields: EditSettings fields by name, over it (`settings_of`)."""
    from ..imageio import save_png
    from ..stores.atomic import write_bytes_atomic

    s = settings_of(EditSettings, settings, fields)
    edit, n, seed = s.edit, s.n, s.seed
    t0 = time.perf_counter()
    dev = next(run.model.parameters()).device
    check_draw(run, n, guidance=s.guidance != 1, option=f"--n {n}", device=str(dev), max_memory=s.max_memory)
    check_edit(edit, run.tokenizer.config.decomposition, run.checkpoint)
    q = run.tokenizer.quantizer
    B = q.num_base
    if B >= len(run.model.cfg.map_shapes):
        raise SampleError(f"{run.checkpoint}: a model without detail maps has no factors to edit")
    labels = torch.full((n,), label, dtype=torch.int64, device=dev)
    gen = lambda stream: _generators(seed, stream, n, dev)          # noqa: E731 - one stream per draw
    draw = dict(cfg=s.guidance, **s.draw(), num_base=B, order=q.order)
    orig = generate(run.model, q, labels, generator=gen(0), **draw)
    f_base = prefix_features(q, orig.maps[:B])
    images = {"original": orig.f_hat}
    edited: Dict[str, List[torch.Tensor]] = {}
    if edit == "recolor":
        nxt = [(i + 1) % n for i in range(n)]
        swapped = orig.maps[:B] + [m[nxt] for m in orig.maps[B:]]
        edited["albedo of the next sample"] = swapped
        images["albedo of the next sample"] = prefix_features(q, swapped)
        redraw_labels = labels if to_label is None else torch.full_like(labels, to_label)
    else:
        f_spec = orig.f_hat - f_base
        for g in s.gains:
            images[f"specular x{g:g}"] = f_base + g * f_spec
        redraw_labels = labels
    what = "albedo" if edit == "recolor" else "specular"
    for v in range(1, s.variants + 1):
        g = generate(run.model, q, redraw_labels, generator=gen(v), prefix=orig.maps[:B], **draw)
        edited[f"new {what} {v}"] = g.maps
        images[f"new {what} {v}"] = g.f_hat
    out = as_path(out)                  # a URL (s3://...): each file is one upload (stores.atomic)
    if is_local(out):
        out.mkdir(parents=True, exist_ok=True)
    names = list(images)
    decoded = [decode(run.tokenizer, f) for f in images.values()]           # each (n, H, W, 3)
    files = []
    for i in range(n):
        path = out / f"edit_{i:03d}.png"
        save_png(tile([d[i] for d in decoded], cols=len(decoded)), path)
        files.append(path)
    meta = {"checkpoint": model_source(run.checkpoint), "edit": edit, "decomposition": run.tokenizer.config.decomposition,
            "class": label, "to_class": to_label, "n": n, "variants": s.variants, "gains": list(s.gains), "seed": seed,
            "cfg": s.guidance, **s.draw(), "strip": names}
    write_bytes_atomic(out / "edit.json", json.dumps(meta, indent=1).encode())
    return EditResult(names, orig.maps, edited, files, time.perf_counter() - t0, out)


def edit_to_folder(cfg: EditConfig) -> EditResult:
    """`nextdetail edit`: the run, its labels, then edit_samples."""
    run = load_run(cfg.run, tokenizer=cfg.tokenizer, device=cfg.device)
    names = run.meta["class_names"]
    label = class_label(cfg.label, names)
    to_label = None if cfg.to_class is None else class_label(cfg.to_class, names)
    nc = run.model.cfg.num_classes
    for flag, lab in (("--class", label), ("--to-class", to_label)):
        if lab is not None and lab != -1 and not 0 <= lab < nc:
            raise SampleError(f"{flag} {lab}: this model knows classes 0..{nc - 1}" if nc else
                              f"{flag} {lab}: this model was trained without labels")
    return edit_samples(run, cfg.out, cfg, label=label, to_label=to_label)
