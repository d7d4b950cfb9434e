"""What the on-disk formats share: the journal folder's name and the one atomic writer.

Every file a store, a token store, a run folder or a command's output folder gets is written
by `atomic_write`: to a dot-named temp file beside it (readers skip dot names), flushed and
fsynced, then renamed into place, so a reader sees either nothing or the whole file, even after
a crash or power loss (an npz streamed over many calls, npz.py, ends with the same
`commit_file`). These files are not:
  - the append-only logs, whose lines are written as things happen: a run's log.jsonl (a record
    a step; cut back to the resumed step atomically) and the attempt journals of
    pipelines/attempts.py (a line before and after each item);
  - a store's bases.zarr/zarr.json, which Zarr writes when the store is created: meta.json,
    written last (atomically), marks the store complete, and a store without it is not read.
"""
from .atomic import PARTS, atomic_write, write_bytes_atomic, write_table_atomic

__all__ = ["PARTS", "atomic_write", "write_bytes_atomic", "write_table_atomic"]
