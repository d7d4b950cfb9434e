"""Benchmark of the AT solver backends: throughput and distance to the exact energy floor.

For every available backend (numpy, numba, cupy with a GPU) on real 256x256x3 crops
(<repo>/../shared/data, see tests/crops.py; skimage.data pictures when that is absent):

  ms/image, images/s   wall time of one `ambrosio_tortorelli` call on a batch, after a
                       warm-up call (numba JIT / CUDA compile excluded); median of --repeats.
  x numpy              images/s over numpy's images/s at the same n_iter and image size.
  gap median / worst   over the first --floor-crops crops: (E(u, s*(u)) - E_floor) / E_floor,
                       u the backend's output, s*(u) = argmin_s E(u, s) by a direct sparse
                       solve, E_floor the energy of the exact alternating minimization from
                       u = f (tests/exact_at.py); each floor is computed once per run, in
                       parallel processes, before any timing.
  GB/s, % peak (cupy)  bytes moved / time, with 4 (3C + 2) bytes per pixel per sweep (float32:
                       read f, read + write u, read + write s; 44 B for RGB) and
                       --peak-bandwidth (4.3e12 B/s by default) as the peak.

    python benchmarks/bench_decomp.py [--n-iter 100] [--batch 32] [--numpy-batch 4]
        [--gpu-batch 512] [--size 256] [--backends numpy,numba,cupy] [--floor-crops 4]

The exact reference is imported from tests/exact_at.py (one implementation, not a copy).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import exact_at  # noqa: E402  (tests/exact_at.py, via sys.path)
from crops import center_crop, photo_paths  # noqa: E402

from nextdetail.decomp import ATParams, ambrosio_tortorelli, at_energy  # noqa: E402
from nextdetail.decomp.at import cupy_usable  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"


# ----------------------------------------------------------------------------- crops

def _skimage_pictures() -> list[tuple[str, np.ndarray]]:
    """RGB pictures bundled with scikit-image, float32 in [0, 1] (no download needed)."""
    from skimage import data
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "coins", "camera"):
        try:
            im = np.asarray(getattr(data, name)(), dtype=np.float32) / 255
        except Exception:  # a picture that this scikit-image version would have to download
            continue
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=-1)
        out.append((f"skimage.{name}", im[..., :3]))
    return out


def load_crops(n: int, size: int) -> tuple[list[str], np.ndarray]:
    """n crops (size, size, 3), float32: centre crops of the shared photos in the fixed order
    of crops.photo_paths (the test suite's quality crops first); without ../shared/data,
    crops of scikit-image's pictures at several offsets."""
    if SHARED_DATA.is_dir():
        paths = photo_paths(SHARED_DATA, size)
        if len(paths) >= n:
            return ([str(p.relative_to(SHARED_DATA)) for p in paths[:n]],
                    np.stack([center_crop(p, size) for p in paths[:n]]))
    pictures = [(name, im) for name, im in _skimage_pictures() if min(im.shape[:2]) >= size]
    if not pictures:
        raise SystemExit(f"no pictures of at least {size}x{size}: neither {SHARED_DATA} nor scikit-image")
    names, crops = [], []
    offsets = [(0.5, 0.5), (0, 0), (1, 1), (0, 1), (1, 0), (0.5, 0), (0.5, 1), (0, 0.5), (1, 0.5)]
    for k in range(n):      # every picture's centre first, then its corners and edges
        (name, im), (fy, fx) = pictures[k % len(pictures)], offsets[(k // len(pictures)) % len(offsets)]
        y, x = int(fy * (im.shape[0] - size)), int(fx * (im.shape[1] - size))
        names.append(f"{name}@{y},{x}")
        crops.append(np.ascontiguousarray(im[y:y + size, x:x + size]))
    return names, np.stack(crops)


# ----------------------------------------------------------------------------- measurements

def exact_floors(crops: np.ndarray, alpha, lam, eps) -> list[tuple[float, int, float]]:
    """(E_floor, alternations, seconds) per crop, one spawned process per CPU."""
    workers = max(1, min(os.cpu_count() or 1, len(crops)))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        jobs = [pool.submit(_timed_floor, c.astype(np.float64), alpha, lam, eps) for c in crops]
        return [j.result() for j in jobs]


def _timed_floor(f, alpha, lam, eps):
    t = time.perf_counter()
    _, _, E, it = exact_at.exact_alternating(f, alpha, lam, eps)
    return E, it, time.perf_counter() - t


def time_backend(backend: str, batch: np.ndarray, p: dict, repeats: int):
    """Median seconds of one call on `batch` after a warm-up call, and the last result.
    A cupy batch is handed over as a device array, so the timing is the solve, not PCIe."""
    x = batch
    sync = lambda: None  # noqa: E731
    if backend == "cupy":
        import cupy as cp
        x = cp.asarray(batch)
        sync = cp.cuda.get_current_device().synchronize
    ambrosio_tortorelli(x[:2], backend=backend, **{**p, "n_iter": 2})     # JIT / kernel compile
    sync()
    times, r = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        r = ambrosio_tortorelli(x, backend=backend, **p)
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), r


def gaps(r, crops: np.ndarray, floors: list, alpha, lam, eps) -> np.ndarray:
    """(E(u, s*(u)) - E_floor) / E_floor for the first len(floors) images of result r."""
    u_all = r.u if isinstance(r.u, np.ndarray) else r.u.get()
    out = []
    for n, (E_floor, _, _) in enumerate(floors):
        u = np.asarray(u_all[n], np.float64)
        E = at_energy(u, crops[n], exact_at.exact_s(u, alpha, lam, eps), alpha, lam, eps)
        out.append((E - E_floor) / E_floor)
    return np.array(out)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n-iter", default=f"{ATParams.n_iter},100",
                    help="sweeps per solve; a comma-separated list runs each (default first)")
    ap.add_argument("--batch", type=int, default=32, help="images per timed call (numba)")
    ap.add_argument("--numpy-batch", type=int, default=4, help="images per timed call (numpy, ~1-3 s each)")
    ap.add_argument("--gpu-batch", type=int, default=512,
                    help="images per timed call (cupy; the --batch crops repeated)")
    ap.add_argument("--size", type=int, default=256, help="crop side in pixels")
    ap.add_argument("--backends", default="numpy,numba,cupy",
                    help="comma-separated; cupy is skipped when it is not usable")
    ap.add_argument("--floor-crops", type=int, default=4,
                    help="crops with an exact floor (0: no gap columns); ~15-60 s each")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per backend (median)")
    ap.add_argument("--alpha", type=float, default=10.0)
    ap.add_argument("--lam", type=float, default=0.01)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--peak-bandwidth", type=float, default=4.3e12, help="GPU peak memory bandwidth, B/s")
    a = ap.parse_args(argv)

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if "cupy" in backends and not cupy_usable():
        print("cupy: not usable here (not installed, or no CUDA device); skipped")
        backends.remove("cupy")
    n_iters = [int(x) for x in a.n_iter.split(",") if x.strip()]
    sizes = {"numpy": a.numpy_batch, "numba": a.batch, "cupy": a.batch}
    n_load = max([a.floor_crops] + [sizes[b] for b in backends])
    names, crops = load_crops(n_load, a.size)
    import numba
    print(f"crops: {len(crops)} x {a.size}x{a.size}x3 from "
          f"{SHARED_DATA if SHARED_DATA.is_dir() else 'scikit-image'}; "
          f"{os.cpu_count()} CPUs, numba threads {numba.get_num_threads()}")
    print(f"parameters: alpha={a.alpha} lam={a.lam} eps={a.eps} n_iter={n_iters}")

    floors = []
    if a.floor_crops > 0:
        t = time.perf_counter()
        floors = exact_floors(crops[:a.floor_crops], a.alpha, a.lam, a.eps)
        print(f"\nexact floors (alternating sparse solves to a relative change < 1e-8), "
              f"{time.perf_counter() - t:.0f} s:")
        for name, (E, it, sec) in zip(names, floors):
            print(f"  {name:28s} E_floor {E:12.4f}  {it:4d} alternations  {sec:6.1f} s")

    rows = []
    for n_iter in n_iters:
        p = dict(alpha=a.alpha, lam=a.lam, eps=a.eps, n_iter=n_iter)
        for b in backends:
            n = sizes[b]
            batch = crops[:n]
            if b == "cupy":        # fill the GPU: the CPU batch's crops, repeated
                n = a.gpu_batch
                batch = np.concatenate([crops[:a.batch]] * (-(-n // a.batch)))[:n]
            sec, r = time_backend(b, batch, p, a.repeats)
            g = gaps(r, crops, floors[:n], a.alpha, a.lam, a.eps) if floors else np.array([])
            row = dict(backend=b, batch=n, n_iter=n_iter, sec=sec, ips=n / sec, gaps=g)
            if b == "cupy":
                import cupy as cp
                bpp = 4 * (3 * crops.shape[-1] + 2)
                row["bw"] = bpp * n * a.size * a.size * n_iter / sec
                row["bpp"] = bpp
                row["device"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
            rows.append(row)

    numpy_ips = {r["n_iter"]: r["ips"] for r in rows if r["backend"] == "numpy"}
    head = (f"\n{'backend':8s} {'batch':>6s} {'n_iter':>6s} {'ms/image':>10s} {'images/s':>10s} "
            f"{'x numpy':>8s} {'gap med':>9s} {'gap worst':>9s} {'gap n':>5s}")
    print(head)
    print("-" * (len(head) - 1))
    for r in rows:
        g = r["gaps"]
        gm = f"{100 * np.median(g):+8.3f}%" if g.size else f"{'-':>9s}"
        gw = f"{100 * g.max():+8.3f}%" if g.size else f"{'-':>9s}"
        base = numpy_ips.get(r["n_iter"])
        x = f"{r['ips'] / base:8.1f}" if base else f"{'-':>8s}"
        print(f"{r['backend']:8s} {r['batch']:6d} {r['n_iter']:6d} {1e3 * r['sec'] / r['batch']:10.2f} "
              f"{r['ips']:10.1f} {x} {gm} {gw} {g.size:5d}")
    for r in rows:
        if "bw" in r:
            print(f"\ncupy on {r['device']}, n_iter {r['n_iter']}: {r['bw'] / 1e9:.0f} GB/s = {100 * r['bw'] / a.peak_bandwidth:.1f} % "
                  f"of {a.peak_bandwidth / 1e12:.1f} TB/s, assuming {r['bpp']} B per pixel per sweep "
                  f"(float32: read f, read+write u, read+write s)")


if __name__ == "__main__":
    main()
