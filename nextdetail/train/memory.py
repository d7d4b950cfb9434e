"""What the next-detail transformer needs in memory to train a step, from its config alone (built
and run on torch's meta device, nextdetail.limits); drawing from it: nextdetail.generate.memory."""
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
