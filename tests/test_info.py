"""`nextdetail info`: each kind of path is named with its vital facts, --json for scripts, and a
path of no known kind is one line with exit status 2 (nextdetail.info, info_facts)."""
from __future__ import annotations

import json
import shutil

import pytest

from nextdetail.cli import main
from nextdetail.info import KINDS, describe, identify, inspect

from view_data import chain as make_chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return make_chain(tmp_path_factory)


def test_each_kind_is_identified(chain):
    expected = {chain.store: "decomposition_store", chain.tokens: "token_store", chain.tokenizer: "tokenizer_run",
                chain.transformer: "transformer_run", chain.samples: "samples", chain.edit: "edit",
                chain.eval: "eval_tokenizer", chain.model: "tokenizer_model", chain.npz: "npz_batch",
                chain.checkpoint: "tokenizer_checkpoint"}
    for path, key in expected.items():
        assert identify(path).key == key, path
        assert describe(path) == KINDS[key]
    assert describe(chain.transformer) == "a transformer run"


def test_store_facts_count_images_and_name_the_error_rows(chain):
    f = inspect(chain.store).to_json()
    assert (f["kind"], f["images"], f["ok"], f["error"]) == ("decomposition_store", 6, 5, 1)
    assert (f["method"], f["order"], f["size"], f["shard_files"]) == ("base_detail", 3, 40, 2)
    assert f["at"]["n_iter"] == 8 and f["bytes_per_image"] > 0
    assert len(f["energy_mean"]) == 3 and all(e > 0 for e in f["energy_mean"])
    (example,) = f["error_examples"]
    assert example["index"] == 5 and example["id"].endswith("notes.png") and "not an image" in example["error"]


def test_token_store_facts_carry_the_tokenizer_sha256_and_usage_per_map(chain):
    from nextdetail.checksum import file_sha256

    f = inspect(chain.tokens).to_json()
    assert f["rows"] == 5 and f["tokens_per_row"] == sum(h * w for h, w in f["map_shapes"])
    assert f["tokenizer"]["sha256"] == file_sha256(chain.checkpoint)
    assert len(f["map_usage"]) == len(f["map_shapes"]) and all(0 < u <= 1 for u in f["map_usage"])
    assert f["usage_rows"] == 5


def test_run_facts_have_steps_losses_and_checkpoints(chain):
    tok = inspect(chain.tokenizer).facts
    assert tok["steps"] == 2 and "loss" in tok["last"] and tok["checkpoints"][0]["step"] == 2
    tr = inspect(chain.transformer).facts
    assert tr["steps"] == 2 and "acc" in tr["last"] and tr["last_val"]["step"] == 2


def test_info_prints_lines_or_json(chain, capsys):
    assert main(["info", str(chain.store), str(chain.transformer)]) == 0
    out = capsys.readouterr().out
    assert f"{chain.store}: a decomposition store" in out and "images 6: 5 ok, 1 error" in out
    assert f"{chain.transformer}: a transformer run" in out and "checkpoints: ckpt-0000002.pt" in out
    assert main(["info", "--json", str(chain.tokens), str(chain.npz)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(s)["kind"] for s in lines] == ["token_store", "npz_batch"]
    assert json.loads(lines[1])["images"] == 5


def test_an_unknown_path_is_one_line_and_exit_2(chain, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    for path, what in ((tmp_path / "notes", "a folder"), (tmp_path / "gone", "nothing (no such file or folder)")):
        assert main(["info", str(chain.store), str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""                       # nothing printed before every PATH is checked
        assert captured.err.strip().splitlines() == [
            f"nextdetail info: error: {path}: {what}, not a decomposition store, token store, tokenizer or "
            f"transformer run, model folder or ADM .npz"]


def test_a_store_being_written_is_described_as_it_stands(chain, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(chain.store, copy)
    (copy / "meta.json").unlink()
    info = inspect(copy)
    assert info.kind.key == "decomposition_store_incomplete" and not info.kind.complete
    assert info.facts["listed"] == 6 and info.facts["lock"] is None
    assert "its job died" in "\n".join(info.lines())
