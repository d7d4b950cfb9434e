"""A tiny real token store for tests: a small decomposition store (make_store), a tokenizer
trained for a few steps (a real checkpoint), and the export run in-process (no Ray)."""
from __future__ import annotations

from pathlib import Path

from pipeline_data import make_store


def tiny_tokenizer(store: Path, out: Path, kind: str = "basedetail", image_size: int = 32,
                   steps: int = 2, vocab: int = 64, ch: int = 8) -> Path:
    """Train a small tokenizer (~20k parameters at ch=8) for `steps` steps; returns its checkpoint."""
    from nextdetail.tokenize import config_for
    from nextdetail.runs import checkpoints
    from nextdetail.tokenize.train import TokenizerTrainConfig, train

    tok = config_for(kind, image_size, 8, ch=ch, num_res_blocks=1, attn=False, vocab=vocab,
                     **({"depth": 4} if kind == "vanilla" else {}))
    train(TokenizerTrainConfig(data=str(store), out=str(out), tokenizer=tok, steps=steps, batch_size=2, lr=2e-3,
                      lpips_weight=0.0, disc_start=10 ** 9, ckpt_every=steps))
    return checkpoints(out)[-1]


def make_token_store(tmp: Path, n: int = 6, size: int = 40, kind: str = "basedetail", **export):
    """(tokens folder, tokenizer checkpoint, decomposition store) of n images, 32 px crops."""
    from nextdetail.pipelines.export import ExportConfig, export_in_process

    tmp = Path(tmp)
    store = make_store(tmp / "store", n=n, size=size, order=3)
    ckpt = tiny_tokenizer(store, tmp / "tokenizer", kind)
    out = tmp / "tokens"
    export_in_process(ExportConfig(data=store, tokenizer=ckpt, out=out, **export))
    return out, ckpt, store


def near_tie_checkpoint(ckpt: Path, out: Path, spread: float = 1e-5) -> Path:
    """A copy of a tokenizer checkpoint whose codes all lie within `spread` of one code: nearly
    every position's nearest code is then decided in the 6th digit, so any float difference in
    the encoder (batch shape, thread count) flips tokens. The worst case for bit-stable exports."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for key in ("model", "model_ema"):
        if key in state:
            e = state[key]["quantizer.codebook.embed.weight"]
            state[key]["quantizer.codebook.embed.weight"] = e[:1] + spread * torch.randn(e.shape, generator=g)
    torch.save(state, out)
    return out


def tiny_transformer(tokens: Path, tokenizer: Path, out: Path, steps: int) -> Path:
    """A `nextdetail train` run of a 1-block, 32-wide transformer for `steps` steps (batch 2), its
    validation and checkpoint at the last step, through the command; returns the run folder."""
    from nextdetail.cli import main

    assert main(["train", "--tokens", str(tokens), "--tokenizer", str(tokenizer), "--out", str(out), "--depth", "1",
                 "--width", "32", "--heads", "2", "--steps", str(steps), "--batch-size", "2",
                 "--val-every", str(steps), "--ckpt-every", str(steps)]) == 0
    return out
