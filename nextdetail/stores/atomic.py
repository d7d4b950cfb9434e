"""One atomic, durable writer for every file the project writes (see the package docstring).

On a local disk: a dot-named temp file beside the target, fsynced, renamed into place. On object
storage (a URL; nextdetail.storage) there is no rename, but a PUT is atomic: the file is written
to a local temp file and uploaded whole in one request (a multipart upload above 100 MB, which
the server also makes visible only when complete), so a reader never sees part of it either.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..faults import writing
from ..storage import as_path, is_url

# The journal folder of an unfinished store or token store: work done, not yet assembled.
PARTS = "_parts"


@contextmanager
def atomic_write(path):
    """Yield a temp path beside `path`; after the block, fsync it and rename it into place
    (and fsync the folder, so the rename survives a power loss). On an exception the temp file
    is removed and `path` is untouched."""
    if is_url(path):
        with _upload_on_exit(as_path(path)) as tmp:
            yield tmp
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):             # a write's ENOSPC names no file: say which one it was
            yield tmp
            commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _upload_on_exit(url):
    fd, tmp = tempfile.mkstemp(prefix=f".{url.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        commit_file(tmp, url)
    finally:
        Path(tmp).unlink(missing_ok=True)


def commit_file(tmp, path) -> None:
    """Move a fully written file into place durably: fsync it, rename it (atomic on one file
    system), fsync the folder so the rename survives a power loss. To a URL: one whole upload
    (atomic on object storage), then the local file is removed."""
    if is_url(path):
        url = as_path(path)
        url.fs.put_file(str(tmp), url.path)
        Path(tmp).unlink(missing_ok=True)
        return
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:          # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path, data: bytes) -> None:
    if is_url(path):            # one PUT: no temp file needed
        from ..storage import write_once
        with writing(path):
            write_once(path, data)
        return
    with atomic_write(path) as tmp:
        Path(tmp).write_bytes(data)


def write_table_atomic(table, path) -> None:
    """A pyarrow table as Parquet, atomically."""
    import pyarrow.parquet as pq

    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)
