"""The `nextdetail` command. One `add_<command>` (arguments) and `cmd_<command>` (work) pair
per subcommand; `main` only parses and dispatches.

    nextdetail decompose INPUT... --out DIR [--order 3 --alpha 10 --lam 0.01 --eps 0.01
                                             --n-iter 50 --backend auto --size N]
    nextdetail decompose-dataset SRC --out STORE [--size 256 --order 3 ... --address ADDR
                                                  --workers N --gpus-per-worker G --overwrite]
    nextdetail train-tokenizer --data STORE --out RUN [--quantizer basedetail --image-size 256
                                                       --downsample 16 --steps N --resume ...]
    nextdetail eval-tokenizer RUN... --data STORE [--out DIR --images N]
    nextdetail export-tokens --data STORE --tokenizer RUN --out TOKENS [--address ADDR --workers N
                                                                        --gpus-per-worker G --shard-rows R]
    nextdetail train --tokens TOKENS --tokenizer RUN --out RUN2 [--depth --width --batch-size --lr
                                                                 --steps ... --resume]
    nextdetail sample RUN2 --out DIR [--class C --n 16 --cfg 1.5 --top-k --top-p --seed S --highres 2]

Exit status: 0 all images done, 1 some input failed, 2 usage or parameter error;
decompose-dataset also 3: the job did not finish (the store is resumable); train-tokenizer
0 trained, 2 usage/parameter/store/run-folder error, 3 training failed (non-finite loss, I/O);
eval-tokenizer 0 done, 2 usage, store or checkpoint error; export-tokens 0 done, 1 blocks given up on, 2 usage, store
or checkpoint error, 3 the export did not finish (rerun to resume); train 0 trained, 2 usage,
parameter, token store or run-folder error, 3 training failed; sample 0 done, 2 usage, run or
tokenizer error.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import __version__
from .decomp import ATParams, Decomposition, decompose
from .decomp.at import BACKENDS, resolve_backend
from .imageio import DEFAULT_MAX_PIXELS, FolderError, ImageError, list_images, load_image, save_png
from .pipelines.attempts import DEFAULT_MAX_ATTEMPTS
from .viz import contact_sheet, detail_scale, detail_to_uint8, edges_to_uint8

log = logging.getLogger(__name__)

PROG = "nextdetail"


class ParameterError(ValueError):
    """A command-line value that parses but makes no sense (reported in one line, exit 2)."""


# --------------------------------------------------------------------------- decompose

@dataclass(frozen=True)
class DecomposeConfig:
    """Validated settings of `nextdetail decompose`.

    out        : output folder; one sub-folder per image.
    order      : number of levels n (details D_1..D_n).
    params     : AT solver parameters (alpha, lam, eps, omega, n_iter).
    backend    : solver backend actually used (auto already resolved).
    size       : None keeps each image's size; N resizes + center-crops to N x N.
    batch_size : images per solver call when size is set (same-shape images batch).
    """

    out: Path
    order: int
    params: ATParams
    backend: str
    size: Optional[int] = None
    batch_size: int = 8


@dataclass
class DecomposeReport:
    """What a run did: output folder per finished image, failure lines, timing, energies."""

    written: List[Path] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)
    seconds: float = 0.0
    energies: List[float] = field(default_factory=list)   # per image: mean over levels

    def summary(self, out: Path) -> str:
        ok, bad = len(self.written), len(self.failures)
        rate = ok / self.seconds if self.seconds > 0 else 0.0
        energy = f"{np.mean(self.energies):.6g}" if self.energies else "n/a"
        return (f"{ok} images ok, {bad} failed, {self.seconds:.1f} s, {rate:.2f} images/s, "
                f"mean AT energy {energy}; output in {out}")


def add_solver_arguments(p: argparse.ArgumentParser) -> None:
    """--order and the AT parameters, shared by every subcommand that decomposes."""
    p.add_argument("--order", type=int, default=3, help="levels n (default 3)")
    p.add_argument("--alpha", type=float, default=ATParams.alpha, help="smoothness weight (default 10)")
    p.add_argument("--lam", type=float, default=ATParams.lam, help="edge-length weight (default 0.01)")
    p.add_argument("--eps", type=float, default=ATParams.eps, help="edge width in px (default 0.01)")
    p.add_argument("--omega", type=float, default=ATParams.omega, help="SOR relaxation in (0,2) (default 1.6)")
    p.add_argument("--n-iter", type=int, default=ATParams.n_iter, help=f"solver sweeps per level (default {ATParams.n_iter})")


def at_params(args: argparse.Namespace) -> ATParams:
    """The AT parameters of parsed arguments; ParameterError names a bad one."""
    try:
        return ATParams(alpha=args.alpha, lam=args.lam, eps=args.eps, omega=args.omega, n_iter=args.n_iter)
    except ValueError as e:
        raise ParameterError(str(e)) from None


def add_decompose(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decompose", help="split images into base/detail/edge layers (CART base-detail)",
        description="Decompose each image I into I = B_n + D_n + ... + D_1 by repeated "
                    "Ambrosio-Tortorelli smoothing and write the layers as .npy and .png "
                    "plus a contact sheet, one folder per image under --out.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    add_solver_arguments(p)
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto = cupy with a GPU, else numba (numpy if numba is unavailable)")
    p.add_argument("--size", type=int, default=None, metavar="N",
                   help="resize shorter side to N and center-crop N x N (enables batching)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="images per solver call with --size (default 8)")
    p.set_defaults(func=cmd_decompose)


def usable_backend(name: str) -> str:
    """Resolve 'auto' and make sure the backend module imports.

    'auto' falls back to numpy (with a warning) when the compiled backend cannot be imported,
    so a broken numba install slows the CLI down instead of stopping it; a backend asked
    for by name must work. Raises ParameterError otherwise.
    """
    try:
        resolved = resolve_backend(name)
    except (ValueError, RuntimeError) as e:
        raise ParameterError(str(e)) from None
    try:
        importlib.import_module(f"nextdetail.decomp.backend_{resolved}")
    except ImportError as e:
        if name != "auto" or resolved == "numpy":
            raise ParameterError(f"backend {resolved!r} is not available ({e})") from None
        log.warning("backend %s is not available (%s); using numpy, which is much slower", resolved, e)
        return "numpy"
    return resolved


def decompose_config(args: argparse.Namespace) -> DecomposeConfig:
    """Check the values of `nextdetail decompose`; ParameterError names the first bad one."""
    if args.order < 1:
        raise ParameterError(f"--order must be >= 1, got {args.order}")
    if args.size is not None and args.size < 1:
        raise ParameterError(f"--size must be >= 1, got {args.size}")
    if args.batch_size < 1:
        raise ParameterError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out.exists() and not args.out.is_dir():
        raise ParameterError(f"--out {args.out} exists and is not a folder")
    params = at_params(args)
    return DecomposeConfig(out=args.out, order=args.order, params=params,
                           backend=usable_backend(args.backend), size=args.size,
                           batch_size=args.batch_size)


def output_names(paths: Sequence[Path]) -> List[str]:
    """Folder name per input: the file stem, made unique by -2, -3, ... in input order.

    Compared case-insensitively, so the folders also stay apart on macOS/Windows disks.
    Each folder's meta.json records the source path, so the mapping is never ambiguous.
    """
    names, used = [], set()
    for p in paths:
        stem = p.stem or "image"
        name, k = stem, 1
        while name.lower() in used:
            k += 1
            name = f"{stem}-{k}"
        used.add(name.lower())
        names.append(name)
    return names


def _host(a) -> np.ndarray:
    """numpy view of a layer, copying from the GPU for cupy arrays."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def select_image(dec: Decomposition, i: Optional[int]) -> Decomposition:
    """Image i of a batch decomposition as a single-image one (i=None: dec itself, on the host)."""
    pick = (lambda a: _host(a)) if i is None else (lambda a: _host(a)[i])
    energy = (lambda e: float(e)) if i is None else (lambda e: float(np.asarray(e)[i]))
    return Decomposition(bases=[pick(b) for b in dec.bases], details=[pick(d) for d in dec.details],
                         edges=[pick(s) for s in dec.edges], energies=[energy(e) for e in dec.energies],
                         method=dec.method, params=dict(dec.params))


