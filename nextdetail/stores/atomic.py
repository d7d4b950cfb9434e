"""One atomic, durable writer for every file the project writes (see the package docstring)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from ..faults import writing

# The journal folder of an unfinished store or token store: work done, not yet assembled.
PARTS = "_parts"


@contextmanager
def atomic_write(path):
    """Yield a temp path beside `path`; after the block, fsync it and rename it into place
    (and fsync the folder, so the rename survives a power loss). On an exception the temp file
    is removed and `path` is untouched."""
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


def commit_file(tmp, path) -> None:
    """Move a fully written file into place durably: fsync it, rename it (atomic on one file
    system), fsync the folder so the rename survives a power loss."""
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
    with atomic_write(path) as tmp:
        Path(tmp).write_bytes(data)


def write_table_atomic(table, path) -> None:
    """A pyarrow table as Parquet, atomically."""
    import pyarrow.parquet as pq

    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)
