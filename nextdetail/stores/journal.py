"""Resumable output folders: the one rule every command that writes a folder follows.

Four kinds of folder are written so that rerunning the same command continues them: the
decomposition store (decompose-dataset), the token store (export-tokens), sample batches
(sample --per-class) and training runs (train-tokenizer, train). Each kind is an `OutputFolder`
and each follows the same three steps:

    with kind.lock(path):                    1. one writer at a time (nextdetail.stores.lock)
        kind.claim(path, overwrite=...)      2. new, ours, or refused; --overwrite removes
                                                exactly the kind's own entries
        old = recorded(path / FILE, settings)   3. the settings the bytes depend on, recorded
        diffs = differences(old, settings)      once; a rerun that asks for others is refused,
                                                naming each difference

Only the kind's own entries are ever removed, so `--overwrite` pointed at the wrong folder (a
home directory, another kind of output) is refused instead of emptying it. Dot names (the lock,
temp files) are never the kind's: a folder that holds only them counts as new.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Tuple

from ..errors import PathError
from ..storage import as_path, is_url, remove_tree
from .atomic import write_bytes_atomic
from .lock import folder_lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputFolder:
    """A kind of resumable output folder.

    noun: what the folder is called in messages ("decomposition store", "token store", ...);
    entries: the names (or glob patterns: 'ckpt-*.pt') the kind writes at the folder's top level,
    the only ones `claim(..., overwrite=True)` removes; error: the PathError subclass its refusals raise; mark: the entry
    that every folder of the kind has, named when a folder is refused for lacking them all;
    option: the option that names the folder on the command line.
    """

    noun: str
    entries: Tuple[str, ...]
    error: Callable[[Any, str], PathError] = PathError
    mark: Optional[str] = None
    option: str = "--out"

    def state(self, path) -> str:
        """'new' (absent, or holding dot names only), 'ours' (holds one of the kind's entries)
        or 'foreign'; the error when path is a file."""
        path = as_path(path)
        names = {n for n in _names(path, self) if not n.startswith(".")}
        if not names:
            return "new"
        return "ours" if any(self.owns(n) for n in names) else "foreign"

    def owns(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, e) for e in self.entries)

    def claim(self, path, *, overwrite: bool = False) -> str:
        """The folder's state for a job about to write it: a foreign folder is refused; with
        `overwrite` the kind's entries are removed first and the state is 'new'."""
        state = self.state(path)
        if state == "foreign":
            raise self.error(path, self.foreign_reason())
        if state == "ours" and overwrite:
            log.info("%s: --overwrite: removing the existing %s", path, self.noun)
            self.remove(path)
            return "new"
        return state

    def foreign_reason(self) -> str:
        lacks = f" (no {self.mark})" if self.mark else ""
        return (f"exists and is not a {self.noun}{lacks}; choose another {self.option} "
                f"(--overwrite only ever replaces a {self.noun})")

    def remove(self, path) -> None:
        """Remove the kind's entries from path, and nothing else."""
        path = as_path(path)
        for name in sorted(n for n in _names(path, self) if self.owns(n)):
            p = path / name
            if is_url(p) or (p.is_dir() and not p.is_symlink()):
                remove_tree(p)          # an object store's "folder" is a prefix: every object under it
            else:
                p.unlink(missing_ok=True)

    def lock(self, path):
        """The folder's writer lock (a context manager; see nextdetail.stores.lock)."""
        return folder_lock(path, self.noun, self.option)


def _names(path, kind: OutputFolder) -> List[str]:
    """The names directly in folder `path` ([] when absent: on object storage, no object under
    the prefix); the kind's error when path is a file."""
    if is_url(path):
        fs = path.fs
        try:
            entries = fs.ls(path.path, detail=True)
        except FileNotFoundError:
            return []
        if len(entries) == 1 and entries[0]["type"] == "file" and entries[0]["name"].rstrip("/") == path.path.rstrip("/"):
            raise kind.error(path, f"exists and is not a folder; choose another {kind.option}")
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries]
    if not path.exists():
        return []
    if not path.is_dir():
        raise kind.error(path, f"exists and is not a folder; choose another {kind.option}")
    return os.listdir(path)


def recorded(path, settings: Mapping) -> Optional[dict]:
    """The settings recorded in the JSON file `path`, or None after recording `settings` there
    (a new folder). Several writers may record the same settings at once: the atomic rename makes
    the last whole copy win."""
    path = as_path(path)
    if path.is_file():
        return json.loads(path.read_text())
    write_bytes_atomic(path, json.dumps(dict(settings), indent=1).encode())
    return None


def differences(old, new, *, ignore: tuple = (), labels: Optional[Tuple[str, str]] = None, flatten: bool = False,
                value: Callable[[Any], str] = repr, names: Optional[Mapping[str, str]] = None,
                prefix: str = "", spell: Optional[Callable[[type, str], Optional[str]]] = None) -> List[str]:
    """How `new` differs from `old`, one phrase per difference, in `new`'s order.

    old, new: two configs of one dataclass (nested configs are compared field by field, as
    'part.field', or with `flatten` by their own names spelt as options: 'n-iter'), or two
    mappings of recorded settings (a key missing on one side counts as None).
    spell(config class, field) names a dataclass field (its option: options.option_name), or
    None to keep the default name.
    The phrase is 'name OLD != NEW', with ' (label)' after each value when `labels` is given;
    with `names`, the phrase of a differing key is names[key] instead (keys it lacks are
    compared but not named; their phrase is the default one). `ignore` names fields or keys
    that may differ.
    """
    cls = None
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new):
        cls = type(old)
        pairs = [(f.name, getattr(old, f.name), getattr(new, f.name)) for f in dataclasses.fields(old)]
    else:
        old, new = dict(old or {}), dict(new or {})
        pairs = [(k, old.get(k), new.get(k)) for k in list(new) + [k for k in old if k not in new]]
    out = []
    for key, x, y in pairs:
        if key in ignore:
            continue
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
            out += differences(x, y, ignore=ignore, labels=labels, flatten=flatten, value=value,
                               prefix="" if flatten else f"{prefix}{key}.", spell=spell)
        elif x != y:
            if names is not None and key in names:
                if names[key] not in out:
                    out.append(names[key])
                continue
            name = (spell(cls, key) if spell is not None and cls is not None else None) or (
                key.replace("_", "-") if flatten else prefix + key)
            a, b = (f" ({labels[0]})", f" ({labels[1]})") if labels else ("", "")
            out.append(f"{name} {value(x)}{a} != {value(y)}{b}")
    return out
