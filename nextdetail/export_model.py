"""`nextdetail export-model RUN --out DIR`: a training run as a model folder anyone can load.

    tokenizer run   -> DIR/model.safetensors (the EMA weights when the run kept them), config.json
                       (TokenizerConfig, map schedule, decomposition and its AT parameters, the
                       training data), README.md (the model card)
    transformer run -> the same for the transformer (TransformerConfig: shape, token maps,
                       vocabulary, classes), and its tokenizer as DIR/tokenizer/, so that
                       `sample DIR` needs nothing else

The folder layout and its checks are nextdetail.pretrained's; this module gathers what the card
states from the run: its data (store or token store path, image count, sha256 of the manifest or
index), steps, and the final metrics it has (eval-tokenizer's final.csv given as --eval; the
transformer's last train and val loss from log.jsonl).
"""
from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .checksum import file_sha256
from .errors import ConfigError
from .options import opt
from .pretrained import CONFIG, MODEL_FOLDER, TOKENIZER, ModelFolderError, is_model_folder, model_source
from .storage import as_path, is_url, tree_sizes

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ExportModelConfig:
    """Settings of `nextdetail export-model`."""

    run: Path = opt(help="a tokenizer or transformer run folder (its latest checkpoint) or a checkpoint file",
                    positional=True, metavar="RUN")
    out: Path = opt(help="the model folder to write (model.safetensors, config.json, README.md)", metavar="DIR")
    eval: Optional[Path] = opt(None, "eval-tokenizer's output folder: the card states its final.csv row of RUN",
                               metavar="EVAL")
    tokenizer: Optional[Path] = opt(None, "a transformer run's tokenizer (run, checkpoint or model folder) when "
                                          "the one it recorded has moved", metavar="RUN")
    overwrite: bool = opt(False, "replace DIR when it is already a model folder")

    def __post_init__(self):
        for name in ("run", "out", "eval", "tokenizer"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, as_path(getattr(self, name)))    # a URL stays one


@dataclass
class ExportModelReport:
    out: Path
    kind: str
    tensors: int
    parameters: int
    bytes: int
    seconds: float

    def summary(self) -> str:
        return (f"exported a {self.kind} ({self.parameters:,} parameters in {self.tensors} tensors, "
                f"{self.bytes / 2**20:.1f} MiB) in {self.seconds:.1f} s; model folder {self.out}")


def export_model(cfg: ExportModelConfig) -> ExportModelReport:
    """Write the model folder of cfg.run (see the module docstring); the kind is the run's."""
    from .runs import RunError, checkpoint_kind, latest_checkpoint, load_checkpoint

    t0 = time.perf_counter()
    try:
        path = latest_checkpoint(cfg.run)
        ckpt = load_checkpoint(path)
    except RunError as e:
        raise ConfigError(f"RUN {e}") from None
    if MODEL_FOLDER.claim(cfg.out, overwrite=cfg.overwrite) == "ours":
        raise ModelFolderError(cfg.out, "is a model folder already; pass --overwrite to replace it")
    kind = checkpoint_kind(ckpt)
    source = {"checkpoint": model_source(path), "sha256": file_sha256(path), "step": int(ckpt.get("step", 0))}
    if kind.startswith("tokenizer"):
        model = _export_tokenizer(cfg, path, ckpt, source)
    elif kind.startswith("transformer"):
        model = _export_transformer(cfg, path, ckpt, source)
    else:
        raise ConfigError(f"RUN {path}: a {kind}, not a tokenizer or transformer run")
    n_bytes = _folder_bytes(cfg.out)
    return ExportModelReport(cfg.out, kind.split(" (")[0], len(model.state_dict()),
                             sum(p.numel() for p in model.parameters()), n_bytes, time.perf_counter() - t0)


def _export_tokenizer(cfg: ExportModelConfig, path: Path, ckpt: dict, source: dict):
    from .tokenize.tokenizer import Tokenizer, checkpoint_weights, read_checkpoint

    _, config = read_checkpoint(path)
    tok = Tokenizer(config)
    tok.load_state_dict(checkpoint_weights(ckpt, ema=True))
    source["weights"] = "ema" if "model_ema" in ckpt else "final"
    data = _store_facts(ckpt["config"].get("data"))
    metrics = _eval_row(cfg.eval, cfg.run, path)
    card = tokenizer_card(config, source, data, metrics)
    tok.save_pretrained(cfg.out, source=source, card=card, data=data, metrics=metrics,
                        decomposition={"method": config.decomposition, "at": data.get("at")})
    return tok


def _export_transformer(cfg: ExportModelConfig, path: Path, ckpt: dict, source: dict):
    import json

    from .generate.run import load_run
    from .runs import load_checkpoint, read_log

    run = load_run(path, tokenizer=cfg.tokenizer)           # checks the tokenizer's sha256
    source["weights"] = "final"
    tok_ckpt = Path(run.meta["tokenizer"])
    tok_source = {"checkpoint": model_source(tok_ckpt), "sha256": ckpt["tokenizer"]["sha256"]}
    if is_model_folder(tok_ckpt):
        tok_source = dict(json.loads((tok_ckpt / CONFIG).read_text())["source"])
    else:
        tok_source["weights"] = "ema" if "model_ema" in load_checkpoint(tok_ckpt) else "final"
    records = read_log(as_path(model_source(path)).parent)    # a URL's run: its log in the bucket
    last = {split: next((r for r in reversed(records) if r.get("split", "train") == split), None)
            for split in ("train", "val")}
    metrics = {f"{split}_loss": rec["loss"] for split, rec in last.items() if rec is not None}
    data = {"tokens": ckpt["data"].get("tokens"), "samples": ckpt["data"].get("num_samples")}
    tokens = as_path(data["tokens"] or "")
    if (tokens / "index.parquet").is_file():
        data["index_sha256"] = _sha256(tokens / "index.parquet")
    run.tokenizer.save_pretrained(cfg.out / TOKENIZER, source=tok_source)
    card = transformer_card(run, source, tok_source, data, metrics)
    run.model.save_pretrained(cfg.out, source=source, card=card, data=data, metrics=metrics,
                              tokenizer={"sha256": ckpt["tokenizer"]["sha256"], "folder": TOKENIZER},
                              class_names=run.meta["class_names"])
    return run.model


