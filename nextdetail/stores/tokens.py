"""The token store (a public contract) and its reader, `TokenDataset`.

    TOKENS/tokens.bin      uint16, shape (N, L), row-major, no header. Row i holds sample i's
                           token maps r_1 .. r_M concatenated in generation order (base maps,
                           then detail maps), each map flattened row-major:
                           L = sum_k h_k * w_k, map k is row[offsets[k]:offsets[k+1]].
    TOKENS/index.parquet   one row per sample: row, id, label, class_name, store_index (the
                           image's index in the decomposition store it came from).
    TOKENS/meta.json       format, N, L, dtype, vocabulary size, map shapes, number of base maps,
                           detail factors, the tokenizer checkpoint (path, sha256, config) and the
                           decomposition parameters, the sha256 of every file ("checksums",
                           absent from older stores). Written last: a folder without it is an
                           incomplete export and is refused.
    TOKENS/shards/         instead of tokens.bin when exported with --shard-rows R: fixed-size
                           files tokens-00000.bin, ... of R rows each (the last may be shorter),
                           listed in meta.json; the same reader reads them.

Training reads it through one np.memmap per file and one fancy-index gather per batch: no
decoding, no per-sample Python, no copies beyond the batch itself. A token store given as a URL
(s3://...) is fetched once into the local cache, verified, and memory-mapped from there
(fetch_token_store, at the end of this file, says why: reading rows by range would cost a request
per row).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..cache import fetch_file, keyed_folder
from ..errors import PathError
from ..storage import as_path, is_url, tree_sizes
from .atomic import PARTS, write_bytes_atomic
from .meta import check_keys

log = logging.getLogger(__name__)

FORMAT = "nextdetail.token_store"
FORMAT_VERSION = 1
TOKENS = "tokens.bin"
INDEX = "index.parquet"
META = "meta.json"
INDEX_COLUMNS = ("row", "id", "label", "class_name", "store_index")   # index.parquet, in order
SHARDS = "shards"
DTYPE = np.dtype("<u2")             # uint16, little-endian on every machine
MAX_VOCAB = int(np.iinfo(DTYPE).max) + 1


class TokenStoreError(PathError):
    """A token store that cannot be used as asked; str is one line "<TOKENS or its file>: <reason>"."""


def map_offsets(map_shapes: Sequence[Sequence[int]]) -> np.ndarray:
    """int64 (M+1,): start of each map in a row, and L at the end."""
    return np.concatenate([[0], np.cumsum([int(h) * int(w) for h, w in map_shapes])]).astype(np.int64)


def shard_name(k: int) -> str:
    return f"{SHARDS}/tokens-{k:05d}.bin"


def read_token_meta(path) -> dict:
    """meta.json of a token store, checked for completeness, format and self-consistency."""
    path = as_path(path)
    if not path.is_dir():
        raise TokenStoreError(path, "no such token store (not a folder)")
    if not (path / META).is_file():
        if (path / PARTS).exists() or (path / TOKENS).exists():
            raise TokenStoreError(path, "incomplete token store (no meta.json): its export has not "
                                        "finished; rerun the same `nextdetail export-tokens` command")
        raise TokenStoreError(path, "not a token store (no meta.json)")
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise TokenStoreError(path / META, f"cannot read it as JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TokenStoreError(path, f"meta.json does not describe a {FORMAT}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TokenStoreError(path, f"token store format version {meta.get('format_version')!r}; this "
                                    f"nextdetail reads version {FORMAT_VERSION} only")
    meta_file = path / META
    required = ("vocab", "N", "L") + (("shard_rows",) if "shards" in meta else ())
    check_keys(meta, meta_file, dict.fromkeys(required + ("num_base", "order", "num_classes"), int),
               TokenStoreError, required=required)
    vocab, N, L = meta["vocab"], meta["N"], meta["L"]
    try:
        shapes = [tuple(int(v) for v in s) for s in meta["map_shapes"]]
        if not shapes or any(len(s) != 2 for s in shapes):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise TokenStoreError(meta_file, f"'map_shapes' must be a list of [h, w] pairs, got "
                                         f"{meta.get('map_shapes')!r}"[:200]) from None
    shards = meta.get("shards")
    if shards is not None and not (isinstance(shards, list) and all(
            isinstance(x, dict) and isinstance(x.get("file"), str) and isinstance(x.get("rows"), int)
            for x in shards)):
        raise TokenStoreError(meta_file, "'shards' must be a list of {file, rows} objects")
    if meta.get("dtype") != "uint16":
        raise TokenStoreError(path, f"meta.json dtype {meta.get('dtype')!r}: this reader takes uint16")
    if not 1 <= vocab <= MAX_VOCAB:
        raise TokenStoreError(path, f"vocabulary of {vocab} tokens does not fit uint16 (at most {MAX_VOCAB})")
    if int(map_offsets(shapes)[-1]) != L:
        raise TokenStoreError(path, f"meta.json says L = {L} but its map shapes sum to {map_offsets(shapes)[-1]}")
    if N < 0:
        raise TokenStoreError(path, f"meta.json says N = {N}")
    return meta


class TokenDataset:
    """Read a finished token store: `get_batch(indices)` -> (tokens int64 (B, L), labels int64 (B,)).

    tokenizer : optional run folder or checkpoint file; refused (TokenStoreError) unless its
                sha256 equals the one the tokens were exported with.

    The memmaps are opened lazily and again in every process (DataLoader workers, DDP ranks):
    the object pickles without them. Tokens are read with one fancy-index gather per file
    touched (one for a single tokens.bin), converted to int64 once, and split into maps by views.
    """

    def __init__(self, path, tokenizer=None):
        import pyarrow.parquet as pq

        self.url = str(path) if is_url(path) else None     # where it came from, when a URL
        if self.url is not None:
            path = fetch_token_store(path)
        self.path = Path(path)
        self.meta = meta = read_token_meta(self.path)
        self.N, self.L, self.vocab = int(meta["N"]), int(meta["L"]), int(meta["vocab"])
        self.map_shapes: List[Tuple[int, int]] = [tuple(int(v) for v in s) for s in meta["map_shapes"]]
        self.offsets = map_offsets(self.map_shapes)
        self.num_base = int(meta.get("num_base", len(self.map_shapes)))
        self.order = int(meta.get("order", 0))
        self.files, self.shard_rows = self._files(meta)
        for f, rows in self.files:
            size = (self.path / f).stat().st_size if (self.path / f).is_file() else None
            if size is None:
                raise TokenStoreError(self.path / f, "is missing")
            if size != rows * self.L * DTYPE.itemsize:
                raise TokenStoreError(self.path / f, f"holds {size} bytes; meta.json says {rows} rows x "
                                                     f"{self.L} tokens x {DTYPE.itemsize} bytes = "
                                                     f"{rows * self.L * DTYPE.itemsize} (truncated or damaged)")
        try:
            index = pq.read_table(self.path / INDEX).to_pandas()
        except Exception as e:  # missing, truncated or unreadable Parquet
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise TokenStoreError(self.path / INDEX, f"cannot read it ({type(e).__name__}: {first})") from None
        missing = [c for c in INDEX_COLUMNS if c not in index.columns]
        if missing:
            raise TokenStoreError(self.path / INDEX, f"lacks the column(s) {', '.join(missing)}")
        if len(index) != self.N or not (index["row"].to_numpy() == np.arange(self.N)).all():
            raise TokenStoreError(self.path / INDEX, f"has {len(index)} rows, not rows 0..{self.N - 1} of meta.json")
        self.index = index
        self.labels = index["label"].fillna(-1).to_numpy(np.int64)
        self.ids = index["id"].tolist()
        self.num_classes = int(meta.get("num_classes", int(self.labels.max()) + 1 if self.N else 0))
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)
        self._mm: Optional[list] = None
        self._pid = None

    # -- files -------------------------------------------------------------------------------
    def _files(self, meta) -> Tuple[List[Tuple[str, int]], int]:
        shards = meta.get("shards")
        if not shards:
            return [(TOKENS, self.N)], max(self.N, 1)
        files = [(s["file"], int(s["rows"])) for s in shards]
        rows = int(meta["shard_rows"])
        if sum(r for _, r in files) != self.N or any(r != rows for _, r in files[:-1]):
            raise TokenStoreError(self.path, f"meta.json shards do not add up to N = {self.N} rows "
                                             f"in files of {rows} rows")
        return files, rows

    def _maps(self) -> list:
        # A memmap opened before a fork would share its file position state with the child's
        # copy-on-write pages; reopening per process keeps every worker independent.
        if self._mm is None or self._pid != os.getpid():
            self._mm = [np.memmap(self.path / f, dtype=DTYPE, mode="r", shape=(rows, self.L))
                        if rows else np.zeros((0, self.L), DTYPE) for f, rows in self.files]
            self._pid = os.getpid()
        return self._mm

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_mm"], state["_pid"] = None, None
        return state

    def __len__(self) -> int:
        return self.N

    # -- reading -----------------------------------------------------------------------------
    def gather(self, indices) -> np.ndarray:
        """uint16 (B, L) rows `indices` (any order, repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"indices of shape {idx.shape}: expected a 1-D array")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.N):
            bad = idx[(idx < 0) | (idx >= self.N)][0]
            raise IndexError(f"{self.path}: sample {bad} out of range 0..{self.N - 1}")
        maps = self._maps()
        if len(maps) == 1:
            return maps[0][idx]
        out = np.empty((len(idx), self.L), DTYPE)
        shard = idx // self.shard_rows
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = maps[k][idx[sel] - k * self.shard_rows]
        return out

    def get_batch(self, indices):
        """(tokens int64 torch (B, L), labels int64 torch (B,)) of samples `indices`."""
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        rows = self.gather(idx)
        # uint16 -> int64 in one vectorised copy (what embedding and cross-entropy take).
        return torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(self.labels[idx])

    def split_maps(self, tokens_BL) -> list:
        """(B, L) -> [r_1 .. r_M], views of shape (B, h_k, w_k)."""
        B = tokens_BL.shape[0]
        return [tokens_BL[:, a:b].reshape(B, h, w)
                for (a, b), (h, w) in zip(zip(self.offsets[:-1], self.offsets[1:]), self.map_shapes)]

    # -- provenance --------------------------------------------------------------------------
    def check_tokenizer(self, tokenizer) -> Path:
        """Resolve a run folder / checkpoint / model folder and refuse it unless its sha256 (of
        its checkpoint, or of the one a model folder came from) is the recorded one."""
        from ..pretrained import ModelFolderError, model_sha256, resolve_model
        from ..runs import RunError

        try:
            ckpt = resolve_model(tokenizer)
        except (RunError, ModelFolderError) as e:
            raise TokenStoreError(self.path, str(e)) from None
        recorded = self.meta.get("tokenizer", {}).get("sha256")
        digest = model_sha256(ckpt)
        if digest != recorded:
            raise TokenStoreError(self.path, f"tokenizer checkpoint {ckpt} (sha256 {digest[:12]}...) is not the "
                                             f"one these tokens were exported with (sha256 "
                                             f"{str(recorded)[:12]}..., {self.meta['tokenizer'].get('checkpoint')})")
        return ckpt


