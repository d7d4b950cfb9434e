"""`nextdetail view` over HTTP (Starlette's TestClient, no browser): every page and picture of each
kind of source, what the pictures hold, caching headers, the refusals of paths outside the given
folders (.., absolute, symlinks, encoded forms: 404), a store being written, the Host guard, the
loopback default and its warning, and that nothing is written."""
from __future__ import annotations

import io
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from view_data import chain as make_chain

HOSTS = ["127.0.0.1", "localhost", "testserver"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return make_chain(tmp_path_factory)


@pytest.fixture(scope="module")
def paths(chain):
    return [chain.store, chain.tokens, chain.tokenizer, chain.transformer, chain.samples, chain.edit, chain.eval,
            chain.model, chain.npz]


def client_for(paths, tokenizer=None, per_page=60):
    from starlette.testclient import TestClient

    from nextdetail.view.app import create_app
    from nextdetail.view.sources import open_sources

    return TestClient(create_app(open_sources(paths, tokenizer), allowed_hosts=HOSTS, tokenizer=tokenizer,
                                 per_page=per_page))


@pytest.fixture(scope="module")
def client(paths):
    return client_for(paths)


def png(response) -> np.ndarray:
    assert response.status_code == 200, response.text[:300]
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_every_page_answers_with_html_and_security_headers(client, paths):
    urls = ["/", *[f"/s/{n}" for n in range(len(paths))], "/s/0/image/0", "/s/0/image/5", "/s/1/row/0",
            "/s/0?status=error", "/s/0?sort=energy_1", "/s/0?class=&label=1&page=0", "/static/style.css"]
    for url in urls:
        r = client.get(url)
        assert r.status_code == 200, (url, r.text[:500])
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "script-src" not in r.headers["content-security-policy"]      # default-src 'none': no scripts
    home = client.get("/").text
    for phrase in ("a decomposition store", "a token store", "a tokenizer run", "a transformer run",
                   "a samples folder", "an ADM sample batch"):
        assert phrase in home


def test_store_grid_filters_sorts_and_pages(chain, paths):
    import pyarrow.parquet as pq

    c = client_for(paths, per_page=2)
    assert c.get("/s/0").text.count('class="tile') == 2
    second = c.get("/s/0?page=1").text
    assert "/s/0/image/2?" in second and "/s/0/image/3?" in second and "/s/0/image/0?" not in second
    assert "page 2 of 3" in second
    assert "page 3 of 3" in c.get("/s/0?page=99").text            # past the end: the last page
    errors = c.get("/s/0?status=error").text
    assert errors.count('class="tile') == 1 and "/s/0/image/5?" in errors and "not an image" in errors
    labelled = c.get("/s/0?label=1&page=0").text                   # labels 0,1,0,1,0,1: rows 1, 3
    assert "/s/0/image/1?" in labelled and "/s/0/image/3?" in labelled and "rows 1–2 of 3 matching" in labelled
    energy = pq.read_table(chain.store / "manifest.parquet").column("energy_1").to_pylist()
    hardest = sorted((e, i) for i, e in enumerate(energy) if e is not None)[::-1]
    top = c.get("/s/0?sort=energy_1").text
    assert top.index(f"/s/0/image/{hardest[0][1]}?") < top.index(f"/s/0/image/{hardest[1][1]}?")
    assert "of 5" in top                                           # the error row has no energy
    assert "no rows match" in c.get("/s/0?status=pending").text


def test_store_pictures_are_the_stored_layers(chain, client):
    from nextdetail.pipelines import DecompositionStore
    from nextdetail.viz import detail_scale, detail_to_uint8

    q = DecompositionStore(chain.store).quantized(1)              # ok image 1 is manifest row 1
    assert (png(client.get("/s/0/layer/1/I.png")) == np.moveaxis(q[0], 0, -1)).all()
    assert (png(client.get("/s/0/layer/1/B_3.png")) == np.moveaxis(q[3], 0, -1)).all()
    d1 = np.moveaxis((q[0].astype(np.float32) - q[1]) / 255, 0, -1)
    assert (png(client.get("/s/0/layer/1/D_1.png")) == detail_to_uint8(d1, detail_scale(d1))).all()
    page = client.get("/s/0/image/1").text
    assert f"±{detail_scale(d1):.2g}" in page and "energy_1" in page
    thumb = client.get("/s/0/thumb/1.webp")
    assert thumb.headers["content-type"] == "image/webp" and max(png(thumb).shape[:2]) <= 128
    tag = thumb.headers["etag"]
    assert "max-age" in thumb.headers["cache-control"]
    assert client.get("/s/0/thumb/1.webp", headers={"if-none-match": tag}).status_code == 304
    for url in ("/s/0/layer/5/I.png", "/s/0/layer/1/X_9.png", "/s/0/image/6", "/s/0/thumb/6.webp", "/s/9",
                "/s/1/image/0"):
        assert client.get(url).status_code == 404, url
    error_page = client.get("/s/0/image/5").text
    assert "Why it failed" in error_page and "/layer/5/" not in error_page


def test_token_pages_draw_maps_and_codebook_usage(chain, client):
    from nextdetail.info_facts import TokenRows
    from nextdetail.view.images import palette

    tokens = TokenRows(chain.tokens)
    overview = client.get("/s/1").text
    assert overview.count('<svg class="hist"') == len(tokens.map_shapes) and "codes used" in overview
    codes = tokens.maps(tokens.rows([2])[0])[0]
    pic = png(client.get("/s/1/map/2/0.png"))
    k = pic.shape[0] // codes.shape[0]
    assert (pic[::k, ::k] == palette(tokens.vocab)[codes]).all()
    row = client.get("/s/1/row/2").text
    assert "--tokenizer" in row and "/s/1/recon/" not in row
    assert client.get("/s/1/recon/2/1.png").status_code == 404         # no tokenizer given
    assert client.get(f"/s/1/map/2/{len(tokens.map_shapes)}.png").status_code == 404


def test_with_its_tokenizer_each_depth_is_decoded(chain, tmp_path):
    from nextdetail.stores.tokens import TokenStoreError
    from nextdetail.view.sources import open_sources

    c = client_for([chain.tokens], tokenizer=chain.tokenizer)
    assert "/s/0/recon/0/1.png" in c.get("/s/0/row/0").text
    m = len(c.app.state.sources[0].adapter.tokens.map_shapes)
    assert png(c.get(f"/s/0/recon/0/{m}.png")).shape[2] == 3
    assert c.get(f"/s/0/recon/0/{m + 1}.png").status_code == 404
    other = tmp_path / "other.pt"
    other.write_bytes(chain.checkpoint.read_bytes() + b"\0")
    with pytest.raises(TokenStoreError, match="not the tokenizer these tokens were exported with"):
        open_sources([chain.tokens], other)


def test_run_and_output_pages(chain, client):
    tok = client.get("/s/2").text
    assert "/s/2/chart/losses.png" in tok and "/s/2/chart/perplexity.png" in tok
    assert "/s/2/chart/usage.png" not in tok            # 2 steps: no codebook usage logged yet
    assert png(client.get("/s/2/chart/losses.png")).shape[1] == 720       # charts drawn by matplotlib
    transformer = client.get("/s/3").text
    assert "/s/3/chart/losses.png" in transformer and "/s/3/chart/maps.png" in transformer
    assert client.get("/s/3/chart/nothing.png").status_code == 404
    samples = client.get("/s/4").text
    assert "/s/4/file/sample_000.png" in samples and "+D_1" in samples
    assert png(client.get("/s/4/file/grid.png")).shape == (32, 32, 3)
    assert "new albedo 2" in client.get("/s/5").text
    evals = client.get("/s/6").text
    assert "/s/6/chart/depth-mse.png" in evals and "depth-lpips" not in evals       # lpips is nan throughout
    assert png(client.get("/s/6/chart/depth-psnr.png")).size
    assert "The model card." in client.get("/s/7").text
    batch = client.get("/s/8").text
    assert "/s/8/npz/4.png" in batch and "class 4" in batch
    assert png(client.get("/s/8/npz/4.png")).shape == (32, 32, 3)
    assert client.get("/s/8/npz/5.png").status_code == 404


def asgi_status(app, path: str) -> int:
    """GET `path` exactly as given (the test client would resolve a literal `..` itself)."""
    import anyio

    sent = []

    async def run():
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)

    anyio.run(run)
    return sent[0]["status"]


