"""A model argument given as a URL (a run folder, a checkpoint, a model folder on s3://...),
fetched once into the local cache and then loaded as a local one.

torch.load and safetensors read files, and a checkpoint is read whole anyway, so the file is
downloaded, not read by range. What is fetched:

    a checkpoint file      that file
    a run folder           its latest checkpoint only (ckpt-*.pt: names sort by step)
    a model folder         every file under it (model.safetensors, config.json, README.md,
                           a transformer's tokenizer/)

The cache entry is keyed by the URL and the object's size and ETag (or modification time), so
an object replaced in the bucket is fetched again; each file is checked against its listed size
before it is renamed into place (nextdetail.cache.fetch_file), and a model folder's config.json
is written last, so a fetch cut short is never taken for a whole folder. Commands still verify
what they load as they do for local files (a checkpoint's sha256 against the one a token store
or a transformer recorded, a model folder's tensors against its config).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

from .cache import fetch_file, keyed_folder
from .errors import RunError
from .storage import as_path

log = logging.getLogger(__name__)

# The two files every model folder has (nextdetail.pretrained writes and reads them).
WEIGHTS = "model.safetensors"
CONFIG = "config.json"

_ORIGIN: Dict[str, str] = {}        # str(local path) -> the URL it was fetched from


def origin(path) -> Optional[str]:
    """The URL a local cache path was fetched from in this process, or None."""
    return _ORIGIN.get(str(path))


def _version(info: dict) -> str:
    """What changes when an object is replaced: size, then ETag or modification time."""
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return f"{info.get('size')}:{str(tag).strip(chr(34))}"


def fetch_model(url) -> Path:
    """The local copy of a checkpoint, run folder (its latest checkpoint) or model folder at
    `url`; RunError naming the URL when it is none of them."""
    u = as_path(str(url).rstrip("/"))
    fs, root = u.fs, u.path.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    files = {name[len(root):].lstrip("/"): info for name, info in found.items()
             if info.get("type", "file") == "file"}
    if "" in files:                                 # the URL is a file: a checkpoint
        return _fetch_one(str(u), files[""], u.name)
    if not files:
        raise RunError(f"{u}: nothing (no such file or folder)")
    if CONFIG in files and WEIGHTS in files:
        return _fetch_folder(u, files, CONFIG)
    ckpts = sorted(r for r in files if "/" not in r and r.startswith("ckpt-") and r.endswith(".pt"))
    if not ckpts:
        raise RunError(f"{u}: a folder with no checkpoint (ckpt-*.pt) and no model (config.json, "
                       f"model.safetensors), not a run folder")
    return _fetch_one(f"{str(u)}/{ckpts[-1]}", files[ckpts[-1]], ckpts[-1])


def _fetch_one(url: str, info: dict, name: str) -> Path:
    local = keyed_folder("models", url, _version(info), name=name)
    if not local.is_file():
        log.info("fetching %s into %s", url, local)
    fetch_file(url, local, size=int(info["size"]))
    _ORIGIN[str(local)] = url
    return local


def _fetch_folder(u, files: Dict[str, dict], last: str) -> Path:
    url = str(u)
    key = "\n".join(f"{r} {_version(i)}" for r, i in sorted(files.items()))
    local = keyed_folder("models", url, key, name=u.name or "model")
    if not (local / last).is_file():
        log.info("fetching %s into %s", url, local)
    for rel in sorted(files, key=lambda r: r == last):       # config.json last: the folder's mark
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        fetch_file(f"{url}/{rel}", local / rel, size=int(files[rel]["size"]))
    _ORIGIN[str(local)] = url
    return local
