"""Evaluation-scale sampling: K images of every class, as the ADM `.npz` batch FID is computed on.

    report = sample_per_class(cfg)          # `nextdetail sample RUN --per-class 50 --npz s.npz`; torchrun-aware
    report = sample_batches(run, out, per_class=50, npz="s.npz", seed=0, batch_size=64, cfg=1.5)
    report = sample_batches(run, out, cfg)  # cfg: a SampleConfig (sample.SampleSettings)

The design, for 50,000 images spread over many processes and many hours:

- Fixed samples. Sample j is (class c, index i) = divmod(j, K), class-major: all of class 0,
  then class 1, ... Each draws its tokens from its own torch.Generator seeded from
  sha256(seed, c, i) (`generate` with one generator per row, inverse-CDF draws), so its
  randomness does not depend on which other samples share its batch.
- Fixed global batches. Batch b is samples b B .. b B + B - 1 (B = --batch-size, the last one
  shorter), whatever the number of processes; under torchrun rank r draws the batches with
  b % world == r. A batch is the same computation in a split run as in a single process, so both
  give bit-identical images (the per-sample seeds alone would not: batched float arithmetic
  differs with the batch's shape), given the same arithmetic per process: on CPU the same
  thread count (torchrun sets OMP_NUM_THREADS=1), on GPUs the same kind of device.
- Resumable parts. Each batch ends as DIR/parts/batch-BBBBBB.npz (uint8 images (b, H, W, 3), int64
  labels), written to a temp name and renamed, after its PNGs DIR/images/JJJJJJ.png; a rerun skips
  the batches whose part is there (writing back any PNG it lacks from the part).
  DIR/parts/settings.json records what the parts were drawn with; other settings are refused.
- Assembly. When every batch is done (a barrier under torchrun), rank 0 streams the parts in
  order into the ADM batch (`NpzWriter`: arr_0 images, arr_1 labels) and writes DIR/samples.json.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..distributed import Dist, all_reduce_sum
from ..pretrained import model_source
from ..storage import as_path, is_local
from ..stores.atomic import atomic_write, write_bytes_atomic
from ..stores.journal import differences, recorded
from .images import decode
from .loop import generate
from .memory import check_draw
from .options import SampleError, settings_of
from .run import load_run
from .sample import SampleConfig, SampleSettings

log = logging.getLogger(__name__)


def sample_seed(seed: int, label: int, index: int) -> int:
    """The 63-bit seed of sample (class `label`, `index` within its class) under --seed."""
    digest = hashlib.sha256(f"nextdetail-sample:{seed}:{label}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def part_path(out: Path, b: int) -> Path:
    return out / "parts" / f"batch-{b:06d}.npz"


def png_path(out: Path, j: int) -> Path:
    return out / "images" / f"{j:06d}.png"


def write_part(path: Path, images_bHW3: np.ndarray, labels_b: np.ndarray) -> None:
    """A batch's part file, whole or not at all (stores.atomic: temp file, fsync, rename)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images_bHW3, labels=labels_b.astype(np.int64))