def test_paths_outside_the_given_folders_are_404(chain, tmp_path):
    from nextdetail.view.safety import safe_file

    folder = tmp_path / "samples"
    shutil.copytree(chain.samples, folder)
    secret = tmp_path / "secret.png"
    shutil.copy(folder / "grid.png", secret)
    (folder / "out.png").symlink_to(secret)                      # a symlink out of the tree
    (folder / "in.png").symlink_to(folder / "grid.png")          # and one inside it
    (folder / ".hidden.png").write_bytes(secret.read_bytes())
    c = client_for([folder])
    assert c.get("/s/0/file/grid.png").status_code == 200
    assert c.get("/s/0/file/in.png").status_code == 200
    refused = ["/s/0/file/out.png", "/s/0/file/%2e%2e/secret.png", "/s/0/file/%2E%2E/secret.png",
               "/s/0/file/..%2fsecret.png", "/s/0/file/%2e%2e%2fsecret.png", f"/s/0/file/%2f{secret}",
               f"/s/0/file/{str(secret).replace('/', '%2f')}", "/s/0/file/.hidden.png", "/s/0/file/samples.json",
               "/s/0/file/%252e%252e/secret.png", "/s/0/file/grid.png%00.png", "/s/0/file/x/..%5c..%5csecret.png",
               "/s/0/file/"]
    for url in refused:
        assert c.get(url).status_code == 404, url
    for raw in ("/s/0/file/../secret.png", "/s/0/file/./../secret.png", f"/s/0/file/{secret}",
                f"/s/0/file//{secret}", "/s/0/file/sub/../../secret.png"):
        assert asgi_status(c.app, raw) == 404, raw
    for rel in ("../secret.png", "/etc/passwd", "a/../../secret.png", "out.png", ".hidden.png", "grid.png/..",
                "..\\secret.png", "grid.png\0"):
        assert safe_file(folder, rel) is None, rel
    assert safe_file(folder, "grid.png") == (folder / "grid.png").resolve()