def write_decomposition(dec: Decomposition, folder: Path, *, source: Path, backend: str) -> None:
    """Write one image's layers into `folder`.

    base_k.npy / detail_k.npy : float32 (H, W, 3), k = 1..n;  edges_k.npy : float32 (H, W)
    base_k.png, detail_k.png (mid-grey = 0, see nextdetail.viz), edges_k.png, input.png,
    contact.png, meta.json (source, shape, parameters, energies, detail display scales).
    """
    folder.mkdir(parents=True, exist_ok=True)
    save_png(dec.bases[0], folder / "input.png")
    scales = []
    for k in range(1, dec.order + 1):
        base, detail, edges = dec.bases[k], dec.details[k - 1], dec.edges[k - 1]
        np.save(folder / f"base_{k}.npy", base.astype(np.float32, copy=False))
        np.save(folder / f"detail_{k}.npy", detail.astype(np.float32, copy=False))
        np.save(folder / f"edges_{k}.npy", edges.astype(np.float32, copy=False))
        save_png(base, folder / f"base_{k}.png")
        scales.append(detail_scale(detail))
        save_png(detail_to_uint8(detail, scales[-1]), folder / f"detail_{k}.png")
        save_png(edges_to_uint8(edges), folder / f"edges_{k}.png")
    contact_sheet(dec, title=source.name).save(folder / "contact.png")
    meta = {"source": str(source), "shape": list(dec.bases[0].shape), "method": dec.method,
            "order": dec.order, "params": dec.params, "backend": backend,
            "energies": [float(e) for e in dec.energies],
            # detail_k.png shows clip(D / scale, -1, 1) * 127.5 + 127.5
            "detail_png_scales": scales}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def run_decompose(paths: Sequence[Path], cfg: DecomposeConfig,
                  on_failure: Callable[[str], None]) -> DecomposeReport:
    """Decompose `paths` into cfg.out/<name>/. A bad input calls on_failure("<path>: <reason>")
    once and the run goes on. Images go to the solver one at a time, or cfg.batch_size at
    a time when cfg.size makes them the same shape."""
    report = DecomposeReport()
    names = output_names(paths)
    chunk = cfg.batch_size if cfg.size is not None else 1
    start_time = time.perf_counter()

    def fail(msg: str) -> None:
        report.failures.append(msg)
        on_failure(msg)

    with logging_redirect_tqdm(), tqdm(total=len(paths), unit="img", desc="decompose",
                                       file=sys.stderr, disable=None) as bar:
        for start in range(0, len(paths), chunk):
            loaded = []
            for path, name in zip(paths[start:start + chunk], names[start:start + chunk]):
                try:
                    loaded.append((path, name, load_image(path, cfg.size)))
                except ImageError as e:
                    fail(str(e))
                    bar.update(1)
            if not loaded:
                continue
            batched = len(loaded) > 1
            images = np.stack([im for _, _, im in loaded]) if batched else loaded[0][2]
            try:
                dec = decompose(images, cfg.order, backend=cfg.backend, **cfg.params.to_dict())
            except (ValueError, RuntimeError, MemoryError) as e:
                for path, _, _ in loaded:
                    fail(f"{path}: decomposition failed ({type(e).__name__}: {e})")
                bar.update(len(loaded))
                continue
            for i, (path, name, _) in enumerate(loaded):
                one = select_image(dec, i if batched else None)
                try:
                    write_decomposition(one, cfg.out / name, source=path, backend=cfg.backend)
                except OSError as e:
                    fail(f"{path}: cannot write {cfg.out / name} ({e})")
                else:
                    report.written.append(cfg.out / name)
                    report.energies.append(float(np.mean(one.energies)))
                bar.update(1)
    report.seconds = time.perf_counter() - start_time
    return report


