"""export-model: a run as a model folder (safetensors + config.json + card), loaded bit-identically
with no pickle, taken by every command that takes a run, and refused in one line when damaged."""
import json
import shutil

import pytest
import torch

from token_data import make_token_store, tiny_transformer

from nextdetail.cli import main
from nextdetail.export_model import ExportModelConfig, export_model
from nextdetail.generate.run import load_run
from nextdetail.pretrained import ModelFolderError
from nextdetail.tokenize import Tokenizer
from nextdetail.train.model import NextDetailTransformer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export-model")
    tokens, ckpt, store = make_token_store(tmp, n=6)
    run2 = tiny_transformer(tokens, ckpt, tmp / "run2", steps=2)
    return tmp, tokens, ckpt, store, run2


def test_tokenizer_folder_loads_bit_identically_without_pickle(runs, tmp_path, capsys):
    tmp, tokens, ckpt, store, _ = runs
    out = tmp_path / "tok"
    assert main(["export-model", str(ckpt.parent), "--out", str(out)]) == 0
    assert "exported a tokenizer run" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "tokenizer" and config["source"]["step"] == 2
    assert config["schedule"]["num_base"] + 2 * config["schedule"]["order"] == len(config["schedule"]["map_sizes"])
    assert config["data"]["images"] == 6 and len(config["data"]["manifest_sha256"]) == 64
    assert "## Training data" in (out / "README.md").read_text()

    a, b = Tokenizer.from_checkpoint(ckpt), Tokenizer.from_pretrained(out)
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    bases = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(k)) for k in range(a.needs_bases)]
    idx_a, idx_b = a.encode(image, bases), b.encode(image, bases)
    assert all(torch.equal(x, y) for x, y in zip(idx_a, idx_b))
    assert torch.equal(a.decode(idx_a), b.decode(idx_b))

    from safetensors.torch import load_file          # the tensors alone, without nextdetail
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in load_file(out / "model.safetensors").items())
    assert Tokenizer.from_checkpoint(ckpt.parent).config == a.config     # a RUN means its latest checkpoint

    # The folder stands where its checkpoint stood: the token store accepts it, and so does train.
    from nextdetail.stores.tokens import TokenDataset
    TokenDataset(tokens, tokenizer=out)
    assert main(["train", "--tokens", str(tokens), "--tokenizer", str(out), "--out", str(tmp_path / "r"),
                 "--depth", "1", "--width", "32", "--heads", "2", "--steps", "1", "--batch-size", "2"]) == 0


def test_transformer_folder_samples_like_its_run(runs, tmp_path):
    tmp, tokens, ckpt, store, run2 = runs
    out = tmp_path / "t"
    report = export_model(ExportModelConfig(run=run2, out=out))
    assert report.kind == "transformer run" and (out / "tokenizer" / "model.safetensors").is_file()
    a, b = load_run(run2), load_run(out)
    assert b.meta["class_names"] == a.meta["class_names"] and b.meta["step"] == a.meta["step"]
    c = a.model.cfg                     # logits of the same inputs: teacher features of every map after the first
    f_BLc = torch.rand(2, c.seq_len - c.map_shapes[0][0] * c.map_shapes[0][1], c.cvae,
                       generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, -1])
    with torch.no_grad():
        assert torch.equal(a.model(labels, f_BLc), b.model(labels, f_BLc))
    for p, q in zip(a.model.state_dict().values(), NextDetailTransformer.from_pretrained(out).state_dict().values()):
        assert torch.equal(p, q)
    assert main(["sample", str(out), "--out", str(tmp_path / "s"), "--n", "1"]) == 0


def test_damaged_or_wrong_folders_are_refused_in_one_line(runs, tmp_path, capsys):
    tmp, tokens, ckpt, store, run2 = runs
    good = tmp_path / "good"
    export_model(ExportModelConfig(run=ckpt, out=good))

    def broken(name, edit):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    from safetensors.torch import load_file, save_file
    def drop(folder):
        w = load_file(folder / "model.safetensors")
        w.pop(sorted(w)[0])
        save_file(w, folder / "model.safetensors")

    def reshape(folder):
        w = load_file(folder / "model.safetensors")
        k = next(k for k, v in w.items() if v.ndim == 4)
        w[k] = w[k][:1].clone()
        save_file(w, folder / "model.safetensors")

    def other_kind(folder):
        c = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**c, "kind": "transformer"}))

    cases = {"missing": (drop, "lacks the tensor"), "shape": (reshape, "has shape"),
             "kind": (other_kind, r"a transformer \(nextdetail train\) model folder, not a tokenizer")}
    for name, (edit, words) in cases.items():
        with pytest.raises(ModelFolderError, match=words):
            Tokenizer.from_pretrained(broken(name, edit))
    # through a command: exit 2, one line naming the folder
    assert main(["sample", str(good), "--out", str(tmp_path / "s"), "--n", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a transformer" in err[0] and str(good) in err[0]
    # a folder of another tokenizer is refused by the token store it does not match
    other = tmp_path / "other"
    w = load_file(good / "model.safetensors")
    cfg = json.loads((good / "config.json").read_text())
    other.mkdir()
    save_file(w, other / "model.safetensors")
    (other / "config.json").write_text(json.dumps({**cfg, "source": {**cfg["source"], "sha256": "0" * 64}}))
    assert main(["train", "--tokens", str(tokens), "--tokenizer", str(other), "--out", str(tmp_path / "r"),
                 "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the one these tokens were exported with" in err[0]
    # an existing model folder is replaced only with --overwrite
    assert main(["export-model", str(ckpt), "--out", str(good)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_a_folder_loads_through_the_hugging_face_hub_cache(runs, tmp_path, monkeypatch):
    """The layout is what huggingface_hub serves: a repo id resolved from the hub's cache
    (offline: HF_HUB_OFFLINE=1, a snapshot as snapshot_download would have left it)."""
    pytest.importorskip("huggingface_hub")
    tmp, tokens, ckpt, store, run2 = runs
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-tokenizer"
    export_model(ExportModelConfig(run=ckpt, out=repo / "snapshots" / commit))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = Tokenizer.from_pretrained("someone/tiny-tokenizer")
    assert tok.config == Tokenizer.from_checkpoint(ckpt).config
