"""`nextdetail info PATH`: what a path is, and its vital facts.

    identify(path) -> Kind       which of the project's outputs a path is, from its names and its
                                 small metadata files (meta.json, config.json, log.jsonl's first
                                 lines, an .npz's member names); nothing large is read
    describe(path) -> str        one phrase for messages: "a transformer run", "a token store",
                                 "an incomplete decomposition store (being written, or its job
                                 died)", else what runs.folder_kind says ("a folder", "a file")
    inspect(path) -> Info        the kind and its facts (nextdetail.info_facts), a JSON-able dict;
                                 Info.lines() is what `nextdetail info` prints

Everything here only reads: no lock is taken, so a store another job is writing is described as
it stands. A path that is none of the kinds is a PathError (exit status 2) naming what it is.
"""
from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from .errors import PathError
from .options import opt
from .storage import as_path, is_url, open_input

log = logging.getLogger(__name__)

# key -> the phrase messages use. The keys are the `kind` of `info --json` (a public contract).
KINDS = {
    "decomposition_store": "a decomposition store",
    "decomposition_store_incomplete": "an incomplete decomposition store (being written, or its job died)",
    "token_store": "a token store",
    "token_store_incomplete": "an incomplete token store (being written, or its export died)",
    "tokenizer_run": "a tokenizer run",
    "transformer_run": "a transformer run",
    "run": "a training run (no log or checkpoint says of which trainer)",
    "tokenizer_model": "a tokenizer model folder (nextdetail export-model)",
    "transformer_model": "a transformer model folder (nextdetail export-model)",
    "npz_batch": "an ADM sample batch (.npz)",
    "npz_stats": "Inception statistics (.npz with mu and sigma)",
    "samples": "a samples folder (nextdetail sample)",
    "upscale": "an upscale folder (nextdetail upscale)",
    "edit": "an edit folder (nextdetail edit)",
    "eval_tokenizer": "an eval-tokenizer folder (eval.csv)",
    "tokenizer_checkpoint": "a tokenizer checkpoint file",
    "transformer_checkpoint": "a transformer checkpoint file",
}
RUN_KINDS = ("tokenizer_run", "transformer_run", "run")
OUTPUT_KINDS = ("samples", "upscale", "edit", "eval_tokenizer")
NAMED = "a decomposition store, token store, tokenizer or transformer run, model folder or ADM .npz"


class InfoError(PathError):
    """A path that is none of the kinds `info` and `view` know; str names what it is instead."""


@dataclass(frozen=True)
class Kind:
    """What a path is: `key` (one of KINDS) and its phrase."""

    key: str

    @property
    def phrase(self) -> str:
        return KINDS[self.key]

    @property
    def complete(self) -> bool:
        return not self.key.endswith("_incomplete")


@dataclass
class Info:
    """A path, its kind and its facts (a JSON-able dict, keys per kind: see info_facts)."""

    path: Path
    kind: Kind
    facts: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"path": str(self.path), "kind": self.kind.key, "what": self.kind.phrase, **self.facts}

    def lines(self) -> List[str]:
        """What `nextdetail info` prints: the kind, then one fact a line."""
        from .info_facts import fact_lines

        return [f"{self.path}: {self.kind.phrase}"] + ["  " + s for s in fact_lines(self.kind.key, self.facts)]


