"""How the decomposition store's cost grows with N: 1,000, 10,000 and 100,000 images at 64 px.

Synthetic datasets (made once, cached under out/bench-scale/) of random 80x80 crops of the
../shared/data photos as JPEG files in 100 class folders, as ImageNet is laid out (or, with
--source parquet, the same JPEGs in Hugging Face Parquet shards of 1,000 rows). For each N,
`nextdetail decompose-dataset` runs as a user runs it (a subprocess, local Ray, all CPUs):

  img/s          the job's processing rate (its summary line; Ray's start-up excluded)
  vs 1k          that rate over the 1,000-image rate (target at 100k: >= 0.9)
  driver MB      the driver process's peak RSS (VmHWM; target at 100k: <= 1,000)
  entries        files + folders in the finished store (target: <= N/64 + 20)
  KB/img, x src  store bytes per image, and over the source JPEG bytes
  no-op s        wall seconds of the same command on the complete store (target at 100k: <= 30)
  kept, redone   the driver SIGKILLed once half the images are in the journal: images kept by
                 the store, images the rerun did; kept + redone = N means nothing done and kept
                 was done twice, and N/2 - kept is what the kill lost (the shards in flight)
  same bytes     the killed-and-resumed store's bases.zarr equals the uninterrupted one's

At the largest N also `export-tokens` (a tiny tokenizer, 32 px centre crops) images/s and the
token store's meta.json bytes. Not a test: about 15 minutes for the three sizes on 2 cores
once the datasets exist (making them, the first time, a few minutes more).

    python benchmarks/bench_store_scale.py [--sizes 1000,10000,100000] [--image-size 64] [--source parquet]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nextdetail.imageio import list_images  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "out" / "bench-scale"
CLASSES = 100
RATE = re.compile(r"(?:processed|encoded) (\d+) in ([\d.]+) s = ([\d.]+) images/s")


def make_dataset(n: int) -> Path:
    """n JPEG crops (80x80) of the real photos in CLASSES folders, made once."""
    from PIL import Image

    folder = OUT / f"src-{n}"
    done = folder / ".complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    photos = [np.asarray(Image.open(p).convert("RGB")) for d in ("kodak24", "bsd100", "set14")
              for p in list_images([SHARED_DATA / d])]
    if not photos:
        raise SystemExit(f"{SHARED_DATA}: no photos to crop")
    rng = np.random.default_rng(n)
    for c in range(CLASSES):
        (folder / f"class{c:03d}").mkdir(parents=True)
    for i in range(n):
        p = photos[rng.integers(len(photos))]
        y, x = rng.integers(0, p.shape[0] - 80), rng.integers(0, p.shape[1] - 80)
        Image.fromarray(p[y:y + 80, x:x + 80]).save(folder / f"class{i % CLASSES:03d}" / f"{i:07d}.jpg", quality=90)
    done.touch()
    return folder


def make_parquet(n: int) -> Path:
    """The same n JPEGs as Hugging Face Parquet shards of 1,000 rows (image struct, label), made once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = OUT / f"src-{n}-parquet"
    if (folder / ".complete").exists():
        return folder
    files = list_images([make_dataset(n)])
    folder.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())])
    for k, lo in enumerate(range(0, n, 1000)):
        part = files[lo:lo + 1000]
        table = pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in part],
                          "label": [int(p.parent.name[5:]) for p in part]}, schema=schema)
        pq.write_table(table, folder / f"train-{k:05d}.parquet", row_group_size=250)
    (folder / ".complete").touch()
    return folder


def tree_size(folder: Path) -> tuple:
    entries = list(folder.rglob("*"))
    return len(entries), sum(p.stat().st_size for p in entries if p.is_file())


