"""Run folders of the training commands (`train-tokenizer`, `train`), one convention for both:

    RUN/ckpt-<step>.pt    checkpoints, 7-digit zero-padded step (names sort by step), each
                          written to a temp name and renamed: never a half-written checkpoint
    RUN/log.jsonl         one JSON record per line, each with its "step"; on resume the records
                          past the resumed checkpoint are dropped, so the log reads as one run
    RUN/loss.png          the log's losses against step
    RUN/tb/               the log's numbers as TensorBoard curves, one event file per run segment,
                          cut to the resumed step like the log (nextdetail.tblog; --log)

`latest_checkpoint(RUN)` is how every command turns "a run folder or a checkpoint file" into
a file, and `load_checkpoint(path)` is how every command reads one.

Checkpoints hold tensors and plain containers only (configs as dicts, RNG states as tensors,
sampler positions as ints), so they are read with `torch.load(weights_only=True)`: a file
whose pickle would call anything else (and so could run code) is refused, never executed.
Since format 2 each checkpoint carries `CHECKPOINT_FORMAT`; one without it was written by
nextdetail 0.1, which also only stored plain data: it is read the same way, with a warning.
"""
from __future__ import annotations

import errno
import json
import logging
import shutil
import pickle
import re
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, TypeVar

from .errors import ConfigError, RunError, TrainError, first_line
from .faults import Preempted, deferred_term, term_requested, terminable, writing
from .limits import check_max_memory, memory_opt
from .options import check_int, opt, option_name
from .model_fetch import fetch_model
from .storage import as_path, is_url
from .stores import atomic_write, write_bytes_atomic
from .stores.journal import OutputFolder, differences
from .tblog import LOGGERS, TB, WANDB, Board, check_loggers

if TYPE_CHECKING:
    from .distributed import Dist

log = logging.getLogger(__name__)


LOG = "log.jsonl"
PLOT = "loss.png"          # the log's losses against step, drawn by each command
# Written into every checkpoint by save_checkpoint; bump when what a checkpoint holds changes.
CHECKPOINT_FORMAT = {"format": "nextdetail-checkpoint", "format_version": 2}


# A run folder as a resumable output (nextdetail.stores.journal): one trainer writes it at a time.
RUN = OutputFolder("run", ("ckpt-*.pt", LOG, PLOT, TB, WANDB), TrainError)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What both trainers take besides their data, model and optimizer: how long, how often to
    checkpoint, the seed of every random draw, the device. The trainers' configs extend it."""

    steps: int = opt(1000, "training steps", ge=1)
    ckpt_every: int = opt(500, "steps between checkpoints", ge=1)
    seed: int = opt(0, "seed of the weights, the data order and every random draw", ge=0)
    device: str = opt("cpu", "torch device (cuda: bf16 autocast)")
    term_grace: float = opt(20.0, "on SIGTERM (preemption), write a checkpoint of the current step if that "
                                  "takes less than this many seconds, then stop; 0: stop at once", ge=0,
                            metavar="S")
    max_memory: Optional[str] = memory_opt()
    resume: bool = opt(False, "continue from the run's latest checkpoint (the result equals an uninterrupted run)")
    log: str = opt("tensorboard", "training curves beside log.jsonl: tensorboard (event files in RUN/tb/), wandb "
                                  "(those and Weights & Biases; WANDB_MODE=offline needs no network), none",
                   choices=LOGGERS)
    log_images: int = opt(4, "images added to the curves at each checkpoint: reconstructions (tokenizer), "
                             "samples (transformer); 0: none", ge=0, metavar="N")

    # Fields any resumed run may change (each trainer adds its own): that it resumes, and how it
    # reacts to faults.
    CONTROL_FIELDS = ("resume", "term_grace", "max_memory", "log", "log_images")

    def __post_init__(self):
        check_int("steps", self.steps)
        check_int("ckpt_every", self.ckpt_every)
        check_int("log_images", self.log_images, 0)
        if not self.term_grace >= 0:
            raise ConfigError(f"--term-grace must be a finite number >= 0, got {self.term_grace}")
        check_max_memory(self.max_memory)


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}.pt"


