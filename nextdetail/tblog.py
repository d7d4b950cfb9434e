"""Training curves where people look at them: TensorBoard event files in RUN/tb/ (on by default)
and, with `--log wandb`, Weights & Biases, written beside RUN/log.jsonl by both trainers.

    board = Board(RUN, start, log="tensorboard")     # RunLog makes it, on rank 0 only
    board.scalars(record, perf={"images_per_s": 812.0})
    board.images(step, {"reconstructions": uint8 (H, W, 3)})
    board.close()

What goes in: every number of a log.jsonl record, under the tag `scalar_tags` gives it (lists,
e.g. per-map losses, one tag per map: "train/map_loss/03"); `perf` numbers (throughput, CUDA peak
memory) that vary from run to run and so stay out of log.jsonl, which is bit-identical with and
without a board; and, at checkpoints, images from the trainer.

The writer is tensorboardX: its only dependencies (numpy, protobuf, packaging) are ones
nextdetail already has (~0.7 MB installed), where torch.utils.tensorboard needs the tensorboard
package itself (its web server: grpcio, werkzeug, the data server; ~50 MB). The event files are
TensorBoard's own format: `pip install tensorboard; tensorboard --logdir RUN/tb` reads them.

Resume: log.jsonl drops its records past the resumed checkpoint, and the curves must match.
Each run segment writes a new event file, named after its start step; before it starts, the
events past the resumed step are removed from the earlier files (`trim_events`), so a resumed
run continues the same curves without a gap or a duplicate step in every reader. (The new file
also starts with TensorBoard's purge marker, a SessionLog START at step start + 1, but readers
differ in what they purge: TensorBoard's data server drops scalars by it, not images.)
"""
from __future__ import annotations

import logging
import math
import os
import re
import struct
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)

TB = "tb"                          # RUN/tb/: the event files
WANDB = "wandb"                    # RUN/wandb/: wandb's own files (offline runs, to `wandb sync`)
LOGGERS = ("tensorboard", "wandb", "none")

# Record keys that are not a loss of the split, by the group they are shown under.
_GROUPS = {"lr": "opt", "grad_norm": "opt", "gan_w": "opt",
           "perplexity": "codebook", "restarted": "codebook", "map_usage": "codebook",
           "tokens_per_s": "perf"}
_NOT_SCALARS = ("step", "split")


def check_loggers(kind: str) -> None:
    """ConfigError (exit 2), one line, when `--log` asks for a writer that is not installed;
    called before any work."""
    if kind not in LOGGERS:
        raise ConfigError(f"--log {kind}: must be one of {', '.join(LOGGERS)}")
    if kind == "none":
        return
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise ConfigError(f"--log {kind}: the tensorboardX package is not installed (pip install tensorboardX), "
                          f"or pass --log none") from None
    if kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--log wandb: the wandb package is not installed: pip install wandb (it also runs "
                              "without network: WANDB_MODE=offline), or leave --log at tensorboard") from None


def scalar_tags(rec: dict) -> Dict[str, float]:
    """{tag: value} of a log record's numbers: "<group>/<key>", the group the record's split
    ("train", "val") for losses and accuracies, else opt / codebook / perf; a list gives one tag
    per map, numbered from 01 in generation order. Non-numbers are skipped."""
    split = rec.get("split", "train")
    out = {}
    for key, value in rec.items():
        if key in _NOT_SCALARS:
            continue
        group = split if split != "train" else _GROUPS.get(key, "train")
        if isinstance(value, (list, tuple)):
            for k, v in enumerate(value):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{group}/{key}/{k + 1:02d}"] = float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{group}/{key}"] = float(value)
    return out


def perf_scalars(device, seconds: float, images: int) -> Dict[str, float]:
    """Throughput of one step (images/s) and, on CUDA, the peak memory allocated so far (GiB):
    numbers for the curves only, never for log.jsonl (they vary from run to run)."""
    out = {"images_per_s": images / max(seconds, 1e-9)}
    if getattr(device, "type", str(device)) == "cuda":
        import torch
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


