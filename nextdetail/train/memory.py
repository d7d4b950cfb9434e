"""What the next-detail transformer needs in memory to train a step and to draw a batch, from
its config alone (built and run on torch's meta device, nextdetail.limits)."""
from __future__ import annotations

from typing import List

import torch

from ..limits import Need, adamw_state_bytes, model_bytes, on_meta, saved_bytes
from .model import NextDetailTransformer, TransformerConfig


def training_needs(mcfg: TransformerConfig, batch: int) -> List[Need]:
    """Weights, gradients and AdamW state, and the activations of a step at `batch` samples
    (teacher-forced inputs (B, L, Cvae) in, logits (B, L, V) out, kept in float32 for the loss)."""
    def probe():
        model = NextDetailTransformer(mcfg)
        labels_B = torch.zeros(batch, dtype=torch.long)
        f_BLc = torch.zeros(batch, mcfg.seq_len - mcfg.map_shapes[0][0] * mcfg.map_shapes[0][1], mcfg.cvae)
        return model_bytes(model), saved_bytes(lambda: model(labels_B, f_BLc))

    weights, acts = on_meta(probe)
    logits = 2 * batch * mcfg.seq_len * mcfg.vocab * 4          # logits and the loss's softmax
    shape = f"--depth {mcfg.depth} --width {mcfg.width}"
    return [Need(shape, "weights, gradients and AdamW state", adamw_state_bytes(weights // 4)),
            Need(f"--batch-size {batch}", f"activations of {batch} samples of {mcfg.seq_len} tokens", acts + logits)]


def draw_needs(mcfg: TransformerConfig, rows: int, option: str) -> List[Need]:
    """A KV-cached draw of `rows` sequences (twice the images under guidance): the cache of every
    block (keys and values, float32) and the largest map's logits, probabilities and sort."""
    L, w = mcfg.seq_len, mcfg.width
    largest = max(h * w_ for h, w_ in mcfg.map_shapes)
    return [Need(option, f"the key/value cache of {rows} sequences", 2 * mcfg.depth * rows * L * w * 4),
            Need(option, f"the logits of {rows} x {largest} tokens", 4 * rows * largest * mcfg.vocab * 4)]


def check_draw(run, images: int, *, guidance: bool, option: str, scale: int = 1, scale_option: str = "",
               device: str = "cpu", max_memory=None) -> None:
    """Refuse (MemoryRefusal) a draw of `images` images from `run` that cannot fit: the KV cache
    and logits of its rows, and decoding them at `scale` times the trained size."""
    from ..limits import check_memory
    from ..tokenize.memory import decode_needs

    tcfg = run.tokenizer.config
    needs = draw_needs(run.model.cfg, images * (2 if guidance else 1), option)
    side = scale * tcfg.image_size
    needs.append(Need(scale_option if scale > 1 else option, f"decoding {images} images at {side} px",
                      decode_needs(tcfg, images, scale * tcfg.latent())))
    check_memory(needs, device=device, max_memory=max_memory)