def env() -> dict:
    e = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    e.pop("RAY_ADDRESS", None)
    return e


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cli(argv, kill_when=None) -> tuple:
    """Run `python -m nextdetail.cli ARGV`: (stdout, wall seconds, driver peak RSS MB). kill_when:
    SIGKILL the driver (then its session's Ray helpers) once it returns True."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nextdetail.cli", *map(str, argv)], cwd=ROOT, env=env(),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0.0
    try:
        while proc.poll() is None:
            peak = max(peak, peak_rss_mb(proc.pid))
            if kill_when is not None and kill_when():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
        out = proc.stdout.read()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if kill_when is None and proc.returncode != 0:
        raise SystemExit(f"{shlex.join(map(str, argv))}: exit {proc.returncode}\n{out}")
    return out, time.perf_counter() - t0, peak


def journal_ok(store: Path) -> int:
    import pyarrow.dataset as pads

    parts = store / "_parts"
    if not parts.is_dir():
        return 0
    try:
        files = [str(p) for p in parts.rglob("part-*.parquet")]
        table = pads.dataset(files, format="parquet").to_table(columns=["status"])
    except (OSError, ValueError):          # a part renamed into place while listed
        return 0
    return int(sum(s == "ok" for s in table.column("status").to_pylist()))


def bases_digest(store: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((store / "bases.zarr").iterdir()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def tiny_tokenizer(store: Path, out: Path) -> Path:
    """A run folder with a 4-step tokenizer (what export costs does not depend on its quality)."""
    if not out.exists():
        cli(["train-tokenizer", "--data", store, "--out", out, "--image-size", 32, "--downsample", 8, "--ch", 8,
             "--num-res-blocks", 1, "--vocab", 16, "--steps", 4, "--batch-size", 8, "--lpips-weight", 0])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated N")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--source", choices=["folder", "parquet"], default="folder",
                    help="the same JPEGs as files in class folders, or in Hugging Face Parquet shards")
    a = ap.parse_args(argv)
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    sizes = [int(x) for x in a.sizes.split(",")]
    rows, base_rate = [], None
    for n in sizes:
        src = make_dataset(n) if a.source == "folder" else make_parquet(n)
        _, src_bytes = tree_size(src)
        runs = OUT / f"runs-{n}-{a.source}"
        shutil.rmtree(runs, ignore_errors=True)
        store = runs / "store"
        args = ["decompose-dataset", src, "--out", store, "--size", a.image_size]
        out, _, rss = cli(args)
        rate = float(RATE.search(out).group(3))
        base_rate = base_rate or rate
        entries, store_bytes = tree_size(store)
        out, noop_s, _ = cli(args)
        killed = runs / "killed"
        cli(["decompose-dataset", src, "--out", killed, "--size", a.image_size],
            kill_when=lambda: journal_ok(killed) >= n // 2)
        time.sleep(1)
        kept = journal_ok(killed)
        out, _, _ = cli(["decompose-dataset", src, "--out", killed, "--size", a.image_size])
        redone = int(RATE.search(out).group(1))
        same = bases_digest(killed) == bases_digest(store)
        rows.append((n, rate, rate / base_rate, rss, entries, n / 64 + 20, store_bytes / n / 1024,
                     store_bytes / src_bytes, noop_s, kept, redone, same))
        print(f"N={n}: {rows[-1]}", flush=True)
        shutil.rmtree(killed)
        if n == sizes[-1]:
            ckpt = tiny_tokenizer(store, runs / "tokenizer")
            out, _, _ = cli(["export-tokens", "--data", store, "--tokenizer", ckpt, "--out", runs / "tokens"])
            export_rate = float(RATE.search(out).group(3))
            meta_bytes = (runs / "tokens" / "meta.json").stat().st_size
            rows[-1] += (export_rate, meta_bytes)
    print()
    head = (f"{'N':>7s} {'img/s':>6s} {'vs 1k':>5s} {'driver MB':>9s} {'entries':>7s} {'<= N/64+20':>10s} "
            f"{'KB/img':>6s} {'x src':>5s} {'no-op s':>7s} {'kept':>6s} {'redone':>6s} {'same bytes':>10s}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r[0]:7d} {r[1]:6.1f} {r[2]:5.2f} {r[3]:9.0f} {r[4]:7d} {r[5]:10.0f} {r[6]:6.1f} {r[7]:5.2f} "
              f"{r[8]:7.1f} {r[9]:6d} {r[10]:6d} {str(r[11]):>10s}")
    last = rows[-1]
    if len(last) > 12:
        print(f"\nexport-tokens at N={last[0]}: {last[12]:.1f} images/s; token store meta.json {last[13]:,} bytes")
    print(json.dumps({"machine_cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
