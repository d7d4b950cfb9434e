"""The token store and its reader, without Ray: the in-process export equals the tokenizer's own
encode, the reader's batches and maps are the stored rows, the epoch order covers every sample
exactly once across DDP ranks and resumes exactly, and bad stores are refused in one line."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from nextdetail.pipelines import DecompositionStore
from nextdetail.pipelines.export import ExportConfig, export_in_process
from nextdetail.tokenize import Tokenizer
from nextdetail.stores.layers import split_layers
from nextdetail.train import EpochSampler, TokenDataset, TokenStoreError
from nextdetail.stores.tokens import INDEX, META, TOKENS
from token_data import make_token_store, tiny_tokenizer


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """6 images of a 40 px store, 32 px centre crops, in blocks of 4 (two parts, one short)."""
    return make_token_store(tmp_path_factory.mktemp("tokens"), n=6, size=40, block_rows=4)


def reference_maps(store_path, ckpt):
    """The tokenizer's own encode of every ok image's centre crop: M int64 (N, h, w)."""
    store, tok = DecompositionStore(store_path), Tokenizer.from_checkpoint(ckpt)
    s, o = tok.config.image_size, (store.size - tok.config.image_size) // 2
    layers = torch.stack([torch.from_numpy(store.layers(i)[:, :, o:o + s, o:o + s].astype(np.float32))
                          for i in range(len(store))])
    image, bases = split_layers(layers, tok.needs_bases)
    return tok.encode(image, bases)


def test_export_then_read_equals_the_tokenizers_encode(tokens):
    out, ckpt, store = tokens
    ds = TokenDataset(out, tokenizer=ckpt)
    want = reference_maps(store, ckpt)
    assert len(ds) == 6 and ds.map_shapes == [tuple(m.shape[1:]) for m in want]
    assert ds.L == sum(m[0].numel() for m in want) and ds.vocab == 64
    assert (ds.num_base, ds.order) == (4, 3)            # 32 px / x8: base maps 1..4, then 3 x 2 details
    idx = [5, 0, 3, 3]                                  # any order, repeats allowed
    tokens_BL, labels_B = ds.get_batch(idx)
    assert tokens_BL.dtype == torch.int64 and tokens_BL.shape == (4, ds.L)
    assert labels_B.dtype == torch.int64 and labels_B.shape == (4,)
    for got, ref in zip(ds.split_maps(tokens_BL), want):
        torch.testing.assert_close(got, ref[idx], rtol=0, atol=0)
    # tokens.bin is exactly the documented layout: uint16 rows, maps flattened in order.
    raw = np.fromfile(out / TOKENS, dtype="<u2").reshape(6, ds.L)
    np.testing.assert_array_equal(raw, torch.cat([m.flatten(1) for m in want], 1).numpy())
    meta = json.loads((out / META).read_text())
    assert meta["N"] == 6 and meta["L"] == ds.L and meta["dtype"] == "uint16"
    assert meta["decomposition"]["order"] == 3 and meta["tokenizer"]["kind"] == "basedetail"


def test_index_maps_rows_to_store_images(tokens):
    out, _, store = tokens
    ds, s = TokenDataset(out), DecompositionStore(store)
    assert ds.index["row"].tolist() == list(range(6))
    assert ds.index["store_index"].tolist() == s.ok_indices.tolist()
    assert ds.ids == [s.manifest["id"][i] for i in s.ok_indices]
    np.testing.assert_array_equal(ds.labels, s.labels)


def test_reader_pickles_without_its_memmap_and_reopens(tokens):
    ds = TokenDataset(tokens[0])
    a, _ = ds.get_batch([1, 2])
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._mm is None
    torch.testing.assert_close(clone.get_batch([1, 2])[0], a)
    loader = torch.utils.data.DataLoader(range(6), batch_size=3, num_workers=1,
                                         collate_fn=lambda idx: clone.get_batch(idx)[0])
    torch.testing.assert_close(torch.cat(list(loader)), ds.get_batch(range(6))[0])


def test_sharded_export_reads_the_same(tokens, tmp_path):
    out, ckpt, store = tokens
    sharded = tmp_path / "sharded"
    export_in_process(ExportConfig(data=store, tokenizer=ckpt, out=sharded, shard_rows=4))
    ds, flat = TokenDataset(sharded), TokenDataset(out)
    assert [s["rows"] for s in ds.meta["shards"]] == [4, 2] and not (sharded / TOKENS).exists()
    idx = [5, 1, 4, 0, 3]                               # straddles both shards
    torch.testing.assert_close(ds.get_batch(idx)[0], flat.get_batch(idx)[0], rtol=0, atol=0)


def test_out_of_range_index_names_the_sample(tokens):
    with pytest.raises(IndexError, match="sample 6 out of range 0..5"):
        TokenDataset(tokens[0]).get_batch([0, 6])


@pytest.mark.parametrize("n,batch,world", [(10, 3, 1), (13, 3, 4), (7, 2, 2), (5, 8, 2)])
def test_every_sample_once_per_epoch_across_ranks(n, batch, world):
    samplers = [EpochSampler(n, batch, seed=3, rank=r, world_size=world) for r in range(world)]
    steps = 4 * n                                      # several epochs' worth
    stream = []
    for _ in range(steps):
        got = [s.next_batch() for s in samplers]
        assert all(len(g) == batch for g in got)       # fixed shapes on every rank
        stream += np.concatenate(got).tolist()
    epochs = len(stream) // n
    for e in range(epochs):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n)), e
    assert stream[:n] != stream[n:2 * n] or n < 3      # a new permutation per epoch
    # Validation passes: each rank's share of one epoch, together every sample once.
    shares = [np.concatenate(list(s.iter_epoch(1))) for s in samplers]
    assert sorted(np.concatenate(shares).tolist()) == list(range(n))


def test_sampler_is_deterministic_and_resumes_exactly():
    a = EpochSampler(11, 4, seed=7)
    first = [a.next_batch() for _ in range(5)]
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(6)]
    b = EpochSampler(11, 4, seed=7)
    assert all((x == y).all() for x, y in zip(first, [b.next_batch() for _ in range(5)]))
    c = EpochSampler(11, 4, seed=7)
    c.load_state_dict(json.loads(json.dumps(state)))   # the state survives JSON (checkpoints)
    assert all((x == y).all() for x, y in zip(rest, [c.next_batch() for _ in range(6)]))
    assert not (EpochSampler(11, 4, seed=8).next_batch() == first[0]).all()
    with pytest.raises(ValueError, match="seed"):
        EpochSampler(11, 4, seed=8).load_state_dict(state)


# ----------------------------------------------------------------------------- bad stores

def copy_store(src, dst):
    dst.mkdir()
    for name in (TOKENS, INDEX, META):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def edit_meta(folder, **changes):
    meta = json.loads((folder / META).read_text())
    meta.update(changes)
    (folder / META).write_text(json.dumps(meta))


def test_missing_meta_is_an_incomplete_store(tokens, tmp_path):
    bad = copy_store(tokens[0], tmp_path / "t")
    (bad / META).unlink()
    with pytest.raises(TokenStoreError, match="incomplete token store .no meta.json.") as e:
        TokenDataset(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    with pytest.raises(TokenStoreError, match="not a token store"):
        TokenDataset(tmp_path)


def test_tokens_bin_size_must_match_meta(tokens, tmp_path):
    bad = copy_store(tokens[0], tmp_path / "t")
    with open(bad / TOKENS, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(TokenStoreError, match="tokens.bin: holds .* bytes; meta.json says 6 rows"):
        TokenDataset(bad)


def test_vocabulary_must_fit_uint16(tokens, tmp_path):
    bad = copy_store(tokens[0], tmp_path / "t")
    edit_meta(bad, vocab=70000)
    with pytest.raises(TokenStoreError, match="vocabulary of 70000 tokens does not fit uint16"):
        TokenDataset(bad)


def test_map_shapes_must_sum_to_L(tokens, tmp_path):
    bad = copy_store(tokens[0], tmp_path / "t")
    edit_meta(bad, map_shapes=[[1, 1]])
    with pytest.raises(TokenStoreError, match="map shapes sum to 1"):
        TokenDataset(bad)


def test_another_tokenizer_checkpoint_is_refused(tokens, tmp_path):
    out, ckpt, store = tokens
    other = tiny_tokenizer(store, tmp_path / "other", steps=1)
    with pytest.raises(TokenStoreError, match="is not the one these tokens were exported with"):
        TokenDataset(out, tokenizer=other)
    assert TokenDataset(out, tokenizer=ckpt.parent).check_tokenizer(ckpt.parent) == ckpt   # run folder works


# The columns and types docs/token-store.md and docs/dataset-store.md promise (issue 27, part 3).
INDEX_COLUMNS = {"row": "int64", "id": "string", "label": "int64", "class_name": "string", "store_index": "int64"}
MANIFEST_COLUMNS = {"index": "int64", "id": "string", "path": "string", "member": "string", "label": "int64",
                    "class_name": "string", "problem": "string", "status": "string", "error": "string",
                    **{f"energy_{k}": "double" for k in (1, 2, 3)}, **{f"iterations_{k}": "int64" for k in (1, 2, 3)},
                    "shard_bytes": "int64", "seconds": "double", "backend": "string", "worker_host": "string",
                    "worker_pid": "int64"}


def test_index_and_manifest_open_without_nextdetail(tokens):
    """pyarrow, pandas and DuckDB read both Parquet files as documented; DuckDB joins them."""
    import pandas as pd
    import pyarrow.parquet as pq
    duckdb = pytest.importorskip("duckdb")

    out, _, store = tokens
    for path, columns in ((out / INDEX, INDEX_COLUMNS), (store / "manifest.parquet", MANIFEST_COLUMNS)):
        table = pq.read_table(path)
        assert {f.name: str(f.type) for f in table.schema} == columns, path
        df = pd.read_parquet(path)
        assert list(df.columns) == list(columns) and len(df) == table.num_rows > 0
        assert duckdb.sql(f"SELECT * FROM read_parquet('{path}')").fetchall() == [tuple(r.values())
                                                                                  for r in table.to_pylist()]
        types = {r[0]: r[1] for r in duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()}
        assert types == {k: {"int64": "BIGINT", "string": "VARCHAR", "double": "DOUBLE"}[v] for k, v in columns.items()}
    # Each token row's image, found in the decomposition store's manifest by store_index.
    joined = duckdb.sql(f"SELECT i.id = m.id AS same FROM '{out / INDEX}' i "
                        f"JOIN '{store / 'manifest.parquet'}' m ON i.store_index = m.index").fetchall()
    assert len(joined) == len(TokenDataset(out)) and all(same for (same,) in joined)
