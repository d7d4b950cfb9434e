"""Tokenizer model and quantizers: schedules, Algorithm 1 bookkeeping, encode/decode = forward,
codebook restarts, LPIPS offline. Tiny models (a few hundred thousand weights), CPU."""
from __future__ import annotations

import logging

import pytest
import torch

from nextdetail.tokenize import ConfigError, QuantConfig, Tokenizer, config_for, scale_patch_sizes
from nextdetail.tokenize.losses import LPIPSWeightsError, backbone_path, build_lpips
from nextdetail.tokenize.quant import Codebook
from nextdetail.tokenize.tokenizer import to_image

KINDS = ("vanilla", "multiscale", "basedetail")


def tiny(kind, image_size=32, downsample=8, **quant):
    quant.setdefault("vocab", 64)
    if kind == "vanilla":
        quant.setdefault("depth", 4)
    return config_for(kind, image_size, downsample, ch=8, num_res_blocks=1, **quant)


def inputs(size=32, batch=2, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g), [torch.rand(batch, 3, size, size, generator=g)
                                                           for _ in range(n)]


def test_default_schedules_and_their_scaling():
    cart = QuantConfig()                                   # CART-256: 8 base + 3 x 2 detail maps
    assert cart.num_maps() == 14
    assert cart.map_sizes(16) == [1, 2, 3, 4, 6, 9, 13, 16] + [16] * 6
    assert QuantConfig(kind="multiscale").map_sizes(16) == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    assert QuantConfig(kind="vanilla", depth=5).map_sizes(8) == [8] * 5
    # 64 px crops with x8: an 8x8 latent keeps CART's M = 14 (base maps 1..8).
    small = config_for("basedetail", 64, 8, ch=8)
    assert small.quant.map_sizes(8) == [1, 2, 3, 4, 5, 6, 7, 8] + [8] * 6
    assert scale_patch_sizes((1, 2, 3, 4, 6, 9, 13, 16), 32) == (2, 4, 6, 8, 12, 18, 26, 32)
    with pytest.raises(ConfigError, match="must end at the latent side 8"):
        config_for("multiscale", 64, 8, patch_sizes=(1, 2, 4))
    with pytest.raises(ConfigError, match="strictly increasing"):
        QuantConfig(base_patch_sizes=(1, 3, 3))
    with pytest.raises(ConfigError, match="not divisible"):
        config_for("vanilla", 60, 8)


@pytest.mark.parametrize("kind,size,downsample,want", [
    ("vanilla", 32, 8, [(4, 4)] * 4),
    ("multiscale", 32, 8, [(1, 1), (2, 2), (3, 3), (4, 4)]),
    ("basedetail", 32, 8, [(1, 1), (2, 2), (3, 3), (4, 4)] + [(4, 4)] * 6),
    ("basedetail", 256, 16, [(p, p) for p in (1, 2, 3, 4, 6, 9, 13, 16)] + [(16, 16)] * 6),
])
def test_token_map_shapes(kind, size, downsample, want):
    tok = Tokenizer(tiny(kind, size, downsample)).eval()
    image, bases = inputs(size, batch=1)
    idx = tok.encode(image, bases)
    assert [tuple(i.shape) for i in idx] == [(1,) + w for w in want]
    assert all(i.dtype == torch.int64 and 0 <= int(i.min()) and int(i.max()) < 64 for i in idx)
    img = tok.decode(idx)
    assert img.shape == (1, 3, size, size) and 0 <= float(img.min()) and float(img.max()) <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_encode_then_decode_reproduces_the_forward_pass(kind):
    torch.manual_seed(1)
    tok = Tokenizer(tiny(kind)).eval()
    image, bases = inputs()
    with torch.no_grad():
        out = tok(image, bases)
    idx = tok.encode(image, bases)
    for a, b in zip(idx, out.q.idx):
        assert torch.equal(a, b)
    f_hat = tok.quantizer.lookup(idx)                     # Algorithm 2 from the tokens alone
    torch.testing.assert_close(f_hat, out.q.f_hat, rtol=0, atol=1e-5)
    torch.testing.assert_close(tok.decode(idx), to_image(out.x_hat).clamp(0, 1), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="token map 0 has shape"):
        tok.decode([i.repeat(1, 2, 2) for i in idx])


