"""Benchmark of the dataset job: Ray Data against a plain in-process loop, same work.

Both do, for the same images with the same backend and batch size: read + resize/crop
(nextdetail.imageio.load_image), decompose (nextdetail.decomp.decompose), convert the
bases to 8 bits and write each shard of 64 images once (same codec, same shard writer).

  loop img/s       images / wall time of the loop, with Numba using W threads; kernels
                   compiled before timing.
  job img/s        images / processing time of `run_job` with W actors (first batch start
                   to last batch end), i.e. Ray's start-up excluded...
  job/loop         ... and their ratio (target >= 0.85).
  Ray init, start-up   ray.init alone, and from ray.init to the first batch starting
                   (actor pool, kernel warm-up), reported separately.
  job total img/s  images / whole run_job wall time, start-up and store finishing included.

Then, at the largest worker count, the job on the same images as a listing of files, as Hugging
Face Parquet shards and as WebDataset tars (100 images per shard): job img/s and the ratio to
the files (shard sources open a few large files instead of one file per image).

    python benchmarks/bench_pipeline.py [--images 300] [--size 256] [--order 3] [--n-iter 100]
        [--batch-size 8] [--workers 1,2] [--backend numba] [--sources folder,parquet,webdataset]

Images: the photos of <repo>/../shared/data (kodak24, bsd100, set14, set5, then
cifar10_subset to fill up), read by path; generated pictures when that folder is absent.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from nextdetail.decomp import ATParams, decompose  # noqa: E402
from nextdetail.imageio import list_images, load_image  # noqa: E402
from nextdetail.pipelines import DecomposeDatasetConfig, StoreParams, run_job  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
FOLDERS = ("kodak24", "bsd100", "set14", "set5", "cifar10_subset")


def pick_images(n: int, tmp: Path) -> tuple[list[Path], str]:
    if SHARED_DATA.is_dir():
        paths = []
        for folder in FOLDERS:
            paths += list_images([SHARED_DATA / folder])
        if paths:
            return paths[:n], f"../shared/data ({', '.join(FOLDERS)}, in that order)"
    from pipeline_data import synthetic_photo   # tests/pipeline_data.py
    return [synthetic_photo(tmp / f"g{i:04d}.png", i, size=320) for i in range(n)], "generated pictures"


def plain_loop(paths, params: StoreParams, batch: int, threads: int, out: Path) -> float:
    """The same work as the job, in this process; returns seconds."""
    import numba

    from nextdetail.stores.shards import create_bases_array, quantize_bases, shard_file, write_shard

    numba.set_num_threads(threads)
    m = params.shard_images
    create_bases_array(out, len(paths), params.levels, params.size, m, {})
    at = params.at.to_dict()
    t0 = time.perf_counter()
    for k in range(params.shards(len(paths))):
        shard = paths[k * m:(k + 1) * m]
        bases = []
        for start in range(0, len(shard), batch):
            images = np.stack([load_image(p, params.size) for p in shard[start:start + batch]])
            bases.append(quantize_bases(decompose(images, params.order, backend=params.backend, **at).bases))
        write_shard(shard_file(out.parent, k), np.concatenate(bases), m)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--images", type=int, default=300, help="number of images")
    ap.add_argument("--size", type=int, default=256, help="stored image side")
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--n-iter", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--backend", default="numba", choices=("numba", "numpy"))
    ap.add_argument("--sources", default="folder,parquet,webdataset",
                    help="source kinds to compare at the largest worker count ('' for none)")
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging
    logging.basicConfig(level=logging.WARNING)

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        tmp = Path(tmp)
        paths, origin = pick_images(a.images, tmp)
        lst = tmp / "list.txt"
        lst.write_text("".join(f"{p}\n" for p in paths))
        at = ATParams(n_iter=a.n_iter)
        params = StoreParams(order=a.order, size=a.size, at=at, backend=a.backend)
        print(f"images: {len(paths)} from {origin}; {a.size}x{a.size}, order {a.order}, n_iter {a.n_iter}, "
              f"backend {a.backend}, batch {a.batch_size}; machine: {os.cpu_count()} CPUs")
        # Neither side may pay for a cold disk cache that the other then finds warm.
        for p in paths:
            Path(p).read_bytes()
        # Compile (or load from Numba's cache) before anything is timed.
        decompose(np.zeros((1, 16, 16, 3), np.float32), a.order, backend=a.backend, n_iter=1)
        head = (f"{'workers':>7s} {'loop img/s':>10s} {'job img/s':>9s} {'job/loop':>8s} {'Ray init s':>10s} "
                f"{'start-up s':>10s} {'job total img/s':>15s}")
        rows = []
        for w in [int(x) for x in a.workers.split(",")]:
            (tmp / f"loop{w}").mkdir()
            loop_s = plain_loop(paths, params, a.batch_size, w, tmp / f"loop{w}" / "bases.zarr")
            cfg = DecomposeDatasetConfig(src=lst, out=tmp / f"store{w}", size=a.size, order=a.order, params=at,
                                         backend=a.backend, workers=w, batch_size=a.batch_size)
            report = run_job(cfg)
            assert report.ok == len(paths), report.summary()
            loop_rate = len(paths) / loop_s
            rows.append(f"{w:7d} {loop_rate:10.1f} {report.rate:9.1f} {report.rate / loop_rate:8.2f} "
                        f"{report.ray_seconds:10.1f} {report.startup_seconds:10.1f} "
                        f"{report.images / report.seconds:15.1f}")
            print(f"  W={w}: loop {loop_s:.1f} s; job: {report.summary()}", flush=True)
        print()
        print(head)
        print("-" * len(head))
        for r in rows:
            print(r)
        if a.sources:
            source_rows(a, paths, at, tmp, max(int(x) for x in a.workers.split(",")))


def source_rows(a, paths, at, tmp: Path, workers: int) -> None:
    """The job on the same images as loose files, Hugging Face Parquet shards and WebDataset tars."""
    from pipeline_data import hf_shard, wds_shard   # tests/pipeline_data.py

    data = [Path(p).read_bytes() for p in paths]
    n_shards = max(1, len(paths) // 100)
    cut = [round(k * len(paths) / n_shards) for k in range(n_shards + 1)]
    (tmp / "hf").mkdir()
    (tmp / "wds").mkdir()
    for k in range(n_shards):
        part = range(cut[k], cut[k + 1])
        hf_shard(tmp / "hf" / f"train-{k:05d}-of-{n_shards:05d}.parquet", [data[i] for i in part], [0] * len(part),
                 names=["x"], row_group_size=100)
        wds_shard(tmp / "wds" / f"shard-{k:06d}.tar",
                  [(f"{i:09d}", {Path(paths[i]).suffix.lstrip(".").lower(): data[i], "cls": b"0"}) for i in part])
    results = []
    for kind, src in (("folder", tmp / "list.txt"), ("parquet", tmp / "hf"), ("webdataset", tmp / "wds")):
        if kind not in a.sources.split(","):
            continue
        cfg = DecomposeDatasetConfig(src=src, out=tmp / f"store-{kind}", size=a.size, order=a.order, params=at,
                                     backend=a.backend, workers=workers, batch_size=a.batch_size)
        report = run_job(cfg)
        assert report.ok == len(paths), report.summary()
        results.append((kind, report.rate))
        print(f"  {kind}: {report.summary()}", flush=True)
    head = f"{'source':>10s} {'shards':>6s} {'job img/s':>9s} {'vs folder':>9s}"
    print(f"\n{head}\n{'-' * len(head)}")
    for kind, rate in results:
        print(f"{kind:>10s} {n_shards if kind != 'folder' else '-':>6} {rate:9.1f} {rate / results[0][1]:9.2f}")


if __name__ == "__main__":
    main()
