"""Benchmark of `nextdetail train`: tokens/s and the step time split into data and compute.

  data ms      the rank's next batch: EpochSampler indices, one memmap gather (uint16 -> int64),
               copy to the device (on CUDA synchronised, so the copy is counted here)
  compute ms   the training step: the quantizer inputs (teacher forcing), forward, loss,
               backward, clipping, AdamW, the per-map statistics (CUDA synchronised)
  data %       data / (data + compute): must stay under 1 %
  inputs ms    the teacher-forcing inputs alone (codebook lookups + phi convs), measured apart;
               part of compute
  tokens/s     batch x L / step time
  MFU          on CUDA: model FLOPs (6 x non-embedding parameters + 12 x depth x width x L
               attention, per token) / step time / the device's peak bf16 (--peak-tflops)

    python benchmarks/bench_train.py [--tokens TOKENS --tokenizer RUN] [--images 64]
        [--image-size 256] [--downsample 16] [--depth 2] [--width 128] [--heads 4]
        [--batch-size 8] [--steps 10] [--warmup-steps 2] [--device cpu|cuda] [--compile]

Without --tokens it builds a token store first (not timed): the photos of ../shared/data (or
generated pictures) decomposed at --image-size, a tiny tokenizer (one training step; its
token values do not matter for speed) with CART's schedule for that size (256 px, x16: 8 base
maps 1..16 + 3 x 2 detail maps of 16 x 16, L = 2108, V = 4096), exported in-process.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from nextdetail.train.inputs import teacher_inputs  # noqa: E402
from nextdetail.train.model import TransformerShape  # noqa: E402
from nextdetail.train.trainer import Trainer, TransformerTrainConfig  # noqa: E402


def build_tokens(tmp: Path, images: int, size: int, downsample: int, vocab: int):
    """(token store, tokenizer checkpoint) made with the project's own store, trainer and export."""
    from pipeline_data import make_store          # tests/pipeline_data.py
    from nextdetail.pipelines.export import ExportConfig, export_in_process
    from nextdetail.tokenize import config_for
    from nextdetail.runs import checkpoints
    from nextdetail.tokenize.train import TokenizerTrainConfig as TokConfig, train as train_tok

    store = make_store(tmp / "store", n=images, size=size, order=3)
    tok = config_for("basedetail", size, downsample, ch=16, num_res_blocks=1, attn=False, vocab=vocab)
    train_tok(TokConfig(data=str(store), out=str(tmp / "tokenizer"), tokenizer=tok, steps=1, batch_size=2,
                        lpips_weight=0.0, disc_start=10 ** 9, ckpt_every=1))
    ckpt = checkpoints(tmp / "tokenizer")[-1]
    export_in_process(ExportConfig(data=store, tokenizer=ckpt, out=tmp / "tokens"))
    return tmp / "tokens", ckpt


def model_flops_per_token(tr: Trainer) -> float:
    """Training FLOPs per token: 6 N (N: parameters outside the embedding tables) plus the
    attention scores and values, 12 x depth x width x L (full-sequence attention, an upper bound
    for the block-causal mask)."""
    m = tr.model
    n = sum(p.numel() for name, p in m.named_parameters() if "emb" not in name)
    c = m.cfg
    return 6 * n + 12 * c.depth * c.width * c.seq_len


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=Path)
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--downsample", type=int, default=16)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="device peak dense bf16 TFLOP/s for MFU (default 989: H100/H200 SXM)")
    a = p.parse_args(argv)
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.tokens is None:
            t0 = time.perf_counter()
            a.tokens, a.tokenizer = build_tokens(tmp, a.images, a.image_size, a.downsample, a.vocab)
            print(f"built a token store of {a.images} images in {time.perf_counter() - t0:.1f} s (not timed)")
        cfg = TransformerTrainConfig(tokens=str(a.tokens), tokenizer=str(a.tokenizer), out=str(tmp / "run"),
                                     model=TransformerShape(depth=a.depth, width=a.width, heads=a.heads),
                                     batch_size=a.batch_size, steps=10 ** 9, warmup=10, val_fraction=0.0,
                                     device=a.device, compile=a.compile)
        tr = Trainer(cfg)
        cuda = tr.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        L = tr.ds.L
        n_params = sum(p.numel() for p in tr.model.parameters())
        dev = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        print(f"tokens: N={len(tr.ds)}, L={L}, V={tr.ds.vocab}, {len(tr.ds.map_shapes)} maps "
              f"{[h for h, _ in tr.ds.map_shapes]}; model: depth {a.depth}, width {a.width}, heads {a.heads}, "
              f"{n_params / 1e6:.2f} M parameters; batch {a.batch_size}; device {dev}"
              f"{'; bf16 autocast' if cuda else ''}{'; torch.compile' if a.compile else ''}")
        data_s, comp_s, inp_s = [], [], []
        for i in range(a.warmup_steps + a.steps):
            sync()
            t0 = time.perf_counter()
            batch = tr.next_batch()
            sync()
            t1 = time.perf_counter()
            tr.step(*batch)
            sync()
            t2 = time.perf_counter()
            teacher_inputs(tr.quantizer, tr.ds.split_maps(batch[0]))
            sync()
            t3 = time.perf_counter()
            if i >= a.warmup_steps:
                data_s.append(t1 - t0)
                comp_s.append(t2 - t1)
                inp_s.append(t3 - t2)
        data, comp, inp = (statistics.median(v) for v in (data_s, comp_s, inp_s))
        step = data + comp
        tps = a.batch_size * L / step
        head = (f"{'data ms':>9} {'compute ms':>11} {'step ms':>9} {'data %':>7} {'inputs ms':>10} "
                f"{'tokens/s':>10}" + (f" {'TFLOP/s':>8} {'MFU':>6}" if cuda else ""))
        row = (f"{data * 1e3:9.2f} {comp * 1e3:11.1f} {step * 1e3:9.1f} {100 * data / step:7.3f} {inp * 1e3:10.2f} "
               f"{tps:10,.0f}")
        if cuda:
            tflops = model_flops_per_token(tr) * tps / 1e12
            row += f" {tflops:8.1f} {100 * tflops / a.peak_tflops:5.1f}%"
        print(f"median of {a.steps} steps after {a.warmup_steps} warm-up steps")
        print(head)
        print("-" * len(head))
        print(row)


if __name__ == "__main__":
    main()
