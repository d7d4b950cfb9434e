"""Progress bars of the commands (tqdm on stderr), and Ray Data's console kept quiet.

Library code reports progress through small protocols (the jobs' `Progress`, the trainers'
`progress(step, steps, record)` callback); these are the terminal implementations the CLI
hands them.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

from tqdm import tqdm

from .stores.decomposition_format import source_name


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
                tqdm.write(f"{source_name(r)}: {r['error']}", file=sys.stderr)
        self.bar.update(len(rows))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def step_bar(desc: str, total: int, postfix: Callable[[dict], dict], enabled: bool = True):
    """(bar, progress): a tqdm bar over training steps and the trainers' progress callback.
    A resumed run starts the bar where it stands; `postfix(record)` gives the numbers shown."""
    bar = tqdm(total=total, unit="step", desc=desc, file=sys.stderr, disable=None if enabled else True)

    def progress(step: int, steps: int, rec: dict) -> None:
        if bar.n == 0 and step > 1:
            bar.update(step - 1)
        bar.update(1)
        bar.set_postfix(refresh=False, **postfix(rec))

    return bar, progress


class _DropRayNoise(logging.Filter):
    """Ray Data warns that its progress bars are off: they are, ours replaces them. When a job
    fails Ray Data logs the failure at ERROR with its own stack trace; the command reports it
    once, in one line with its cause (pipelines.ray_job.job_failures), and Ray Data's log file
    keeps the trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and "Progress bars disabled" not in record.getMessage()


def quiet_ray_data() -> None:
    """Ray Data's console shows warnings only (its log file under /tmp/ray keeps everything).

    Ray Data installs its handlers when ray.data is imported, so import it first.
    """
    import ray.data  # noqa: F401

    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)
            handler.addFilter(_DropRayNoise())