def checkpoints(run) -> List[Path]:
    """The checkpoints of a run folder, oldest first."""
    return sorted(Path(run).glob("ckpt-*.pt"))


def latest_checkpoint(run) -> Path:
    """A checkpoint file as given, or the newest checkpoint of a run folder (RunError if none)."""
    run = fetch_model(run) if is_url(run) else Path(run)       # a URL: fetched into the cache
    if run.is_file():
        return run
    found = checkpoints(run) if run.is_dir() else []
    if not found:
        raise RunError(f"{run}: {folder_kind(run)} with no checkpoint (ckpt-*.pt), not a run folder")
    return found[-1]


def save_checkpoint(path: Path, obj: dict) -> None:
    """torch.save to a temp name, then rename into place. `obj` must hold only what
    load_checkpoint accepts (tensors, dicts, lists, tuples, str, int, float, bool, None)."""
    import torch

    with atomic_write(path) as tmp:
        try:
            torch.save({**obj, "checkpoint": CHECKPOINT_FORMAT}, tmp)
        except RuntimeError as e:       # torch's zip writer reports a failed write as a RuntimeError
            full = shutil.disk_usage(Path(path).parent).free < (1 << 20)
            raise OSError(errno.ENOSPC if full else errno.EIO, first_line(e), str(path)) from e


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_checkpoint(path, map_location="cpu", what: str = "nextdetail checkpoint") -> dict:
    """The dict saved by save_checkpoint, read with torch.load(weights_only=True).

    RunError, one line naming the file, when it is missing, truncated or not a torch zip
    file, when its pickle needs anything but tensors and plain containers (refused, never
    executed), or when it holds no dict. `what` names the expected kind in messages.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such checkpoint file")
    # torch.save has written zip files since torch 1.6; anything else (a cut-short file has
    # lost the zip's central directory) would go to the legacy unpickler, whose errors on
    # random bytes read like refused code.
    if not zipfile.is_zipfile(path):
        raise RunError(f"{path}: cannot read checkpoint (truncated, or not a file written by torch.save)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        if found is None:
            raise RunError(f"{path}: cannot read checkpoint (its pickle is damaged)") from None
        raise RunError(f"{path}: refused: its pickle needs `{found.group(1)}`, not a tensor or plain "
                       f"container, so loading it could run code; not a {what}") from None
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise RunError(f"{path}: cannot read checkpoint (damaged: {first_line(e)})") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path}: holds a {type(obj).__name__}, not a {what}")
    if obj.get("checkpoint") != CHECKPOINT_FORMAT and "model" in obj:
        log.warning("%s: written before checkpoint format 2 (nextdetail 0.1); it holds plain data only, "
                    "read safely with weights_only", path)
    return obj


def folder_kind(path) -> str:
    """What a path holds, from its names alone (nothing is read): 'a decomposition store', 'a
    token store', 'a training run', 'an empty folder', 'a folder', 'a file', 'nothing'; for
    messages that say what a command was given and what it needs."""
    path = as_path(path)
    if not path.exists():
        return "nothing (no such file or folder)"
    if path.is_file():
        return "a file"
    names = {p.name for p in path.iterdir() if not p.name.startswith(".")}
    if not names:
        return "an empty folder"
    if "bases.zarr" in names or "layers.zarr" in names:
        return "a decomposition store"
    if names & {"tokens.bin", "index.parquet", "shards"}:
        return "a token store"
    if {"config.json", "model.safetensors"} <= names:
        return "a model folder (nextdetail export-model)"
    if any(n.startswith("ckpt-") and n.endswith(".pt") for n in names) or LOG in names:
        return "a training run"
    return "a folder"


def checkpoint_kind(ckpt: dict) -> str:
    """Which command wrote a checkpoint dict: 'tokenizer run' (train-tokenizer), 'transformer run'
    (train), or 'unknown'; for messages that say what was given and what is needed."""
    config = ckpt.get("config")
    if "model_config" in ckpt:
        return "transformer run (nextdetail train)"
    if isinstance(config, dict) and isinstance(config.get("tokenizer"), dict):
        return "tokenizer run (nextdetail train-tokenizer)"
    return "checkpoint of neither trainer"


@dataclass
class RunReport:
    """What a training command did: steps start_step..steps in `seconds`, the last step's record."""

    out: Path
    start_step: int
    steps: int
    seconds: float
    last: dict

    def timing(self, extra: str = "") -> str:
        done = self.steps - self.start_step
        rate = done / self.seconds if self.seconds > 0 else float("nan")
        return (f"trained steps {self.start_step}..{self.steps} ({done} steps, {self.seconds:.1f} s, "
                f"{rate:.2f} steps/s{extra})")


