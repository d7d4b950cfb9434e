"""What drawing a batch from a trained run needs in memory, from its configs alone (nextdetail.limits),
checked before anything is drawn."""
from __future__ import annotations

from typing import List

from ..limits import Need
from ..train.model import TransformerConfig


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
