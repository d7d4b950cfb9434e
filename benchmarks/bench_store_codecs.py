"""Which lossless codec a format-2 decomposition store should use: bytes and read rate per codec.

For real photos at 256 px, order 3, decomposed once (cached under out/bench-store/), the 8-bit
bases [B_0 = I, B_1, ..., B_n] (n+1, 3, H, W) of each image are written as the store writes them
(Zarr 3, one inner chunk per image inside one shard) with each candidate codec, then read back
in random order one image at a time, as a shuffled loader does:

  KB/image        shard file bytes / images
  x float16       the format-1 figure (float16 layers + zstd 3, one chunk per image) / this
  reads/s         images / wall seconds of the random reads
  write ms/image  CPU milliseconds to encode and write one image (the job pays it once)
  reads/s/core    images / CPU seconds of this process (Zarr may decode on threads)

Layouts: "bases" stores B_k as is (the store's contract); "mod-diff" stores B_n and
(B_(k-1) - B_k) mod 256, an invertible alternative measured to see whether details compress
better than bases.

    python benchmarks/bench_store_codecs.py [--images 24] [--size 256] [--order 3] [--reads 400]
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

from nextdetail.decomp import decompose  # noqa: E402
from nextdetail.imageio import list_images, load_image  # noqa: E402
from nextdetail.stores.shards import quantize_bases  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "out" / "bench-store"


def real_bases(n: int, size: int, order: int) -> tuple:
    """(uint8 bases (n, order+1, 3, size, size), float16 layers as format 1 stored them) of n real
    photos, decomposed once and cached."""
    cache = CACHE / f"bases-{n}-{size}-{order}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            return f["bases"], f["layers"]
    paths = []
    for folder in ("kodak24", "bsd100"):
        paths += list_images([SHARED_DATA / folder])
    if len(paths) < n:
        raise SystemExit(f"{SHARED_DATA}: {len(paths)} photos, {n} asked")
    images = np.stack([load_image(p, size) for p in paths[:n]])
    bases, layers = [], []
    for start in range(0, n, 8):
        dec = decompose(images[start:start + 8], order, backend="numba")
        bases.append(quantize_bases(dec.bases))
        layers.append(np.stack(dec.layers, axis=1).transpose(0, 1, 4, 2, 3).astype(np.float16))
    bases, layers = np.concatenate(bases), np.concatenate(layers)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, bases=bases, layers=layers)
    return bases, layers


def float16_bytes(layers: np.ndarray) -> float:
    """Bytes per image of format 1: float16 layers [B_n, D_n, ..., D_1], zstd 3, one chunk each."""
    import zarr
    from zarr.codecs import ZstdCodec
    from zarr.storage import MemoryStore

    chunks: dict = {}
    store = MemoryStore(chunks)
    arr = zarr.create_array(store=store, shape=layers.shape, chunks=(1, *layers.shape[1:]), dtype="float16",
                            compressors=ZstdCodec(level=3), zarr_format=3)
    arr[:] = layers
    return sum(len(v.to_bytes()) for k, v in chunks.items() if k.startswith("c/")) / len(layers)


def mod_diff(bases: np.ndarray) -> np.ndarray:
    """[B_n, (B_(n-1) - B_n) mod 256, ..., (B_0 - B_1) mod 256]: invertible by cumulative sums mod 256."""
    return np.concatenate([bases[:, -1:], bases[:, -2::-1] - bases[:, :0:-1]], axis=1)


def measure(data: np.ndarray, compressors, folder: Path, reads: int) -> tuple:
    import zarr

    n = len(data)
    arr = zarr.create_array(store=str(folder), shape=data.shape, chunks=(1, *data.shape[1:]),
                            shards=data.shape, dtype="uint8", fill_value=0, compressors=compressors,
                            zarr_format=3, overwrite=True)
    t0 = time.process_time()
    arr[:] = data
    write_ms = (time.process_time() - t0) / n * 1000
    files = [p for p in (folder / "c").rglob("*") if p.is_file()]
    kb = sum(p.stat().st_size for p in files) / n / 1024
    arr = zarr.open_array(str(folder), mode="r")
    order = np.random.default_rng(0).integers(0, n, reads)
    assert (np.asarray(arr[int(order[0])]) == data[order[0]]).all()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in order:
        np.asarray(arr[int(i)])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return kb, write_ms, reads / wall, reads / cpu


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--reads", type=int, default=400, help="random single-image reads per codec")
    a = ap.parse_args(argv)
    from zarr.codecs import BloscCodec, ZstdCodec

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    bases, layers = real_bases(a.images, a.size, a.order)
    f16 = float16_bytes(layers)
    print(f"{a.images} photos (kodak24, bsd100) at {a.size} px, order {a.order}; {os.cpu_count()} CPUs; "
          f"format 1 (float16 layers + zstd 3): {f16 / 1024:.0f} KB/image\n")
    codecs = [("zstd 1", ZstdCodec(level=1, checksum=True)), ("zstd 3", ZstdCodec(level=3, checksum=True)),
              ("zstd 9", ZstdCodec(level=9, checksum=True)), ("zstd 19", ZstdCodec(level=19, checksum=True)),
              ("blosc zstd 3 bitshuffle", BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=1)),
              ("blosc lz4 5", BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=1))]
    head = (f"{'layout':9s} {'codec':24s} {'KB/image':>8s} {'x float16':>9s} {'write ms/image':>14s} "
            f"{'reads/s':>8s} {'reads/s/core':>12s}")
    print(head + "\n" + "-" * len(head))
    with tempfile.TemporaryDirectory(prefix="bench_codecs_") as tmp:
        for layout, data in (("bases", bases), ("mod-diff", mod_diff(bases))):
            for name, codec in codecs:
                if layout == "mod-diff" and name not in ("zstd 3", "zstd 9"):
                    continue
                kb, write_ms, rate, core = measure(data, codec, Path(tmp) / f"{layout}-{name}", a.reads)
                print(f"{layout:9s} {name:24s} {kb:8.0f} {f16 / 1024 / kb:9.2f} {write_ms:14.1f} {rate:8.0f} "
                      f"{core:12.0f}", flush=True)


if __name__ == "__main__":
    main()