class Board:
    """The curves of one run segment (steps start+1 onwards): TensorBoard, plus W&B for
    log="wandb"; log="none" writes nothing. Rank 0 only (RunLog makes it there)."""

    def __init__(self, out, start: int, *, log: str = "tensorboard", config: Optional[dict] = None):
        check_loggers(log)
        self.out, self.start = Path(out), start
        self.tb = self.wandb = None
        trim_events(self.out / TB, start)       # also with log="none": no curve may outlive the log
        if log == "none":
            return
        from tensorboardX import FileWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        # A new file per segment, named after its start step too: two segments begun in the same
        # second would otherwise share tensorboardX's name (time + host) and the second would
        # overwrite the first. The START event is TensorBoard's purge marker (SummaryWriter's
        # purge_step). FileWriter, not SummaryWriter: one event per record, all its numbers in
        # one Summary, is 10x faster (0.3 ms for 33 numbers) and half the bytes of an event each.
        self.tb = FileWriter(str(self.out / TB), flush_secs=30, filename_suffix=f".step{start:09d}")
        self.tb.add_event(Event(step=start + 1, session_log=SessionLog(status=SessionLog.START)))
        if log == "wandb":
            self.wandb = _wandb_run(self.out, start, config)

    def scalars(self, rec: dict, perf: Optional[dict] = None) -> None:
        step = int(rec["step"])
        values = scalar_tags(rec)
        values.update({f"perf/{k}": float(v) for k, v in (perf or {}).items()})
        values = {k: v for k, v in values.items() if math.isfinite(v)}
        if self.tb is not None and values:
            from tensorboardX.proto.summary_pb2 import Summary

            self.tb.add_summary(Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values.items()]), step)
        if self.wandb is not None and values:
            self.wandb.log(values, step=step)

    def images(self, step: int, images: Dict[str, np.ndarray]) -> None:
        """uint8 (H, W, 3) images, one per tag ("reconstructions", "samples")."""
        for tag, im in images.items():
            if self.tb is not None:
                from tensorboardX.summary import image

                self.tb.add_summary(image(f"images/{tag}", np.asarray(im, np.uint8), dataformats="HWC"), step)
            if self.wandb is not None:
                import wandb
                self.wandb.log({f"images/{tag}": wandb.Image(np.asarray(im, np.uint8))}, step=step)

    @property
    def wants_images(self) -> bool:
        return self.tb is not None or self.wandb is not None

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_run(out: Path, start: int, config: Optional[dict]):
    """A W&B run for this segment, grouped with the run folder's other segments: W&B cannot drop
    the steps past a resumed checkpoint that an interrupted segment logged, so each segment is its
    own W&B run (named RUN-from-<step>) in the group RUN. Its files go to RUN/wandb/; offline
    (WANDB_MODE=offline) they wait there for `wandb sync`."""
    import wandb

    (out / WANDB).mkdir(parents=True, exist_ok=True)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "nextdetail"), dir=str(out), group=out.name,
                      name=f"{out.name}-from-{start}", config=config or {},
                      reinit=True)


_SEGMENT = re.compile(r"\.step(\d+)$")


def trim_events(tb_dir, start: int) -> None:
    """Remove the events past step `start` from RUN/tb's files, as truncate_log does for log.jsonl.

    By induction only one file needs reading: every resume trims, so all files but the newest
    segment begun before `start` already end at or before it; the files of segments begun at or
    after `start` hold nothing to keep and are deleted. Records are TFRecords (length, its crc,
    payload, its crc), kept byte for byte; a cut-short last record (a killed writer) is dropped."""
    tb_dir = Path(tb_dir)
    files = sorted(tb_dir.glob("events.out.tfevents.*")) if tb_dir.is_dir() else []
    if not files:
        return
    from tensorboardX.proto.event_pb2 import Event

    from .stores import write_bytes_atomic

    seg = {f: int(m.group(1)) if (m := _SEGMENT.search(f.name)) else -1 for f in files}
    older = []
    for f in files:
        if seg[f] >= start:
            log.info("%s: removing the curves of a segment past the resumed step %d", f, start)
            f.unlink()
        else:
            older.append(f)
    latest = max((seg[f] for f in older), default=None)
    for f in older:
        if seg[f] != latest and latest != -1:
            continue
        data, kept, i = f.read_bytes(), [], 0
        while i + 12 <= len(data):
            n, = struct.unpack("<Q", data[i:i + 8])
            end = i + 12 + n + 4
            if end > len(data):
                break
            ev = Event.FromString(data[i + 12:i + 12 + n])
            if ev.step <= start:
                kept.append(data[i:end])
            i = end
        if sum(map(len, kept)) != len(data):
            write_bytes_atomic(f, b"".join(kept))


def read_events(tb_dir):
    """The event files of RUN/tb read with TensorBoard's own reader (needs the tensorboard package),
    purges applied, every event kept (size_guidance 0: no sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def uint8_grid(rows: Iterable[np.ndarray], gap: int = 2) -> np.ndarray:
    """Rows of uint8 (B, H, W, 3) images -> one uint8 (rows H, B W, 3) grid, white gaps."""
    rows = [np.asarray(r, np.uint8) for r in rows]
    n, h, w = rows[0].shape[:3]
    out = np.full((len(rows) * (h + gap) - gap, n * (w + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = im
    return out
