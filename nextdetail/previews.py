"""The images the trainers add to their curves at each checkpoint (nextdetail.tblog): the
tokenizer's reconstructions of the checkpoint step's batch, the transformer's samples.

Both leave training exactly as it was: no gradient, the models put back in the mode they were
in, torch's RNG states forked (whatever a forward draws is thrown away), the quantizer in eval
mode (no codebook usage counted), the transformer's draws from their own seeded generator. So
log.jsonl and the checkpoints are bit-identical with and without them.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict

import numpy as np
import torch

from .tblog import uint8_grid


@contextmanager
def untouched(module: torch.nn.Module, device: torch.device):
    """eval mode and a forked RNG for the duration; the module's mode restored after."""
    was = module.training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        module.eval()
        try:
            yield
        finally:
            module.train(was)


def _uint8(x_B3HW: torch.Tensor) -> np.ndarray:
    return (x_B3HW.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def reconstructions(trainer, n: int) -> Dict[str, np.ndarray]:
    """{"reconstructions": grid}: the first n images of the last training batch (top row) and the
    tokenizer's reconstructions of them (bottom row), in pixels (a log-space tokenizer's
    converted). {} before the first step."""
    from .tokenize.bases import inputs_from_bases
    from .tokenize.tokenizer import to_image

    q = getattr(trainer, "last_batch", None)
    if q is None or n <= 0:
        return {}
    tok = trainer.tok
    with untouched(tok, trainer.device):
        image, bases = inputs_from_bases(q[:n], trainer.n_bases, trainer.cfg.tokenizer.space())
        with trainer.amp:
            x_hat = tok(image, bases).x_hat
        rows = [tok.to_pixels(image.float()), tok.to_pixels(to_image(x_hat.float()).clamp(0, 1))]
    return {"reconstructions": uint8_grid([_uint8(r) for r in rows])}


class Samples:
    """{"samples": grid}: n images drawn by the transformer being trained (no guidance, classes
    0, 1, ... in turn, unconditional for an unlabelled store), decoded by its tokenizer (loaded
    once, at the first checkpoint). The same seed every time, so checkpoints compare."""

    def __init__(self, trainer, n: int):
        self.trainer, self.n, self.tok = trainer, n, None

    def __call__(self) -> Dict[str, np.ndarray]:
        from .generate.images import decode
        from .generate.loop import generate
        from .tokenize import Tokenizer

        tr = self.trainer
        if self.n <= 0:
            return {}
        if self.tok is None:
            # a run's checkpoint file, or an exported model folder
            self.tok = Tokenizer.from_pretrained(tr.tok_ckpt, map_location=tr.device)
        C = tr.mcfg.num_classes
        labels = (torch.arange(self.n) % C if C > 0 else torch.full((self.n,), -1)).to(tr.device)
        with untouched(tr.model, tr.device):
            gen = torch.Generator(tr.device).manual_seed(tr.cfg.seed)
            out = generate(tr.model, tr.quantizer, labels, cfg=1.0, generator=gen)
            images = decode(self.tok, out.f_hat)
        return {"samples": uint8_grid([images])}
