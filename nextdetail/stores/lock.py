"""An advisory exclusive lock on a job's output folder (a store, a token store, a run folder).

Two jobs writing one folder would interleave their parts and corrupt it, so a writing job holds
`<folder>/.nextdetail.lock` for its whole run (a dot name: store code ignores dot names when it
decides whether a folder is empty). Readers take no lock. The file is one JSON object: host, pid,
process_start (/proc/<pid>/stat field 22, so a reused pid is told apart), started (UTC), command.

Acquire: write the content to a unique temp file in the folder, flock it, `os.link` it to the lock
name, unlink the temp. link is an atomic create that fails if the name exists, on local file
systems and on NFS (where O_EXCL was long unreliable), and the file is complete before it is
visible. The open fd keeps the flock until release; flock dies with its process, so a lock whose
flock can be taken was left by a dead job:
  - flock refused            -> a live holder: refuse;
  - another host             -> refuse even so (flock across hosts is not trustworthy on every
                                network file system) and say how to remove the file;
  - this host, pid dead or reused, or unreadable content -> take it over in place, with a warning;
  - this host, pid alive     -> refuse (a holder whose flock did not carry, e.g. on some NFS).
Release unlinks the file only if the name is still our inode, then closes the fd.

On object storage (a URL) there is no flock and no link, and the holder's host is usually
another pod: the lock is an object created with an exclusive PUT (S3's If-None-Match: *), and a
lease. Its holder rewrites it every LEASE_RENEW seconds from a daemon thread; a lock not renewed
for LEASE seconds (its object's server-side modification time) belongs to a job that died
(preempted, killed, its node lost) and is taken over with a warning, as is one of this host whose
pid is gone. A live holder is refused, naming it. Release deletes the object if it is still ours.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from ..errors import PathError
from ..storage import as_path, is_url, write_once

LOCK = ".nextdetail.lock"
_TRIES = 20          # a lock released or taken over between our steps: look again, boundedly
log = logging.getLogger(__name__)


class FolderLocked(PathError):
    """Another job holds the folder's lock; str is one line naming the holder."""


