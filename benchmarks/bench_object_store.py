"""Object storage against the local disk, side by side in one run: the same work on a real
S3-protocol server on 127.0.0.1 (moto's, tests/s3_server.py) and on this machine's disk.

  decompose-dataset img/s   SRC and STORE on the bucket vs both on disk: processing rate of
                            run_job (first batch start to last batch end), same Ray, workers,
                            images; ratio (target >= 0.8)
  loader img/s              the tokenizer's StoreLoader (whole shards, loader workers) reading
                            the store from the bucket vs from disk; ratio (target >= 0.8)
  bytes per image           uploaded and downloaded during the job, and read by the loader for
                            one pass, against the store's own bytes per image (target <= 1.1x:
                            nothing read or written twice)
  requests per image        of listing a folder-of-images SRC of 10k and 100k objects (target:
                            far below 1: one LIST per 1,000 objects, never one per image)

    python benchmarks/bench_object_store.py [--images 64] [--size 256] [--order 3]
        [--workers 2] [--listing 10000,100000]

The bucket's server runs in this process (a real HTTP server on the loopback: requests,
signing, XML and bodies as with S3, no network latency), so the ratios measure what our code
adds: extra requests, bytes read twice, copies through the driver.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def images(n: int, folder: Path) -> Path:
    """n photos of ../shared/data (generated ones when absent) as a class-folder SRC."""
    from pipeline_data import photo_paths

    src = folder / "src"
    for i, p in enumerate(photo_paths(n, folder)):
        dst = src / f"c{i % 4}" / f"{i:05d}{p.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(p.read_bytes())
    return src


def store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def job(src, out, args):
    from nextdetail.decomp import ATParams
    from nextdetail.pipelines import DecomposeDatasetConfig, run_job

    cfg = DecomposeDatasetConfig(src=src, out=out, size=args.size, order=args.order, params=ATParams(),
                                 backend="numba", workers=args.workers, batch_size=8)
    report = run_job(cfg)
    return report.processed / max(report.processing_seconds, 1e-9), report


def loader_rate(path, args) -> float:
    from nextdetail.stores.decomposition import DecompositionStore
    from nextdetail.tokenize.loader import StoreLoader

    store = DecompositionStore(path)
    batch = 8
    loader = StoreLoader(store, crop=min(args.size, 128), batch_size=batch, seed=0, workers=args.workers)
    loader.next()                          # workers started, first blocks read
    steps = max(1, len(store) // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        loader.next()
    return steps * batch / (time.perf_counter() - t0)


def listing_requests(server, n: int) -> tuple:
    """(requests per image, seconds) of scan_source over a prefix of n image objects, put
    straight into the server's backend (uploading 100k objects over HTTP would take minutes)."""
    from moto.s3.models import s3_backends

    from nextdetail.pipelines.sources import scan_source

    name = f"listing-{n}"
    backend = s3_backends["123456789012"]["aws"]
    backend.create_bucket(name, "us-east-1")
    for i in range(n):
        backend.put_object(name, f"train/c{i % 10}/{i:07d}.jpg", b"x")
    server.reset_counts()
    t0 = time.perf_counter()
    found = len(list(scan_source(f"s3://{name}/train")))
    seconds = time.perf_counter() - t0
    assert found == n, (found, n)
    return server.total_requests() / n, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--listing", default="10000,100000")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from s3_server import S3Server, make_bucket

    server = S3Server().start()
    os.environ.update(server.env())
    make_bucket("bench")
    import ray
    import s3fs

    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, logging_level="ERROR")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-object-"))
    src = images(args.images, tmp)
    fs.put(str(src), "bench/src", recursive=True)

    print(f"{args.images} images at {args.size} px, order {args.order}, {args.workers} workers; "
          f"S3 server on 127.0.0.1 ({server.url})")
    job(src, tmp / "warm", args)              # numba kernels cached, Ray Data warmed up
    disk_rate, _ = job(src, tmp / "store", args)
    server.reset_counts()
    s3_rate, _ = job("s3://bench/src", "s3://bench/store", args)
    up, down, requests = server.bytes_in, server.bytes_out, server.total_requests()
    per_store = store_bytes(tmp / "store") / args.images
    src_bytes = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) / args.images
    print(f"decompose-dataset   disk {disk_rate:7.2f} img/s   s3 {s3_rate:7.2f} img/s   ratio {s3_rate / disk_rate:.2f}")
    print(f"  per image: store {per_store / 1e3:.1f} KB; uploaded {up / args.images / 1e3:.1f} KB "
          f"({up / args.images / per_store:.2f}x the store); downloaded {down / args.images / 1e3:.1f} KB "
          f"({down / args.images / src_bytes:.2f}x the source file); {requests / args.images:.2f} requests")

    disk_load = loader_rate(tmp / "store", args)
    server.reset_counts()
    s3_load = loader_rate("s3://bench/store", args)
    down = server.bytes_out
    print(f"tokenizer loader    disk {disk_load:7.1f} img/s   s3 {s3_load:7.1f} img/s   ratio {s3_load / disk_load:.2f}")
    print(f"  per image read: {down / args.images / 1e3:.1f} KB ({down / args.images / per_store:.2f}x the store, "
          f"one pass and the loader's start)")

    for n in [int(x) for x in args.listing.split(",") if x]:
        per, seconds = listing_requests(server, n)
        print(f"listing {n:>7} images: {per * n:.0f} requests ({per:.4f} per image), {seconds:.1f} s")
    ray.shutdown()
    server.stop()


if __name__ == "__main__":
    main()
