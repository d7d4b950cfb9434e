"""Object storage against the local disk, side by side in one run: the same work on a real
S3-protocol server on 127.0.0.1 (moto's, tests/s3_server.py) and on this machine's disk.

  decompose-dataset img/s   SRC and STORE on the bucket vs both on disk: processing rate of
                            run_job (first batch start to last batch end), same Ray, workers,
                            images; ratio (target >= 0.8)
  loader img/s              the tokenizer's StoreLoader (whole shards; 0 and W loader workers)
                            reading the store from the bucket vs from disk, 4 epochs after
                            the first batch (workers started); ratio
                            (target >= 0.8)
  bytes per image           uploaded and downloaded during the job, and read by the loader
                            (0 workers: no read-ahead past the end), against the store's own
                            bytes per image (target <= 1.1x: nothing read or written twice)
  requests per image        of listing a folder-of-images SRC of 10k and 100k objects (target:
                            far below 1: one LIST per 1,000 objects, never one per image)

    python benchmarks/bench_object_store.py [--images 256] [--size 256] [--order 3]
        [--workers 2] [--shard-images 16] [--listing 10000,100000]

The bucket's server runs in a process of its own (a real HTTP server on the loopback: requests,
signing, XML and bodies as with S3, no network latency; pure Python, so its throughput is a few
hundred MB/s at best), so the ratios measure what our code adds: extra requests, bytes read
twice, copies through the driver, and what a slow server costs the loader.
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
                                 backend="numba", workers=args.workers, batch_size=8, shard_images=args.shard_images)
    report = run_job(cfg)
    return report.processed / max(report.processing_seconds, 1e-9), report


class Server:
    """tests/s3_server.py in a process of its own (its Python must not share our GIL: a loader
    reading at hundreds of MB/s would measure the server's thread against the trainer's)."""

    def __init__(self):
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "s3_server.py"), str(self.port)],
                                     stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()

    def ask(self, what: str, **query) -> dict:
        import json
        import urllib.parse
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/_nextdetail/{what}?{urllib.parse.urlencode(query)}") as r:
            return json.loads(r.read())

    def counts(self) -> tuple:
        c = self.ask("counts")
        return sum(c["requests"].values()), c["bytes_in"], c["bytes_out"]

    def cpu_seconds(self) -> float:
        """CPU time the server process has used (user + system): on this machine the S3 server
        shares the cores with the job, which a real bucket does not."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.kill()


def loader_rate(path, args, workers: int, epochs: float = 1.0, server=None) -> tuple:
    """(images/s, bytes the server sent) of `epochs` epochs after the first batch (workers
    started and their first blocks read: not counted)."""
    from nextdetail.stores.decomposition import DecompositionStore
    from nextdetail.tokenize.loader import StoreLoader

    store = DecompositionStore(path)
    batch = 8
    loader = StoreLoader(store, crop=min(args.size, 128), batch_size=batch, seed=0, workers=workers)
    loader.next()                         # workers started and their first blocks read: not timed
    before = server.counts()[2] if server else 0
    steps = max(1, int(epochs * len(store)) // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        loader.next()
    rate = steps * batch / (time.perf_counter() - t0)
    return rate, (server.counts()[2] - before if server else 0)


def listing_requests(server, n: int) -> tuple:
    """(requests per image, seconds) of scan_source over a prefix of n image objects, put
    straight into the server's backend (uploading 100k objects over HTTP would take minutes)."""
    from nextdetail.pipelines.sources import scan_source

    name = f"listing-{n}"
    server.ask("fill", bucket=name, prefix="train", n=n)
    before = server.counts()[0]
    t0 = time.perf_counter()
    found = len(list(scan_source(f"s3://{name}/train")))
    seconds = time.perf_counter() - t0
    assert found == n, (found, n)
    return (server.counts()[0] - before - 1) / n, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-images", type=int, default=16)
    ap.add_argument("--listing", default="10000,100000")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from s3_server import make_bucket

    server = Server()
    os.environ.update(AWS_ENDPOINT_URL=server.url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_REGION="us-east-1")
    make_bucket("bench")
    import ray
    import s3fs

    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, logging_level="ERROR")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-object-"))
    src = images(args.images, tmp)
    fs.put(str(src), "bench/src", recursive=True)

    print(f"{args.images} images at {args.size} px, order {args.order}, {args.shard_images} per shard, "
          f"{args.workers} workers; S3 server on 127.0.0.1 in another process ({server.url})")
    # Warm-ups: numba kernels cached, Ray Data started, and the workers of the bucket's jobs
    # (started with the storage variables in their runtime_env) have imported s3fs once.
    job(src, tmp / "warm", args)
    job("s3://bench/src", "s3://bench/warm", args)
    disk_rate, _ = job(src, tmp / "store", args)
    before, cpu0, t0 = server.counts(), server.cpu_seconds(), time.perf_counter()
    s3_rate, _ = job("s3://bench/src", "s3://bench/store", args)
    after, server_cpu, wall = server.counts(), server.cpu_seconds() - cpu0, time.perf_counter() - t0
    requests, up, down = (a - b for a, b in zip(after, before))
    per_store = store_bytes(tmp / "store") / args.images
    src_bytes = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) / args.images
    print(f"decompose-dataset   disk {disk_rate:7.2f} img/s   s3 {s3_rate:7.2f} img/s   ratio {s3_rate / disk_rate:.2f}")
    print(f"  per image: store {per_store / 1e3:.1f} KB; uploaded {up / args.images / 1e3:.1f} KB "
          f"({up / args.images / per_store:.2f}x the store); downloaded {down / args.images / 1e3:.1f} KB "
          f"({down / args.images / src_bytes:.2f}x the source file); {requests / args.images:.2f} requests")
    print(f"  the S3 server process used {server_cpu:.1f} CPU-s during the {wall:.1f} s of the bucket's job "
          f"({server_cpu / wall / (os.cpu_count() or 1):.0%} of this machine's {os.cpu_count()} cores)")

    for workers in (0, args.workers):
        disk_load, _ = loader_rate(tmp / "store", args, workers, epochs=4)
        s3_load, down = loader_rate("s3://bench/store", args, workers, epochs=4, server=server)
        print(f"tokenizer loader, {workers} workers: disk {disk_load:7.1f} img/s   s3 {s3_load:7.1f} img/s   "
              f"ratio {s3_load / disk_load:.2f}" + (
                  f"; read {down / args.images / 1e3:.1f} KB per image in 4 epochs "
                  f"({down / (4 * args.images) / per_store:.2f}x the store per epoch)" if workers == 0 else ""))

    for n in [int(x) for x in args.listing.split(",") if x]:
        per, seconds = listing_requests(server, n)
        print(f"listing {n:>7} images: {per * n:.0f} requests ({per:.4f} per image), {seconds:.1f} s")
    ray.shutdown()
    server.stop()


if __name__ == "__main__":
    main()