T = TypeVar("T")


def run_training(cfg: RunConfig, body: Callable[["Dist"], T]) -> T:
    """Both trainers' entry point: body(d) in this process's place of torchrun's world (or alone),
    rank 0 holding the run folder's lock (RUN.lock, on the URL itself for a run on object
    storage, which trains in a local mirror: nextdetail.run_mirror) for the whole run."""
    from .distributed import run

    check_loggers(cfg.log)          # a missing wandb is refused before any work

    def locked(d):
        from .run_mirror import mirrored         # a run on a URL trains in a local mirror

        with RUN.lock(cfg.out) if d.main else nullcontext(), mirrored(cfg.out, cfg.resume, d.rank):
            return body(d)

    return run(cfg.device, locked)


def checkpoint_differences(saved, asked, *, ignore: tuple = ()) -> List[str]:
    """'--flag A (checkpoint) != B (asked)' for each field of two configs of one class that differs
    (a field that is no option as 'part.field'); `ignore` names the fields a resumed run may change."""
    return differences(saved, asked, ignore=ignore, labels=("checkpoint", "asked"), value=str, spell=option_name)


def resume_from(out, resume: bool) -> Optional[Path]:
    """The checkpoint a run resumes from: None for a new run folder; TrainError when the folder
    already holds checkpoints and resume was not asked for (a run is never overwritten)."""
    out = Path(out)
    found = checkpoints(out) if out.is_dir() else []
    if found and not resume:
        raise TrainError(f"{out}: already holds checkpoints ({found[-1].name}); resume it or choose another --out")
    return found[-1] if found else None


def load_resumed(path: Path, map_location, what: str, saved_config, asked) -> dict:
    """The checkpoint to resume from, its config checked: `saved_config(ckpt["config"])` must
    equal `asked` but for what may change on resume (its differences()); TrainError naming each
    difference, or the unreadable file, otherwise."""
    try:
        ckpt = load_checkpoint(path, map_location, what=what)
    except RunError as e:
        raise TrainError(f"{e}; delete it to resume from the one before") from None
    diff = saved_config(ckpt["config"]).differences(asked)
    if diff:
        raise TrainError(f"{path}: checkpoint of another config: " + "; ".join(diff))
    log.info("resuming %s from step %d", path, ckpt["step"])
    return ckpt