def _folder_bytes(folder) -> int:
    """The bytes of every file under a folder (a local one, or a prefix of a bucket)."""
    return sum(tree_sizes(folder).values())


def _sha256(path) -> str:
    """sha256 of a local file, or of an object (streamed)."""
    if not is_url(path):
        return file_sha256(path)
    import hashlib
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _store_facts(store_path) -> dict:
    """What the card says of a tokenizer's training store: path, ok images, AT parameters and
    the manifest's sha256 (only the path when the store is not here any more)."""
    from .stores.decomposition import DecompositionStore, StoreError

    facts = {"store": store_path}
    try:
        store = DecompositionStore(store_path)
    except (StoreError, TypeError, OSError):
        log.warning("%s: the training store is not readable here; the card names its path only", store_path)
        return facts
    facts.update(images=len(store), size=store.size, method=store.method, at=store.meta.get("at"),
                 manifest_sha256=_sha256(as_path(store_path) / "manifest.parquet"))
    return facts


def _eval_row(folder: Optional[Path], run: Path, path: Path) -> dict:
    """RUN's row of eval-tokenizer's final.csv in `folder` (named as eval-tokenizer names runs)."""
    if folder is None:
        return {}
    file = as_path(folder) / "final.csv"
    if not file.is_file():
        raise ConfigError(f"--eval {folder}: no final.csv (the output folder of nextdetail eval-tokenizer)")
    rows = list(csv.DictReader(file.open()))
    names = {Path(run).name, f"{path.parent.name}/{path.stem}"}
    row = next((r for r in rows if r["run"] in names), rows[0] if len(rows) == 1 else None)
    if row is None:
        raise ConfigError(f"--eval {file}: no row for {Path(run).name} (rows: {', '.join(r['run'] for r in rows)})")
    return {k: float(row[k]) for k in ("psnr", "ssim", "lpips", "rfid") if row.get(k)} | {"images": int(row["images"])}


def tokenizer_card(config, source: dict, data: dict, metrics: dict) -> str:
    q = config.quant
    lines = ["---", "library_name: nextdetail", "tags: [image-tokenizer, vq-vae, next-detail, cart]", "---", "",
             f"# nextdetail tokenizer ({q.kind}, {config.image_size} px)", "",
             f"A VQ-VAE tokenizer for next-detail (CART) generation, trained with `nextdetail train-tokenizer` "
             f"for {source['step']} steps ({source['weights']} weights).", "",
             "## Model", "",
             f"- quantizer: {q.kind}, vocabulary {q.vocab}, image size {config.image_size}, "
             f"decomposition {config.decomposition}",
             f"- from checkpoint `{source['checkpoint']}` (sha256 `{source['sha256']}`)", "",
             "## Training data", ""]
    lines += [f"- store: `{data.get('store')}`"]
    if "images" in data:
        lines += [f"- {data['images']} images at {data['size']} px, method {data['method']}, AT parameters "
                  f"{data['at']}", f"- manifest sha256 `{data['manifest_sha256']}`"]
    lines += ["", "## Metrics", ""]
    lines += ([f"- {k}: {v:.4g}" for k, v in metrics.items()] if metrics else
              ["- none recorded (pass `--eval` the output of `nextdetail eval-tokenizer`)"])
    lines += ["", "## Use", "", "```python", "from nextdetail.tokenize import Tokenizer",
              "tok = Tokenizer.from_pretrained(\"DIR\")   # or a Hugging Face repo id", "```", ""]
    return "\n".join(lines)


def transformer_card(run, source: dict, tok_source: dict, data: dict, metrics: dict) -> str:
    c = run.model.cfg
    lines = ["---", "library_name: nextdetail", "tags: [image-generation, autoregressive, next-detail, cart]",
             "---", "", f"# nextdetail next-detail transformer (depth {c.depth}, width {c.width})", "",
             f"Trained with `nextdetail train` for {source['step']} steps on `{data['tokens']}` "
             f"({data.get('samples')} samples).", "",
             "## Model", "",
             f"- {c.depth} blocks x width {c.width}, {c.heads} heads, {len(c.map_shapes)} token maps "
             f"({c.seq_len} tokens), vocabulary {c.vocab}, {c.num_classes} classes",
             f"- from checkpoint `{source['checkpoint']}` (sha256 `{source['sha256']}`)",
             f"- its tokenizer: `tokenizer/`, from checkpoint sha256 `{tok_source['sha256']}`",
             "", "## Metrics", ""]
    lines += [f"- {k}: {v:.4g}" for k, v in metrics.items()] or ["- none recorded"]
    lines += ["", "## Use", "", "```bash", "nextdetail sample DIR --out samples --n 16", "```", ""]
    return "\n".join(lines)
