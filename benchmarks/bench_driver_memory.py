"""How the decompose-dataset driver's memory grows with the number of images in shard sources.

Makes Hugging Face Parquet shards and WebDataset tars of N images each (1,000 images per shard;
the image cells are a few bytes: the driver never reads them; kept under out/bench-driver/ for
reruns), then runs everything the job's driver does except solving, in a fresh process per
source and N: list SRC and stage the manifest (check_store), create the store (plan_store),
build the job's rows window by window (shard_items over _windows, as for 2 actors), and the
rerun's check (the listing compared with the manifest shard by shard). Prints each phase's
seconds and the process's peak RSS (VmHWM), and beside it, in another fresh process, the peak of
holding the same listing as one Python list (what the driver held before streaming).

    python benchmarks/bench_driver_memory.py [--sizes 10000,100000,1000000] [--kinds parquet,webdataset]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "bench-driver"
PER_SHARD = 1000

CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
def hwm():
    return next(int(l.split()[1]) / 1024 for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith("VmHWM:"))
from nextdetail.pipelines import DecomposeDatasetConfig, decompose_job
from nextdetail.pipelines.sources import scan_source
from nextdetail.pipelines.decompose_worker import shard_items
from nextdetail.stores.store_check import check_store
from nextdetail.stores.store_plan import plan_store
src, store, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
params = DecomposeDatasetConfig(src=src, out=store, size=64, order=3).store_params("numba")
before, t = hwm(), {}
t0 = time.perf_counter()
if mode == "list":
    n = len(list(scan_source(src)))
    t["list"] = time.perf_counter() - t0
else:
    check = check_store(store, params, scan_source(src), overwrite=True)
    t["list+stage"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = plan_store(store, params, check, overwrite=True)
    t["create"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = sum(len(shard_items(plan, w)) for w in decompose_job._windows(plan, workers=2))
    t["rows"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = check_store(store, params, scan_source(src), overwrite=False).n_images
    t["rerun check"] = time.perf_counter() - t0
    assert rows == plan.params.shards(n) and n == plan.n_images
print(json.dumps({"images": n, "seconds": t, "rss_before_mb": before, "rss_peak_mb": hwm()}))
"""


def make_parquet(folder: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {"image": {"_type": "Image"}, "label": {"names": [f"c{c}" for c in range(1000)],
                                                       "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64())],
                       metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    for k in range(n // PER_SHARD):
        rows = range(k * PER_SHARD, (k + 1) * PER_SHARD)
        table = pa.table({"image": [{"bytes": b"x", "path": f"{i}.jpg"} for i in rows],
                          "label": [i % 1000 for i in rows]}, schema=schema)
        pq.write_table(table, folder / f"train-{k:05d}-of-{n // PER_SHARD:05d}.parquet", row_group_size=PER_SHARD)
    return folder


def make_tars(folder: Path, n: int) -> Path:
    for k in range(n // PER_SHARD):
        with tarfile.open(folder / f"shard-{k:06d}.tar", "w") as tar:
            for i in range(k * PER_SHARD, (k + 1) * PER_SHARD):
                for ext, data in (("jpg", b"x"), ("cls", str(i % 1000).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def source(kind: str, n: int) -> Path:
    folder = OUT / f"{kind}-{n}"
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (make_parquet if kind == "parquet" else make_tars)(folder, n)
        (folder / ".complete").touch()
    return folder


def child(src: Path, mode: str) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(OUT / "store"), mode, str(ROOT)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--kinds", default="parquet,webdataset")
    a = ap.parse_args(argv)
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    for kind in a.kinds.split(","):
        for n in (int(x) for x in a.sizes.split(",")):
            t0 = time.perf_counter()
            src = source(kind, n)
            made = time.perf_counter() - t0
            r, held = child(src, "stream"), child(src, "list")
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items())
            print(f"{kind:10s} N={n:>9,} ({n // PER_SHARD} shards; made in {made:.0f} s): driver peak RSS "
                  f"{r['rss_peak_mb']:.0f} MB ({r['rss_before_mb']:.0f} MB after imports); {phases} | "
                  f"the listing held as a list: peak {held['rss_peak_mb']:.0f} MB, "
                  f"{held['seconds']['list']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
