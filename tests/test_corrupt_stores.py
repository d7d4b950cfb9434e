"""Damaged stores are named, never a traceback: each case gives exactly one line naming the
file and what is wrong, exit status 2, and leaves every file as it was. (A truncated checkpoint:
tests/test_checkpoints.py.)"""
from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from nextdetail import cli
from nextdetail.stores.decomposition import DecompositionStore
from nextdetail.stores.decomposition_format import MANIFEST, META, StoreError
from nextdetail.stores.shards import shard_file
from nextdetail.stores.tokens import INDEX, TOKENS
from token_data import make_token_store
from conftest import own_lines


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    tokens, ckpt, store = make_token_store(tmp_path_factory.mktemp("corrupt"), n=6, size=32)
    return store, ckpt, tokens


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, argv, folder, *names):
    """Run the command on a damaged copy: exit 2, one line naming the file, nothing changed."""
    before = tree(folder)
    assert cli.main([str(a) for a in argv]) == 2
    lines = own_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert tree(folder) == before
    return lines[0]


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def export_argv(store, ckpt, tmp_path):
    return ["export-tokens", "--data", store, "--tokenizer", ckpt, "--out", tmp_path / "out", "--workers", "1"]


def shard(store):
    return shard_file(store, 0)          # the store's 6 images are one shard


def test_a_shard_overwritten_with_garbage(clean, tmp_path, capsys):
    store, ckpt, _ = clean
    bad = copy(store, tmp_path / "store")
    size = shard(bad).stat().st_size
    shard(bad).write_bytes((b"\x28\xb5\x2f\xfd" + b"garbage" * size)[:size])     # zstd magic, then noise
    with pytest.raises(StoreError, match=r"c\.0\.0\.0\.0\.0: image 2 \(.+\): damaged shard, cannot decode it"):
        DecompositionStore(bad)[2]
    line = refused(capsys, ["eval-tokenizer", ckpt, "--data", bad, "--out", tmp_path / "eval", "--no-lpips",
                            "--no-rfid"], bad,
                   "bases.zarr/c.0.0.0.0.0", "damaged shard")
    assert line.startswith("nextdetail eval-tokenizer: error: ")


def test_a_truncated_shard_read_by_a_ray_worker(ray_session, clean, tmp_path, capsys):
    store, ckpt, _ = clean
    bad = copy(store, tmp_path / "store")
    data = shard(bad).read_bytes()
    shard(bad).write_bytes(data[: len(data) // 2])
    refused(capsys, export_argv(bad, ckpt, tmp_path), bad, "bases.zarr/c.0.0.0.0.0",
            f"shard 0 is damaged ({len(data) // 2} bytes, written with {len(data)})")


def test_a_missing_shard_file(clean, tmp_path, capsys):
    store, ckpt, _ = clean
    bad = copy(store, tmp_path / "store")
    shard(bad).unlink()                                           # Zarr alone would read zeros
    refused(capsys, ["train-tokenizer", "--data", bad, "--out", tmp_path / "run", "--image-size", "32",
                     "--downsample", "8", "--ch", "8", "--num-res-blocks", "1", "--vocab", "16", "--steps", "4",
                     "--batch-size", "6", "--lpips-weight", "0", "--loader-workers", "1"],
            bad, "c.0.0.0.0.0", "missing shard file")          # met in a loader worker process


def test_a_manifest_cut_short(clean, tmp_path, capsys):
    store, ckpt, _ = clean
    bad = copy(store, tmp_path / "store")
    data = (bad / MANIFEST).read_bytes()
    (bad / MANIFEST).write_bytes(data[: len(data) // 2])
    refused(capsys, export_argv(bad, ckpt, tmp_path), bad, f"store/{MANIFEST}", "cannot read the manifest")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(order="3"), "'order' is str '3', expected an integer"),
    (lambda m: m.pop("size"), "missing key 'size'"),
    (lambda m: m["counts"].update(images=None), "'counts.images' is NoneType None, expected an integer"),
    (lambda m: m.update(at=[1, 2]), "'at' is list [1, 2], expected an object"),
])
def test_meta_json_with_wrong_types_or_a_missing_key(clean, tmp_path, capsys, edit, message):
    store, ckpt, _ = clean
    bad = copy(store, tmp_path / "store")
    meta = json.loads((bad / META).read_text())
    edit(meta)
    (bad / META).write_text(json.dumps(meta))
    refused(capsys, export_argv(bad, ckpt, tmp_path), bad, f"store/{META}", message)


def train_argv(tokens, ckpt, tmp_path):
    return ["train", "--tokens", tokens, "--tokenizer", ckpt, "--out", tmp_path / "run", "--depth", "1",
            "--width", "32", "--heads", "2", "--steps", "1"]


def test_tokens_bin_one_byte_short(clean, tmp_path, capsys):
    _, ckpt, tokens = clean
    bad = copy(tokens, tmp_path / "tokens")
    data = (bad / TOKENS).read_bytes()
    (bad / TOKENS).write_bytes(data[:-1])
    refused(capsys, train_argv(bad, ckpt, tmp_path), bad, f"tokens/{TOKENS}",
            f"holds {len(data) - 1} bytes", "truncated or damaged")


def test_index_parquet_with_a_missing_column(clean, tmp_path, capsys):
    _, ckpt, tokens = clean
    bad = copy(tokens, tmp_path / "tokens")
    pq.write_table(pq.read_table(bad / INDEX).drop_columns(["label"]), bad / INDEX)
    refused(capsys, train_argv(bad, ckpt, tmp_path), bad, f"tokens/{INDEX}", "lacks the column(s) label")
