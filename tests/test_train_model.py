"""The next-detail transformer: mask, causality, KV-cache equivalence, position schemes."""
import pytest
import torch

from nextdetail.tokenize import config_for
from nextdetail.tokenize.quant import build_quantizer
from nextdetail.train.inputs import next_input, teacher_inputs
from nextdetail.errors import ConfigError
from nextdetail.train.model import (NextDetailTransformer, TransformerConfig,
                                    block_causal_mask, normalized_positions)

SHAPES = ((1, 1), (2, 2), (4, 4), (4, 4))          # a tiny base-detail-like schedule, L = 37


def tiny(**kw):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab=16, map_shapes=SHAPES, cvae=8, num_classes=3, depth=2, width=32, heads=2,
                            **kw)
    return NextDetailTransformer(cfg).eval()


def test_mask_is_block_causal():
    m = block_causal_mask(SHAPES)
    assert m.shape == (37, 37) and m.dtype == torch.bool
    level = [0] + [1] * 4 + [2] * 16 + [3] * 16
    for q in range(37):
        for k in range(37):
            assert bool(m[q, k]) == (level[k] <= level[q])
    # within a map every token sees every other (parallel prediction of the whole map)
    assert m[5:21, 5:21].all() and not m[5:21, 21:].any()


@pytest.mark.parametrize("kw", [{}, {"pos": "learned"}, {"adaln": True}])
def test_logits_of_map_m_ignore_maps_from_m_on(kw):
    """Changing the inputs of maps >= m (0-based; f holds maps 1.. from position 0) leaves the
    logits of maps < m bitwise unchanged, and does change those of maps >= m."""
    model = tiny(**kw)
    if kw.get("adaln"):        # zero-initialised AdaLN is the identity: give it weights
        for b in model.blocks:
            torch.nn.init.normal_(b.ada.weight, std=0.02)
    labels = torch.tensor([0, 2])
    f = torch.randn(2, 36, 8)
    base = model(labels, f)
    assert base.shape == (2, 37, 16)
    off = model.cfg.offsets()
    for m in range(1, 4):
        g = f.clone()
        g[:, off[m] - 1:] += torch.randn_like(g[:, off[m] - 1:])     # inputs of maps m..M-1 (0-based)
        out = model(labels, g)
        assert torch.equal(out[:, :off[m]], base[:, :off[m]])
        assert not torch.allclose(out[:, off[m]:], base[:, off[m]:])


def test_class_changes_every_map_and_null_class_is_used_for_unlabelled():
    model = tiny()
    f = torch.randn(1, 36, 8)
    a, b = model(torch.tensor([0]), f), model(torch.tensor([1]), f)
    assert not torch.allclose(a[:, 0], b[:, 0])
    assert torch.equal(model(torch.tensor([-1]), f), model(torch.tensor([3]), f))    # -1 -> null (= 3)


@pytest.mark.parametrize("kw", [{}, {"pos": "learned"}, {"adaln": True}])
def test_kv_cached_steps_equal_the_full_forward(kw):
    model = tiny(**kw)
    labels = torch.tensor([1, 0, 2])
    f = torch.randn(3, 36, 8)
    full = model(labels, f)
    cache, off = model.new_cache(), model.cfg.offsets()
    for k in range(4):
        fk = None if k == 0 else f[:, off[k] - 1:off[k + 1] - 1]
        torch.testing.assert_close(model.step(k, labels, fk, cache), full[:, off[k]:off[k + 1]],
                                   rtol=1e-5, atol=1e-5)


def test_normalized_positions_share_centres_across_sizes():
    p1, p2 = normalized_positions(1, 1, 4.0), normalized_positions(2, 2, 4.0)
    assert torch.allclose(p1, torch.tensor([[2.0, 2.0]], dtype=torch.float64))
    assert torch.allclose(p2.mean(0), p1[0])
    assert normalized_positions(4, 4, 4.0).max() < 4.0


def test_bad_configs_are_refused_by_name():
    with pytest.raises(ConfigError, match="heads"):
        TransformerConfig(vocab=4, map_shapes=SHAPES, cvae=2, width=30, heads=4)
    with pytest.raises(ConfigError, match="pos"):
        TransformerConfig(vocab=4, map_shapes=SHAPES, cvae=2, pos="sinusoid")
    with pytest.raises(ConfigError, match="RoPE"):
        TransformerConfig(vocab=4, map_shapes=SHAPES, cvae=2, width=12, heads=2)


def test_teacher_inputs_are_the_cumulative_reconstruction_resized():
    cfg = config_for("basedetail", 32, 8, ch=8, num_res_blocks=1, vocab=32)      # 4x4 latent
    torch.manual_seed(0)
    q = build_quantizer(cfg.quant, cfg.model.z_channels, cfg.latent()).eval()
    sizes = q.sizes
    maps = [torch.randint(32, (2, s, s)) for s in sizes]
    f = teacher_inputs(q, maps)
    L = sum(s * s for s in sizes)
    assert f.shape == (2, L - 1, cfg.model.z_channels)
    contribs = q.contributions(maps)
    f_hat, pos = torch.zeros_like(contribs[0]), 0
    for k in range(1, len(sizes)):
        f_hat = f_hat + contribs[k - 1]
        want = torch.nn.functional.interpolate(f_hat, size=(sizes[k],) * 2, mode="area")
        torch.testing.assert_close(f[:, pos:pos + sizes[k] ** 2], want.flatten(2).transpose(1, 2))
        pos += sizes[k] ** 2
    # the incremental version gives the same inputs
    f_hat, pos = None, 0
    for k in range(len(sizes) - 1):
        f_hat, nxt = next_input(q, k, maps[k], f_hat, (sizes[k + 1],) * 2)
        torch.testing.assert_close(nxt, f[:, pos:pos + sizes[k + 1] ** 2])
        pos += sizes[k + 1] ** 2
