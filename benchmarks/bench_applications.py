"""The paper's applications on small runs trained on the shared photos: super-resolution by token
prefix measured on held-out photos (against the originals and against bicubic), and the recolour
and relight strips of docs/applications.md.

For each decomposition a small chain, each step a `nextdetail` command (kept under
WORK/<method>/ and reused when present), trained on BSD100 + Set14 + Set5 (119 photos):

    decompose-dataset TRAIN.txt --out store --size 96 [--method M --order n]
    train-tokenizer --data store --image-size 64 --downsample 8 --ch 16 --num-res-blocks 1 \\
        --vocab 512 --steps S --lr 1e-3 --lpips-weight 0 --disc-start 10**9   (L2 + VQ: no weights here)
    export-tokens --data store --tokenizer tokenizer --out tokens
    train --tokens tokens --tokenizer tokenizer --depth 2 --width 192 --heads 4 --steps T

then
    upscale KODAK/*.png --run base_detail/transformer --scale 4 --downscale-first   (16 -> 64 px)
    upscale KODAK/*.png --run base_detail/transformer --scale 2 --downscale-first   (32 -> 64 px)
    upscale ... --scale 4 --prefix K                for K in --prefixes (more maps from the input)
    edit intrinsic/transformer --edit recolor --n 4          (with --edits)
    edit specular/transformer --edit relight --n 4

The Kodak photos are never trained on; PSNR and SSIM are of their 64 px centre crops, as
`upscale` reports them (upscale.json per scale). Prints a table at the end.

    python benchmarks/bench_applications.py [--work out/bench-applications] [--tokenizer-steps 4000]
        [--steps 800] [--depth 2] [--width 192] [--prefixes 11,13] [--edits]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
ORDERS = {"base_detail": 3, "intrinsic": 3, "specular": 4}


def run(argv) -> None:
    from nextdetail import cli

    print("$ nextdetail " + " ".join(map(str, argv)), flush=True)
    t0 = time.time()
    status = cli.main([str(a) for a in argv])
    print(f"  ({time.time() - t0:.0f} s)", flush=True)
    if status not in (0, 1):
        sys.exit(f"bench_applications: `nextdetail {argv[0]}` failed (exit status {status})")


def chain(work: Path, method: str, listing: Path, tokenizer_steps: int, steps: int, depth: int, width: int) -> Path:
    """The method's store, tokenizer, tokens and transformer under work/method; returns the run."""
    w = work / method
    w.mkdir(parents=True, exist_ok=True)
    if not (w / "store" / "meta.json").is_file():
        run(["decompose-dataset", listing, "--out", w / "store", "--size", 96, "--method", method,
             "--order", ORDERS[method]])
    tok, tr = w / "tokenizer", w / "transformer"
    if not list(tok.glob("ckpt-*.pt")):
        run(["train-tokenizer", "--data", w / "store", "--out", tok, "--image-size", 64, "--downsample", 8,
             "--ch", 16, "--num-res-blocks", 1, "--vocab", 512, "--steps", tokenizer_steps, "--batch-size", 8,
             "--lr", "1e-3", "--lpips-weight", 0, "--disc-start", 10 ** 9, "--ckpt-every", tokenizer_steps])
    if not (w / "tokens" / "meta.json").is_file():
        run(["export-tokens", "--data", w / "store", "--tokenizer", tok, "--out", w / "tokens"])
    if not list(tr.glob("ckpt-*.pt")):
        run(["train", "--tokens", w / "tokens", "--tokenizer", tok, "--out", tr, "--depth", depth, "--width", width,
             "--heads", 4, "--steps", steps, "--batch-size", 16, "--lr", "1e-3", "--warmup", 50,
             "--val-fraction", 0, "--val-every", steps, "--ckpt-every", steps])
    return tr