def _json(path: Path) -> Optional[dict]:
    """A small JSON file as a dict, None when it is missing or not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run_kind(path: Path) -> str:
    """tokenizer_run or transformer_run from the run's log (the transformer's records carry a
    "split", the tokenizer's an "l2"), else from its latest checkpoint (torch, memory-mapped),
    else "run"."""
    try:
        with (path / "log.jsonl").open() as f:
            for line, _ in zip(f, range(4)):
                rec = json.loads(line)
                if "split" in rec:
                    return "transformer_run"
                if "l2" in rec:
                    return "tokenizer_run"
    except (OSError, ValueError):
        pass
    found = sorted(path.glob("ckpt-*.pt"))
    return _checkpoint_kind(found[-1], "run") if found else "run"


def _checkpoint_kind(path: Path, unknown: Optional[str]) -> Optional[str]:
    """tokenizer_* / transformer_* of a checkpoint file by the trainer that wrote it."""
    from .runs import RunError, checkpoint_kind, load_checkpoint

    suffix = "_checkpoint" if unknown is None else "_run"
    if is_url(path):        # not downloaded just to be named: a run says what it is in its log
        return unknown
    try:
        # mmap: the tensors stay on disk; only the pickle's plain data (the config) is read.
        kind = checkpoint_kind(load_checkpoint(path, what="checkpoint", map_location="cpu"))
    except RunError:
        return unknown
    if kind.startswith("tokenizer"):
        return "tokenizer" + suffix
    if kind.startswith("transformer"):
        return "transformer" + suffix
    return unknown


def _npz_kind(path: Path) -> Optional[str]:
    try:
        with open_input(path) as f, zipfile.ZipFile(f) as zf:
            names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile):
        return None
    if "arr_0" in names:
        return "npz_batch"
    return "npz_stats" if {"mu", "sigma"} <= names else None


def _store_kind(path: Path, names: set) -> Optional[str]:
    meta = _json(path / "meta.json") if "meta.json" in names else None
    fmt = (meta or {}).get("format")
    if fmt == "nextdetail.decomposition_store" or "bases.zarr" in names or "layers.zarr" in names:
        return "decomposition_store" if meta is not None else "decomposition_store_incomplete"
    if fmt == "nextdetail.token_store" or names & {"tokens.bin", "index.parquet", "shards"}:
        return "token_store" if meta is not None else "token_store_incomplete"
    parts = path / "_parts"
    if "_parts" in names and parts.is_dir():        # an export whose first blocks are not in yet
        if any(p.name.startswith("block-") for p in parts.iterdir()):
            return "token_store_incomplete"
    return None


def identify(path) -> Optional[Kind]:
    """The kind of `path` (see KINDS), or None when it is none of them."""
    from .pretrained import CONFIG, is_model_folder

    path = as_path(path)
    if path.is_file():
        if path.suffix == ".npz":
            key = _npz_kind(path)
        elif path.suffix == ".pt":
            key = _checkpoint_kind(path, None)
        else:
            key = None
        return Kind(key) if key else None
    if not path.is_dir():
        return None
    names = {n.name for n in path.iterdir() if not n.name.startswith(".")}
    key = _store_kind(path, names)
    if key is None and is_model_folder(path):
        kind = (_json(path / CONFIG) or {}).get("kind")
        key = f"{kind}_model" if kind in ("tokenizer", "transformer") else None
    if key is None and (any(n.startswith("ckpt-") and n.endswith(".pt") for n in names) or "log.jsonl" in names):
        key = run_kind(path)
    if key is None:
        for name, k in (("samples.json", "samples"), ("upscale.json", "upscale"), ("edit.json", "edit"),
                        ("eval.csv", "eval_tokenizer")):
            if name in names:
                key = k
                break
    return Kind(key) if key else None


def describe(path) -> str:
    """One phrase saying what `path` is, for messages: "a transformer run", "a token store", ...;
    for a path of none of the kinds, nextdetail.runs.folder_kind's ("a folder", "a file",
    "nothing (no such file or folder)")."""
    from .runs import folder_kind

    kind = identify(path)
    return kind.phrase if kind is not None else folder_kind(path)


def refuse(path) -> InfoError:
    """The one-line error for a path that is none of the kinds."""
    return InfoError(path, f"{describe(path)}, not {NAMED}")


def inspect(path) -> Info:
    """The kind and the facts of `path`; InfoError (exit status 2) when it is none of the kinds."""
    from .info_facts import facts_of

    path = as_path(path)
    kind = identify(path)
    if kind is None:
        raise refuse(path)
    # A token store on a URL is read from its verified copy in the cache (its codebook usage
    # reads thousands of rows); the rest in place: a run's listing and its log's tail by range.
    read = readable_copy(path, kind.key) if kind.key == "token_store" else path
    return Info(path, kind, facts_of(kind.key, read))


def readable_copy(path, key: str):
    """What `info` and `view` read for a path of kind `key`: the path itself, unless it is a URL
    of a token store (fetched whole into the local cache and verified, as TokenDataset does: it
    is ~1 KB per image) or of a run or an output folder (its small files, the logs, records and
    pictures, fetched into the cache; never its checkpoints). A decomposition store is always
    read in place, by range: it may hold a million images."""
    if not is_url(path) or key.startswith("decomposition_store") or key.endswith("_checkpoint") or \
            key.startswith("npz_"):
        return path
    if key == "token_store":
        from .stores.tokens import fetch_token_store
        return fetch_token_store(path)
    from .cache import fetch_file, keyed_folder
    from .storage import tree_sizes

    files = {rel: n for rel, n in tree_sizes(path).items()
             if rel and not rel.endswith(".pt") and not any(p.startswith(".") for p in rel.split("/"))}
    local = keyed_folder("view", str(path), *(f"{rel} {n}" for rel, n in sorted(files.items())),
                         name=path.name or "run")
    for rel, n in sorted(files.items()):
        fetch_file(f"{path}/{rel}", local / rel, size=n)
    return local


@dataclass(frozen=True)
class InfoConfig:
    """Settings of `nextdetail info`."""

    paths: Tuple[Path, ...] = opt(help="a decomposition store, token store, run folder, model folder or .npz",
                       positional=True, metavar="PATH", nargs="+", type=as_path)
    json: bool = opt(False, "print one JSON object per PATH (one a line) instead of text")
