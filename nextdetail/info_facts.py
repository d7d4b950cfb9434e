"""The vital facts of each kind of path `nextdetail info` knows (nextdetail.info), as JSON-able
dicts, and their text lines.

Everything reads only what it needs and in bounded memory: the manifest a row group at a time,
a token store's codebook usage from a sample of at most USAGE_ROWS rows (memory-mapped), a run's
log from its last 64 KiB. `TokenRows` (rows of a token store by number, without its index) and
`map_code_counts` are shared with the viewer (nextdetail.view).
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .storage import open_input, sizes

USAGE_ROWS = 4096           # a token store's codebook usage is measured on at most this many rows
ERROR_EXAMPLES = 5
LOG_TAIL = 64 * 1024        # bytes of log.jsonl read for the last records


# --------------------------------------------------------------------------- decomposition store

def _dir_bytes(folder: Path) -> tuple:
    """(files, bytes) directly under `folder` (a store's shard files), from one listing (a stat
    each on a disk; a request per 1,000 objects on object storage)."""
    shards = [n for name, n in sizes(folder).items() if name.startswith("c.")]
    return len(shards), sum(shards)


def _manifest_stats(path: Path, levels: int) -> dict:
    """Means of energy_k and iterations_k over ok rows, and the first error rows, read a row group
    at a time (a million-row manifest is never held whole)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    f = pq.ParquetFile(open_input(path / "manifest.parquet"))
    have = set(f.schema_arrow.names)
    energy = [f"energy_{k}" for k in range(1, levels + 1) if f"energy_{k}" in have]
    sweeps = [f"iterations_{k}" for k in range(1, levels + 1) if f"iterations_{k}" in have]
    sums = dict.fromkeys(energy + sweeps, 0.0)
    counts = dict.fromkeys(energy + sweeps, 0)
    status: Dict[str, int] = {}
    errors: List[dict] = []
    for g in range(f.num_row_groups):
        t = f.read_row_group(g, columns=["index", "id", "status", "error"] + energy + sweeps)
        for vc in pc.value_counts(t.column("status")).to_pylist():
            status[str(vc["values"])] = status.get(str(vc["values"]), 0) + int(vc["counts"])
        for c in energy + sweeps:
            col = t.column(c)
            counts[c] += len(col) - col.null_count
            sums[c] += float(pc.sum(col).as_py() or 0.0)
        if len(errors) < ERROR_EXAMPLES:
            bad = t.filter(pc.equal(t.column("status"), "error"))
            errors += bad.select(["index", "id", "error"]).slice(0, ERROR_EXAMPLES - len(errors)).to_pylist()
    mean = {c: (sums[c] / counts[c] if counts[c] else None) for c in sums}
    return {"status": status, "energy_mean": [mean[c] for c in energy], "sweeps_mean": [mean[c] for c in sweeps],
            "error_examples": errors}


def store_facts(path: Path) -> dict:
    meta = json.loads((path / "meta.json").read_text())
    files, size = _dir_bytes(path / "bases.zarr")
    counts = meta.get("counts", {})
    ok = int(counts.get("ok", 0))
    facts = {"complete": True, "images": counts.get("images"), "ok": ok, "error": counts.get("error"),
             "method": meta.get("method"), "order": meta.get("order"), "levels": meta.get("levels"),
             "size": meta.get("size"), "layer_order": meta.get("layer_order"), "at": meta.get("at"),
             "backend": meta.get("backend"), "shard_images": meta.get("shard_images"), "shard_files": files,
             "bytes": size, "bytes_per_image": round(size / ok) if ok else None,
             "format_version": meta.get("format_version"), "nextdetail_version": meta.get("nextdetail_version"),
             "src": meta.get("src")}
    stats = _manifest_stats(path, int(meta.get("levels") or meta.get("order") or 0))
    facts.update(energy_mean=stats["energy_mean"], sweeps_mean=stats["sweeps_mean"],
                 error_examples=stats["error_examples"])
    return facts


def incomplete_store_facts(path: Path) -> dict:
    """What a store being written (or whose job died) shows: its listing, the shards in place,
    the journal, and who holds its lock."""
    import pyarrow.parquet as pq

    files, size = _dir_bytes(path / "bases.zarr")
    rows = None
    try:
        rows = pq.ParquetFile(open_input(path / "manifest.parquet")).metadata.num_rows
    except Exception:       # absent while the listing is staged, or being replaced: say so, don't fail
        pass
    parts = path / "_parts"
    journal = sum(1 for _ in parts.rglob("*") if _.is_file()) if parts.is_dir() else 0
    return {"complete": False, "listed": rows, "shard_files": files, "bytes": size, "journal_files": journal,
            "lock": _lock_holder(path)}


