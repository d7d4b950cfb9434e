"""A token store on object storage, fetched once into the local cache and read from there.

Why fetch it rather than read rows by range: training draws a random batch of rows every
step, and a row is ~1 KB; reading rows over the network would cost one request per row (a
range request per sample, thousands per second per GPU, each ~10-50 ms away), while the whole
store is small (about 1 KB per image: 1.3 GB for ImageNet's 1.28M images) and fits a node's
disk. Fetched once, it is memory-mapped as a local store is, at the local store's speed.

    cache folder   NEXTDETAIL_CACHE/tokens/<sha256 of the URL and of its meta.json>/<name>
    verified       every file's size against meta.json (tokens) or the listing (index.parquet),
                   and its sha256 against meta.json "checksums" (written by nextdetail >= 0.3.1;
                   an older store is checked by size only)
    complete mark  meta.json, written last: a fetch cut short is fetched again, never read

A second open asks the bucket for meta.json alone (one GET of a few KB) and, when it is the one
the cache was made from, reads nothing else. A re-export (another meta.json) gets a new folder.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..cache import fetch_file, keyed_folder
from ..storage import as_path
from .atomic import write_bytes_atomic

log = logging.getLogger(__name__)


def fetch_token_store(url) -> Path:
    """The local copy of the token store at `url` (see the module docstring); TokenStoreError
    naming the URL when it is not a complete token store."""
    from .tokens import INDEX, META, TOKENS, TokenStoreError, read_token_meta

    u = as_path(str(url).rstrip("/"))
    try:
        meta_bytes = (u / META).read_bytes()
    except FileNotFoundError:
        read_token_meta(u)             # says why: no store, or an unfinished export
        raise TokenStoreError(u, "not a token store (no meta.json)") from None
    local = keyed_folder("tokens", str(u), hashlib.sha256(meta_bytes).hexdigest(), name=u.name or "tokens")
    if (local / META).is_file() and (local / META).read_bytes() == meta_bytes:
        return local                   # a cache hit: nothing but meta.json was read
    meta = read_token_meta(u)          # checked before anything is downloaded
    sums = meta.get("checksums") or {}
    L = int(meta["L"])
    files = [(s["file"], int(s["rows"]) * L * 2) for s in meta["shards"]] if meta.get("shards") else \
        [(TOKENS, int(meta["N"]) * L * 2)]
    listed = _sizes(u)
    files.append((INDEX, listed.get(INDEX)))
    log.info("%s: fetching the token store (%d files) into %s", u, len(files), local)
    for name, size in files:
        if listed.get(name) is None:
            raise TokenStoreError(u / name, "is missing")
        if size is not None and listed[name] != size:
            raise TokenStoreError(u / name, f"holds {listed[name]} bytes; meta.json says {size} (truncated or damaged)")
        fetch_file(f"{str(u)}/{name}", local / name, size=listed[name], sha256=sums.get(name))
    write_bytes_atomic(local / META, meta_bytes)
    return local


def _sizes(u) -> dict:
    """{relative path: size} of the store's objects, in one listing (per 1,000 objects)."""
    fs, root = u.fs, u.path.rstrip("/")
    return {name[len(root):].lstrip("/"): int(info.get("size") or 0)
            for name, info in fs.find(root, detail=True).items() if info.get("type", "file") == "file"}
