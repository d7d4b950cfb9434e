"""One small chain of every kind of folder `nextdetail info` and `view` know, built once per test
session (memoised here, so tests/test_info.py, test_view.py and test_view_browser.py share it):
a decomposition store with an error row, its tokenizer run, token store and transformer run (the
project's own helpers, no Ray), and small stand-ins for the output folders (samples, upscale,
edit, eval-tokenizer), a model folder and an ADM .npz batch."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

_CHAIN = {}


def store_with_errors(path: Path, n_good: int = 5, size: int = 40, order: int = 3) -> Path:
    """A finished store of n_good photos and one file that is not an image (an error row, last)."""
    from pipeline_data import broken_files, listing, photo_paths, prepare_store, solve_shards

    from nextdetail.decomp import ATParams
    from nextdetail.pipelines import StoreParams, list_sources
    from nextdetail.pipelines.decompose_worker import DecomposeWorker
    from nextdetail.stores.store_plan import finish_store

    params = StoreParams(order=order, size=size, at=ATParams(n_iter=8), backend="numba", shard_images=4)
    good = photo_paths(n_good, path.parent)
    bad = broken_files(path.parent / "broken", good[0])["not_image"]
    src = list_sources(listing([*good, bad], path.parent / f"{path.name}.txt", labels=[0, 1, 0, 1, 0, 1][:n_good + 1]))
    plan = prepare_store(path, params, src, overwrite=False)
    solve_shards(plan, DecomposeWorker(str(path), params.to_dict(), run=plan.run, batch_size=8, read_size=size))
    finish_store(plan, src=f"{path.name}.txt")
    return path


def outputs(root: Path, picture: np.ndarray) -> dict:
    """Stand-ins for the folders sample, upscale, edit and eval-tokenizer write, a model folder and
    an .npz batch: their records as those commands write them, small pictures."""
    from nextdetail.imageio import save_png
    from nextdetail.npz import write_npz

    out = {}
    samples = root / "samples"
    save_png(picture, samples / "grid.png")
    save_png(np.concatenate([picture] * 4, 1), samples / "sample_000.png")
    (samples / "samples.json").write_text(json.dumps({"step": 2, "n": 1, "strip": "B_3, +D_3, +D_2, +D_1"}))
    out["samples"] = samples
    edit = root / "edit"
    save_png(np.concatenate([picture] * 3, 1), edit / "edit_000.png")
    (edit / "edit.json").write_text(json.dumps({"edit": "recolor", "n": 1, "strip": ["original", "new albedo 1",
                                                                                   "new albedo 2"]}))
    out["edit"] = edit
    evals = root / "eval"
    evals.mkdir()
    with open(evals / "eval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "quantizer", "depth", "map_side", "mse", "psnr", "lpips", "images"])
        for d in range(1, 5):
            w.writerow(["tokenizer", "basedetail", d, d, 0.1 / d, 10 + d, "nan", 4])
    (evals / "final.csv").write_text("run,quantizer,images,psnr,ssim,lpips,rfid\ntokenizer,basedetail,4,14,0.5,nan,\n")
    out["eval"] = evals
    model = root / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    (model / "config.json").write_text(json.dumps({
        "format": "nextdetail-model", "format_version": 1, "kind": "tokenizer",
        "config": {"image_size": 32, "quant": {"kind": "basedetail", "vocab": 64}},
        "source": {"checkpoint": "RUN/ckpt-0000002.pt", "sha256": "ab" * 32, "step": 2, "weights": "ema"},
        "metrics": {"psnr": 14.0}}))
    (model / "README.md").write_text("# a tokenizer\n\nThe model card.\n")
    out["model"] = model
    out["npz"] = write_npz(root / "batch.npz", np.stack([picture] * 5), np.arange(5))
    return out


def chain(tmp_path_factory) -> SimpleNamespace:
    """The session's chain (built on first use): store, tokenizer, tokens, transformer and outputs."""
    if "chain" not in _CHAIN:
        from token_data import tiny_tokenizer, tiny_transformer

        from nextdetail.pipelines.export import ExportConfig, export_in_process

        root = tmp_path_factory.mktemp("view-chain")
        store = store_with_errors(root / "store")
        ckpt = tiny_tokenizer(store, root / "tokenizer")
        tokens = root / "tokens"
        export_in_process(ExportConfig(data=store, tokenizer=ckpt, out=tokens))
        transformer = tiny_transformer(tokens, ckpt, root / "transformer", steps=2)
        picture = (np.arange(32 * 32 * 3).reshape(32, 32, 3) % 251).astype(np.uint8)
        _CHAIN["chain"] = SimpleNamespace(root=root, store=store, tokenizer=ckpt.parent, checkpoint=ckpt,
                                          tokens=tokens, transformer=transformer, **outputs(root / "outputs", picture))
    return _CHAIN["chain"]
