"""What the tokenizer needs in memory for a training step, an encode and a decode, from its
config alone: the models are built and run on torch's meta device (nextdetail.limits), so a
config that cannot fit is refused before anything is allocated or written."""
from __future__ import annotations

from typing import List

import torch

from ..limits import Need, adamw_state_bytes, forward_peak, model_bytes, on_meta, saved_bytes
from .config import TokenizerConfig
from .tokenizer import Tokenizer

# An LPIPS backbone (AlexNet, VGG or SqueezeNet features) keeps about as much for backward as
# the discriminator does per image; sized with the discriminator's probe, not built (its
# weights may need a download).
LPIPS_AS_DISC = 1


def _images(tcfg: TokenizerConfig, batch: int):
    s = tcfg.image_size
    return [torch.zeros(batch, 3, s, s) for _ in range(1 + tcfg.needs_bases())]


def training_needs(tcfg: TokenizerConfig, batch: int, *, disc_factory, ema: bool, buffer_bytes: int,
                   buffer: int = 0, gan: bool = True) -> List[Need]:
    """Weights, gradients and AdamW state of the tokenizer and the discriminator (`disc_factory()`
    builds it), the EMA copy, the activations of one step at `batch` images (the discriminator's
    and LPIPS's only when `gan`: the run reaches --disc-start), and the loader's shuffle buffer
    (`buffer_bytes`)."""
    s = tcfg.image_size

    def probe():
        tok = Tokenizer(tcfg).eval()               # eval: no codebook bookkeeping on meta
        disc = disc_factory()
        x, *bases = _images(tcfg, batch)
        acts = saved_bytes(lambda: tok(x, bases))
        try:
            d_acts = saved_bytes(lambda: disc(x)) if gan else 0
        except RuntimeError:                       # too small an image for it: refused at --disc-start
            d_acts = 0
        return model_bytes(tok), model_bytes(disc), acts, d_acts

    tok_b, disc_b, acts, d_acts = on_meta(probe)
    params = (tok_b + disc_b) // 4
    return [Need(f"--ch {tcfg.model.ch}", "weights, gradients and AdamW state", adamw_state_bytes(params)),
            Need(f"--ch {tcfg.model.ch}", "EMA weights", tok_b if ema else 0),
            Need(f"--batch-size {batch}", f"activations of {batch} images at {s} px",
                 acts + (2 + LPIPS_AS_DISC) * d_acts),
            Need(f"--shuffle-buffer {buffer}", "the loader's shuffle buffer", buffer_bytes)]


def inference_needs(tcfg: TokenizerConfig, batch: int, option: str) -> List[Need]:
    """The weights and the largest step of an encode + decode of `batch` images."""
    def probe():
        tok = Tokenizer(tcfg).eval()
        x, *bases = _images(tcfg, batch)
        return model_bytes(tok), forward_peak(tok, lambda: tok(x, bases))

    weights, peak = on_meta(probe)
    return [Need(f"--ch {tcfg.model.ch}", "tokenizer weights", weights),
            Need(option, f"encoding and decoding {batch} images at {tcfg.image_size} px", peak)]


def decode_needs(tcfg: TokenizerConfig, batch: int, latent: int) -> int:
    """Bytes of the largest step of decoding `batch` latents of side `latent` (the high-resolution
    strategy decodes latents of scale x the trained side)."""
    def probe():
        tok = Tokenizer(tcfg).eval()
        f = torch.zeros(batch, tcfg.model.z_channels, latent, latent)
        return forward_peak(tok.decoder, lambda: tok.decoder(f))

    return on_meta(probe)