@pytest.mark.parametrize("kind", KINDS)
def test_an_images_tokens_do_not_depend_on_its_batch(kind):
    """Fixed-shape micro-batches: one image's tokens are the same alone, in a batch of 7, in
    batches of 3 (the last one padded), at micro-batches of 4, and under 1 or 2 threads as long
    as the thread count is the same for both encodes."""
    torch.manual_seed(0)
    tok = Tokenizer(tiny(kind)).eval()
    with torch.no_grad():                   # all codes within 1e-5: every token is a near-tie
        e = tok.quantizer.codebook.embed.weight
        e.copy_(e[:1] + 1e-5 * torch.randn(e.shape))
    image, bases = inputs(batch=7)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            whole = tok.encode(image, bases)
            for step, micro in ((1, None), (3, None), (7, 4), (2, 4)):
                parts = [tok.encode(image[a:a + step], [b[a:a + step] for b in bases], micro_batch=micro)
                         for a in range(0, 7, step)]
                got = [torch.cat(maps) for maps in zip(*parts)]
                if micro is None:                   # the default micro-batch: the same bits
                    assert all(g.equal(w) for g, w in zip(got, whole)), (t, step)
                else:                               # another fixed shape, batch-independent too
                    ref = tok.encode(image, bases, micro_batch=micro)
                    assert all(g.equal(r) for g, r in zip(got, ref)), (t, step, micro)
    finally:
        torch.set_num_threads(threads)
    empty = tok.encode(image[:0], [b[:0] for b in bases])
    assert [tuple(m.shape) for m in empty] == [(0, p, p) for p in tok.quantizer.sizes]


def test_algorithm1_bookkeeping():
    torch.manual_seed(2)
    tok = Tokenizer(tiny("basedetail")).eval()
    image, bases = inputs()
    with torch.no_grad():
        f_I, f_B = tok.features(image, bases)
        q = tok.quantizer(f_I, f_B)
        f_B = [f_I] + f_B                                  # f_B0 = f_I, f_B1, f_B2, f_B3
    nb, d, n = 4, 2, 3
    # Reconstruction is the sum of every map's phi contribution.
    torch.testing.assert_close(torch.stack(q.contribs).sum(0), q.f_hat, rtol=0, atol=1e-6)
    # Base maps code f_Bn; each detail stage starts from f_D = f_B(k-1) - f_Bk, D_n first.
    torch.testing.assert_close(q.inputs[0], f_B[n])
    for j, k in enumerate(range(n, 0, -1)):
        torch.testing.assert_close(q.inputs[nb + j * d], f_B[k - 1] - f_B[k])
    # Inside a stage each map quantizes what the previous ones left (residual quantization).
    for k in list(range(1, nb)) + [nb + 1, nb + 3, nb + 5]:
        torch.testing.assert_close(q.inputs[k], q.inputs[k - 1] - q.contribs[k - 1], rtol=0, atol=1e-6)
    # Detail tokens are the nearest codes of the full-resolution residual; base tokens of the
    # area-downsampled one.
    e = tok.quantizer.codebook.embed.weight
    for k in (0, 2, nb, nb + 5):
        p = tok.quantizer.sizes[k]
        x = torch.nn.functional.interpolate(q.inputs[k], size=(p, p), mode="area")
        x_NC = x.permute(0, 2, 3, 1).reshape(-1, e.shape[1])
        want = torch.cdist(x_NC, e).argmin(1).view(q.idx[k].shape)
        assert torch.equal(q.idx[k], want)
    # Telescoping: the factors coded add up to f_I, so f_hat approximates the image's features.
    total = f_B[n] + sum(f_B[k - 1] - f_B[k] for k in range(1, n + 1))
    torch.testing.assert_close(total, f_I, rtol=0, atol=1e-5)


