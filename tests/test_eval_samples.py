"""eval-samples: FID, IS, KID and precision/recall through the real loading code, with a stand-in
Inception weights file (inception_standin.py), on small sets of real photos; the weights' lookup
(given file, hub cache, download, offline); ADM .npz batches."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from inception_standin import write_standin_inception
from pipeline_data import make_store, photo_paths

from nextdetail import cli
from nextdetail.checksum import file_sha256
from nextdetail.evaluation.fidelity import EvalSamplesConfig, evaluate_samples, fidelity_metrics
from nextdetail.evaluation.image_sets import ImageSetError, open_image_set
from nextdetail.evaluation.inception import INCEPTION, inception_features, load_inception
from nextdetail.imageio import load_image, to_uint8
from nextdetail.npz import NpzWriter, image_count, iter_images, read_labels, write_npz
from nextdetail.weights import WeightsError, weights_file

N, SIZE = 16, 64


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """N real photos as 64 px crops in three folders: as they are, blurred (radius 1), more (3)."""
    root = tmp_path_factory.mktemp("evalsets")
    crops = [to_uint8(load_image(p, SIZE)) for p in photo_paths(N, root)]
    sets = {}
    for name, radius in (("sharp", 0), ("blur1", 1), ("blur3", 3)):
        folder = root / name
        folder.mkdir()
        for i, c in enumerate(crops):
            im = Image.fromarray(c)
            (im.filter(ImageFilter.GaussianBlur(radius)) if radius else im).save(folder / f"{i:03d}.png")
        sets[name] = folder
    sets["weights"] = write_standin_inception(root / "weights" / INCEPTION.filename, np.stack(crops))
    return sets


@pytest.fixture(scope="module")
def features(photos):
    net = load_inception(photos["weights"])
    return {name: inception_features(net, open_image_set(photos[name]).batches(8))
            for name in ("sharp", "blur1", "blur3")}


def test_fid_is_zero_for_a_set_against_itself_and_grows_with_blur(features):
    sharp_pool, sharp_logits = features["sharp"]
    assert sharp_pool.shape == (N, 2048) and sharp_logits.shape == (N, 1008) and np.isfinite(sharp_pool).all()
    m = {name: fidelity_metrics(pool, logits, sharp_pool, None, kid_subset_size=8)
         for name, (pool, logits) in features.items()}
    assert abs(m["sharp"]["fid"]) < 1e-3 * m["blur1"]["fid"]
    assert 0 < m["blur1"]["fid"] < m["blur3"]["fid"]
    assert m["sharp"]["precision"] == m["sharp"]["recall"] == 1.0
    for r in m.values():
        assert np.isfinite(r["is_mean"]) and r["is_mean"] >= 1.0 and r["is_std"] >= 0
        assert np.isfinite(r["kid_mean"]) and np.isfinite(r["kid_std"])
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert abs(m["sharp"]["kid_mean"]) < m["blur3"]["kid_mean"]


def test_the_command_writes_traceable_results_and_statistics_serve_as_a_reference(photos, tmp_path, capsys):
    w = photos["weights"]
    stats = tmp_path / "sharp-stats.npz"
    assert cli.main(["eval-samples", str(photos["sharp"]), "--inception-weights", str(w),
                     "--save-stats", str(stats), "--out", str(tmp_path / "ref.json")]) == 0
    with np.load(stats) as z:
        assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048)
    assert cli.main(["eval-samples", str(photos["blur3"]), "--ref", str(photos["sharp"]),
                     "--inception-weights", str(w), "--kid-subset-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "precision" in out and f"evaluated {N} images (folder) against {N} (folder)" in out
    res = json.loads((photos["blur3"].parent / "blur3-eval.json").read_text())
    assert res["samples"] == {"path": str(photos["blur3"]), "kind": "folder", "images": N}
    assert res["ref"]["images"] == N and res["inception"]["sha256"] == file_sha256(w)
    assert set(res["metrics"]) >= {"fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall"}
    # The same FID against the saved statistics; KID and P/R need images, so they are left out.
    assert cli.main(["eval-samples", str(photos["blur3"]), "--ref", str(stats), "--inception-weights", str(w),
                     "--out", str(tmp_path / "vs-stats.json")]) == 0
    by_stats = json.loads((tmp_path / "vs-stats.json").read_text())
    assert by_stats["metrics"]["fid"] == pytest.approx(res["metrics"]["fid"], rel=1e-6)
    assert "kid_mean" not in by_stats["metrics"] and by_stats["ref"]["kind"] == "statistics"


def test_an_adm_batch_and_a_store_are_sets_like_a_folder(photos, features, tmp_path):
    net = load_inception(photos["weights"])
    images = np.concatenate(list(open_image_set(photos["sharp"]).batches(5)))
    npz = write_npz(tmp_path / "sharp.npz", images, np.arange(N) % 3)
    s = open_image_set(npz)
    assert (s.kind, s.n) == ("npz", N)
    pool, _ = inception_features(net, s.batches(8))
    np.testing.assert_array_equal(pool, features["sharp"][0])
    # A decomposition store's images (B_0) are read as stored.
    store = make_store(tmp_path / "store", n=4, size=SIZE, order=1, n_iter=2)
    st = open_image_set(store)
    assert (st.kind, st.n) == ("store", 4)
    from nextdetail.stores.decomposition import DecompositionStore
    got = np.concatenate(list(st.batches(3)))
    assert np.array_equal(got[2], DecompositionStore(store).quantized(2)[0].transpose(1, 2, 0))


def test_the_adm_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 12, 10, 3), dtype=np.uint8)
    with NpzWriter(tmp_path / "b.npz", 7, (12, 10), labels=True) as w:
        w.write(x[:4], [0, 0, 1, 1])
        w.write(x[4:], [2, 2, 3])
    with np.load(tmp_path / "b.npz") as z:                 # what ADM's evaluator does with it
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (7, 12, 10, 3)
        assert np.array_equal(z["arr_0"], x) and z["arr_1"].dtype == np.int64
        assert z["arr_1"].tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert image_count(tmp_path / "b.npz") == (7, 12, 10)
    assert np.array_equal(np.concatenate(list(iter_images(tmp_path / "b.npz", 3))), x)
    write_npz(tmp_path / "u.npz", x)                         # unconditional: no arr_1
    assert read_labels(tmp_path / "u.npz") is None and zipfile.ZipFile(tmp_path / "u.npz").namelist() == ["arr_0.npy"]
    with pytest.raises(ValueError, match="3 images written, 7 expected"):
        with NpzWriter(tmp_path / "short.npz", 7, (12, 10), labels=False) as w:
            w.write(x[:3])
            w.close()
    assert not (tmp_path / "short.npz").exists() and not (tmp_path / "short.npz.tmp").exists()


def test_missing_weights_are_named_in_one_line_with_their_source(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION.filename
    assert cli.main(["eval-samples", str(photos["sharp"]), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"not found: download {INCEPTION.url} to {cached}" in err[0]
    assert "--inception-weights FILE" in err[0] and "downloads are off" in err[0]
    assert cli.main(["eval-samples", str(photos["sharp"]), "--inception-weights", str(tmp_path / "nope.pth")]) == 2
    assert f"--inception-weights {tmp_path / 'nope.pth'}: no such file" in capsys.readouterr().err


def test_weights_come_from_the_cache_or_a_download_unless_offline(photos, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("NEXTDETAIL_OFFLINE")
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(WeightsError, match=r"not found and the download failed \(<urlopen error"):
        weights_file(INCEPTION)
    assert calls == [(INCEPTION.url, "6726825d")]
    with pytest.raises(WeightsError, match="downloads are off"):
        weights_file(INCEPTION, no_download=True)
    assert len(calls) == 1                                       # --offline: not even tried

    def good_download(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        with open(dst, "wb") as f:
            f.write(photos["weights"].read_bytes())
    monkeypatch.setattr(torch.hub, "download_url_to_file", good_download)
    path = weights_file(INCEPTION)
    assert path == tmp_path / "hub" / "checkpoints" / INCEPTION.filename and path.is_file()
    assert weights_file(INCEPTION) == path and len(calls) == 2   # cached: no second download
    load_inception(path)


def test_a_weights_file_that_needs_code_is_refused(tmp_path):
    import collections
    evil = tmp_path / "evil.pth"
    torch.save({"x": collections.Counter(a=1)}, evil)            # a pickle needing a non-tensor global
    with pytest.raises(WeightsError, match=f"{evil}: not usable as the Inception"):
        load_inception(evil)


def test_sets_that_cannot_be_read_are_named(photos, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (40, 30)).save(mixed / "a.png")
    Image.new("RGB", (30, 40)).save(mixed / "b.png")
    with pytest.raises(ImageSetError, match=r"b.png: is 30x40, the set's first image 40x30: pass --size N"):
        list(open_image_set(mixed).batches(4))
    assert np.concatenate(list(open_image_set(mixed, 16).batches(4))).shape == (2, 16, 16, 3)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ImageSetError, match="has no arr_0 .*statistics alone can only be a --ref"):
        open_image_set(tmp_path / "stats.npz")
    with pytest.raises(ImageSetError, match="no such file or folder"):
        evaluate_samples(EvalSamplesConfig(samples=tmp_path / "none", inception_weights=photos["weights"]))
