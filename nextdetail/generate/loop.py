"""The autoregressive loop: a trained next-detail transformer draws token maps, KV-cached, map
by map, with classifier-free guidance.

    run = load_run("RUN2")                                  # generate.run: model + tokenizer
    out = generate(run.model, run.tokenizer.quantizer, labels_B, cfg=1.5, top_k=0, top_p=0.0,
                   generator=torch.Generator().manual_seed(0))
    out.maps, out.f_hat                                     # M int64 (B, h_k, w_k); (B, Cvae, s, s)
    images = run.tokenizer.decode(out.maps)

Map k is drawn from the logits of one `model.step` over its h_k w_k tokens, all at once, given the
key/value cache of maps < k; its input is the cumulative f_hat so far at map k's size. The base
maps come first, then the detail maps.

Classifier-free guidance: the batch is doubled (true class, null class) and map k's logits are
u + s_k (c - u) with s_k = 1 + (cfg - 1) k / (M - 1), a linear ramp from no guidance on the first
map to `cfg` on the last (VAR's ramp, written so that cfg = 1 switches guidance off and skips the
unconditional half).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..precision import bf16_autocast
from ..tokenize.schedule import stage_ends
from ..train.inputs import next_input
from ..train.model import NextDetailTransformer
from .draw import draw_per_row, filter_logits, guidance_scale


@dataclass
class Generated:
    maps: List[torch.Tensor]        # M int64 (B, h_k, w_k)
    f_hat: torch.Tensor             # (B, Cvae, s, s), s the latent side: sum of every map's contribution
    f_stages: List[torch.Tensor]    # f_hat after the base maps, then after each detail factor


@torch.no_grad()
def generate(model: NextDetailTransformer, quantizer, labels_B: torch.Tensor, *, cfg: float = 1.5,
             top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
             generator: Optional[torch.Generator | Sequence[torch.Generator]] = None,
             prefix: Sequence[torch.Tensor] = (),
             num_base: Optional[int] = None, order: int = 0, stop: Optional[int] = None) -> Generated:
    """Draw maps len(prefix)..stop-1 (default all M) for labels_B (int64 (B,); -1: unconditional);
    `prefix` maps (B, h_k, w_k) are given, not drawn (teacher-forced into the cache).
    generator: one torch.Generator for the batch (torch.multinomial), or a list of B, one per row
    (inverse-CDF draws, `draw_per_row`: each row's tokens come from its own generator).
    num_base, order: the quantizer's schedule (`quantizer.num_base`, `quantizer.order`), for
    f_stages (f_hat after the base and after each detail factor); None: f_hat alone."""
    model.eval()
    mc = model.cfg
    M = len(mc.map_shapes) if stop is None else stop
    B, dev = labels_B.shape[0], labels_B.device
    guided = cfg != 1.0
    null = torch.full_like(labels_B, mc.num_classes)
    labels_2 = torch.cat([labels_B, null]) if guided else labels_B
    cache = model.new_cache()
    amp = bf16_autocast(labels_B.device)
    maps: List[torch.Tensor] = []
    f_hat, f_in = None, None
    ends = stage_ends(M, num_base if num_base is not None else M, order)
    stages = []
    for k in range(M):
        h, w = mc.map_shapes[k]
        x = None if k == 0 else (torch.cat([f_in, f_in]) if guided else f_in)
        if k < len(prefix):
            with amp:
                model.step(k, labels_2, x, cache)
            idx_Bhw = prefix[k].to(dev)
        else:
            with amp:
                logits = model.step(k, labels_2, x, cache).float()
            if guided:
                c, u = logits.chunk(2)
                logits = u + guidance_scale(cfg, k, len(mc.map_shapes)) * (c - u)
            logits = filter_logits(logits / max(temperature, 1e-6), top_k, top_p)
            if isinstance(generator, (list, tuple)):
                idx_Bhw = draw_per_row(logits.softmax(-1), generator).view(B, h, w)
            else:
                probs = logits.softmax(-1).flatten(0, 1)
                idx_Bhw = torch.multinomial(probs, 1, generator=generator).view(B, h, w)
        maps.append(idx_Bhw)
        nxt = mc.map_shapes[k + 1] if k + 1 < M else None
        f_hat, f_in = next_input(quantizer, k, idx_Bhw, f_hat, nxt)
        if k + 1 in ends:
            stages.append(f_hat)
    return Generated(maps, f_hat, stages)