def test_host_guard_and_bad_requests(client):
    assert client.get("/", headers={"host": "evil.example"}).status_code == 400       # DNS rebinding
    assert client.get("/s/0?page=-3&label=x&sort=rm%20-rf&status=bogus").status_code == 200


def test_a_store_being_written_is_shown_as_it_stands(chain, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(chain.store, store)
    (store / "meta.json").unlink()
    c = client_for([store])
    page = c.get("/s/0").text
    assert "Being written" in page and "/s/0/thumb/0.webp" in page
    assert png(c.get("/s/0/thumb/0.webp")).size
    shutil.copy(chain.store / "meta.json", store / "meta.json")           # the job finishes: reopened
    assert "Being written" not in c.get("/s/0").text


def test_view_command_binds_loopback_warns_on_other_hosts_and_refuses_unknown_paths(chain, tmp_path, monkeypatch,
                                                                                    capsys, caplog):
    import uvicorn

    from nextdetail.cli import main

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.append(sockets[0].getsockname()))
    before = snapshot(chain.store)
    with caplog.at_level(logging.WARNING):
        assert main(["view", str(chain.store), str(chain.tokens)]) == 0
    out = capsys.readouterr().out
    assert served[-1][0] == "127.0.0.1" and f"http://127.0.0.1:{served[-1][1]}/" in out
    assert not [r for r in caplog.records if "reachable from other machines" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        assert main(["view", str(chain.store), "--host", "0.0.0.0"]) == 0
    assert served[-1][0] == "0.0.0.0"
    assert [r for r in caplog.records if "reachable from other machines" in r.getMessage()]
    (tmp_path / "notes").mkdir()
    assert main(["view", str(chain.store), str(tmp_path / "notes")]) == 2
    assert "notes: an empty folder, not a decomposition store" in capsys.readouterr().err
    assert len(served) == 2                                                # refused before binding
    assert snapshot(chain.store) == before and not (chain.store / ".nextdetail.lock").exists()


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*") if p.is_file())


def test_the_viewer_writes_nothing(chain, client, paths):
    before = {p: snapshot(p) if p.is_dir() else p.stat().st_mtime_ns for p in paths}
    for url in ("/s/0", "/s/0/image/1", "/s/0/thumb/2.webp", "/s/1", "/s/2/chart/losses.png", "/s/8/npz/0.png"):
        assert client.get(url).status_code == 200
    assert before == {p: snapshot(p) if p.is_dir() else p.stat().st_mtime_ns for p in paths}
    assert not any(os.path.exists(p / ".nextdetail.lock") for p in paths if p.is_dir())


def test_info_and_view_read_a_bucket_in_place_or_through_the_cache(chain, s3):
    """Once on object storage (issue 26): the store is read in place, by range; the token store
    and the run are fetched into the cache (the run without its checkpoints). The pages and
    pictures are the local ones."""
    import s3fs

    from nextdetail.info import inspect

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    bucket = s3.bucket[len("s3://"):]
    for name, local in (("store", chain.store), ("tokens", chain.tokens), ("tok", chain.tokenizer)):
        fs.put(str(local), f"{bucket}/{name}", recursive=True)
    urls = [f"{s3.bucket}/store", f"{s3.bucket}/tokens", f"{s3.bucket}/tok"]
    for url, local in zip(urls, (chain.store, chain.tokens, chain.tokenizer)):
        remote, here = inspect(url), inspect(local)
        assert remote.kind == here.kind
        assert {k: v for k, v in remote.facts.items() if k != "lock"} == \
               {k: v for k, v in here.facts.items() if k != "lock"}
    s3.reset_counts()
    remote, local = client_for(urls), client_for([chain.store, chain.tokens, chain.tokenizer])
    for url in ("/s/0", "/s/0/image/1", "/s/1", "/s/1/row/0", "/s/2"):
        assert remote.get(url).status_code == 200, url
    for url in ("/s/0/thumb/1.webp", "/s/0/layer/1/B_2.png", "/s/0/layer/1/D_1.png", "/s/1/map/0/0.png"):
        assert (png(remote.get(url)) == png(local.get(url))).all(), url
    assert s3.requests["PUT"] == 0 and s3.requests["DELETE"] == 0          # read-only