# ----------------------------------------------------------------------------- on object storage

# A token store on object storage, fetched once into the local cache and read from there.
#
# Why fetch it rather than read rows by range: training draws a random batch of rows every
# step, and a row is ~1 KB; reading rows over the network would cost one request per row (a
# range request per sample, thousands per second per GPU, each ~10-50 ms away), while the whole
# store is small (about 1 KB per image: 1.3 GB for ImageNet's 1.28M images) and fits a node's
# disk. Fetched once, it is memory-mapped as a local store is, at the local store's speed.
#
#     cache folder   NEXTDETAIL_CACHE/tokens/<sha256 of the URL and of its meta.json>/<name>
#     verified       every file's size against meta.json (tokens) or the listing (index.parquet),
#                    and its sha256 against meta.json "checksums" (recorded by exports since object storage;
#                    an older store is checked by size only)
#     complete mark  meta.json, written last: a fetch cut short is fetched again, never read
#
# A second open asks the bucket for meta.json alone (one GET of a few KB) and, when it is the one
# the cache was made from, reads nothing else. A re-export (another meta.json) gets a new folder.

def fetch_token_store(url) -> Path:
    """The local copy of the token store at `url` (see the module docstring); TokenStoreError
    naming the URL when it is not a complete token store."""
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
    return tree_sizes(u)
