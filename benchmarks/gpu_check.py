"""The prepared GPU check: everything the toolkit does on a GPU, measured in one short run.

GPU windows are rare and short, so this one command measures every GPU path at once, each part
in a process of its own with a time cap (a part that hangs or runs out of memory costs its cap,
not the run), and writes one JSON and a table:

  cupy_tests        the CuPy tests of the AT solver (pytest -k cupy)
  at_solver         AT, cupy backend, 256x256x3 at the defaults, batches of 64, 256, 1024:
                    solves/s, ms per sweep, the fraction of the memory roofline (the 44 bytes per
                    pixel and sweep the kernel must move, see decomp/backend_cupy.py, against a
                    device-to-device copy timed in the same run), the energy gap to the CPU
                    (numba) result on the same crops, and whether an image's result depends on
                    the batch it came in
  tokenizer_train   CART-256 tokenizer training steps in bf16 (generator + PatchGAN, LPIPS off:
                    the device has no lpips package): images/s, peak memory
  transformer_train VAR-d16-sized transformer (depth 16, width 1024) on the CART-256 token
                    layout in bf16: tokens/s and MFU against a bf16 matmul timed in the same run
  export_encode     CART-256 tokenizer encode rate (images/s), and the same tokens at two batch
                    sizes (the token store's bit-stability on this GPU)

    make gpu-check                                   # python3 benchmarks/gpu_check.py
    python benchmarks/gpu_check.py [--out out/gpu-check.json] [--parts a,b] [--dry-run]

It runs under a GPU machine's stock Python (torch, cupy, numba, numpy, pandas, pyarrow; no ray,
zarr or lpips): the parts read synthetic inputs, and nothing here imports ray or zarr. `--dry-run`
runs every part on the CPU at toy size (tests/test_gpu_check.py), so the plan and the imports
are checked on any machine before a GPU window is spent on them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# name: (seconds allowed on a GPU, seconds allowed in a dry run); the GPU caps sum to < 6 min.
PARTS = {"cupy_tests": (90, 60), "at_solver": (90, 120), "tokenizer_train": (60, 120),
         "transformer_train": (60, 120), "export_encode": (45, 120)}
AT_BYTES_PER_PIXEL_SWEEP = 44       # float32, C = 3: read f, read + write u, read + write s


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    import statistics

    fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def torch_device(dry: bool):
    import torch

    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --dry-run on a machine without one)")
    return torch.device("cuda")


# ----------------------------------------------------------------------------- the parts

def part_cupy_tests(dry: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cupy",
           "tests/test_at.py", "tests/test_at_quality.py", "tests/test_cuda_source.py"]
    if dry:
        cmd.append("--collect-only")           # the plan only: on the CPU they would all skip
    # No third-party pytest plugins: the tests need none, and a GPU machine's may not import.
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    lines = [s for s in r.stdout.strip().splitlines() if s.strip()]
    summary = lines[-1] if lines else r.stderr.strip()[-300:]
    if r.returncode != 0:
        raise RuntimeError(f"pytest exit status {r.returncode}: {summary}\n" + r.stdout[-2000:])
    return {"summary": summary}


def synthetic_images(n: int, size: int, seed: int = 0):
    """n smooth RGB images with sharp-edged discs, float32 (n, size, size, 3) in [0, 1]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        img = np.stack([0.5 + 0.3 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y
                                                        + rng.uniform())) for _ in range(3)], -1)
        for _ in range(4):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
            img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 1, 3)
        out[i] = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    return out