def _lock_holder(path: Path) -> Optional[dict]:
    """The writer's lock file (host, pid, started, command), when there is one."""
    try:
        info = json.loads((path / ".nextdetail.lock").read_text())
    except (OSError, ValueError):
        return None
    return {k: info.get(k) for k in ("host", "pid", "started", "command")} if isinstance(info, dict) else None


# --------------------------------------------------------------------------- token store

class TokenRows:
    """Rows of a finished token store by number, memory-mapped (tokens.bin or shards/), without
    reading index.parquet whole (TokenDataset does, which costs O(N) at open)."""

    def __init__(self, path):
        from .stores.tokens import map_offsets, read_token_meta

        self.path = Path(path)
        self.meta = read_token_meta(self.path)
        self.N, self.L, self.vocab = int(self.meta["N"]), int(self.meta["L"]), int(self.meta["vocab"])
        self.map_shapes = [tuple(int(v) for v in s) for s in self.meta["map_shapes"]]
        self.offsets = map_offsets(self.map_shapes)
        shards = self.meta.get("shards")
        self.files = [(s["file"], int(s["rows"])) for s in shards] if shards else [("tokens.bin", self.N)]
        self.shard_rows = int(self.meta["shard_rows"]) if shards else max(self.N, 1)
        self._maps: Optional[list] = None

    def _memmaps(self) -> list:
        if self._maps is None:
            self._maps = [np.memmap(self.path / f, dtype="<u2", mode="r", shape=(rows, self.L)) if rows
                          else np.zeros((0, self.L), "<u2") for f, rows in self.files]
        return self._maps

    def rows(self, idx: Sequence[int]) -> np.ndarray:
        """uint16 (len(idx), L): the rows idx (0 <= i < N)."""
        idx = np.asarray(idx, np.int64)
        out = np.empty((len(idx), self.L), np.uint16)
        maps = self._memmaps()
        for j, i in enumerate(idx):
            k = int(i) // self.shard_rows
            out[j] = maps[k][int(i) - k * self.shard_rows]
        return out

    def maps(self, row: np.ndarray) -> List[np.ndarray]:
        """One row (L,) split into its token maps (h_k, w_k)."""
        return [row[a:b].reshape(h, w) for a, b, (h, w) in zip(self.offsets[:-1], self.offsets[1:], self.map_shapes)]

    def sample_rows(self, limit: int = USAGE_ROWS) -> np.ndarray:
        """At most `limit` row numbers spread evenly over the store (all of them when N <= limit)."""
        return np.unique(np.linspace(0, self.N - 1, min(self.N, limit)).astype(np.int64)) if self.N else \
            np.zeros(0, np.int64)


