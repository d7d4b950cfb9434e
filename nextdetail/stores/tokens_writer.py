"""The token store's writer: an export's encoded blocks -> tokens.bin (or shards/), index.parquet,
then meta.json, the mark of a complete store.

The format is the one tokens.py documents and reads; its files are written here, beside that
reader, so that the two change together. The export job (pipelines/export.py) plans, encodes one
part file per block in its journal (TOKENS/_parts) and then calls `finish_token_store`, which
never reads a token: parts are moved (shards/) or concatenated (tokens.bin) as bytes, and
hashed on the way (meta.json "checksums"). TOKENS may be a URL: then every file is one PUT. A finish
that dies is run again by the rerun: meta.json is written last and the journal dropped after it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from .. import __version__
from ..storage import absolute, as_path, copy, is_local, remove_tree, sizes
from .atomic import PARTS, atomic_write, write_bytes_atomic, write_table_atomic
from .decomposition_format import StoreError
from .journal import OutputFolder
from .tokens import FORMAT, FORMAT_VERSION, INDEX, META, SHARDS, TOKENS, map_offsets, shard_name

log = logging.getLogger(__name__)

TOKEN_STORE = OutputFolder("token store", (TOKENS, INDEX, META, PARTS, SHARDS), StoreError)


def _assemble(out, blocks: Sequence[Tuple[int, int, object]], sharded: bool) -> Dict[str, str]:
    """The blocks' part files (block, rows, part) as shards/ (moved) or one tokens.bin (copied);
    returns {file: sha256} of what it wrote. On object storage a shard is a server-side copy of
    its part (no rename there), and tokens.bin is the parts streamed through a local temp file
    and uploaded in one PUT."""
    sums = {}
    if sharded:
        if is_local(out):
            (out / SHARDS).mkdir(exist_ok=True)
        have = sizes(out / SHARDS)
        for b, _, part in blocks:
            shard = out / shard_name(b)
            if shard.name not in have:        # not yet moved by an earlier finish
                if is_local(out):
                    os.replace(part, shard)
                else:
                    copy(part, shard)         # the part is removed with the journal, after meta.json
            sums[shard_name(b)] = _sha256(shard)
    else:
        h = hashlib.sha256()
        with atomic_write(out / TOKENS) as tmp, open(tmp, "wb") as dst:
            for _, _, part in blocks:
                with as_path(part).open("rb") as src:
                    while chunk := src.read(1 << 24):
                        h.update(chunk)
                        dst.write(chunk)
        sums[TOKENS] = h.hexdigest()
    return sums


def _sha256(path) -> str:
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _write_index(out, store) -> Tuple[np.ndarray, list]:
    """index.parquet: one row per ok image of the decomposition store, in store order (its
    manifest read a row group at a time). Returns the rows' labels and class names."""
    import pyarrow as pa

    labels = store.labels.astype(np.int64)
    classes = store.ok_column("class_name")
    n = len(store)
    table = pa.table({"row": pa.array(np.arange(n), pa.int64()),
                      "id": pa.array(store.ok_column("id"), pa.string()),
                      "label": pa.array(labels, pa.int64()),
                      "class_name": pa.array(classes, pa.string()),
                      "store_index": pa.array(store.ok_indices.astype(np.int64), pa.int64())})
    write_table_atomic(table, out / INDEX)
    return labels, classes


def finish_token_store(out, store, blocks: Sequence[Tuple[int, int, object]], *, shard_rows: Optional[int],
                       map_shapes, vocab: int, num_base: int, order: int, checkpoint, sha256: str,
                       tokenizer_config: dict, plan: dict, encode: Iterable[str] = ()) -> None:
    """Blocks -> tokens.bin or shards/, index.parquet, then meta.json last, then drop the journal.

    out: the token store; store: the DecompositionStore its rows come from (its ok images, in
    order); blocks: (block, rows, part file) in row order; shard_rows: keep the parts as shard
    files of that many rows (None: one tokens.bin). The tokenizer's checkpoint, sha256 and config,
    and the export's plan (what a rerun is compared with) are recorded in meta.json, as are the
    encoder set-ups of this run (`encode`, JSON strings)."""
    from ..pretrained import model_source

    out = as_path(out)
    sharded = shard_rows is not None
    checksums = _assemble(out, blocks, sharded)
    labels, classes = _write_index(out, store)
    checksums[INDEX] = _sha256(out / INDEX)
    names = {int(lab): c for lab, c in zip(labels, classes) if lab >= 0 and c}
    quant = tokenizer_config["quant"]
    offsets = map_offsets(map_shapes)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "nextdetail_version": __version__,
            "N": len(store), "L": int(offsets[-1]), "dtype": "uint16", "byte_order": "little",
            "layout": "row-major (N, L); map k of row i is row[offsets[k]:offsets[k+1]], reshaped (h_k, w_k)",
            "vocab": vocab, "map_shapes": map_shapes,
            "offsets": offsets.tolist(), "num_maps": len(map_shapes),
            "num_base": num_base, "order": order,
            "detail_depth": quant["detail_depth"] if order else 0,
            "num_classes": int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0,
            "class_names": [names.get(k) for k in range(int(labels.max()) + 1)] if names else [],
            "tokenizer": {"checkpoint": model_source(checkpoint), "sha256": sha256,
                          "kind": quant["kind"], "config": tokenizer_config,
                          "image_size": tokenizer_config["image_size"],
                          "crop": "centre crop of the stored image"},
            "decomposition": {"store": absolute(store.path), "method": store.method,
                              "layer_order": store.layer_names, "order": store.order, "size": store.size,
                              "at": store.meta.get("at"), "backend": store.meta.get("backend")},
            "plan": plan}
    encode = sorted(set(encode))
    if encode:
        # What the bytes depend on besides the inputs, as the encoders of this run reported it
        # (blocks finished by an earlier run are not in it). Two entries: mixed bytes.
        meta["encode"] = [json.loads(s) for s in encode]
        if len(encode) > 1:
            log.warning("%s: blocks were encoded on %d different set-ups (see meta.json 'encode'); "
                        "their tokens may differ in the last bit of a near-tie", out, len(encode))
    if sharded:
        meta["shard_rows"] = shard_rows
        meta["shards"] = [{"file": shard_name(b), "rows": rows} for b, rows, _ in blocks]
    # sha256 of every file (since object storage): what a reader that fetches the store over the network
    # verifies its copy with (stores.tokens.fetch_token_store); older stores are read without it.
    meta["checksums"] = checksums
    write_bytes_atomic(out / META, (json.dumps(meta, indent=2) + "\n").encode())
    remove_tree(out / PARTS)
