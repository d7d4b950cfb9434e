"""Page load times and server memory of `nextdetail view` on decomposition stores of 10k, 100k and
1M images.

Each store is synthetic but has the real files: a manifest.parquet of N rows written in row groups
of 4,096 (64 shards of 64, as decompose-dataset writes it; statuses, labels, 1,000 class names,
AT energies, every 97th row an error), meta.json, bases.zarr's zarr.json, and sparse shards: only
the shard files under the measured pages exist (start, middle, end; smooth 256 px images of order
3, written by the store's own shard writer). Kept under out/bench-view/ for reruns.

Per N, a fresh `nextdetail view STORE --port 0` (the real command, in its own process) is asked,
over HTTP from this process:
    grid pages at the start, the middle and the end (HTML; then the page's 60 thumbnails fetched
        6 at a time, as a browser does), filtered by status and by class (first and repeated
        request), sorted by AT energy (first page, middle page);
    one image page and its 7 layer pictures.
Each is the median of --repeats requests (thumbnails: the page with all its pictures, once, cold).
Then the server's RSS (VmRSS) and peak (VmHWM) from /proc. Target: every page < 1 s, memory flat
in N.

    python benchmarks/bench_view.py [--sizes 10000,100000,1000000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "bench-view"
SIZE, ORDER, M, GROUP = 256, 3, 64, 4096
PER_PAGE = 60


def smooth_bases(seed: int, m: int) -> np.ndarray:
    """uint8 (m, order+1, 3, SIZE, SIZE): gradients and a disc, smoother with k (compress like photos)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = np.empty((m, ORDER + 1, 3, SIZE, SIZE), np.uint8)
    for i in range(m):
        a = rng.uniform(0.5, 3, 3)
        img = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (a[c] * x + y)) for c in range(3)])
        img[:, (x - 0.5) ** 2 + (y - 0.5) ** 2 < rng.uniform(0.02, 0.1)] = rng.uniform(0, 1, (3, 1))
        for k in range(ORDER + 1):
            out[i, k] = np.rint(np.clip(img * (1 - 0.1 * k) + 0.05 * k, 0, 1) * 255)
    return out