def cmd_decompose(args: argparse.Namespace) -> int:
    try:
        cfg = decompose_config(args)
    except ParameterError as e:
        print(f"{PROG} decompose: error: {e}", file=sys.stderr)
        return 2
    try:
        paths = list_images(args.inputs)
    except FolderError as e:
        print(f"{PROG} decompose: error: {e}", file=sys.stderr)
        return 2
    if not paths:
        print(f"{PROG} decompose: error: no image files in {' '.join(args.inputs)}", file=sys.stderr)
        return 1
    cfg.out.mkdir(parents=True, exist_ok=True)
    report = run_decompose(paths, cfg, on_failure=lambda msg: tqdm.write(msg, file=sys.stderr))
    print(report.summary(cfg.out))
    return 1 if report.failures else 0


# --------------------------------------------------------------------------- decompose-dataset

def add_ray_arguments(p: argparse.ArgumentParser, actors: str) -> None:
    """Where a Ray job runs and how many actors it gets (decompose-dataset, export-tokens)."""
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="join a Ray cluster ('auto' or ray://host:port); default: start a local Ray")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help=f"{actors} (default: one per CPU, or per G GPUs)")
    p.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per actor (default 1 when the cluster has GPUs, else 0)")


def add_decompose_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decompose-dataset", help="decompose a whole dataset with Ray into a Zarr + Parquet store",
        description="Decompose every image of SRC into STORE/layers.zarr (float16 layers, generation "
                    "order), STORE/manifest.parquet (one row per image) and STORE/meta.json, with a "
                    "local Ray or a Ray cluster. Rerunning the same command resumes. Exit status: 0 "
                    "every image ok, 1 some images failed (the store is complete, see the manifest), "
                    "2 usage, parameter or store mismatch, 3 the job did not finish (rerun to resume), "
                    "130 interrupted (rerun to resume).")
    p.add_argument("src", metavar="SRC", type=Path,
                   help="folder of images (class sub-folders give labels) or a .txt/.parquet listing")
    p.add_argument("--out", required=True, type=Path, metavar="STORE", help="store folder")
    p.add_argument("--size", type=int, default=256, metavar="N",
                   help="shorter side resized to N (LANCZOS), center-cropped N x N (default 256)")
    add_solver_arguments(p)
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto = cupy on GPU workers, else numba")
    add_ray_arguments(p, "actors in the pool")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per solver call (default 8)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="P",
                   help="an image whose header declares more pixels is an error row, never decoded "
                        f"(decompression bombs; default {DEFAULT_MAX_PIXELS:,})")
    add_max_attempts(p, "an image")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store made with other parameters or from other images")
    p.set_defaults(func=cmd_decompose_dataset)