def map_code_counts(tokens: TokenRows, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """int64 (M, vocab): how often each code appears in each token map over `rows` (default
    tokens.sample_rows())."""
    rows = tokens.sample_rows() if rows is None else rows
    out = np.zeros((len(tokens.map_shapes), tokens.vocab), np.int64)
    for lo in range(0, len(rows), 512):          # 512 rows at a time: bounded memory for any L
        block = tokens.rows(rows[lo:lo + 512])
        for k, (a, b) in enumerate(zip(tokens.offsets[:-1], tokens.offsets[1:])):
            out[k] += np.bincount(block[:, a:b].ravel(), minlength=tokens.vocab)[:tokens.vocab]
    return out


def token_store_facts(path: Path) -> dict:
    tokens = TokenRows(path)
    meta = tokens.meta
    rows = tokens.sample_rows()
    usage = (map_code_counts(tokens, rows) > 0).mean(1) if len(rows) else np.zeros(len(tokens.map_shapes))
    size = sum((path / f).stat().st_size for f, _ in tokens.files if (path / f).is_file())
    tok = meta.get("tokenizer") or {}
    dec = meta.get("decomposition") or {}
    return {"complete": True, "rows": tokens.N, "tokens_per_row": tokens.L, "vocab": tokens.vocab,
            "map_shapes": [list(s) for s in tokens.map_shapes], "num_base": meta.get("num_base"),
            "order": meta.get("order"), "num_classes": meta.get("num_classes"),
            "tokenizer": {"sha256": tok.get("sha256"), "checkpoint": tok.get("checkpoint"), "kind": tok.get("kind")},
            "decomposition": {"store": dec.get("store"), "method": dec.get("method"), "size": dec.get("size")},
            "bytes": size, "usage_rows": int(len(rows)), "map_usage": [round(float(u), 5) for u in usage]}


def incomplete_token_store_facts(path: Path) -> dict:
    parts = path / "_parts"
    blocks = sorted(parts.glob("block-*.bin")) if parts.is_dir() else []
    return {"complete": False, "blocks_done": len(blocks), "bytes": sum(p.stat().st_size for p in blocks),
            "lock": _lock_holder(path)}


# --------------------------------------------------------------------------- runs and outputs

def log_tail(run: Path, n: int = 200) -> List[dict]:
    """The last records of RUN/log.jsonl (at most n, from its last LOG_TAIL bytes)."""
    path = run / "log.jsonl"
    if not path.is_file():
        return []
    with path.open("rb") as f:           # a file, or an object read by range
        f.seek(max(0, path.stat().st_size - LOG_TAIL))
        lines = f.read().decode(errors="replace").splitlines()
    out = []
    for line in lines[1:] if path.stat().st_size > LOG_TAIL else lines:     # the first may be cut
        try:
            out.append(json.loads(line))
        except ValueError:
            continue        # a line being written
    return out[-n:]


_STEP = re.compile(r"ckpt-(\d+)\.pt$")


def run_facts(path: Path) -> dict:
    recs = log_tail(path)
    ckpts = [{"name": p.name, "step": int(_STEP.search(p.name).group(1)), "bytes": p.stat().st_size}
             for p in sorted(path.glob("ckpt-*.pt")) if _STEP.search(p.name)]
    train = [r for r in recs if r.get("split", "train") == "train"]
    val = [r for r in recs if r.get("split") == "val"]
    keep = ("loss", "l2", "vq", "lpips", "g", "d", "acc", "perplexity", "map_usage")
    last = {k: v for k, v in (train[-1] if train else {}).items() if k in keep}
    facts = {"steps": max([r.get("step", 0) for r in recs] + [c["step"] for c in ckpts] + [0]),
             "last": last, "checkpoints": ckpts, "tensorboard": (path / "tb").is_dir()}
    if val:
        facts["last_val"] = {k: v for k, v in val[-1].items() if k in ("step", "loss", "acc")}
    return facts


def model_facts(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    weights = path / "model.safetensors"
    inner = config.get("config") or {}
    quant = inner.get("quant") if isinstance(inner.get("quant"), dict) else {}
    return {"model_kind": config.get("kind"), "source": config.get("source"), "metrics": config.get("metrics"),
            "data": config.get("data"), "image_size": inner.get("image_size"), "quantizer": quant.get("kind"),
            "vocab": quant.get("vocab") or inner.get("vocab"), "bytes": weights.stat().st_size,
            "tokenizer_folder": (path / "tokenizer").is_dir(), "nextdetail_version": config.get("nextdetail_version")}


def npz_facts(path: Path, kind: str) -> dict:
    from .npz import image_count, npz_keys

    facts = {"keys": npz_keys(path), "bytes": path.stat().st_size}
    if kind == "npz_batch":
        n, h, w = image_count(path)
        facts.update(images=int(n), height=int(h), width=int(w), labels="arr_1" in facts["keys"])
    return facts


def output_facts(path: Path, kind: str) -> dict:
    """A samples, upscale, edit or eval-tokenizer folder: its record and its pictures."""
    pngs = sorted(p.name for p in path.glob("*.png"))
    facts: dict = {"pictures": len(pngs)}
    record = {"samples": "samples.json", "upscale": "upscale.json", "edit": "edit.json"}.get(kind)
    if record:
        try:
            facts["record"] = json.loads((path / record).read_text())
        except (OSError, ValueError):
            facts["record"] = None
        if kind == "samples" and (path / "images").is_dir():
            facts["images"] = sum(1 for _ in (path / "images").glob("*.png"))
    if kind == "eval_tokenizer":
        for name in ("eval.csv", "final.csv"):
            if (path / name).is_file():
                facts[name.split(".")[0]] = list(csv.DictReader((path / name).open()))
    return facts


def facts_of(key: str, path: Path) -> dict:
    """The facts of a path of kind `key` (nextdetail.info.KINDS)."""
    if key == "decomposition_store":
        return store_facts(path)
    if key == "decomposition_store_incomplete":
        return incomplete_store_facts(path)
    if key == "token_store":
        return token_store_facts(path)
    if key == "token_store_incomplete":
        return incomplete_token_store_facts(path)
    if key in ("tokenizer_run", "transformer_run", "run"):
        return run_facts(path)
    if key.endswith("_model"):
        return model_facts(path)
    if key.startswith("npz_"):
        return npz_facts(path, key)
    if key.endswith("_checkpoint"):
        return {"bytes": path.stat().st_size, "run": str(path.parent)}
    return output_facts(path, key)


# --------------------------------------------------------------------------- text

def _num(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))


def _size(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def fact_lines(key: str, f: dict) -> List[str]:
    """The facts of `info` as text, a few lines."""
    if key == "decomposition_store":
        at = " ".join(f"{k}={v:g}" for k, v in (f.get("at") or {}).items() if isinstance(v, (int, float)))
        lines = [f"images {_num(f['images'])}: {_num(f['ok'])} ok, {_num(f['error'])} error",
                 f"method {f['method']}, order {f['order']} (layers {', '.join(f.get('layer_order') or [])}), "
                 f"{f['size']} x {f['size']} px, backend {f['backend']}",
                 f"AT {at}",
                 f"mean AT energy per level {' / '.join(_num(e) for e in f['energy_mean']) or '-'}; "
                 f"mean sweeps {' / '.join(_num(e) for e in f['sweeps_mean']) or '-'}",
                 f"{f['shard_files']} shard file{'' if f['shard_files'] == 1 else 's'} of {f['shard_images']} images, "
                 f"{_size(f['bytes'])} "
                 f"({_size(f['bytes_per_image'])} per ok image)"]
        lines += [f"error row {e['index']} ({e['id']}): {e['error']}" for e in f["error_examples"]]
        return lines
    if key == "decomposition_store_incomplete" or key == "token_store_incomplete":
        done = (f"{_num(f.get('listed'))} images listed, {f['shard_files']} shard files written"
                if "listed" in f else f"{f['blocks_done']} blocks exported")
        lock = f["lock"]
        who = (f"being written by pid {lock.get('pid')} on {lock.get('host')} since {lock.get('started')}"
               if lock else "no job holds its lock (its job died: rerun the same command to complete it)")
        return [f"{done}, {_size(f['bytes'])}; no meta.json yet", who]
    if key == "token_store":
        shapes = " ".join(f"{h}x{w}" for h, w in f["map_shapes"])
        usage = " ".join(f"{u:.0%}" for u in f["map_usage"])
        return [f"rows {_num(f['rows'])} x {_num(f['tokens_per_row'])} tokens, vocabulary {f['vocab']}, "
                f"{len(f['map_shapes'])} maps ({shapes}), {_size(f['bytes'])}",
                f"tokenizer sha256 {f['tokenizer']['sha256']} ({f['tokenizer']['kind']}; "
                f"{f['tokenizer']['checkpoint']})",
                f"from store {f['decomposition']['store']} ({f['decomposition']['method']}, "
                f"{f['decomposition']['size']} px)",
                f"codebook usage per map over {f['usage_rows']} rows: {usage}"]
    if key in ("tokenizer_run", "transformer_run", "run"):
        last = ", ".join(f"{k} {_num(v)}" for k, v in f["last"].items() if not isinstance(v, list))
        lines = [f"steps done {f['steps']}; last: {last or '-'}"]
        if "last_val" in f:
            lines.append(f"last validation (step {f['last_val'].get('step')}): loss {_num(f['last_val'].get('loss'))}")
        if "map_usage" in f["last"]:
            lines.append("codebook usage per map: " + " ".join(f"{u:.0%}" for u in f["last"]["map_usage"]))
        lines.append("checkpoints: " + (", ".join(f"{c['name']} ({_size(c['bytes'])})" for c in f["checkpoints"])
                                        or "none"))
        return lines
    if key.endswith("_model"):
        src = f.get("source") or {}
        return [f"{f['model_kind']}: image size {_num(f['image_size'])}, quantizer {_num(f['quantizer'])}, "
                f"vocabulary {_num(f['vocab'])}, weights {_size(f['bytes'])}",
                f"from {src.get('checkpoint')} (step {src.get('step')}, sha256 {src.get('sha256')})",
                "metrics: " + (", ".join(f"{k} {_num(v)}" for k, v in (f.get("metrics") or {}).items()) or "none")]
    if key == "npz_batch":
        return [f"{f['images']:,} images of {f['height']} x {f['width']}" + (", labelled" if f["labels"] else ""),
                f"{_size(f['bytes'])}"]
    if key == "npz_stats":
        return [f"keys {', '.join(f['keys'])}, {_size(f['bytes'])}"]
    if key.endswith("_checkpoint"):
        return [f"{_size(f['bytes'])}, of the run {f['run']}"]
    lines = [f"{f['pictures']} pictures"]
    if f.get("record"):
        lines.append(", ".join(f"{k} {v}" for k, v in f["record"].items() if not isinstance(v, (list, dict)))[:300])
    for row in f.get("final") or []:
        lines.append(", ".join(f"{k} {v}" for k, v in row.items()))
    return lines