def shards_to_write(n: int) -> list:
    """The shard files under the measured pages: start, middle, end (each page may span two)."""
    last = (n - 1) // M
    mid_page = (n // 2) // PER_PAGE
    mid = [(mid_page * PER_PAGE) // M, (mid_page * PER_PAGE + PER_PAGE - 1) // M]
    end_page = (n - 1) // PER_PAGE
    return sorted({0, 1, *mid, (end_page * PER_PAGE) // M, last})


def make_store(path: Path, n: int) -> Path:
    """The synthetic store (see the module docstring); reused when it is already there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nextdetail.decomp import ATParams
    from nextdetail.stores.decomposition_format import manifest_schema
    from nextdetail.stores.shards import create_bases_array, shard_key, write_shard

    if (path / "meta.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    at = ATParams().to_dict()
    params = {"method": "base_detail", "order": ORDER, "size": SIZE, "backend": "numba", "dtype": "uint8",
              "shard_images": M, "at": at}
    create_bases_array(path / "bases.zarr", n, ORDER, SIZE, M,
                       {"nextdetail": {"format": "nextdetail.decomposition_store", "format_version": 2,
                                       "params": params, "layer_order": ["B_3", "D_3", "D_2", "D_1"], "images": n}})
    sizes = {}
    for k in shards_to_write(n):
        m = min(M, n - k * M)
        sizes[k] = write_shard(path / "bases.zarr" / shard_key(k), smooth_bases(k, m), M)
    schema = manifest_schema(ORDER)
    rng = np.random.default_rng(0)
    errors = 0
    with pq.ParquetWriter(path / "manifest.parquet", schema) as w:
        for lo in range(0, n, GROUP):
            idx = np.arange(lo, min(n, lo + GROUP))
            bad = idx % 97 == 13
            errors += int(bad.sum())
            label = idx % 1000
            energy = rng.gamma(4.0, 300.0, (ORDER, len(idx)))
            cols = {"index": idx, "id": [f"train/n{l:05d}/img_{i:07d}.JPEG" for i, l in zip(idx, label)],
                    "path": [f"/data/train/n{l:05d}/img_{i:07d}.JPEG" for i, l in zip(idx, label)],
                    "member": [None] * len(idx), "label": label, "class_name": [f"class_{l:03d}" for l in label],
                    "problem": [None] * len(idx), "status": np.where(bad, "error", "ok").tolist(),
                    "error": [f"/data/x_{i}.JPEG: cannot identify image file" if b else None for i, b in zip(idx, bad)],
                    "shard_bytes": [sizes.get(int(i) // M, 12_345_678) for i in idx],
                    "seconds": np.full(len(idx), 0.5), "backend": ["numba"] * len(idx),
                    "worker_host": ["node-1"] * len(idx), "worker_pid": np.full(len(idx), 4242)}
            for k in range(ORDER):
                cols[f"energy_{k + 1}"] = np.where(bad, np.nan, energy[k])
                cols[f"iterations_{k + 1}"] = np.full(len(idx), 25)
            table = pa.table({f.name: pa.array(cols[f.name], type=f.type, from_pandas=True) for f in schema},
                             schema=schema)
            w.write_table(table, row_group_size=GROUP)
    meta = {"format": "nextdetail.decomposition_store", "format_version": 2, "nextdetail_version": "0.3.0",
            **params, "levels": ORDER, "space": "linear", "array": "bases.zarr",
            "layer_order": ["B_3", "D_3", "D_2", "D_1"], "base_order": ["I", "B_1", "B_2", "B_3"],
            "counts": {"images": n, "ok": n - errors, "error": errors}, "src": "synthetic"}
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    return path


def get(url: str) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        r.read()
        assert r.status == 200, (url, r.status)
    return time.perf_counter() - t0


def timed(url: str, repeats: int) -> tuple:
    """(first request's seconds, median of the repeats after it)."""
    first = get(url)
    return first, statistics.median([get(url) for _ in range(repeats)]) if repeats else first


def with_pictures(base: str, page_url: str) -> float:
    """A page and every picture on it (6 at a time), cold: what a browser waits for."""
    import re

    t0 = time.perf_counter()
    with urllib.request.urlopen(page_url, timeout=60) as r:
        html = r.read().decode()
    pics = re.findall(r'<img[^>]+src="([^"]+)"', html)
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda p: get(base + p.replace("&amp;", "&")), pics))
    return time.perf_counter() - t0


def proc_mem(pid: int) -> tuple:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    val = {l.split(":")[0]: int(l.split()[1]) / 1024 for l in status if l.startswith(("VmRSS", "VmHWM"))}
    return val["VmRSS"], val["VmHWM"]


def bench(store: Path, n: int, repeats: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "nextdetail.cli", "view", str(store), "--port", "0"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        base = line.split(" at ")[1].split()[0].rstrip("/")
        rss0 = proc_mem(proc.pid)[0]
        s = f"{base}/s/0"
        mid, end = (n // 2) // PER_PAGE, (n - 1) // PER_PAGE
        rows = {}
        rows["grid start"] = timed(s, repeats)
        rows["grid middle"] = timed(f"{s}?page={mid}", repeats)
        rows["grid end"] = timed(f"{s}?page={end}", repeats)
        rows["status=error, page 0"] = timed(f"{s}?status=error", repeats)
        rows["status=error, middle"] = timed(f"{s}?status=error&page={n // 97 // PER_PAGE // 2}", repeats)
        rows["class=class_500, page 1"] = timed(f"{s}?class=class_500&page=1", repeats)
        rows["sort energy_1, page 0"] = timed(f"{s}?sort=energy_1", repeats)
        rows["sort energy_1, middle"] = timed(f"{s}?sort=energy_1&page={mid}", repeats)
        rows["image page"] = timed(f"{s}/image/{n // 2}", repeats)
        pictures = {"grid start + 60 thumbnails": with_pictures(base, s),
                    "grid middle + 60 thumbnails": with_pictures(base, f"{s}?page={mid}"),
                    "grid end + thumbnails": with_pictures(base, f"{s}?page={end}"),
                    "image page + 7 layers": with_pictures(base, f"{s}/image/{n // 2 + 1}")}
        rss, hwm = proc_mem(proc.pid)
        return {"rows": rows, "pictures": pictures, "rss_start": rss0, "rss": rss, "hwm": hwm}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    results = {}
    for n in (int(v) for v in args.sizes.split(",")):
        t0 = time.perf_counter()
        store = make_store(args.out / f"store-{n}", n)
        made = time.perf_counter() - t0
        results[n] = r = bench(store, n, args.repeats)
        print(f"\nN = {n:,} (store ready in {made:.1f} s; manifest "
              f"{(store / 'manifest.parquet').stat().st_size / 2**20:.1f} MiB)")
        print(f"  {'request':32s} {'first':>8s} {'median':>8s}")
        for name, (first, med) in r["rows"].items():
            print(f"  {name:32s} {first * 1000:7.0f}ms {med * 1000:7.0f}ms")
        for name, sec in r["pictures"].items():
            print(f"  {name:32s} {sec * 1000:7.0f}ms")
        print(f"  server RSS {r['rss_start']:.0f} MB at start, {r['rss']:.0f} MB after, peak {r['hwm']:.0f} MB")
    worst = max(max(v[0] for v in r["rows"].values()) for r in results.values())
    print(f"\nslowest first request {worst * 1000:.0f} ms (target < 1000 ms); RSS after: "
          + ", ".join(f"{n:,}: {r['rss']:.0f} MB" for n, r in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
