"""One conversion of stored bases into tokenizer inputs (nextdetail.tokenize.bases), equal bit for
bit to the store reader's layers, and the quantizer's schedule as generation reads it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nextdetail.stores.decomposition import DecompositionStore
from nextdetail.stores.layers import split_layers
from nextdetail.stores.shards import layers_from_bases
from nextdetail.tokenize import config_for
from nextdetail.tokenize.bases import inputs_from_bases
from nextdetail.tokenize.quant import build_quantizer
from pipeline_data import make_store


def same(got, want) -> bool:
    return torch.equal(got[0], want[0]) and len(got[1]) == len(want[1]) and \
        all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


@pytest.mark.parametrize("method,order", [("base_detail", 3), ("intrinsic", 1)])
def test_inputs_are_the_store_readers_layers(tmp_path, method, order):
    store = DecompositionStore(make_store(tmp_path / method, n=2, size=16, order=order, n_iter=2, method=method))
    q = torch.from_numpy(np.stack([store.quantized(i) for i in range(len(store))]))
    layers = torch.from_numpy(np.stack([store.layers(i) for i in range(len(store))]))
    for n in range(store.levels + 1):
        assert same(inputs_from_bases(q, n, store.space), split_layers(layers, n)), n


@pytest.mark.parametrize("space", ["linear", "log"])
def test_every_pair_of_8_bit_values(space):
    v = torch.arange(256, dtype=torch.uint8)
    q = torch.stack([v[:, None].expand(256, 256), v[None, :].expand(256, 256)])      # q_0, q_1: every pair
    q = q[None, :, None].expand(1, 2, 3, 256, 256).contiguous()
    want = split_layers(torch.from_numpy(layers_from_bases(q.numpy(), space)), 1)
    assert same(inputs_from_bases(q, 1, space), want)
    with pytest.raises(ValueError, match="layer space"):
        inputs_from_bases(q, 1, "srgb")


def test_the_quantizer_owns_its_schedule():
    cfg = config_for("basedetail", 32, 8, ch=8, num_res_blocks=1, vocab=32)
    q = build_quantizer(cfg.quant, cfg.model.z_channels, cfg.latent()).eval()
    assert (q.num_base, q.order, q.stage_ends, q.dim) == (4, 3, [4, 6, 8, 10], cfg.model.z_channels)
    assert cfg.map_schedule().stage_ends == q.stage_ends and cfg.needs_bases() == q.order
    f = [torch.randn(2, cfg.model.z_channels, 4, 4, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(q.quantize_base(f[3]), q(f[0], f[1:]).idx[:4]))
    flat = build_quantizer(config_for("multiscale", 32, 8).quant, 32, 4)
    assert (flat.num_base, flat.order, flat.stage_ends) == (len(flat.sizes), 0, [len(flat.sizes)])
