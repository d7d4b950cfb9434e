"""A training run whose folder is a URL (`--out s3://bucket/runs/x`): trained in a local mirror,
synced to the bucket.

Why a mirror: a run appends to log.jsonl every step, trims its log and TensorBoard files on
resume, rewrites loss.png and writes checkpoints through torch.save; object storage has no
append, no rename and no partial rewrite, and a request per step would slow training for
nothing. So the run writes exactly what it writes to a local disk, into a folder of the local
cache keyed by the URL (nextdetail.cache; NEXTDETAIL_CACHE), and that folder is uploaded:

    start     the bucket is the truth: the mirror is emptied, then the run's files are downloaded
              (all but the older checkpoints: the latest, log.jsonl, tb/, loss.png). A new run
              (no --resume) refuses a bucket folder that holds checkpoints, as on a disk.
    sync      after each checkpoint and at the end (also after a failure or SIGTERM): the files
              new or changed since the last sync are uploaded, checkpoints first, each in one
              PUT (atomic: a reader sees the old object or the new one whole); a file the run
              itself removed (a TensorBoard segment trimmed on resume) is deleted in the bucket.
              Nothing else in the bucket is ever deleted.

A kill loses what was written since the last sync, exactly what a resume would drop anyway
(the records and curves past the latest checkpoint). The folder lock (RUN's .nextdetail.lock)
is taken on the URL itself, so two trainers on two machines cannot write one run.

Under torchrun only rank 0 writes and syncs; every other rank downloads the checkpoint it
resumes from into a mirror of its own (ranks of one node must not share a folder they empty).
"""
from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

from .cache import fetch_file, keyed_folder
from .errors import TrainError
from .storage import as_path, is_url, tree_sizes

log = logging.getLogger(__name__)

_ACTIVE: Dict[str, "RunMirror"] = {}      # str(local folder) -> its mirror, while a run trains


def _is_checkpoint(rel: str) -> bool:
    return "/" not in rel and rel.startswith("ckpt-") and rel.endswith(".pt")


class RunMirror:
    """The local folder of a run on a URL, and what of it the bucket already has."""

    def __init__(self, url, rank: int = 0):
        self.url = as_path(str(url).rstrip("/"))
        self.main = rank == 0
        name = self.url.name or "run"
        self.local = keyed_folder("runs", str(self.url), name=name) if self.main else \
            keyed_folder("runs", str(self.url), f"rank{rank}", name=name)
        self.synced: Dict[str, Tuple[int, int, int]] = {}     # relative path -> (size, mtime_ns, inode)

    # -- the bucket --------------------------------------------------------------------------
    def _remote(self, rel: str) -> str:
        return f"{self.url.path.rstrip('/')}/{rel}"

    def listing(self) -> Dict[str, int]:
        """{relative path: size} of the run's objects in the bucket; dot names (the lock) left out."""
        return {rel: n for rel, n in tree_sizes(self.url).items()
                if rel and not any(p.startswith(".") for p in rel.split("/"))}

    def pull(self, resume: bool) -> None:
        """Empty the mirror, then download what the run continues from (see the module docstring)."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)
        remote = self.listing()
        ckpts = sorted(r for r in remote if _is_checkpoint(r))
        if ckpts and not resume:
            raise TrainError(f"{self.url}: already holds checkpoints ({ckpts[-1]}); resume it or choose another --out")
        want = [ckpts[-1]] if ckpts and resume else []
        if self.main:
            want += [r for r in remote if not _is_checkpoint(r)]
        for rel in want:
            fetch_file(self._remote_url(rel), self.local / rel, size=remote[rel])
        if want:
            log.info("%s: %d files of the run fetched into %s", self.url, len(want), self.local)
        self.synced = self._scan()

    def _remote_url(self, rel: str) -> str:
        return f"{str(self.url).rstrip('/')}/{rel}"

    # -- sync --------------------------------------------------------------------------------
    def _scan(self) -> Dict[str, Tuple[int, int, int]]:
        out = {}
        for dirpath, _, files in os.walk(self.local):
            for f in files:
                if f.startswith("."):               # temp files of writes in progress
                    continue
                p = Path(dirpath) / f
                st = p.stat()
                out[p.relative_to(self.local).as_posix()] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return out

    def push(self) -> int:
        """Upload what changed since the last sync (checkpoints first), delete in the bucket what
        the run removed from its folder since then. Returns the number of files uploaded."""
        if not self.main:
            return 0
        now = self._scan()
        changed = sorted((r for r in now if self.synced.get(r) != now[r]), key=lambda r: (not _is_checkpoint(r), r))
        fs = self.url.fs
        for rel in changed:
            fs.put_file(str(self.local / rel), self._remote(rel))
            self.synced[rel] = now[rel]
        for rel in [r for r in self.synced if r not in now]:
            try:
                fs.rm_file(self._remote(rel))
            except FileNotFoundError:
                pass
            del self.synced[rel]
        if changed:
            log.debug("%s: synced %d files", self.url, len(changed))
        return len(changed)


def local_folder(out) -> Path:
    """Where a trainer writes the run `out`: the folder itself, or the mirror of a URL (the one
    `mirrored` set up in this process, else rank 0's)."""
    if not is_url(out):
        return Path(out)
    key = str(as_path(str(out).rstrip("/")))
    for m in _ACTIVE.values():
        if str(m.url) == key:
            return m.local
    return RunMirror(out).local


def sync(local) -> None:
    """After a checkpoint: upload the run's new files when `local` is the mirror of a URL. A
    failed upload is a warning here (training goes on; the next sync uploads it), an error at
    the end of the run."""
    m = _ACTIVE.get(str(Path(local)))
    if m is None:
        return
    try:
        m.push()
    except Exception as e:  # the network, the bucket: the end of the run tries again, and fails loudly
        from .errors import first_line
        log.warning("%s: could not sync the run to the bucket (%s: %s); trying again at the next checkpoint",
                    m.url, type(e).__name__, first_line(e))


@contextmanager
def mirrored(out, resume: bool, rank: int = 0) -> Iterator[Optional[Path]]:
    """Around a training process: for a URL, pull the run into its mirror, yield the mirror,
    sync at the end (even after a failure); for a local folder, nothing."""
    if not is_url(out):
        yield None
        return
    m = RunMirror(out, rank)
    m.pull(resume)
    _ACTIVE[str(m.local)] = m
    try:
        yield m.local
    except BaseException:
        try:
            m.push()        # what the run saved before it stopped (a SIGTERM's checkpoint)
        except Exception as e:  # the failure that stopped the run is the one to report
            log.warning("%s: could not sync the run to the bucket: %s", m.url, e)
        raise
    else:
        m.push()
    finally:
        _ACTIVE.pop(str(m.local), None)
