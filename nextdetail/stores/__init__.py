"""What the on-disk formats share: the journal folder's name and the one atomic writer.

Every file a store, a token store or a run folder gets is written by `atomic_write`: to a
dot-named temp file beside it (readers skip dot names), flushed and fsynced, then renamed into
place, so a reader sees either nothing or the whole file, even after a crash or power loss.
"""
from .atomic import PARTS, atomic_write, write_bytes_atomic, write_table_atomic

__all__ = ["PARTS", "atomic_write", "write_bytes_atomic", "write_table_atomic"]
