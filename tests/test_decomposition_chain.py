"""The intrinsic and specular decompositions through the chain: their stores (what is stored,
what is read back), the tokenizer's schedules for them, and a tiny chain on each store kind."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_data import make_store, photo_paths

from nextdetail import cli, demo
from nextdetail.decomp import decompose, method_info
from nextdetail.decomp.logspace import from_unit_log, to_unit_log
from nextdetail.runs import TrainError
from nextdetail.stores.decomposition import DecompositionStore
from nextdetail.stores.decomposition_format import META, StoreError
from nextdetail.stores.layers import split_layers
from nextdetail.stores.shards import layers_from_bases, unit_log_table
from nextdetail.tokenize import Tokenizer, config_for
from nextdetail.tokenize.bases import inputs_from_bases as bases_inputs
from nextdetail.tokenize.loader import StoreLoader
from nextdetail.tokenize.train import TokenizerTrainConfig, train
from nextdetail.tokenize.tokenizer import to_image


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    return {"intrinsic": make_store(root / "intrinsic", n=3, size=32, order=2, method="intrinsic"),
            "specular": make_store(root / "specular", n=3, size=32, order=4, method="specular")}


def test_an_intrinsic_store_holds_the_image_and_its_shading_and_reads_log_layers(stores):
    s = DecompositionStore(stores["intrinsic"])
    meta = json.loads((s.path / META).read_text())
    assert (meta["method"], meta["order"], meta["levels"], meta["space"]) == ("intrinsic", 2, 1, "log")
    assert meta["base_order"] == ["I", "S_1"] and meta["layer_order"] == ["S_1", "A_1"]
    assert s.levels == 1 and s.layer_names == ["S_1", "A_1"] and s.space == "log"
    q = s.quantized(0)
    assert q.shape == (2, 3, 32, 32)
    assert (q[1, 0] == q[1, 1]).all() and (q[1, 0] == q[1, 2]).all()            # grey shading
    # B_0 is the image as read, bit for bit, as in every store.
    from nextdetail.imageio import load_image
    src = s.manifest["path"][s.ok_indices[0]]
    assert np.array_equal(q[0], np.rint(load_image(src, 32).transpose(2, 0, 1) * 255).astype(np.uint8))
    # The stored shading is the solver's, as an image, within 8-bit rounding.
    dec = decompose(load_image(src, 32), 2, method="intrinsic", backend="numba", n_iter=8)
    S = dec.linear_bases()[1]
    assert np.abs(q[1].transpose(1, 2, 0) / 255.0 - np.clip(S, 0, 1)).max() <= 1 / 510 + 1e-6
    # Layers [t(S), t(I) - t(S)] sum to t(I) (unit-log), which maps back to the image.
    layers = s.layers(0)
    t_I = unit_log_table()[q[0]]
    np.testing.assert_allclose(layers.sum(0), t_I, rtol=0, atol=2e-7)
    assert np.array_equal(layers[0], unit_log_table()[q[1]])
    np.testing.assert_allclose(from_unit_log(t_I), q[0] / 255.0, rtol=0, atol=2e-6)
    np.testing.assert_allclose(to_unit_log(q[0] / np.float32(255)), t_I, rtol=0, atol=0)
    row = s.manifest.iloc[s.ok_indices[0]]
    assert np.isfinite(row["energy_1"]) and row["iterations_1"] == 8 and "energy_2" not in s.manifest
    item = s[0]
    assert np.array_equal(item.image, q[0].transpose(1, 2, 0) / np.float32(255)) and len(item.details) == 1


def test_a_specular_store_reads_diffuse_base_and_specular_terms(stores):
    s = DecompositionStore(stores["specular"])
    meta = json.loads((s.path / META).read_text())
    assert meta["base_order"] == ["I", "A_1", "A_2", "A_3", "A_4"]
    assert s.layer_names == ["A_4", "E_4", "E_3", "E_2", "E_1"] and s.space == "linear" and s.levels == 4
    q = s.quantized(1).astype(np.int16)
    layers = s.layers(1)
    np.testing.assert_allclose(layers.sum(0), q[0] / 255.0, rtol=0, atol=1e-6)
    # Each stored A_k is below A_(k-1): the terms E_k = A_(k-1) - A_k are >= 0 ...
    assert (q[:-1] >= q[1:]).all()
    # ... and achromatic up to the 8-bit rounding of each base (one step per channel).
    E = q[:-1] - q[1:]
    assert (E.max(axis=1) - E.min(axis=1)).max() <= 1
    # No AT: no energies, no sweeps.
    assert s.manifest[[f"energy_{k}" for k in range(1, 5)]].isna().all().all()


@pytest.mark.parametrize("method", ["intrinsic", "specular"])
def test_the_store_bytes_do_not_depend_on_the_solver_batch(tmp_path, method):
    order = 2 if method == "intrinsic" else 3
    a = make_store(tmp_path / "a", n=3, size=32, order=order, method=method, batch_size=1)
    b = make_store(tmp_path / "b", n=3, size=32, order=order, method=method, batch_size=3)
    sa, sb = DecompositionStore(a), DecompositionStore(b)
    assert all(np.array_equal(sa.quantized(i), sb.quantized(i)) for i in range(3))
    assert (a / "bases.zarr" / "c.0.0.0.0.0").read_bytes() == (b / "bases.zarr" / "c.0.0.0.0.0").read_bytes()


@pytest.mark.parametrize("method", ["intrinsic", "specular"])
def test_the_loader_gives_the_store_readers_layers(stores, method):
    s = DecompositionStore(stores[method])
    q = StoreLoader(s, 24, 3, seed=0).next()
    image, bases = bases_inputs(q, s.levels, s.space)
    ref_image, ref_bases = split_layers(torch.from_numpy(layers_from_bases(q.numpy(), s.space)), s.levels)
    assert torch.equal(image, ref_image) and all(torch.equal(a, b) for a, b in zip(bases, ref_bases))
    assert 0 <= float(image.min()) and float(image.max()) <= 1 + 1e-6


def test_the_papers_schedules_per_decomposition():
    shapes = {m: config_for("basedetail", decomposition=m).quant.map_sizes(16)
              for m in ("base_detail", "intrinsic", "specular")}
    assert shapes["base_detail"] == [1, 2, 3, 4, 6, 9, 13, 16] + [16] * 6                 # M = 14
    assert shapes["intrinsic"] == [1, 2, 4, 6, 9, 13, 16] + [16] * 7                      # 7 + 7
    assert shapes["specular"] == [1, 2, 3, 4, 6, 9, 13, 16] + [16] * 8                    # 8 + 4 x 2
    assert config_for("basedetail", decomposition="specular").needs_bases() == 4
    assert config_for("basedetail", decomposition="intrinsic").needs_bases() == 1
    # Explicit settings win over the decomposition's schedule.
    c = config_for("basedetail", decomposition="specular", order=2, detail_depth=3)
    assert c.quant.map_sizes(16)[8:] == [16] * 6 and c.quant.order == 2
    # A checkpoint records it; older checkpoints (no field) were base_detail.
    assert config_for(decomposition="intrinsic").to_dict()["decomposition"] == "intrinsic"
    d = config_for().to_dict()
    del d["decomposition"]
    assert type(config_for()).from_dict(d).decomposition == "base_detail"


@pytest.mark.parametrize("method", ["intrinsic", "specular"])
def test_encode_then_decode_reproduces_the_forward_pass(stores, method):
    torch.manual_seed(0)
    cfg = config_for("basedetail", 32, 8, ch=8, num_res_blocks=1, vocab=64, decomposition=method)
    tok = Tokenizer(cfg).eval()
    s = DecompositionStore(stores[method])
    image, bases = split_layers(torch.from_numpy(np.stack([s.layers(i) for i in range(2)])), s.levels)
    with torch.no_grad():
        out = tok(image, bases)
    idx = tok.encode(image, bases)
    assert len(idx) == len(cfg.quant.map_sizes(4)) and all(torch.equal(a, b) for a, b in zip(idx, out.q.idx))
    # decode gives pixels: for a log-space tokenizer, the decoder's unit-log image mapped back.
    want = to_image(out.x_hat).clamp(0, 1)
    if method == "intrinsic":
        want = from_unit_log(want).clamp(0, 1)
    torch.testing.assert_close(tok.decode(idx), want, rtol=0, atol=1e-5)


def test_a_tokenizer_for_another_decomposition_is_refused(stores, tmp_path):
    cfg = TokenizerTrainConfig(data=str(stores["intrinsic"]), out=str(tmp_path / "run"), steps=1,
                               tokenizer=config_for("basedetail", 32, 8, ch=8, num_res_blocks=1, vocab=64),
                               lpips_weight=0, loader_workers=0)
    with pytest.raises(TrainError, match=r"intrinsic/?: a store of the intrinsic decomposition \(S_1, A_1\); "
                                         r"the tokenizer is for the base-detail decomposition$"):
        train(cfg)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("ckpt-*"))


def test_a_store_of_an_unknown_method_is_refused_in_one_line(stores, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(stores["specular"], copy)
    meta = json.loads((copy / META).read_text())
    meta["method"] = "glossy"
    (copy / META).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"meta.json: unknown decomposition 'glossy'; available: base_detail, "
                                         r"intrinsic, specular \(a store of a newer nextdetail\?\)"):
        DecompositionStore(copy)


def test_decompose_dataset_refuses_an_unknown_method(tmp_path, capsys):
    assert cli.main(["decompose-dataset", str(tmp_path), "--out", str(tmp_path / "s"), "--method", "glossy"]) == 2
    assert "invalid choice: 'glossy'" in capsys.readouterr().err


@pytest.mark.parametrize("method,maps", [("intrinsic", 2), ("specular", 5)])
def test_the_chain_runs_on_each_store_kind(ray_session, tmp_path, capsys, method, maps):
    """decompose-dataset --method -> train-tokenizer (its schedule from the store) -> export-tokens
    -> train -> sample, the commands as typed; the strips show the factors added one by one."""
    photos = [str(p) for p in photo_paths(3, tmp_path)]
    out = tmp_path / method
    assert demo.run_chain(photos, out, size=32, backend="numba", tokenizer_steps=2, train_steps=2,
                          method=method) == 0
    capsys.readouterr()
    tok = Tokenizer.from_checkpoint(next((out / "tokenizer").glob("ckpt-*.pt")))
    assert tok.config.decomposition == method and tok.needs_bases == maps - 1
    tokens = json.loads((out / "tokens" / "meta.json").read_text())
    assert tokens["order"] == maps - 1 and tokens["decomposition"]["method"] == method
    assert tokens["decomposition"]["layer_order"] == method_info(method).layer_names(maps - 1)
    samples = json.loads((out / "samples" / "samples.json").read_text())
    names = method_info(method).layer_names(maps - 1)
    assert samples["strip"] == ", ".join([names[0]] + [f"+{n}" for n in names[1:]])
    assert Image.open(out / "samples" / "sample_000.png").size == (maps * 32 + (maps - 1) * 2, 32)
