"""What a long command meets on a real cluster, said in one line: a full disk, a permission, an
out-of-memory worker buried under Ray's wrappers, and SIGTERM, which is how Kubernetes, Slurm and
spot instances stop a job (then SIGKILL after a grace period).

    line = cause_line(e, "the store")    # "no space left on device writing STORE/...; free space ..."
    with terminable():                    # SIGTERM raises Preempted (a KeyboardInterrupt) ...
        with deferred_term(grace=20):     # ... or, in a trainer, sets term_requested() at a step end
            ...

A preempted command exits 143 (128 + SIGTERM) with "stopped by SIGTERM; rerun the same command
to resume": its outputs are journalled, so nothing done is lost.
"""
from __future__ import annotations

import errno
import re
import signal
import threading
import time
from contextlib import contextmanager
from typing import Optional



class Preempted(KeyboardInterrupt):
    """SIGTERM arrived: stop like Ctrl-C (every cleanup that handles an interrupt runs)."""


# --------------------------------------------------------------------------- causes

# errno -> (what happened, what to do); the rest are reported with their own strerror.
_ERRNO = {
    errno.ENOSPC: ("no space left on device", "free space and rerun the same command"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota, and rerun the same command"),
    errno.EACCES: ("permission denied", "give this user write access, or choose another folder, and rerun"),
    errno.EPERM: ("operation not permitted", "give this user write access, or choose another folder, and rerun"),
    errno.EROFS: ("read-only file system", "choose a writable folder and rerun"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and rerun the same command"),
    errno.EIO: ("input/output error", "check the disk or network file system, and rerun the same command"),
}


# Errors of the machine, not of the input: never recorded against an image (an error row), but
# the job stops with them, since every other image would meet them too.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM})


@contextmanager
def writing(path):
    """Around writes whose OSError may name no file (a write's or a flush's ENOSPC, a background
    writer's): re-raise it naming `path`, so the one line a full disk gives says where."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def machine_error(e: BaseException) -> bool:
    """True for a full disk, a read-only file system, no file handles or no memory, and for
    object storage that cannot be reached or refuses our credentials (nextdetail.storage)."""
    from .storage import storage_failure

    return isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno in MACHINE_ERRNOS) or \
        storage_failure(e) is not None


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception under Ray's wrappers (RayTaskError.cause, UserCodeException's
    __cause__, ...): the OSError or MemoryError that actually happened in a worker."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = e.__cause__ or getattr(e, "cause", None)
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


# How an OSError reads in a traceback: Ray Data hands a worker's failure home as text (its
# UserCodeException arrives without the exception it wrapped).
_OS_ERROR_TEXT = re.compile(r"^(?:\w+\.)*\w*Error: \[Errno (\d+)\] ([^\n]*?)(?:: '([^'\n]*)')?$", re.M)
_MEMORY_ERROR_TEXT = re.compile(r"^MemoryError(?:: (.*))?$", re.M)


def _chain(e: BaseException):
    seen = set()
    while isinstance(e, BaseException) and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or getattr(e, "cause", None)


def as_os_error(e: BaseException) -> Optional[OSError]:
    """The OSError at the root of e, if that is what it is: the exception itself (Ray's
    RayTaskError(OSError) included), or read back from the remote traceback Ray Data sends as text."""
    found = [x for x in _chain(e) if isinstance(x, OSError) and x.errno is not None]
    if found:                   # the outermost names the file where an inner write did not
        return next((x for x in found if x.filename), found[-1])
    for x in _chain(e):
        found = _OS_ERROR_TEXT.findall(str(x))
        if found:
            code, text, filename = found[-1]            # the innermost: the traceback's first error
            return OSError(int(code), text, filename or None)
    return None


def _memory_error(e: BaseException) -> Optional[str]:
    root = root_cause(e)
    if isinstance(root, MemoryError):
        return " ".join(str(root).split()) or "MemoryError"
    for x in _chain(e):
        found = _MEMORY_ERROR_TEXT.findall(str(x))
        if found:
            return " ".join(found[-1].split()) or "MemoryError"
    return None


def os_error_line(e: OSError, more: str = "") -> str:
    """'no space left on device writing PATH (needs about 40 MB more); free space and rerun the
    same command'."""
    what, fix = _ERRNO.get(e.errno, (e.strerror or type(e).__name__, "fix it and rerun the same command"))
    where = f" writing {e.filename}" if e.filename else ""
    return f"{what}{where}{' (' + more + ')' if more else ''}; {fix}"


def cause_line(e: BaseException, more: str = "") -> str:
    """One line for a failure: the OS error with its path and fix, a worker out of memory, or
    'Type: message' of the innermost cause."""
    os_error = as_os_error(e)
    if os_error is not None:
        return os_error_line(os_error, more if os_error.errno in (errno.ENOSPC, errno.EDQUOT) else "")
    memory = _memory_error(e)
    if memory is not None:
        return f"out of memory ({memory[:200]}); lower --batch-size or --workers and rerun the same command"
    root = root_cause(e)
    text = " ".join(str(root).split())
    return f"{type(root).__name__}: {text[:300]}"


# --------------------------------------------------------------------------- SIGTERM

class _Term:
    deferred = False           # a trainer checks at each step end instead of being interrupted
    requested: Optional[float] = None
    grace = 0.0
    timer: Optional[threading.Timer] = None


def _on_term(signum, frame):
    if _Term.deferred and _Term.requested is None:
        _Term.requested = time.monotonic()
        # If the step in progress outlasts the grace, stop anyway: the last checkpoint stands.
        _Term.timer = threading.Timer(_Term.grace, lambda: signal.raise_signal(signal.SIGTERM))
        _Term.timer.daemon = True
        _Term.timer.start()
        return
    raise Preempted()


def install_term_handler() -> None:
    """SIGTERM -> Preempted in the main thread. Called at start and again after ray.init, whose
    core worker installs a handler of its own that prints a C++ stack dump."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_term)


@contextmanager
def terminable():
    """For the block: SIGTERM raises Preempted; the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    install_term_handler()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred_term(grace: float):
    """For a training loop: SIGTERM only sets `term_requested()`, which the loop checks after
    each step to write a checkpoint within `grace` seconds and stop; a step still running after
    `grace` seconds is interrupted (Preempted)."""
    _Term.deferred, _Term.requested, _Term.grace = grace > 0, None, float(grace)
    try:
        yield
    finally:
        if _Term.timer is not None:         # the loop stopped in time: no late signal
            _Term.timer.cancel()
        _Term.deferred, _Term.requested, _Term.timer = False, None, None


def term_requested() -> Optional[float]:
    """Seconds of the grace left since SIGTERM arrived, or None when it has not."""
    if _Term.requested is None:
        return None
    return _Term.grace - (time.monotonic() - _Term.requested)