def add_max_attempts(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--max-attempts", type=int, default=DEFAULT_MAX_ATTEMPTS, metavar="K",
                   help=f"{what} whose worker process died K times is given up on, so that the job ends "
                        f"(default {DEFAULT_MAX_ATTEMPTS})")


class JobProgress:
    """tqdm bar over images for the Ray jobs. `update` takes a count, or the decomposition job's
    manifest rows, whose failed images are printed as "<path>: <reason>" lines."""

    def __init__(self, desc: str, already: str):
        self.desc, self.already, self.bar = desc, already, None

    def start(self, todo: int, done: int) -> None:
        self.bar = tqdm(total=todo, unit="img", desc=self.desc, file=sys.stderr, disable=None)
        if done:
            tqdm.write(f"resuming: {done} images {self.already}, {todo} to do", file=sys.stderr)

    def update(self, rows) -> None:
        if isinstance(rows, int):
            self.bar.update(rows)
            return
        for r in rows:
            if r["status"] != "ok":
                tqdm.write(f"{r['path']}: {r['error']}", file=sys.stderr)
        self.bar.update(len(rows))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _DropRayNoise(logging.Filter):
    """Ray Data warns that its progress bars are off: they are, ours replaces them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Progress bars disabled" not in record.getMessage()


def quiet_ray_data() -> None:
    """Ray Data's console shows warnings only (its log file under /tmp/ray keeps everything).

    Ray Data installs its handlers when ray.data is imported, so import it first.
    """
    import ray.data  # noqa: F401

    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)
            handler.addFilter(_DropRayNoise())


def run_ray_command(args: argparse.Namespace, name: str, output: str, run: Callable):
    """Run a Ray job of a command: (report, 0), or (None, status) after one stderr line:
    2 bad input or a refused output folder, 3 the job did not finish, 130 interrupted. `output`
    names what a rerun of the same command resumes."""
    from .pipelines import ConfigError, JobError, SourceError, StoreError

    if not args.verbose:
        quiet_ray_data()
    try:
        return run(), 0
    except (SourceError, StoreError, ConfigError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return None, 2
    except JobError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return None, 3
    except KeyboardInterrupt:
        print(f"{name}: interrupted; the {output} is resumable: rerun the same command", file=sys.stderr)
        return None, 130


def cmd_decompose_dataset(args: argparse.Namespace) -> int:
    from .pipelines import ConfigError, JobConfig, run_job

    name = f"{PROG} decompose-dataset"
    try:
        cfg = JobConfig(src=args.src, out=args.out, size=args.size, order=args.order,
                        params=at_params(args), backend=args.backend, address=args.address,
                        workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                        batch_size=args.batch_size, overwrite=args.overwrite, max_pixels=args.max_pixels,
                        max_attempts=args.max_attempts)
    except (ParameterError, ConfigError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    report, status = run_ray_command(args, name, "store",
                                     lambda: run_job(cfg, JobProgress("decompose-dataset", "already in the store")))
    if report is None:
        return status
    print(report.summary())
    return 0 if report.error == 0 else 1


# --------------------------------------------------------------------------- train-tokenizer

def _sizes(text: str):
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None


def add_train_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-tokenizer", help="train a VQ-VAE tokenizer (base-detail, multi-scale or vanilla) on a store",
        description="Train the tokenizer on a decomposition store with L2 + VQ/commitment + LPIPS + "
                    "hinge PatchGAN (from --disc-start). RUN gets ckpt-<step>.pt every --ckpt-every steps "
                    "and at the end, log.jsonl and loss.png. --resume continues from RUN's latest "
                    "checkpoint exactly as an uninterrupted run. Exit status: 0 trained, 2 usage, "
                    "parameter, store or run-folder error, 3 training failed.")
    p.add_argument("--data", required=True, type=Path, metavar="STORE", help="decomposition store")
    p.add_argument("--out", required=True, type=Path, metavar="RUN", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from RUN's latest checkpoint")
    m = p.add_argument_group("model")
    m.add_argument("--quantizer", choices=("basedetail", "multiscale", "vanilla"), default="basedetail")
    m.add_argument("--image-size", type=int, default=256, metavar="S",
                   help="training crop side (random crops of the store's images; default 256)")
    m.add_argument("--downsample", type=int, choices=(8, 16), default=16, help="encoder stride (default 16)")
    m.add_argument("--ch", type=int, default=128, help="channels of the first stage (default 128)")
    m.add_argument("--num-res-blocks", type=int, default=2)
    m.add_argument("--no-attn", action="store_true", help="no self-attention at the lowest resolution")
    m.add_argument("--vocab", type=int, default=4096, help="codebook size V (default 4096)")
    m.add_argument("--beta", type=float, default=0.25, help="commitment weight (default 0.25)")
    m.add_argument("--depth", type=int, default=14, help="vanilla: residual depth (default 14)")
    m.add_argument("--patch-sizes", type=_sizes, default=None, metavar="P,P,...",
                   help="multiscale map sides, ending at the latent side (default VAR's, scaled to it)")
    m.add_argument("--base-patch-sizes", type=_sizes, default=None, metavar="P,P,...",
                   help="basedetail base map sides (default CART's 8, scaled to the latent side)")
    m.add_argument("--order", type=int, default=3, help="basedetail: detail factors n (default 3)")
    m.add_argument("--detail-depth", type=int, default=2, help="basedetail: maps per detail factor (default 2)")
    m.add_argument("--dead-after", type=int, default=200, help="steps unused before a code is re-initialised")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--lpips-weight", type=float, default=1.0, help="0 switches LPIPS off")
    t.add_argument("--lpips-net", choices=("alex", "vgg", "squeeze"), default="alex")
    t.add_argument("--lpips-random-backbone", action="store_true",
                   help="random LPIPS backbone instead of the pretrained weights from the torch hub cache")
    t.add_argument("--disc-weight", type=float, default=0.1)
    t.add_argument("--disc-start", type=int, default=2000, help="step from which the discriminator trains")
    t.add_argument("--disc-ch", type=int, default=64, help="PatchGAN width (default 64)")
    t.add_argument("--adaptive-gan-weight", action="store_true",
                   help="scale the GAN loss by |grad rec| / |grad G| at the decoder's last layer (VQGAN)")
    t.add_argument("--ckpt-every", type=int, default=500)
    t.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="keep an EMA of the weights with this decay (e.g. 0.999); 0: off")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="torch device (cuda: bf16 autocast)")
    p.set_defaults(func=cmd_train_tokenizer)


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from .tokenize import ConfigError, config_for
    from .tokenize.losses import LPIPSWeightsError
    from .tokenize.train import TrainConfig, TrainError, train
    from .pipelines.store import StoreError

    name = f"{PROG} train-tokenizer"
    try:
        if not 0.0 <= args.ema < 1.0:
            raise ParameterError(f"--ema {args.ema}: must be in [0, 1)")
        for k in ("steps", "batch_size", "ckpt_every", "image_size", "ch", "num_res_blocks"):
            if getattr(args, k) < 1:
                raise ParameterError(f"--{k.replace('_', '-')} {getattr(args, k)}: must be >= 1")
        tok = config_for(args.quantizer, args.image_size, args.downsample, ch=args.ch,
                         num_res_blocks=args.num_res_blocks, attn=not args.no_attn, vocab=args.vocab,
                         beta=args.beta, depth=args.depth, patch_sizes=args.patch_sizes,
                         base_patch_sizes=args.base_patch_sizes, order=args.order,
                         detail_depth=args.detail_depth, dead_after=args.dead_after)
        cfg = TrainConfig(data=str(args.data), out=str(args.out), tokenizer=tok, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          lpips_weight=args.lpips_weight, lpips_net=args.lpips_net,
                          lpips_backbone="random" if args.lpips_random_backbone else "pretrained",
                          disc_weight=args.disc_weight, disc_start=args.disc_start, disc_ch=args.disc_ch,
                          adaptive_gan=args.adaptive_gan_weight, ema=args.ema,
                          ckpt_every=args.ckpt_every, seed=args.seed, device=args.device)
    except (ParameterError, ConfigError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    bar = tqdm(total=cfg.steps, unit="step", desc="train-tokenizer", file=sys.stderr, disable=None)

    def progress(step, steps, rec):
        if bar.n == 0 and step > 1:
            bar.update(step - 1)              # resumed: start the bar where the run stands
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", l2=f"{rec['l2']:.4f}", refresh=False)

    try:
        with logging_redirect_tqdm():
            report = train(cfg, resume=args.resume, progress=progress)
    except (TrainError, ConfigError, LPIPSWeightsError, StoreError) as e:   # StoreError: a damaged image
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, OSError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 3
    finally:
        bar.close()
    print(report.summary())
    return 0


# --------------------------------------------------------------------------- eval-tokenizer

def add_eval_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-tokenizer", help="reconstruction MSE/PSNR after each quantization depth (CART Figure 11)",
        description="For each RUN (its latest checkpoint, or a checkpoint file), encode the first "
                    "--images images of STORE (centre crops of the run's image size) and decode the "
                    "running sum of the first m token maps, m = 1..M. Writes OUT/eval.csv (run, "
                    "quantizer, depth, map_side, mse, psnr, lpips when its weights are cached) and "
                    "OUT/eval.png (MSE against depth, one line per run), prints the table. Exit "
                    "status: 0 done, 2 usage, store or checkpoint error.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folder or checkpoint file")
    p.add_argument("--data", required=True, type=Path, metavar="STORE", help="decomposition store")
    p.add_argument("--out", type=Path, default=Path("out/eval-tokenizer"), help="output folder")
    p.add_argument("--images", type=int, default=64, metavar="N", help="images evaluated (default 64)")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_eval_tokenizer)


def cmd_eval_tokenizer(args: argparse.Namespace) -> int:
    from .tokenize import CheckpointError
    from .tokenize.evaluate import evaluate, table, write_results
    from .pipelines.store import StoreError
    from .runs import RunError

    name = f"{PROG} eval-tokenizer"
    if args.images < 1 or args.batch_size < 1:
        print(f"{name}: error: --images and --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        rows = evaluate(args.runs, args.data, limit=args.images, batch=args.batch_size)
    except (RunError, CheckpointError, StoreError) as e:      # TrainError is a RunError
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    files = write_results(rows, args.out)
    print(table(rows))
    print(f"{len(args.runs)} runs on {rows[0].images} images; "
          f"wrote {files['csv']} and {files['png']}")
    return 0


# --------------------------------------------------------------------------- export-tokens

def add_export_tokens(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-tokens", help="encode every ok image of a store into a token store (Ray)",
        description="Encode every ok image of STORE (centre crop of the tokenizer's image size) with "
                    "the tokenizer of RUN (its latest checkpoint, or a checkpoint file) into "
                    "TOKENS/tokens.bin (uint16 (N, L), maps in generation order), TOKENS/index.parquet "
                    "and TOKENS/meta.json (written last), with a local Ray or a Ray cluster. Rerunning "
                    "the same command resumes from the finished blocks. Exit status: 0 done, 1 some "
                    "blocks were given up on after --max-attempts worker deaths (the rest is kept, "
                    "the token store is not finished; rerun), 2 usage, store or checkpoint error, 3 the "
                    "export did not finish (rerun to resume), 130 interrupted (rerun to resume).")
    p.add_argument("--data", required=True, type=Path, metavar="STORE", help="decomposition store")
    p.add_argument("--tokenizer", required=True, type=Path, metavar="RUN",
                   help="tokenizer run folder (latest checkpoint) or checkpoint file")
    p.add_argument("--out", required=True, type=Path, metavar="TOKENS", help="token store folder")
    add_ray_arguments(p, "actors, each with its own tokenizer")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="images read and encoded per step; the tokens do not depend on it (default 32)")
    p.add_argument("--block-rows", type=int, default=512, metavar="R",
                   help="images per part file, the unit of work and of resume (default 512)")
    p.add_argument("--shard-rows", type=int, default=None, metavar="R",
                   help="keep fixed-size shard files of R rows instead of one tokens.bin (multi-node)")
    add_max_attempts(p, "a block")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a token store exported from another store or tokenizer")
    p.set_defaults(func=cmd_export_tokens)


def cmd_export_tokens(args: argparse.Namespace) -> int:
    from .pipelines import ConfigError
    from .pipelines.export import ExportConfig, run_export

    name = f"{PROG} export-tokens"
    try:
        cfg = ExportConfig(data=args.data, tokenizer=args.tokenizer, out=args.out, address=args.address,
                           workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                           batch_size=args.batch_size, block_rows=args.block_rows,
                           shard_rows=args.shard_rows, overwrite=args.overwrite, max_attempts=args.max_attempts)
    except ConfigError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    report, status = run_ray_command(args, name, "token store",
                                     lambda: run_export(cfg, JobProgress("export-tokens", "already exported")))
    if report is None:
        return status
    print(report.summary())
    return 1 if report.failed else 0


# --------------------------------------------------------------------------- train

def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train the next-detail transformer on a token store",
        description="Train the next-detail (CART) transformer on TOKENS (from export-tokens) with the "
                    "quantizer of the tokenizer RUN they were exported with. RUN2 gets ckpt-<step>.pt, "
                    "log.jsonl (per-map loss and accuracy) and loss.png; --resume continues exactly. "
                    "Multi-GPU / multi-node: launch with torchrun. Exit status: 0 trained, 2 usage, "
                    "parameter, token store or run-folder error, 3 training failed.")
    p.add_argument("--tokens", required=True, type=Path, metavar="TOKENS", help="token store")
    p.add_argument("--tokenizer", required=True, type=Path, metavar="RUN",
                   help="tokenizer run folder or checkpoint the tokens were exported with")
    p.add_argument("--out", required=True, type=Path, metavar="RUN2", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from RUN2's latest checkpoint")
    m = p.add_argument_group("model")
    m.add_argument("--depth", type=int, default=6, help="transformer blocks (default 6)")
    m.add_argument("--width", type=int, default=384, help="model width (default 384)")
    m.add_argument("--heads", type=int, default=6, help="attention heads (default 6)")
    m.add_argument("--mlp-ratio", type=float, default=4.0)
    m.add_argument("--pos", choices=("rope", "learned"), default="rope",
                   help="normalized 2-D RoPE (default) or learned absolute positions")
    m.add_argument("--adaln", action="store_true", help="condition every block on the class by AdaLN")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=32, help="per process (default 32)")
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--min-lr", type=float, default=0.1, help="cosine floor as a fraction of --lr (default 0.1)")
    t.add_argument("--warmup", type=int, default=100, help="linear warmup steps (default 100)")
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0: off (default 1)")
    t.add_argument("--cond-drop", type=float, default=0.1, help="null-class probability for CFG (default 0.1)")
    t.add_argument("--val-fraction", type=float, default=0.05, help="held-out samples (default 0.05)")
    t.add_argument("--val-every", type=int, default=500)
    t.add_argument("--ckpt-every", type=int, default=500)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="torch device (cuda: bf16 autocast)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .train.trainer import TrainConfig, TrainError, train
    from .train.model import ModelConfigError

    name = f"{PROG} train"
    try:
        cfg = TrainConfig(tokens=str(args.tokens), tokenizer=str(args.tokenizer), out=str(args.out),
                          depth=args.depth, width=args.width, heads=args.heads, mlp_ratio=args.mlp_ratio,
                          pos=args.pos, adaln=args.adaln, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, weight_decay=args.weight_decay,
                          grad_clip=args.grad_clip, cond_drop=args.cond_drop, val_fraction=args.val_fraction,
                          val_every=args.val_every, ckpt_every=args.ckpt_every, seed=args.seed,
                          device=args.device, compile=args.compile)
    except TrainError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    bar = tqdm(total=cfg.steps, unit="step", desc="train", file=sys.stderr,
               disable=None if int(os.environ.get("RANK", "0")) == 0 else True)

    def progress(step, steps, rec):
        if bar.n == 0 and step > 1:
            bar.update(step - 1)              # resumed: start the bar where the run stands
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:,.0f}", refresh=False)

    try:
        with logging_redirect_tqdm():
            report = train(cfg, resume=args.resume, progress=progress)
    except (TrainError, ModelConfigError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, OSError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 3
    finally:
        bar.close()
    if int(os.environ.get("RANK", "0")) == 0:
        print(report.summary())
    return 0


# --------------------------------------------------------------------------- sample

def add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="generate images with a trained next-detail transformer",
        description="Generate --n images of --class with RUN2's latest checkpoint (KV-cached, map by "
                    "map: base maps, then detail maps; classifier-free guidance ramped linearly over the "
                    "maps) and decode them with its tokenizer. Writes DIR/grid.png, DIR/sample_XXX.png "
                    "(the base-only image, then after each detail factor; the last is the final image) "
                    "and DIR/samples.json. --highres S generates at S times the trained resolution "
                    "without retraining: upsampled base, detail maps patchwise. Exit status: 0 done, "
                    "2 usage, run or tokenizer error.")
    p.add_argument("run", type=Path, metavar="RUN2", help="run folder of `nextdetail train` (or a checkpoint)")
    p.add_argument("--out", type=Path, default=Path("out/samples"), metavar="DIR", help="output folder")
    p.add_argument("--class", dest="label", default="-1", metavar="C",
                   help="class label or class name (a class folder of the data; default: none, unconditional)")
    p.add_argument("--n", type=int, default=16, help="images (default 16)")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance scale on the last map; 1: off (default 1.5)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0: all")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass; 0: off")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--highres", type=int, default=1, metavar="S",
                   help="integer upscale of the trained resolution (base upsampled, details patchwise)")
    p.add_argument("--overlap", action="store_true", help="--highres: 50%%-overlapping detail patches")
    p.add_argument("--highres-base", choices=("image", "latent"), default="image",
                   help="--highres: upsample the base as an image and re-encode it (default), or its features")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="RUN",
                   help="the tokenizer run, when it moved since training (its sha256 must match)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    from .train.sample import SampleError, class_label, load_run, sample_to_folder

    name = f"{PROG} sample"
    try:
        if not 0.0 <= args.top_p <= 1.0 or args.top_k < 0 or args.temperature <= 0 or args.cfg < 0:
            raise ParameterError(f"--top-p {args.top_p}, --top-k {args.top_k}, --temperature {args.temperature}, "
                                 f"--cfg {args.cfg}: need 0 <= top-p <= 1, top-k >= 0, temperature > 0, cfg >= 0")
        if args.highres < 1:
            raise ParameterError(f"--highres {args.highres}: must be >= 1")
        run = load_run(args.run, tokenizer=args.tokenizer, device=args.device)
        bar = tqdm(total=args.n, unit="img", desc="sample", file=sys.stderr, disable=None)
        try:
            report = sample_to_folder(run, args.out, label=class_label(args.label, run.meta["class_names"]), n=args.n, cfg=args.cfg, top_k=args.top_k,
                                      top_p=args.top_p, temperature=args.temperature, seed=args.seed,
                                      batch_size=args.batch_size, highres=args.highres, overlap=args.overlap,
                                      highres_base=args.highres_base,
                                      progress=bar.update)
        finally:
            bar.close()
    except (ParameterError, SampleError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


# --------------------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Data pipelines for next-detail (CART) "
                                                            "autoregressive image generation.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_decompose(sub)
    add_decompose_dataset(sub)
    add_train_tokenizer(sub)
    add_eval_tokenizer(sub)
    add_train(sub)
    add_sample(sub)
    add_export_tokens(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point. Returns the exit status; argparse exits with 2 on usage errors."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(levelname)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
