"""Runs, token stores and model folders on object storage (a moto S3 server on 127.0.0.1, reached
only through the standard AWS environment variables): the same bytes as on a local disk.

A run on a URL trains in a local mirror and is synced at each checkpoint (nextdetail.run_mirror);
a token store on a URL is fetched once into the cache and memory-mapped (stores/tokens.py, fetch_token_store);
a model argument on a URL is fetched once (nextdetail.model_fetch)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nextdetail.cli import main
from nextdetail.runs import checkpoints
from nextdetail.stores.tokens import TOKENS, TokenDataset
from nextdetail.tokenize.train import train
from test_tokenize_train import cfg
from token_data import make_token_store, tiny_transformer


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """(tokens, tokenizer checkpoint, store) on the local disk: the reference."""
    return make_token_store(tmp_path_factory.mktemp("object-runs"), n=6)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTDETAIL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fs():
    import s3fs
    return s3fs.S3FileSystem()


def put(local_folder, url):
    """Upload a local folder (a run, a store) as it is: the same bytes on disk and in the bucket."""
    fs().put(str(local_folder), url.removeprefix("s3://"), recursive=True)
    return url


def tensors_equal(a: dict, b: dict, parts=("model", "disc", "opt", "rng")):
    for part in parts:
        x, y = a[part], b[part]
        flat_x, flat_y = torch.utils._pytree.tree_flatten(x)[0], torch.utils._pytree.tree_flatten(y)[0]
        assert len(flat_x) == len(flat_y), part
        for u, v in zip(flat_x, flat_y):
            assert (torch.equal(u, v) if torch.is_tensor(u) else u == v), part


def test_tokenizer_run_on_s3_equals_local_and_resumes_from_the_bucket(local, tmp_path, s3, cache, monkeypatch):
    _, _, store = local
    kw = dict(steps=4, ckpt_every=2, disc_start=3, lpips_weight=0.0)
    train(cfg(store, tmp_path / "disk", **kw))                       # the reference: 4 steps on disk
    url, data = s3.bucket + "/runs/tok", put(store, s3.bucket + "/store")    # --data and --out on s3
    train(cfg(data, url, **{**kw, "steps": 2}))                      # 2 steps into the bucket ...
    monkeypatch.setenv("NEXTDETAIL_CACHE", str(tmp_path / "other-node"))     # ... then on another machine
    report = train(cfg(data, url, **kw, resume=True))               # resumed from the bucket to 4
    assert str(report.out) == url
    names = sorted(p.removeprefix(url.removeprefix("s3://") + "/") for p in fs().find(url.removeprefix("s3://")))
    assert names[:4] == ["ckpt-0000002.pt", "ckpt-0000004.pt", "log.jsonl", "loss.png"], names
    assert all(n.startswith("tb/events.out.tfevents.") for n in names[4:]) and len(names) == 6   # no lock left
    with fs().open(url.removeprefix("s3://") + "/ckpt-0000004.pt") as f:
        a = torch.load(f, weights_only=True)
    b = torch.load(checkpoints(tmp_path / "disk")[-1], weights_only=True)
    assert a["step"] == b["step"] == 4
    tensors_equal(a, b, ("model", "disc", "model_ema", "map_seen", "rng") if "model_ema" in a else
                  ("model", "disc", "map_seen", "rng"))
    assert str(a["opt"]) == str(b["opt"]) and str(a["opt_d"]) == str(b["opt_d"])
    disk_log = [json.loads(s) for s in (tmp_path / "disk" / "log.jsonl").read_text().splitlines()]
    bucket_log = [json.loads(s) for s in fs().cat(url.removeprefix("s3://") + "/log.jsonl").decode().splitlines()]
    assert bucket_log == disk_log and [r["step"] for r in bucket_log] == [1, 2, 3, 4]
    # A new run may not write over a run in the bucket.
    with pytest.raises(Exception, match="already holds checkpoints"):
        train(cfg(data, url, **kw))


def test_token_store_on_s3_reads_back_the_same_tokens_from_a_cache(local, tmp_path, s3, cache):
    from nextdetail.pipelines.export import ExportConfig, export_in_process

    tokens, ckpt, store = local
    run_url = put(ckpt.parent, s3.bucket + "/tokenizer")              # the tokenizer run, in the bucket
    url = s3.bucket + "/tokens"
    export_in_process(ExportConfig(data=store, tokenizer=run_url, out=url))
    assert fs().cat(url.removeprefix("s3://") + "/" + TOKENS) == (tokens / TOKENS).read_bytes()
    assert not fs().exists(url.removeprefix("s3://") + "/_parts")
    ds, ref = TokenDataset(url, tokenizer=run_url), TokenDataset(tokens)
    assert ds.meta["tokenizer"]["checkpoint"] == f"{run_url}/{ckpt.name}"
    assert ds.meta["checksums"][TOKENS] == ref.meta["checksums"][TOKENS]
    idx = np.array([5, 0, 3, 3])
    assert torch.equal(ds.get_batch(idx)[0], ref.get_batch(idx)[0])
    s3.reset_counts()
    again = TokenDataset(url)                                         # a cache hit: meta.json only
    assert s3.requests["GET"] == 1 and s3.bytes_out < 2 * len(json.dumps(ds.meta, indent=2)), dict(s3.requests)
    assert again.path == ds.path and torch.equal(again.get_batch(idx)[0], ref.get_batch(idx)[0])


def test_export_tokens_ray_job_to_s3_writes_the_same_shards(local, ray_session, tmp_path, s3, cache):
    tokens, ckpt, store = local
    url, data, tok = s3.bucket + "/sharded", put(store, s3.bucket + "/store"), put(ckpt.parent, s3.bucket + "/tok")
    # Everything in the bucket: the workers read the store and fetch the tokenizer themselves.
    assert main(["export-tokens", "--data", data, "--tokenizer", tok, "--out", url,
                 "--shard-rows", "4", "--workers", "1"]) == 0
    ds = TokenDataset(url)
    assert [s["file"] for s in ds.meta["shards"]] == ["shards/tokens-00000.bin", "shards/tokens-00001.bin"]
    assert b"".join((ds.path / s["file"]).read_bytes() for s in ds.meta["shards"]) == (tokens / TOKENS).read_bytes()


def test_transformer_run_sample_and_model_folder_on_s3(local, tmp_path, s3, cache):
    tokens, ckpt, store = local
    tok_url, tokens_url = put(ckpt.parent, s3.bucket + "/tokenizer"), put(tokens, s3.bucket + "/tokens")
    run = tiny_transformer(tokens_url, tok_url, s3.bucket + "/run2", steps=2)
    disk = tiny_transformer(tokens, ckpt.parent, tmp_path / "run2", steps=2)
    with fs().open(run.removeprefix("s3://") + "/ckpt-0000002.pt") as f:
        a = torch.load(f, weights_only=True)
    b = torch.load(checkpoints(disk)[-1], weights_only=True)
    tensors_equal(a, b, ("model", "rng"))
    assert a["tokenizer"]["checkpoint"] == f"{tok_url}/{ckpt.name}" and a["data"]["tokens"] == tokens_url
    assert main(["export-model", run, "--out", s3.bucket + "/model"]) == 0
    for source, out in ((run, "from-run"), (s3.bucket + "/model", "from-folder")):
        assert main(["sample", source, "--out", f"{s3.bucket}/{out}", "--n", "1"]) == 0
    grid = [fs().cat(f"{s3.bucket.removeprefix('s3://')}/{o}/grid.png") for o in ("from-run", "from-folder")]
    assert grid[0] == grid[1]


def test_tokenizer_loader_streams_the_same_batches_from_s3(local, s3):
    from nextdetail.stores.decomposition import DecompositionStore
    from nextdetail.tokenize.loader import StoreLoader

    _, _, store = local
    url = put(store, s3.bucket + "/store")
    a = StoreLoader(DecompositionStore(store), 32, 2, seed=1, workers=1, buffer=3)
    s3.reset_counts()
    b = StoreLoader(DecompositionStore(url), 32, 2, seed=1, workers=1, buffer=3)
    for _ in range(4):                  # two epochs of 6 images
        assert torch.equal(a.next(), b.next())
