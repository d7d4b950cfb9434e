"""Benchmark of the token reader: `TokenDataset.get_batch` against a bare np.memmap gather.

One token store of N random rows (uint16, the CART-256 layout by default: 8 base maps
1..16 px plus 3 x 2 detail maps of 16 x 16, L = 2108) is written in a temp folder and read
through the page cache (warmed first). Every method reads the same random batches:

  bare memmap gather   mm[idx] on a uint16 (N, L) np.memmap: the floor, nothing else
  get_batch            TokenDataset.get_batch(idx): gather + uint16 -> int64 + torch tensors
                       (tokens and labels); target >= 0.5x the bare gather
  per-sample loader    a torch Dataset returning one row per __getitem__, batched by a
                       DataLoader (num_workers=0): the usual pattern, what the reader avoids

    python benchmarks/bench_tokens.py [--rows 100000] [--batch 256] [--batches 400] [--L 0]

--L N replaces the CART-256 layout by a single map of N tokens (e.g. --L 1102).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nextdetail.tokenize.config import TokenizerConfig  # noqa: E402
from nextdetail.stores.tokens import (DTYPE, FORMAT, FORMAT_VERSION, INDEX, META, TOKENS,  # noqa: E402
                                     TokenDataset, map_offsets)


def write_random_store(folder: Path, rows: int, shapes, vocab: int, seed: int = 0) -> Path:
    """A token store of random tokens in the documented format (no tokenizer behind it: the
    provenance fields say so)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    L = int(map_offsets(shapes)[-1])
    rng = np.random.default_rng(seed)
    mm = np.memmap(folder / TOKENS, dtype=DTYPE, mode="w+", shape=(rows, L))
    for lo in range(0, rows, 8192):
        hi = min(rows, lo + 8192)
        mm[lo:hi] = rng.integers(0, vocab, (hi - lo, L), dtype=np.uint16)
    mm.flush()
    del mm
    pq.write_table(pa.table({"row": np.arange(rows), "id": [f"random-{i}" for i in range(rows)],
                             "label": rng.integers(0, 1000, rows), "class_name": [None] * rows,
                             "store_index": np.arange(rows)}), folder / INDEX)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "N": rows, "L": L, "dtype": "uint16",
            "vocab": vocab, "map_shapes": [list(s) for s in shapes], "num_base": len(shapes), "order": 0,
            "num_classes": 1000, "tokenizer": {"checkpoint": "none (random tokens)", "sha256": None}}
    (folder / META).write_text(json.dumps(meta))
    return folder


def rate(fn, batches) -> float:
    """Samples per second of fn over the batches (after one untimed call)."""
    fn(batches[0])
    t0 = time.perf_counter()
    for idx in batches:
        fn(idx)
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--L", type=int, default=0, help="one map of L tokens instead of the CART-256 layout")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is printed")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.L:
        shapes = [(1, args.L)]
    else:
        cfg = TokenizerConfig()
        shapes = [(s, s) for s in cfg.quant.map_sizes(cfg.latent())]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_store(Path(tmp), args.rows, shapes, vocab=4096)
        ds = TokenDataset(folder)
        mm = np.memmap(folder / TOKENS, dtype=DTYPE, mode="r", shape=(ds.N, ds.L))
        _ = int(mm.sum(dtype=np.int64))                  # warm the page cache
        rng = np.random.default_rng(1)
        batches = [rng.integers(0, ds.N, args.batch) for _ in range(args.batches)]

        class PerSample(torch.utils.data.Dataset):
            def __len__(self):
                return ds.N

            def __getitem__(self, i):
                return torch.from_numpy(mm[i].astype(np.int64)), int(ds.labels[i])

        per_sample = PerSample()
        loader_batches = batches[: max(1, args.batches // 20)]

        def loader(idx):
            dl = torch.utils.data.DataLoader(per_sample, batch_size=len(idx), sampler=idx.tolist())
            for _ in dl:
                pass

        methods = {"bare memmap gather": lambda idx: mm[idx], "get_batch": ds.get_batch}
        results = {k: [] for k in methods}
        results["per-sample loader"] = []
        for _ in range(args.repeats):                    # interleaved: drift hits every method alike
            for name, fn in methods.items():
                results[name].append(rate(fn, batches))
            results["per-sample loader"].append(rate(loader, loader_batches))
    bare = float(np.median(results["bare memmap gather"]))
    print(f"$ python benchmarks/bench_tokens.py {shlex.join(sys.argv[1:])}")
    print(f"{ds.N} rows x L = {ds.L} uint16 tokens ({ds.N * ds.L * 2 / 2 ** 20:.0f} MiB, page cache), "
          f"batch {args.batch}, random indices, 1 torch thread, median of {args.repeats}")
    print(f"{'method':<20} {'samples/s':>12} {'x bare':>8}")
    for name, r in results.items():
        med = float(np.median(r))
        print(f"{name:<20} {med:>12,.0f} {med / bare:>8.2f}")


if __name__ == "__main__":
    main()
