"""Benchmark of the AT solver backends: throughput, sweeps and distance to the exact energy floor.

For every available backend (numpy, numba, cupy with a GPU) on real 256x256x3 crops
(<repo>/../shared/data, see tests/crops.py; skimage.data pictures when that is absent), and
for every --n-iter (the most sweeps) and --tol (0: always n_iter sweeps; the default:
ATParams.tol), side by side in one run (each repeat times every setting once, in turn):

  ms/solve, solves/s   wall time of one `decompose(batch, order)` call (order AT solves per
                       image, each level smoothing the previous base), after a warm-up call
                       (numba JIT / CUDA compile excluded); median of --repeats.
  x numpy              solves/s over numpy's at the same n_iter and tol.
  x fixed              solves/s over the same backend's at the same n_iter with tol = 0.
  gap median / worst   level 1, over --floor-crops crops: (E(u, s*(u)) - E_floor) / E_floor,
                       u the backend's output, s*(u) = argmin_s E(u, s) by a direct sparse
                       solve, E_floor the energy of the exact alternating minimization from
                       u = f (tests/exact_at.py); the floors are computed in parallel
                       processes before any timing and kept in --floor-cache.
  sweeps per level     mean AT sweeps of each level over the batch.
  energy check         what one convergence check costs, in sweeps: n_iter sweeps with a check
                       every CHECK_EVERY (a tol that never stops) against none.
  GB/s, % peak (cupy)  bytes moved / time, with 4 (3C + 2) bytes per pixel per sweep (float32:
                       read f, read + write u, read + write s; 44 B for RGB) and
                       --peak-bandwidth (4.3e12 B/s by default) as the peak.

    python benchmarks/bench_decomp.py [--n-iter 50] [--tol 0,1e-3] [--order 3] [--batch 32]
        [--numpy-batch 4] [--gpu-batch 512] [--size 256] [--backends numpy,numba,cupy]
        [--floor-crops 4] [--skip 0]

--skip K starts at crop K + 1 of the fixed order (held-out photos: the first crops are the
test suite's quality crops and those the default tol was chosen on). The exact reference is
imported from tests/exact_at.py (one implementation, not a copy).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
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

from nextdetail.decomp import ATParams, ambrosio_tortorelli, at_energy, decompose  # noqa: E402
from nextdetail.decomp.energy import CHECK_EVERY  # noqa: E402
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

def floor_key(crop: np.ndarray, alpha, lam, eps) -> str:
    """What a floor depends on: the crop's bytes, the parameters and the reference's source."""
    h = hashlib.sha256(crop.tobytes())
    h.update(f"{alpha}-{lam}-{eps}".encode())
    h.update(Path(exact_at.__file__).read_bytes())
    h.update(inspect.getsource(at_energy).encode())
    return h.hexdigest()[:24]


def exact_floors(crops: np.ndarray, alpha, lam, eps, cache: Path | None) -> list[tuple[float, int, float]]:
    """(E_floor, alternations, seconds) per crop, one spawned process per CPU; floors found in
    `cache` (a JSON file) are not recomputed."""
    known = json.loads(cache.read_text()) if cache and cache.is_file() else {}
    keys = [floor_key(c, alpha, lam, eps) for c in crops]
    todo = [i for i, k in enumerate(keys) if k not in known]
    if todo:
        workers = max(1, min(os.cpu_count() or 1, len(todo)))
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            jobs = {i: pool.submit(_timed_floor, crops[i].astype(np.float64), alpha, lam, eps) for i in todo}
            for i, j in jobs.items():
                known[keys[i]] = list(j.result())
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, indent=1) + "\n")
    return [tuple(known[k]) for k in keys]


def _timed_floor(f, alpha, lam, eps):
    t = time.perf_counter()
    _, _, E, it = exact_at.exact_alternating(f, alpha, lam, eps)
    return E, it, time.perf_counter() - t


def _device(backend: str, batch: np.ndarray):
    """The batch where the backend takes it (a cupy batch on the GPU, so that the timing is
    the solve, not PCIe) and a function that waits for the device."""
    if backend == "cupy":
        import cupy as cp
        return cp.asarray(batch), cp.cuda.get_current_device().synchronize
    return batch, (lambda: None)


def time_settings(backend: str, batch: np.ndarray, settings: list, order: int, repeats: int):
    """Median seconds of one `decompose(batch, order)` per setting (dicts of ATParams fields),
    the settings timed in turn within each repeat so that they share the machine's load, after
    a warm-up call; and the last decomposition of each."""
    x, sync = _device(backend, batch)
    decompose(x[:2], 1, backend=backend, n_iter=2)          # JIT / kernel compile
    sync()
    times, out = [[] for _ in settings], [None] * len(settings)
    for _ in range(repeats):
        for k, p in enumerate(settings):
            t = time.perf_counter()
            out[k] = decompose(x, order, backend=backend, **p)
            sync()
            times[k].append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times], out


def check_cost(backend: str, batch: np.ndarray, n_iter: int, repeats: int) -> tuple[float, float, float]:
    """(sweeps per energy check, seconds per image for n_iter sweeps without checks, with):
    n_iter sweeps with a check every CHECK_EVERY (tol 1e-300: no image stops) against none,
    timed in turn; the cost of a check in sweeps is the difference over the checks run,
    against the time of a sweep."""
    x, sync = _device(backend, batch)
    ambrosio_tortorelli(x[:2], backend=backend, n_iter=CHECK_EVERY, tol=1e-300)
    sync()
    plain, checked, r = [], [], None
    for _ in range(repeats):
        for tol, times in ((0.0, plain), (1e-300, checked)):
            t = time.perf_counter()
            r = ambrosio_tortorelli(x, backend=backend, n_iter=n_iter, tol=tol)
            sync()
            times.append(time.perf_counter() - t)
    n = len(batch)
    checks = float(np.mean(np.asarray(r.iterations) // CHECK_EVERY)) + 1        # with E_0
    sweeps = float(np.mean(r.iterations))
    t0, t1 = np.median(plain) / n, np.median(checked) / n
    return ((t1 - t0) / checks) / (t0 / n_iter) if sweeps == n_iter else float("nan"), t0, t1


def gaps(u_all, crops: np.ndarray, floors: list, alpha, lam, eps) -> np.ndarray:
    """(E(u, s*(u)) - E_floor) / E_floor for the first len(floors) images of u_all (N, H, W, C)."""
    u_all = u_all if isinstance(u_all, np.ndarray) else u_all.get()
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
    ap.add_argument("--n-iter", default=f"{ATParams.n_iter}",
                    help="the most sweeps per solve; a comma-separated list runs each")
    ap.add_argument("--tol", default=f"0,{ATParams.tol:g}",
                    help="convergence tolerances (0: n_iter sweeps always); a comma-separated list runs each")
    ap.add_argument("--order", type=int, default=3, help="levels per decomposition (AT solves per image)")
    ap.add_argument("--batch", type=int, default=32, help="images per timed call (numba)")
    ap.add_argument("--numpy-batch", type=int, default=4, help="images per timed call (numpy, ~1-3 s per level)")
    ap.add_argument("--gpu-batch", type=int, default=512,
                    help="images per timed call (cupy; the --batch crops repeated)")
    ap.add_argument("--size", type=int, default=256, help="crop side in pixels")
    ap.add_argument("--backends", default="numpy,numba,cupy",
                    help="comma-separated; cupy is skipped when it is not usable")
    ap.add_argument("--floor-crops", type=int, default=4,
                    help="crops with an exact floor (0: no gap columns); ~15-60 s each, once (--floor-cache)")
    ap.add_argument("--skip", type=int, default=0, help="skip the first K crops of the fixed order (held-out runs)")
    ap.add_argument("--floor-cache", type=Path, default=ROOT / "out" / "bench-decomp-floors.json",
                    help="JSON file of the floors computed so far")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per setting (median)")
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
    tols = [float(x) for x in a.tol.split(",") if x.strip()]
    sizes = {"numpy": a.numpy_batch, "numba": a.batch, "cupy": a.batch}
    n_load = max([a.floor_crops] + [sizes[b] for b in backends])
    names, crops = load_crops(a.skip + n_load, a.size)
    names, crops = names[a.skip:], crops[a.skip:]
    import numba
    print(f"crops: {len(crops)} x {a.size}x{a.size}x3 from "
          f"{SHARED_DATA if SHARED_DATA.is_dir() else 'scikit-image'} (crops {a.skip + 1}..{a.skip + len(crops)} "
          f"of the fixed order); {os.cpu_count()} CPUs, numba threads {numba.get_num_threads()}")
    print(f"parameters: alpha={a.alpha} lam={a.lam} eps={a.eps} n_iter={n_iters} tol={tols} order={a.order} "
          f"(a check every {CHECK_EVERY} sweeps)")

    floors = []
    if a.floor_crops > 0:
        t = time.perf_counter()
        floors = exact_floors(crops[:a.floor_crops], a.alpha, a.lam, a.eps, a.floor_cache)
        print(f"\nexact floors (alternating sparse solves to a relative change < 1e-8; computed or "
              f"read from {a.floor_cache}), {time.perf_counter() - t:.0f} s:")
        for name, (E, it, sec) in zip(names, floors):
            print(f"  {name:28s} E_floor {E:12.4f}  {it:4d} alternations  {sec:6.1f} s")

    rows, costs = [], []
    settings = [dict(alpha=a.alpha, lam=a.lam, eps=a.eps, n_iter=n, tol=tol) for n in n_iters for tol in tols]
    for b in backends:
        n = sizes[b]
        batch = crops[:n]
        if b == "cupy":        # fill the GPU: the CPU batch's crops, repeated
            n = a.gpu_batch
            batch = np.concatenate([crops[:a.batch]] * (-(-n // a.batch)))[:n]
        secs, decs = time_settings(b, batch, settings, a.order, a.repeats)
        for p, sec, d in zip(settings, secs, decs):
            g = gaps(d.bases[1], crops, floors[:n], a.alpha, a.lam, a.eps) if floors else np.array([])
            sweeps = [float(np.mean(t)) for t in d.iterations]
            row = dict(backend=b, batch=n, n_iter=p["n_iter"], tol=p["tol"], sec=sec, sps=a.order * n / sec,
                       gaps=g, sweeps=sweeps)
            if b == "cupy":
                import cupy as cp
                bpp = 4 * (3 * crops.shape[-1] + 2)
                row["bw"] = bpp * n * a.size * a.size * sum(sweeps) / sec
                row["bpp"] = bpp
                row["device"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
            rows.append(row)
        if b != "numpy":
            costs.append((b, n, *check_cost(b, batch, n_iters[0], max(a.repeats, 3))))

    key = lambda r: (r["n_iter"], r["tol"])  # noqa: E731
    numpy_sps = {key(r): r["sps"] for r in rows if r["backend"] == "numpy"}
    fixed_sps = {(r["backend"], r["n_iter"]): r["sps"] for r in rows if r["tol"] == 0}
    head = (f"\n{'backend':8s} {'batch':>5s} {'n_iter':>6s} {'tol':>7s} {'ms/solve':>9s} {'solves/s':>9s} "
            f"{'x numpy':>7s} {'x fixed':>7s} {'gap med':>9s} {'gap worst':>9s} {'gap n':>5s}  sweeps per level")
    print(head)
    print("-" * (len(head) - 1))
    for r in rows:
        g = r["gaps"]
        gm = f"{100 * np.median(g):+8.3f}%" if g.size else f"{'-':>9s}"
        gw = f"{100 * g.max():+8.3f}%" if g.size else f"{'-':>9s}"
        base, fixed = numpy_sps.get(key(r)), fixed_sps.get((r["backend"], r["n_iter"]))
        x = f"{r['sps'] / base:7.1f}" if base else f"{'-':>7s}"
        xf = f"{r['sps'] / fixed:7.2f}" if fixed else f"{'-':>7s}"
        print(f"{r['backend']:8s} {r['batch']:5d} {r['n_iter']:6d} {r['tol']:7.2g} "
              f"{1e3 * r['sec'] / (a.order * r['batch']):9.2f} {r['sps']:9.1f} {x} {xf} {gm} {gw} {g.size:5d}  "
              + " / ".join(f"{t:.1f}" for t in r["sweeps"]))
    for b, n, cost, t0, t1 in costs:
        print(f"\nenergy check ({b}, batch {n}, level 1): {cost:.2f} sweep each; {n_iters[0]} sweeps "
              f"{1e3 * t0:.2f} ms/image without checks, {1e3 * t1:.2f} ms/image with one every {CHECK_EVERY}")
    for r in rows:
        if "bw" in r:
            print(f"\ncupy on {r['device']}, n_iter {r['n_iter']} tol {r['tol']:g}: {r['bw'] / 1e9:.0f} GB/s = "
                  f"{100 * r['bw'] / a.peak_bandwidth:.1f} % of {a.peak_bandwidth / 1e12:.1f} TB/s, assuming "
                  f"{r['bpp']} B per pixel per sweep (float32: read f, read+write u, read+write s)")


if __name__ == "__main__":
    main()
