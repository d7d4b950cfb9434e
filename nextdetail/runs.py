"""Run folders of the training commands (`train-tokenizer`, `train`), one convention for both:

    RUN/ckpt-<step>.pt    checkpoints, 7-digit zero-padded step (names sort by step), each
                          written to a temp name and renamed: never a half-written checkpoint
    RUN/log.jsonl         one JSON record per line, each with its "step"; on resume the records
                          past the resumed checkpoint are dropped, so the log reads as one run
    RUN/loss.png          the log's losses against step

`latest_checkpoint(RUN)` is how every command turns "a run folder or a checkpoint file" into
a file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List


LOG = "log.jsonl"
PLOT = "loss.png"          # the log's losses against step, drawn by each command


class RunError(ValueError):
    """A run folder or checkpoint that cannot be used as asked; str is one line naming it."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}.pt"


def checkpoints(run) -> List[Path]:
    """The checkpoints of a run folder, oldest first."""
    return sorted(Path(run).glob("ckpt-*.pt"))


def latest_checkpoint(run) -> Path:
    """A checkpoint file as given, or the newest checkpoint of a run folder (RunError if none)."""
    run = Path(run)
    if run.is_file():
        return run
    found = checkpoints(run) if run.is_dir() else []
    if not found:
        raise RunError(f"{run}: no checkpoint (ckpt-*.pt) in this run folder")
    return found[-1]


def save_checkpoint(path: Path, obj) -> None:
    """torch.save to a temp name, then rename into place."""
    import torch

    tmp = Path(path).with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_log(run) -> List[dict]:
    """The records of RUN/log.jsonl, in order ([] when there is no log yet)."""
    path = Path(run) / LOG
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.exists() else []


def truncate_log(path: Path, step: int) -> None:
    """Drop log records past `step` (the resumed checkpoint's)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [s for s in path.read_text().splitlines() if s.strip() and json.loads(s)["step"] <= step]
    path.write_text("".join(s + "\n" for s in keep))