def part_at_solver(dry: bool) -> dict:
    import numpy as np

    from nextdetail.decomp import ATParams, ambrosio_tortorelli

    p = ATParams()
    size, batches, backend = (32, (2, 4), "numba") if dry else (256, (64, 256, 1024), "cupy")
    crops = synthetic_images(8, size)
    if backend == "cupy":
        import cupy as xp

        def sync():
            xp.cuda.Device().synchronize()
        device_name = xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    else:
        xp, sync, device_name = np, (lambda: None), "cpu"
    # The memory roofline of this device: a device-to-device copy (read + write).
    a = xp.zeros(1 << 28 if backend == "cupy" else 1 << 24, xp.uint8)
    b = xp.empty_like(a)
    b[...] = a
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        b[...] = a
    sync()
    copy_bw = 2 * a.nbytes * 10 / (time.perf_counter() - t0)
    rows, first = [], None
    for B in batches:
        f = xp.asarray(np.concatenate([crops] * (B // len(crops) + 1))[:B])
        ambrosio_tortorelli(f[:2], backend=backend, n_iter=1)          # compile / warm up
        sync()
        t0 = time.perf_counter()
        r = ambrosio_tortorelli(f, backend=backend, **p.to_dict())
        sync()
        dt = time.perf_counter() - t0
        sweeps = float(np.mean(r.iterations))       # each image stops when it has converged (p.tol)
        moved = AT_BYTES_PER_PIXEL_SWEEP * size * size * B * sweeps
        u0 = np.asarray(r.u[0].get() if backend == "cupy" else r.u[0])
        first = u0 if first is None else first
        rows.append({"batch": B, "solves_per_s": B / dt, "mean_sweeps": sweeps, "ms_per_sweep": 1e3 * dt / sweeps,
                     "GB_per_s": moved / dt / 1e9, "roofline_fraction": moved / dt / copy_bw,
                     "first_image_max_diff_to_first_batch": float(np.abs(u0 - first).max())})
    cpu = ambrosio_tortorelli(crops[:4], backend="numba", **p.to_dict())
    dev = ambrosio_tortorelli(xp.asarray(crops[:4]), backend=backend, **p.to_dict())
    gap = (np.asarray(dev.energy) - np.asarray(cpu.energy)) / np.asarray(cpu.energy)
    return {"device": device_name, "backend": backend, "size": size, "n_iter": p.n_iter, "tol": p.tol,
            "copy_GB_per_s": copy_bw / 1e9, "batches": rows, "energy_gap_to_cpu_max": float(np.abs(gap).max())}


class SyntheticBatches:
    """Batches with the store's structure, no store behind them: uint8 bases (B, n+1, 3, s, s),
    the image and n successively smoother bases (box blurs), as the store's loader gives them."""

    def __init__(self, size: int, n: int, batch_size: int, seed: int = 0):
        import torch

        self.size, self.n, self.batch_size = size, n, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self):
        import torch
        import torch.nn.functional as F

        x = torch.rand(self.batch_size, 3, self.size // 8, self.size // 8, generator=self.gen)
        image = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        bases, b = [image], image
        for k in range(self.n):
            b = F.avg_pool2d(b, 2 * k + 3, stride=1, padding=k + 1)
            bases.append(b)
        return (torch.stack(bases, 1) * 255).round().clamp(0, 255).to(torch.uint8)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


def tokenizer_config(dry: bool):
    from nextdetail.tokenize import TokenizerConfig, config_for

    return config_for("basedetail", 32, 8, ch=8, num_res_blocks=1, vocab=64) if dry else TokenizerConfig()


def part_tokenizer_train(dry: bool) -> dict:
    import torch

    from nextdetail.tokenize.train import TokenizerTrainConfig, TokenizerTrainer

    device = torch_device(dry)
    tok = tokenizer_config(dry)
    B = 2 if dry else 16
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TokenizerTrainConfig(data="synthetic", out=tmp, tokenizer=tok, batch_size=B, lpips_weight=0.0,
                                   disc_start=0, device=device.type)
        tr = TokenizerTrainer(cfg, batches=SyntheticBatches(tok.image_size, tok.needs_bases(), B))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        dt = timed(tr.step, device, repeats=2 if dry else 5)
    out = {"config": "CART-256 (ch 128, 256 px, x16, basedetail M=14)" if not dry else "toy",
           "batch": B, "bf16": device.type == "cuda", "images_per_s": B / dt, "s_per_step": dt}
    if device.type == "cuda":
        out["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def matmul_tflops(device) -> float:
    """bf16 dense matmul rate of this device (the MFU denominator), float32 on the CPU."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    dt = timed(lambda: a @ b, device, repeats=10)
    return 2 * n ** 3 / dt / 1e12


def part_transformer_train(dry: bool) -> dict:
    from bench_tokens import write_random_store
    from bench_train import model_flops_per_token
    from nextdetail.runs import checkpoint_name, save_checkpoint
    from nextdetail.checksum import file_sha256
    from nextdetail.stores.tokens import META
    from nextdetail.tokenize import Tokenizer
    from nextdetail.train.model import TransformerShape
    from nextdetail.train.trainer import Trainer, TransformerTrainConfig

    device = torch_device(dry)
    tok = tokenizer_config(dry)
    shape = (TransformerShape(depth=1, width=32, heads=2) if dry else
             TransformerShape(depth=16, width=1024, heads=16))
    B = 2 if dry else 16
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "tok").mkdir()
        ckpt = tmp / "tok" / checkpoint_name(0)           # a random tokenizer: only its quantizer is used
        save_checkpoint(ckpt, {"config": {"tokenizer": tok.to_dict()}, "model": Tokenizer(tok).state_dict()})
        sizes = tok.quant.map_sizes(tok.latent())
        (tmp / "tokens").mkdir()
        write_random_store(tmp / "tokens", 4 * B, [(p, p) for p in sizes], tok.quant.vocab)
        meta = json.loads((tmp / "tokens" / META).read_text())
        meta["tokenizer"] = {"checkpoint": str(ckpt), "sha256": file_sha256(ckpt)}
        (tmp / "tokens" / META).write_text(json.dumps(meta))
        cfg = TransformerTrainConfig(tokens=str(tmp / "tokens"), tokenizer=str(ckpt), out=str(tmp / "run"),
                                     model=shape, batch_size=B, val_fraction=0.0, device=device.type)
        tr = Trainer(cfg)
        dt = timed(lambda: tr.step(*tr.next_batch()), device, repeats=2 if dry else 5)
        L = tr.ds.L
        tokens_per_s = B * L / dt
        flops = model_flops_per_token(tr) * tokens_per_s
        peak = matmul_tflops(device)
        params = sum(p.numel() for p in tr.model.parameters())
    return {"model": f"depth {shape.depth}, width {shape.width}, heads {shape.heads}, {params / 1e6:.0f} M params",
            "L": L, "batch": B, "bf16": device.type == "cuda", "tokens_per_s": tokens_per_s,
            "model_TFLOP_per_s": flops / 1e12, "matmul_TFLOP_per_s": peak, "MFU": flops / 1e12 / peak}


def part_export_encode(dry: bool) -> dict:
    import numpy as np
    import torch

    from nextdetail.pipelines.encode_worker import flatten_maps, numerics, pin_numerics
    from nextdetail.tokenize import Tokenizer
    from nextdetail.tokenize.bases import inputs_from_bases

    device = torch_device(dry)
    pin_numerics(device)
    cfg = tokenizer_config(dry)
    torch.manual_seed(0)
    tok = Tokenizer(cfg).to(device).eval()
    n = 8 if dry else 256
    image, bases = inputs_from_bases(SyntheticBatches(cfg.image_size, cfg.needs_bases(), n).next().to(device),
                                     cfg.needs_bases())
    dt = timed(lambda: tok.encode(image, bases), device, repeats=2 if dry else 3)
    whole = flatten_maps(tok.encode(image, bases))
    parts = [flatten_maps(tok.encode(image[a:a + 7], [b[a:a + 7] for b in bases])) for a in range(0, n, 7)]
    same = bool((np.concatenate(parts) == whole).all())
    return {"images_per_s": n / dt, "images": n, "numerics": numerics(device),
            "same_tokens_batch_n_vs_7": same}


# ----------------------------------------------------------------------------- driver

def run_part(name: str, dry: bool, cap: int) -> dict:
    """One part in a process of its own, killed at its cap; its result is the last stdout line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name] + (["--dry-run"] if dry else [])
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cap,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "cap_s": cap, "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    try:
        result = json.loads(last)
    except ValueError:
        return {"status": "failed", "returncode": r.returncode, "seconds": seconds,
                "stderr": r.stderr.strip()[-1500:]}
    return {"status": "ok", "seconds": seconds, **result}


def table(results: dict) -> str:
    lines = []
    for name, r in results.items():
        if r["status"] != "ok":
            lines.append(f"{name:18s} {r['status']}")
        elif name == "cupy_tests":
            lines.append(f"{name:18s} {r['summary']}")
        elif name == "at_solver":
            for b in r["batches"]:
                lines.append(f"{name:18s} batch {b['batch']:5d}: {b['solves_per_s']:9.1f} solves/s, "
                             f"{b['ms_per_sweep']:.3f} ms/sweep, {100 * b['roofline_fraction']:.0f}% of copy bandwidth")
            lines.append(f"{'':18s} energy gap to CPU {r['energy_gap_to_cpu_max']:.2e}")
        elif name == "tokenizer_train":
            lines.append(f"{name:18s} {r['images_per_s']:.1f} images/s" +
                         (f", peak {r['peak_memory_GiB']:.1f} GiB" if "peak_memory_GiB" in r else ""))
        elif name == "transformer_train":
            lines.append(f"{name:18s} {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['MFU']:.0f}% "
                         f"({r['model']})")
        elif name == "export_encode":
            lines.append(f"{name:18s} {r['images_per_s']:.1f} images/s, same tokens at two batch sizes: "
                         f"{r['same_tokens_batch_n_vs_7']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU at toy size")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "gpu-check.json", help="the JSON written")
    ap.add_argument("--part", help=argparse.SUPPRESS)          # internal: run one part, print its JSON
    a = ap.parse_args(argv)
    if a.part:
        print(json.dumps(globals()[f"part_{a.part}"](a.dry_run)))
        return 0
    names = [n.strip() for n in a.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)}; one of {', '.join(PARTS)}")
    results = {}
    for name in names:
        cap = PARTS[name][1 if a.dry_run else 0]
        print(f"{name} (cap {cap} s) ...", flush=True)
        results[name] = run_part(name, a.dry_run, cap)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"dry_run": a.dry_run, "parts": results}, indent=2) + "\n")
    print(table(results))
    print(f"wrote {a.out}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
