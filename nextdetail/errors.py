"""The errors a command reports: one base carrying the exit status, handled once in `cli.main`.

Every error's str is one line naming the thing at fault (an option, a file, a store, a row).

    NextDetailError                exit 2: usage or input (an option, a file, a store, a checkpoint)
      ConfigError                  a setting that parses but makes no sense: names the option
      PathError                    "<path>: <reason>"; .path and .reason; pickles (Ray sends it home)
      JobError                     exit 3: the job or its I/O failed; rerunning resumes

The subclasses each module raises (StoreError, TokenStoreError, CheckpointError, ...) say which
thing failed and inherit their exit status from here. `cli.main` gives the rest theirs: an
OSError or a diverged loss JOB_FAILED, Ctrl-C INTERRUPTED, SIGTERM PREEMPTED (nextdetail.faults).
EXIT_STATUS says what each status means, once: every command's --help shows it.
"""
from __future__ import annotations

import signal
from pathlib import Path

PARTIAL, USAGE, JOB_FAILED = 1, 2, 3
INTERRUPTED = 128 + signal.SIGINT        # the shell's convention for a signal's death: 130
PREEMPTED = 128 + signal.SIGTERM         # 143

EXIT_STATUS = {
    0: "done",
    PARTIAL: "some inputs failed and the rest is done",
    USAGE: "usage or input error (an option, a file, a folder of the wrong kind, options that cannot fit), "
           "reported in one line before any work",
    JOB_FAILED: "the job did not finish (Ray, I/O, a diverged loss): rerunning the same command resumes",
    INTERRUPTED: "interrupted: rerunning the same command resumes",
    PREEMPTED: "stopped by SIGTERM (preempted): rerunning the same command resumes",
}


def first_line(e: BaseException, typed: bool = False) -> str:
    """The first line of str(e), for messages that must stay on one line; the exception type's
    name when the message is empty, and 'Type: line' with `typed`."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    if typed:
        return f"{type(e).__name__}: {line}" if line else type(e).__name__
    return line or type(e).__name__


class NextDetailError(Exception):
    """Base of every error a command reports in one line."""

    exit_status = USAGE


class ConfigError(NextDetailError, ValueError):
    """A setting (option or config field) that makes no sense; str names it."""


class PathError(NextDetailError, ValueError):
    """Something wrong with a file or folder: str is "<path>: <reason>"."""

    def __init__(self, path, reason: str):
        # a URL (s3://...) stays as it is: Path() would fold its "//"
        self.path = path if isinstance(path, Path) or "://" in str(path) else Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):   # pickles with its two arguments (Ray sends worker errors home)
        return (type(self), (self.path, self.reason))


class RunError(NextDetailError, ValueError):
    """A run folder or checkpoint that cannot be used as asked; str is one line naming it."""


class TrainError(RunError):
    """Training cannot start as asked (data, run folder, config); one line. Both trainers."""


class JobError(NextDetailError, RuntimeError):
    """The job could not run or finish (Ray, cluster, I/O, a diverged loss); rerunning resumes."""

    exit_status = JOB_FAILED
