"""How close the memory estimates that refuse what cannot fit (nextdetail.limits, estimated on
torch's meta device) come to what a step really takes: each case runs in a fresh process that
measures its peak resident memory (ru_maxrss) before building the models and after one step.

    python benchmarks/bench_memory.py

Prints, per case, the estimate, the measured growth and their ratio. An estimate below the
measurement lets a run through that may not fit (allocator slack, library workspaces); far above
refuses runs that would fit. Figures in docs/dataset-store.md ("Resume, faults and reruns").
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASE = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
kind, args = sys.argv[1], json.loads(sys.argv[2])
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if kind == "tokenizer":
    from nextdetail.tokenize.config import config_for
    from nextdetail.tokenize.losses import PatchDiscriminator
    from nextdetail.tokenize.memory import training_needs
    from nextdetail.tokenize.tokenizer import Tokenizer
    tcfg = config_for("basedetail", args["size"], 8, ch=args["ch"], num_res_blocks=1, attn=False, vocab=512)
    B, s = args["batch"], args["size"]
    est = sum(n.bytes for n in training_needs(tcfg, B, disc_factory=lambda: PatchDiscriminator(32), ema=False,
                                              buffer_bytes=0))
    x = [torch.rand(B, 3, s, s) for _ in range(1 + tcfg.needs_bases())]
    before = rss()
    tok, disc = Tokenizer(tcfg), PatchDiscriminator(32)
    opt = torch.optim.AdamW(list(tok.parameters()) + list(disc.parameters()))
    out = tok(x[0], x[1:])
    loss = (out.x_hat - x[0]).pow(2).mean() + out.q.vq_loss + disc(out.x_hat).mean()
    loss.backward(); opt.step()
else:
    from nextdetail.train.memory import training_needs
    from nextdetail.train.model import NextDetailTransformer, TransformerConfig
    sides = args["maps"]
    mcfg = TransformerConfig(depth=args["depth"], width=args["width"], heads=args["heads"], vocab=args["vocab"],
                             map_shapes=tuple((p, p) for p in sides), cvae=32)
    B = args["batch"]
    est = sum(n.bytes for n in training_needs(mcfg, B))
    before = rss()
    model = NextDetailTransformer(mcfg)
    opt = torch.optim.AdamW(model.parameters())
    labels = torch.zeros(B, dtype=torch.long)
    f = torch.randn(B, mcfg.seq_len - 1, 32)
    tokens = torch.randint(0, mcfg.vocab, (B, mcfg.seq_len))
    logits = model(labels, f)
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward(); opt.step()
print(json.dumps({"estimate": est, "measured": rss() - before}))
"""

CASES = [
    ("tokenizer", {"size": 64, "ch": 32, "batch": 4}),
    ("tokenizer", {"size": 128, "ch": 32, "batch": 4}),
    ("transformer", {"depth": 4, "width": 256, "heads": 4, "vocab": 1024, "maps": [1, 2, 4, 8, 16], "batch": 16}),
    ("transformer", {"depth": 8, "width": 512, "heads": 8, "vocab": 4096, "maps": [1, 2, 4, 8, 16], "batch": 8}),
]


def main() -> None:
    print(f"{'case':<60} {'estimate MB':>12} {'measured MB':>12} {'ratio':>6}")
    for kind, args in CASES:
        out = subprocess.run([sys.executable, "-c", CASE, kind, json.dumps(args)], cwd=REPO, capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        name = f"{kind} {' '.join(f'{k}={v}' for k, v in args.items())}"
        print(f"{name:<60} {r['estimate'] / 2**20:12.0f} {r['measured'] / 2**20:12.0f} "
              f"{r['estimate'] / r['measured']:6.2f}")


if __name__ == "__main__":
    main()