def test_base_detail_needs_its_bases():
    tok = Tokenizer(tiny("basedetail"))
    image, bases = inputs()
    with pytest.raises(ValueError, match="needs bases B_1..B_3, got 2"):
        tok.encode(image, bases[:2])
    with pytest.raises(ValueError, match="this tokenizer takes 32x32"):
        tok.encode(image[..., :16, :16], [b[..., :16, :16] for b in bases])


def test_training_forward_is_straight_through():
    torch.manual_seed(3)
    tok = Tokenizer(tiny("multiscale")).train()
    image, _ = inputs()
    out = tok(image)
    out.x_hat.square().mean().backward(retain_graph=True)
    # The reconstruction loss reaches the encoder through the straight-through estimator...
    assert tok.encoder.net[0].weight.grad.abs().sum() > 0
    # ...and the VQ loss trains the codebook.
    tok.zero_grad()
    out.q.vq_loss.backward()
    assert tok.quantizer.codebook.embed.weight.grad.abs().sum() > 0


def test_dead_codes_are_reinitialised_from_batch_features():
    torch.manual_seed(4)
    cb = Codebook(vocab=16, dim=4, decay=0.5, dead_after=2).train()
    f = torch.randn(2, 4, 3, 3)
    feats = f.permute(0, 2, 3, 1).reshape(-1, 4)
    before = cb.embed.weight.detach().clone()
    cb.quantize(f)
    used = set(cb.quantize(f).flatten().tolist())
    assert cb.end_step() == 0                              # usage 1 -> 0.5 for unused codes: alive
    cb.quantize(f)
    restarted = cb.end_step()                              # 0.25 < 1/dead_after: dead
    after = cb.embed.weight.detach()
    changed = [v for v in range(16) if not torch.equal(before[v], after[v])]
    assert restarted == len(changed) == 16 - len(used)
    assert not used & set(changed)                         # codes in use are kept
    for v in changed:                                      # a dead code becomes a batch feature
        assert bool((after[v] == feats).all(1).any())
    assert cb.usage.max() == 1.0 and 1 <= cb.perplexity() <= 16


def test_lpips_random_backbone_is_seeded_offline_and_warns(caplog, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("LPIPS tried to download weights")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    state = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="nextdetail.tokenize.losses"):
        a = build_lpips("alex", backbone="random")
    assert "RANDOM alex backbone" in caplog.text
    assert torch.equal(torch.get_rng_state(), state)      # building it leaves the training RNG alone
    b = build_lpips("alex", backbone="random")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x, y = inputs(64, batch=2)[0] * 2 - 1, inputs(64, batch=2, seed=9)[0] * 2 - 1
    assert float(a(x, x).abs().max()) < 1e-6 and float(a(x, y).min()) > 0


def test_lpips_pretrained_backbone_from_the_hub_cache(tmp_path, monkeypatch):
    import torchvision

    def no_network(*a, **k):
        raise AssertionError("LPIPS tried to download weights")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(LPIPSWeightsError, match=f"LPIPS alex backbone .* not found: download https://download"
                                                 f".pytorch.org/models/alexnet-owt-7be5be79.pth to {tmp_path}/"
                                                 f"checkpoints/alexnet-owt-7be5be79.pth"):
        build_lpips("alex")
    torch.manual_seed(5)
    weights = torchvision.models.alexnet().state_dict()
    backbone_path("alex").parent.mkdir(parents=True)
    torch.save(weights, backbone_path("alex"))
    model = build_lpips("alex")
    assert torch.equal(model.net.slice1[0].weight, weights["features.0.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").bias, weights["features.10.bias"])
