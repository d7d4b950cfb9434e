"""Does the tokenizer trainer's loader keep up? Steps/s, images/s and each step split into data
wait and compute, for --loader-workers 0, 1 and 2, side by side in one run.

A format-2 store of the real photos in ../shared/data (kodak24, set14, bsd100: 138 images, 256 px,
order 3; made once with `nextdetail decompose-dataset`, kept under out/bench-tokenizer/) feeds two
configurations:

  demo      the demo's tokenizer (64 px crops, x8, ch 16, V 512, basedetail), batch 8, the
            default --shuffle-buffer 256: 64 timed steps read two blocks
  cart256   CART-256 (256 px, x16, ch 128, V 4096, basedetail M = 14), batch 2 on this CPU,
            --shuffle-buffer 8 so that its 4 timed steps (~25 s each here) read a block too

Each run builds a TokenizerTrainer (the CLI's code path) and times its steps after a warm-up
step: "data" is the time its step waits in the loader's next(), "compute" the rest (forward,
backward, optimizer, codebook). Target: with workers, data under 5% of the step.

    python benchmarks/bench_tokenizer.py [--steps 64] [--cart-steps 4] [--workers 0,1,2]
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "out" / "bench-tokenizer"


def make_store() -> Path:
    store = OUT / "store"
    if (store / "meta.json").exists():
        return store
    listing = OUT / "photos.txt"
    OUT.mkdir(parents=True, exist_ok=True)
    from nextdetail.imageio import list_images
    photos = list_images([SHARED / d for d in ("kodak24", "set14", "bsd100")])
    if not photos:
        sys.exit(f"{SHARED}: no photos (this benchmark needs ../shared/data)")
    listing.write_text("".join(f"{p}\n" for p in photos))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([sys.executable, "-m", "nextdetail.cli", "decompose-dataset", str(listing), "--out", str(store),
                    "--size", "256", "--order", "3", "--overwrite"], check=True, cwd=ROOT, env=env)
    return store


class Timed:
    """The trainer's batch source, with the time each next() waited."""

    def __init__(self, inner):
        self.inner, self.waits = inner, []

    def next(self):
        t0 = time.perf_counter()
        q = self.inner.next()
        self.waits.append(time.perf_counter() - t0)
        return q

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def configs():
    from nextdetail.tokenize import config_for

    return {"demo": (config_for("basedetail", 64, 8, ch=16, num_res_blocks=1, attn=False, vocab=512), 8, 256),
            "cart256": (config_for("basedetail", 256, 16, ch=128, vocab=4096), 2, 8)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=64, help="timed steps of the demo configuration")
    ap.add_argument("--cart-steps", type=int, default=4, help="timed steps of the CART-256 configuration")
    ap.add_argument("--workers", default="0,1,2")
    a = ap.parse_args(argv)
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    store = make_store()
    print(f"store: {store} (256 px, order 3); machine: {os.cpu_count()} CPUs\n")
    head = f"{'config':8s} {'workers':>7s} {'batch':>5s} {'steps/s':>8s} {'img/s':>7s} {'data ms':>8s} " \
           f"{'compute ms':>10s} {'data %':>6s}"
    print(head + "\n" + "-" * len(head))
    for name, steps in (("demo", a.steps), ("cart256", a.cart_steps)):
        for w in (int(x) for x in a.workers.split(",")):
            r = measure(store, name, w, steps)
            step_ms = 1000 * r["seconds"] / r["steps"]
            data_ms = 1000 * r["wait"] / r["steps"]
            print(f"{name:8s} {w:7d} {r['batch']:5d} {r['steps'] / r['seconds']:8.2f} "
                  f"{r['steps'] * r['batch'] / r['seconds']:7.1f} {data_ms:8.1f} {step_ms - data_ms:10.1f} "
                  f"{100 * data_ms / step_ms:5.1f}%", flush=True)


def measure(store: Path, name: str, workers: int, steps: int) -> dict:
    import torch

    from nextdetail.tokenize.train import TokenizerTrainConfig, TokenizerTrainer

    tok, batch, buffer = configs()[name]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TokenizerTrainConfig(data=str(store), out=tmp, tokenizer=tok, batch_size=batch, lpips_weight=0.0,
                                   disc_start=0, loader_workers=workers, shuffle_buffer=buffer)
        tr = TokenizerTrainer(cfg)
        timed = tr.batches = Timed(tr.batches)
        tr.step()                                  # warm-up: workers start, first blocks read
        timed.waits.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.step()
        seconds = time.perf_counter() - t0
    return {"steps": steps, "seconds": seconds, "batch": batch, "wait": sum(timed.waits),
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    main()