def read_part(path: Path):
    with as_path(path).open("rb") as f, np.load(f, allow_pickle=False) as z:
        return z["images"], z["labels"]


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to mix parts drawn with other settings into this folder; record them if new.
    Every rank may write the same file: the rename makes the last whole copy win."""
    diff = differences(recorded(out / "parts" / "settings.json", settings) or settings, settings)
    if diff:
        raise SampleError(f"{out}: holds samples drawn with other settings ({', '.join(diff)}); use another --out")


@dataclass
class BatchReport:
    out: Path
    n: int                      # samples in all (C K)
    classes: int
    per_class: int
    generated: int              # drawn by this run (all ranks)
    reused: int                 # found in parts of an earlier run
    seconds: float
    npz: Optional[Path]
    png: bool

    def summary(self) -> str:
        rate = self.generated / self.seconds if self.seconds > 0 else float("nan")
        where = [f"parts in {self.out / 'parts'}"]
        if self.png:
            where.append(f"PNGs in {self.out / 'images'}")
        if self.npz is not None:
            where.append(f"ADM batch {self.npz}")
        return (f"sampled {self.n} images ({self.classes} classes x {self.per_class}; {self.generated} "
                f"generated, {self.reused} from earlier parts) in {self.seconds:.1f} s ({rate:.2f} images/s); "
                + "; ".join(where))


@torch.no_grad()
def sample_batches(run, out, settings: Optional[SampleSettings] = None, *, d: Optional[Dist] = None, progress=None,
                   **fields) -> BatchReport:
    """This process's batches of the C x per_class samples of `run` into `out` (see the module
    docstring), then, on rank 0, the ADM batch `npz` and samples.json. settings: a SampleSettings
    (the command's SampleConfig is one); fields: SampleSettings fields by name, over it (per_class,
    npz, png, cfg, top_k, top_p, temperature, seed, batch_size). progress: an object with
    start(todo, done) and update(count) (nextdetail.progress.JobProgress), for this rank's share."""
    from PIL import Image

    s = settings_of(SampleSettings, settings, fields)
    per_class, batch_size, seed, png = s.per_class, s.batch_size, s.seed, s.png
    d = d or Dist()
    C = run.model.cfg.num_classes
    if C == 0:
        raise SampleError("--per-class: this model was trained without labels; use --n for unconditional samples")
    if per_class < 1:
        raise SampleError(f"--per-class {per_class}: evaluation batches need K >= 1 images of every class")
    check_draw(run, batch_size, guidance=s.cfg != 1, option=f"--batch-size {batch_size}",
               device=str(next(run.model.parameters()).device), max_memory=s.max_memory)
    out = as_path(out)                  # a URL (s3://...): each file is one upload (stores.atomic)
    for sub in ("parts", "images") if png and is_local(out) else ("parts",) if is_local(out) else ():
        (out / sub).mkdir(parents=True, exist_ok=True)
    recorded = {"checkpoint": model_source(run.checkpoint), "step": run.meta["step"], "classes": C,
                "per_class": per_class, "cfg": s.cfg, "top_k": s.top_k, "top_p": s.top_p,
                "temperature": s.temperature, "seed": seed, "batch_size": batch_size}
    check_settings(out, recorded)

    n = C * per_class
    labels_N = np.repeat(np.arange(C, dtype=np.int64), per_class)        # sample j is class j // K
    num_batches = (n + batch_size - 1) // batch_size
    mine = [b for b in range(num_batches) if b % d.world == d.rank]
    span = lambda b: range(b * batch_size, min(n, (b + 1) * batch_size))
    t0 = time.perf_counter()
    done = [b for b in mine if part_path(out, b).is_file()]
    todo = [b for b in mine if b not in done]
    if progress is not None:
        progress.start(sum(len(span(b)) for b in todo), sum(len(span(b)) for b in done))
    if done:
        log.info("resuming: %d of this rank's %d batches already written", len(done), len(mine))

    def save_pngs(b, images_bHW3, missing_only=False):
        for j, im in zip(span(b), images_bHW3):
            if not (missing_only and png_path(out, j).is_file()):
                with atomic_write(png_path(out, j)) as tmp:
                    Image.fromarray(im).save(tmp, format="PNG")

    if png:             # a part written before its PNGs were deleted (or by a --no-png run)
        for b in done:
            if any(not png_path(out, j).is_file() for j in span(b)):
                save_pngs(b, read_part(part_path(out, b))[0], missing_only=True)

    dev = next(run.model.parameters()).device
    for b in todo:
        js = span(b)
        labels_b = labels_N[js.start:js.stop]
        gens = [torch.Generator(device=dev).manual_seed(sample_seed(seed, int(c), j % per_class))
                for j, c in zip(js, labels_b)]
        q = run.tokenizer.quantizer
        g = generate(run.model, q, torch.from_numpy(labels_b).to(dev), cfg=s.cfg, generator=gens,
                     num_base=q.num_base, order=q.order, **s.draw())
        images_bHW3 = decode(run.tokenizer, g.f_hat)
        if png:                 # all of them: a run killed mid-batch may have left a cut-short one
            save_pngs(b, images_bHW3)
        write_part(part_path(out, b), images_bHW3, labels_b)          # last: the batch's "done" mark
        if progress is not None:
            progress.update(len(js))

    counts = torch.tensor([sum(len(span(b)) for b in todo), sum(len(span(b)) for b in done)])
    if d.world > 1:
        torch.distributed.barrier()             # every rank's parts are written
        all_reduce_sum(counts, d)
    if d.main:
        missing = [b for b in range(num_batches) if not part_path(out, b).is_file()]
        if missing:
            raise SampleError(f"{out}: {len(missing)} of {num_batches} batches have no part file "
                              f"(first {part_path(out, missing[0])}); rerun to draw them")
        if s.npz is not None:
            assemble_npz(out, num_batches, n, as_path(s.npz))
        meta = {**recorded, "n": n, "class_names": run.meta.get("class_names", []), "batches": num_batches,
                "images": str(out / "images") if png else None, "npz": None if s.npz is None else str(s.npz),
                "tokenizer": run.meta.get("tokenizer")}
        write_bytes_atomic(out / "samples.json", json.dumps(meta, indent=1).encode())
    return BatchReport(out, n, C, per_class, int(counts[0]), int(counts[1]), time.perf_counter() - t0,
                       None if s.npz is None else as_path(s.npz), png)


def assemble_npz(out: Path, num_batches: int, n: int, path: Path) -> Path:
    """The parts, in sample order, streamed into one ADM batch (arr_0 uint8 images, arr_1 labels)."""
    from ..npz import NpzWriter

    size = read_part(part_path(out, 0))[0].shape[1:3]
    with NpzWriter(path, n, size, labels=True) as w:
        for b in range(num_batches):
            images, labels = read_part(part_path(out, b))
            w.write(images, labels)
    log.info("wrote %s (%d images)", path, n)
    return path


def sample_per_class(cfg: SampleConfig, progress=None) -> BatchReport:
    """`nextdetail sample --per-class`: this process's place in torchrun's world (or the whole
    job alone): load the run on this rank's device, draw its batches, rank 0 assembles."""
    from ..distributed import run as run_distributed

    def body(d: Dist) -> BatchReport:
        run = load_run(cfg.run, tokenizer=cfg.tokenizer, device=d.device(cfg.device))
        return sample_batches(run, cfg.out, cfg, d=d, progress=progress if d.main else None)

    return run_distributed(cfg.device, body)