def tokenizer_ceiling(run_path: Path, images, side: int = 64) -> tuple:
    """Mean PSNR/SSIM of the run's tokenizer alone on the images' side px centre crops (encoded
    with their own bases and decoded): the best the upscaled results could reach with it."""
    import numpy as np
    import torch

    from nextdetail.imageio import load_image
    from nextdetail.evaluation.metrics import psnr, ssim
    from nextdetail.generate.images import decode
    from nextdetail.generate.run import load_run
    from nextdetail.generate.upscale import decomposition_params, store_inputs

    run = load_run(run_path)
    order, at = decomposition_params(run)
    ps, ss = [], []
    for path in images:
        ref = load_image(path, side)
        image, bases = store_inputs(torch.from_numpy(ref).permute(2, 0, 1)[None], order, at)
        rec = decode(run.tokenizer, run.tokenizer.quantizer.lookup(run.tokenizer.encode(image, bases)))[0]
        rec = rec.astype(np.float32) / 255
        ps.append(psnr(rec, ref))
        ss.append(ssim(rec, ref))
    return float(np.mean(ps)), float(np.mean(ss))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-applications")
    p.add_argument("--tokenizer-steps", type=int, default=4000)
    p.add_argument("--steps", type=int, default=800, help="transformer steps")
    p.add_argument("--depth", type=int, default=2, help="transformer depth")
    p.add_argument("--width", type=int, default=192, help="transformer width")
    p.add_argument("--prefixes", type=lambda t: [int(v) for v in t.split(",")], default=[11, 13],
                   help="longer prefixes measured at 4x (the base-detail model has 8 base + 6 detail maps)")
    p.add_argument("--edits", action="store_true", help="also the intrinsic and specular runs and their edits")
    args = p.parse_args()
    if not SHARED.is_dir():
        print(f"bench_applications: needs the shared photos at {SHARED}", file=sys.stderr)
        return 2
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    train = sorted(p for d in ("bsd100", "set14", "set5") for p in (SHARED / d).glob("*.png"))
    kodak = sorted((SHARED / "kodak24").glob("*.png"))
    listing = w / "train.txt"
    listing.write_text("".join(f"{p}\n" for p in train))
    base = chain(w, "base_detail", listing, args.tokenizer_steps, args.steps, args.depth, args.width)
    rows = []
    # The default prefix (the base maps) at both scales, then longer prefixes at 4x: the more maps
    # come from the input, the less the model draws (K = M - 1: all but the last map).
    for scale, prefix in [(4, None), (2, None)] + [(4, k) for k in args.prefixes]:
        out = w / (f"upscale-x{scale}" + (f"-prefix{prefix}" if prefix else ""))
        run(["upscale", *kodak, "--run", base, "--scale", scale, "--downscale-first", "--out", out]
            + (["--prefix", prefix] if prefix else []))
        meta = json.loads((out / "upscale.json").read_text())
        mean = lambda k: sum(r[k] for r in meta["images"]) / len(meta["images"])      # noqa: E731
        rows.append((scale, meta["prefix"], meta["input_size"], meta["output_size"], len(meta["images"]),
                     mean("psnr"), mean("ssim"), mean("bicubic_psnr"), mean("bicubic_ssim")))
    ceiling = tokenizer_ceiling(base, kodak)
    if args.edits:
        for method, edit in (("intrinsic", "recolor"), ("specular", "relight")):
            tr = chain(w, method, listing, args.tokenizer_steps, args.steps, args.depth, args.width)
            run(["edit", tr, "--edit", edit, "--n", 4, "--variants", 2, "--out", w / f"edit-{edit}", "--top-k", 50])
    print(f"\n{'scale':>5} {'prefix':>6} {'in':>4} {'out':>4} {'images':>6} {'PSNR dB':>8} {'SSIM':>6} "
          f"{'bicubic PSNR':>12} {'bicubic SSIM':>12}")
    for s, k, n_in, n_out, n, ps, ss, bp, bs in rows:
        print(f"{s:>5} {k:>6} {n_in:>4} {n_out:>4} {n:>6} {ps:>8.2f} {ss:>6.4f} {bp:>12.2f} {bs:>12.4f}")
    print(f"the tokenizer alone on the original 64 px crops (its ceiling): PSNR {ceiling[0]:.2f} dB, "
          f"SSIM {ceiling[1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
