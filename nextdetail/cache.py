"""The local cache of what lives at a URL: token stores, model folders, checkpoints, run mirrors.

Object storage is read by request, and some things are read many times over (a token store row
by row, every batch) or by libraries that want a file (torch.load, safetensors, np.memmap). Those
are fetched once into a folder of this cache, keyed by the URL (and, where the content may change
under one name, by the checksums that name it), verified, and then used as local files.

    NEXTDETAIL_CACHE      the cache's root (default $XDG_CACHE_HOME/nextdetail, else
                          ~/.cache/nextdetail); set it to a node-local disk on a cluster

Every file is downloaded to a temp name beside its place and renamed into place once its size
(and, when known, its sha256) checks out, so a cache entry is whole or absent: a download cut
short by a kill is done again, never used.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

from .errors import PathError
from .storage import as_path

CACHE_ENV = "NEXTDETAIL_CACHE"
log = logging.getLogger(__name__)


class CacheError(PathError):
    """A file fetched from a URL is not what its listing or checksum says; one line naming it."""


def cache_root() -> Path:
    """The cache's root folder (NEXTDETAIL_CACHE, else the user's cache folder)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nextdetail"


def keyed_folder(kind: str, *key: str, name: Optional[str] = None) -> Path:
    """cache_root()/kind/<sha256 of the key, 16 hex>/name: one folder per (URL, checksums). `name`
    (the URL's last part) keeps the folder's own name what it is in the bucket, for messages and
    for what a run writes with its folder's name (plot titles, W&B groups)."""
    digest = hashlib.sha256("\n".join(str(k) for k in key).encode()).hexdigest()[:16]
    folder = cache_root() / kind / digest
    return folder / name if name else folder


def fetch_file(url, local: Path, *, size: Optional[int] = None, sha256: Optional[str] = None) -> Path:
    """`url` as the local file `local`, downloaded unless it is there already with the expected
    size (and sha256, when given: then a file there is checked too). CacheError when the download
    does not have them."""
    from .checksum import file_sha256

    local = Path(local)
    if local.is_file() and (size is None or local.stat().st_size == size) and \
            (sha256 is None or file_sha256(local) == sha256):
        return local
    src = as_path(url)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
    try:
        src.fs.get_file(src.path, str(tmp))
        got = tmp.stat().st_size
        if size is not None and got != size:
            raise CacheError(url, f"downloaded {got} bytes, its listing says {size}")
        if sha256 is not None and file_sha256(tmp) != sha256:
            raise CacheError(url, f"its sha256 is not the recorded {sha256[:12]}... (damaged or replaced); "
                                  f"fetch it again, or export it again")
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    log.debug("fetched %s -> %s", url, local)
    return local