def _process_start(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot, or None without /proc (or without pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # field 2 (comm) may hold spaces and parentheses: count fields after its last ")"
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(info: dict) -> bool:
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # exists, owned by another user
        pass
    recorded, now = info.get("process_start"), _process_start(pid)
    return recorded is None or now is None or recorded == now     # differs: pid reused


def _parse(data: bytes) -> Optional[dict]:
    try:
        info = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("host"), str) else None


def read_lock(folder) -> Optional[dict]:
    """The lock record of `folder`, or None if there is none or it is unreadable. Takes no lock."""
    try:
        return _parse((as_path(folder) / LOCK).read_bytes())
    except OSError:
        return None


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


def _show(info: Optional[dict], key: str) -> str:   # lock files are not ours: keep one line
    return " ".join(str((info or {}).get(key, "?")).split()) or "?"


def _try_create(folder: Path, lockpath: Path, content: bytes) -> Optional[int]:
    """Create the lock file holding our content and our flock; its fd, or None if it exists."""
    tmp = folder / f"{LOCK}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, content)
        os.fsync(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)     # our own new file: cannot be held
        os.link(tmp, lockpath)
        return fd
    except BaseException as e:
        os.close(fd)
        if isinstance(e, FileExistsError):
            return None
        if isinstance(e, OSError) and e.filename is None:     # say where (a full disk, a quota)
            raise OSError(e.errno, e.strerror, str(lockpath)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _acquire(folder: Path, what: str, option: str) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    lockpath, host = folder / LOCK, socket.gethostname()
    content = json.dumps({
        "host": host, "pid": os.getpid(), "process_start": _process_start(os.getpid()),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(" ".join(sys.argv).split())[:300]}).encode()
    info = None
    for _ in range(_TRIES):
        fd = _try_create(folder, lockpath, content)
        if fd is not None:
            return fd
        try:
            fd = os.open(lockpath, os.O_RDWR)
        except FileNotFoundError:        # released meanwhile: create it
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        if locked and not _same_file(lockpath, fd):    # released and replaced meanwhile
            os.close(fd)
            continue
        info = _parse(os.pread(fd, 1 << 16, 0))
        if info is not None and info["host"] != host:
            os.close(fd)
            raise FolderLocked(folder, f"locked by a job on {_show(info, 'host')} (pid "
                               f"{_show(info, 'pid')}, started {_show(info, 'started')}); if no "
                               f"job is running there, remove {lockpath} and rerun")
        stale = info is None or not _alive(info)
        if not locked or not stale:
            os.close(fd)
            if stale:                    # another job is taking this stale lock over right now
                time.sleep(0.05)
                continue
            break
        try:                             # a dead job's lock: make it ours, flock and all
            os.ftruncate(fd, 0)
            os.pwrite(fd, content, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        if info is None:
            log.warning("%s: took over a lock file with unreadable content, which no job held",
                        folder)
        else:
            log.warning("%s: took over the lock of pid %s on %s (started %s), which is no longer "
                        "running", folder, _show(info, "pid"), host, _show(info, "started"))
        return fd
    raise FolderLocked(folder, f"another nextdetail job is writing this {what} (pid "
                       f"{_show(info, 'pid')} on {_show(info, 'host')}, started "
                       f"{_show(info, 'started')}: {_show(info, 'command')}); "
                       f"wait for it to end, or choose another {option}")


LEASE, LEASE_RENEW = 120.0, 30.0       # seconds; a renewal is one small PUT
_HELD: set = set()                     # tokens of the URL locks this process holds now


def _record(**extra) -> bytes:
    return json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(" ".join(sys.argv).split())[:300], **extra}).encode()


def _age(fs, path: str) -> Optional[float]:
    """Seconds since the object was last written (the server's clock), None if unknown."""
    info = fs.info(path)
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if isinstance(modified, str):
        modified = datetime.datetime.fromisoformat(modified.replace("Z", "+00:00"))
    if isinstance(modified, (int, float)):
        return time.time() - modified
    if isinstance(modified, datetime.datetime):
        return (datetime.datetime.now(datetime.timezone.utc) - modified).total_seconds()
    return None


@contextmanager
def _url_lock(folder, what: str, option: str):
    lockpath = folder / LOCK
    fs, key = lockpath.fs, lockpath.path
    token = secrets.token_hex(8)
    content = _record(token=token)
    info = None
    for _ in range(_TRIES):
        try:
            write_once(lockpath, content, exclusive=True)
            break
        except FileExistsError:
            pass
        try:
            info, age = _parse(fs.cat_file(key)), _age(fs, key)
        except FileNotFoundError:            # released meanwhile: create it
            continue
        same_host = info is not None and info["host"] == socket.gethostname()
        expired = age is not None and age > LEASE
        # our own pid with a token this process does not hold: a lock of ours that could not be
        # released (the server was gone when the block ended)
        orphan = same_host and info.get("pid") == os.getpid() and info.get("token") not in _HELD
        if not (expired or info is None or orphan or (same_host and not _alive(info))):
            raise FolderLocked(folder, f"another nextdetail job is writing this {what} (pid "
                               f"{_show(info, 'pid')} on {_show(info, 'host')}, started {_show(info, 'started')}: "
                               f"{_show(info, 'command')}; lease renewed {age or 0:.0f} s ago); wait for it to "
                               f"end, or choose another {option}")
        log.warning("%s: took over the lock of pid %s on %s (started %s), %s", folder, _show(info, "pid"),
                    _show(info, "host"), _show(info, "started"),
                    "whose lease ran out" if expired else "which is no longer running")
        fs.rm_file(key)
    else:
        raise FolderLocked(folder, f"cannot take the lock {lockpath}: other jobs keep taking it; choose another "
                                   f"{option}")
    stop = threading.Event()

    def renew():
        while not stop.wait(LEASE_RENEW):
            try:
                held = _parse(fs.cat_file(key))
                if held is None or held.get("token") != token:
                    log.warning("%s: the lock was taken over by another job", folder)
                    return
                write_once(lockpath, content)
            except Exception as e:  # noqa: BLE001 - a missed renewal is retried; the job goes on
                log.info("%s: renewing the lock failed (%s)", folder, e)

    thread = threading.Thread(target=renew, name="nextdetail-lock-lease", daemon=True)
    thread.start()
    _HELD.add(token)
    try:
        yield
    finally:
        _HELD.discard(token)
        stop.set()
        thread.join(timeout=5)
        try:
            held = _parse(fs.cat_file(key))
            if held is not None and held.get("token") == token:
                fs.rm_file(key)
        except Exception as e:  # noqa: BLE001 - the server gone: the lease runs out by itself
            log.info("%s: releasing the lock failed (%s); it expires in %.0f s", folder, e, LEASE)


@contextmanager
def folder_lock(folder, what: str, option: str = "--out"):
    """Hold the exclusive lock on `folder` (created if missing) for the block; raise
    FolderLocked if another job holds it. `what` ("store", "token store", "run") and `option`
    (the option naming the folder) only word the message."""
    if is_url(folder):
        with _url_lock(as_path(folder), what, option):
            yield
        return
    folder = Path(folder)
    lockpath = folder / LOCK
    created = not folder.exists()
    if folder.exists() and not folder.is_dir():
        raise PathError(folder, f"exists and is not a folder; choose another {option}")
    fd = _acquire(folder, what, option)
    try:
        yield
    finally:
        try:
            if _same_file(lockpath, fd):     # unlink before close: a waiter then sees a new inode
                os.unlink(lockpath)
        except FileNotFoundError:            # the folder was removed meanwhile
            pass
        finally:
            os.close(fd)
        if created:                          # a job refused before writing leaves no empty folder
            try:
                folder.rmdir()
            except OSError:                  # not empty (the job wrote), or gone
                pass