class RunLog:
    """The tail of every training step, the same for both trainers: a record appended to
    RUN/log.jsonl; every `every` steps and at the last one, the log flushed, a checkpoint
    saved and RUN/loss.png redrawn. On a resume the records past the resumed step are dropped
    first. Only the main process (rank 0) writes: `main=False` makes it a no-op.

    Each record also goes to the curves (nextdetail.tblog.Board: RUN/tb/, W&B; `log` as --log),
    with `perf` numbers that vary from run to run and so stay out of log.jsonl; at each
    checkpoint `images()` is drawn into them."""

    def __init__(self, out, start: int, *, main: bool = True, log: str = "none", config: Optional[dict] = None):
        self.out, self.main = Path(out), main
        self._file = self.board = None
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            truncate_log(self.out / LOG, start)
            self._file = open(self.out / LOG, "a")
            with writing(self.out / TB):
                self.board = Board(self.out, start, log=log, config=config)

        self.save_seconds = 0.0          # how long the last checkpoint took to write
        self.saved_step = start          # the step of the newest checkpoint

    def write(self, *records: dict, perf: Optional[dict] = None) -> None:
        if self._file is not None:
            with writing(self.out / LOG):
                for rec in records:
                    self._file.write(json.dumps(rec) + "\n")
            with writing(self.out / TB):
                for i, rec in enumerate(records):
                    self.board.scalars(rec, perf if i == 0 else None)

    def end_step(self, step: int, steps: int, every: int, save: Callable[[], object],
                 plot: Callable[[Path], object], images: Optional[Callable[[], dict]] = None) -> None:
        if self._file is not None and (step % every == 0 or step == steps):
            self._checkpoint(step, save, plot)
            if images is not None and self.board.wants_images:
                try:
                    drawn = images()
                except Exception as e:      # the images are a view of training, never a reason to stop it
                    log.warning("%s: no images in the curves at step %d: %s", self.out, step, first_line(e))
                    drawn = {}
                with writing(self.out / TB):
                    self.board.images(step, drawn)
            with writing(self.out / TB):
                self.board.flush()
            from .run_mirror import sync
            sync(self.out)              # a run on a URL: the checkpoint, then the rest, uploaded

    def _checkpoint(self, step: int, save: Callable[[], object], plot: Callable[[Path], object]) -> None:
        import time

        t0 = time.perf_counter()
        with writing(self.out / LOG):
            self._file.flush()
        save()
        self.save_seconds = time.perf_counter() - t0
        self.saved_step = step
        plot(self.out)

    def stop_if_terminated(self, step: int, save: Callable[[], object],
                           plot: Callable[[Path], object], d=None, device="cpu") -> None:
        """After a step: when SIGTERM has arrived (on any rank, so that all stop at one step),
        write a checkpoint of this step if the last one took less than the grace left (and none
        was just written), then raise Preempted. A resume from it equals an uninterrupted run."""
        left = term_requested()
        stop = left is not None
        if d is not None and d.world > 1:
            import torch

            from .distributed import all_reduce_sum
            stop = bool(all_reduce_sum(torch.tensor([float(stop)], device=device), d).item())
        if not stop:
            return
        fits = left is None or self.save_seconds < left
        if self._file is not None and self.saved_step != step and fits:
            self._checkpoint(step, save, plot)
            log.info("SIGTERM: wrote the checkpoint of step %d", step)
        raise Preempted()

    def close(self, plot: Callable[[Path], object]) -> None:
        """Close the log and the curves; draw the plot when this run wrote no checkpoint and there is none."""
        board, self.board = self.board, None
        if board is not None:
            with writing(self.out / TB):
                board.close()
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if not (self.out / PLOT).exists() and read_log(self.out):
            plot(self.out)


@contextmanager
def preemptible(grace: float):
    """Around a training loop: SIGTERM waits for the step in progress (at most `grace` seconds),
    then RunLog.stop_if_terminated checkpoints and stops (see nextdetail.faults)."""
    with terminable(), deferred_term(grace):
        yield


def read_log(run) -> List[dict]:
    """The records of RUN/log.jsonl, in order ([] when there is no log yet)."""
    path = as_path(run) / LOG
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.exists() else []


def running_mean(ys, window: int) -> list:
    """Mean of each value and the window - 1 before it (fewer at the start): per-step losses of
    a few-image batch are too noisy to read as they are."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def truncate_log(path: Path, step: int) -> None:
    """Drop log records past `step` (the resumed checkpoint's)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [s for s in path.read_text().splitlines() if s.strip() and json.loads(s)["step"] <= step]
    write_bytes_atomic(path, "".join(s + "\n" for s in keep).encode())
