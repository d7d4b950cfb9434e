"""Bounded attempts at inputs that kill their worker process.

Ray restarts a dead actor and retries its task without limit (Ray Data's default), so an input
that kills the process every time (a decoder running out of memory, a crash in a codec) would
stall a job forever. A process cannot record its own death, so a task notes in a small journal
what it starts and what it finishes, and the retry reads it: an item started by an earlier
attempt that never got its "done" line is one whose process died on it.

    journal = AttemptJournal(path)        # one file per unit of work (a batch, a block)
    journal.deaths("read:17")             # attempts at the item that ended with the process dead
    with journal.attempt("read:17"): ...  # "start read:17" before, "done read:17" after
    journal.drop()                        # once the unit's output is written

Lines are flushed, not fsynced: a dead process's writes survive in the page cache, and a lost
node only makes a count lower (one more attempt). The unit of work is owned by one task at a
time, so one journal has one writer. Costs two short writes per item.
"""
from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from ..faults import writing

DEFAULT_MAX_ATTEMPTS = 3

# The journals' folder inside a job's _parts folder. Named with "_" so that pyarrow.dataset,
# which reads the journal parts of a store by listing their folder, skips it (as it skips
# "."- and "_"-named entries): a journal left by a killed worker must never be read as Parquet.
ATTEMPTS = "_attempts"

# Test-only hook: a worker whose input's path or id contains this environment variable's value
# exits at once, as a process killed by an input would. Read by the driver and handed to the
# workers (Ray's workers do not see the driver's later environment).
CRASH_HOOK_ENV = "NEXTDETAIL_TEST_CRASH_ON"


def journal_folder(run_folder) -> Path:
    """Where the attempt journals of a job's run live: its run folder's ATTEMPTS, or, when the
    output is on object storage (which has no append), a folder on the worker's own node keyed
    by the run folder's URL. Ray restarts a dead actor on any node, so a death on another node
    is not counted there: at most one more attempt per node, still a bounded number."""
    from ..storage import is_url

    if not is_url(run_folder):
        return Path(run_folder) / ATTEMPTS
    import hashlib
    import tempfile

    key = hashlib.sha256(str(run_folder).encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / "nextdetail-attempts" / key


def crash_hook() -> Optional[str]:
    return os.environ.get(CRASH_HOOK_ENV) or None


def maybe_crash(name: str, crash_on: Optional[str]) -> None:
    if crash_on and crash_on in str(name):
        os._exit(70)


class AttemptJournal:
    def __init__(self, path):
        self.path = Path(path)
        self._file = None
        starts, dones = Counter(), Counter()
        if self.path.is_file():
            for line in self.path.read_text(errors="replace").splitlines():
                verb, _, item = line.partition(" ")
                if verb == "start":
                    starts[item] += 1
                elif verb == "done":
                    dones[item] += 1
        self._deaths = Counter({k: starts[k] - dones[k] for k in starts if starts[k] > dones[k]})

    def deaths(self, item: str) -> int:
        """How many earlier attempts at `item` ended with their process dead."""
        return self._deaths[str(item)]

    @property
    def died_before(self) -> bool:
        return bool(self._deaths)

    @contextmanager
    def attempt(self, item: str):
        """Journal an attempt at `item`; an exception (handled by the caller) also ends it."""
        self._write(f"start {item}")
        try:
            yield
        finally:
            self._write(f"done {item}")

    def _write(self, line: str) -> None:
        with writing(self.path):        # a full disk's write names no file: say which one it was
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(line + "\n")
            self._file.flush()

    def drop(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


def died_message(what: str, deaths: int, max_attempts: int) -> str:
    """The error-row reason of an item given up on."""
    return (f"the worker process died {deaths} times while {what} (out of memory, or a crash in "
            f"native code); given up (--max-attempts {max_attempts})")
