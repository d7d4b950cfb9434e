"""No input stalls a job: an image (or a token block) whose worker process dies every time is
given up on after --max-attempts and the job ends with exit status 1; symlinked class folders
are followed and a symlink cycle is refused in one line; an image over --max-pixels is an error
row, never decoded. The crashes come from a test-only hook (NEXTDETAIL_TEST_CRASH_ON) that
makes a worker call os._exit on a named input, as an out-of-memory kill would."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from nextdetail import cli
from nextdetail.imageio import ImageError, list_images, load_image
from nextdetail.pipelines import DecompositionStore, list_sources
from nextdetail.pipelines.attempts import CRASH_HOOK_ENV, AttemptJournal
from nextdetail.pipelines.encode_worker import PARTS
from nextdetail.stores.tokens import META, TOKENS
from pipeline_data import listing, photo_paths, synthetic_photo
from token_data import make_token_store
from conftest import own_lines

FAST = ["--order", "2", "--n-iter", "10", "--backend", "numba", "--size", "32"]


def test_attempt_journal_counts_deaths_not_failures(tmp_path):
    j = AttemptJournal(tmp_path / "j.log")
    with j.attempt("a"):
        pass
    with pytest.raises(ValueError), j.attempt("b"):      # an exception is not a death
        raise ValueError
    j._write("start c")                                   # the process "died" inside c
    j._file.close()
    j._file = None
    with open(tmp_path / "j.log", "a") as f:
        f.write("start c\nsta")                           # died again, mid-line on the next start
    again = AttemptJournal(tmp_path / "j.log")
    assert (again.deaths("a"), again.deaths("b"), again.deaths("c"), again.deaths("d")) == (0, 0, 2, 0)
    assert again.died_before
    again.drop()
    assert not (tmp_path / "j.log").exists()


def test_an_image_that_kills_its_worker_becomes_an_error_row(ray_session, tmp_path, capsys, monkeypatch):
    photos = photo_paths(5, tmp_path)
    killer = tmp_path / "crash-me.png"
    synthetic_photo(killer, 99, size=40)
    paths = photos[:2] + [killer] + photos[2:]
    store = tmp_path / "store"
    monkeypatch.setenv(CRASH_HOOK_ENV, "crash-me")
    rc = cli.main(["decompose-dataset", str(listing(paths, tmp_path / "l.txt")), "--out", str(store),
                   "--workers", "1", "--batch-size", "3", "--shard-images", "3", "--max-attempts", "2", *FAST])
    out, err = capsys.readouterr()
    assert rc == 1, err
    assert "6 images: 5 ok, 1 error" in out
    manifest = DecompositionStore(store).manifest.set_index("path")
    row = manifest.loc[str(killer)]
    assert row["status"] == "error"
    assert "worker process died 2 times while reading this image" in row["error"] and "--max-attempts 2" in row["error"]
    assert (manifest.drop(index=str(killer))["status"] == "ok").all()
    assert not (store / PARTS).exists()                                        # journals cleaned up
    # The hook gone (the file "fixed"), a rerun redoes the error row's shard and completes the store.
    monkeypatch.delenv(CRASH_HOOK_ENV)
    assert cli.main(["decompose-dataset", str(tmp_path / "l.txt"), "--out", str(store), "--workers", "1",
                     "--batch-size", "3", "--shard-images", "3", *FAST]) == 0
    assert "6 images: 6 ok, 0 error (3 already done)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def export_inputs(tmp_path_factory):
    reference, ckpt, store = make_token_store(tmp_path_factory.mktemp("limits"), n=8, size=32)
    return store, ckpt, reference


def test_a_block_that_kills_its_worker_is_given_up_and_the_rest_kept(ray_session, export_inputs, tmp_path,
                                                                     capsys, monkeypatch):
    store, ckpt, reference = export_inputs
    victim = DecompositionStore(store).id(5)                   # row 5: block 2 of blocks of 2 rows
    out = tmp_path / "tokens"
    argv = ["export-tokens", "--data", str(store), "--tokenizer", str(ckpt), "--out", str(out),
            "--workers", "1", "--block-rows", "2", "--max-attempts", "2"]
    monkeypatch.setenv(CRASH_HOOK_ENV, victim)
    assert cli.main(argv) == 1
    printed = capsys.readouterr().out
    assert "1 blocks FAILED (e.g. block 2, rows 4..5: the worker process died 2 times while encoding block 2" \
        in printed, printed
    assert not (out / META).exists() and not (out / TOKENS).exists()          # not finished
    assert sorted(p.name for p in (out / PARTS).glob("block-*")) == \
        ["block-000000.bin", "block-000001.bin", "block-000002.failed", "block-000003.bin"]
    monkeypatch.delenv(CRASH_HOOK_ENV)
    assert cli.main(argv) == 0                                                 # the rerun tries it again
    assert "(6 already done)" in capsys.readouterr().out
    assert (out / TOKENS).read_bytes() == (reference / TOKENS).read_bytes()


def test_symlinked_class_folders_and_files_are_followed(tmp_path):
    real = tmp_path / "real"
    for cls in ("cat", "dog"):
        for i in range(2):
            synthetic_photo(real / cls / f"{i}.png", i, size=16)
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(real / "cat", src / "cat")                                      # a linked class folder
    (src / "dog").mkdir()
    for i in range(2):
        os.symlink(real / "dog" / f"{i}.png", src / "dog" / f"{i}.png")       # linked files
    os.symlink(tmp_path / "nowhere.png", src / "dog" / "dangling.png")         # skipped
    sources = list_sources(src)
    assert [(s.id, s.label, s.class_name) for s in sources] == \
        [("cat/0.png", 0, "cat"), ("cat/1.png", 0, "cat"), ("dog/0.png", 1, "dog"), ("dog/1.png", 1, "dog")]
    assert load_image(sources[0].path).shape == (16, 16, 3)


def test_a_symlink_cycle_is_refused_in_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    synthetic_photo(src / "cat" / "0.png", 0, size=16)
    os.symlink(src, src / "cat" / "loop")                                      # cat/loop -> src
    rc = cli.main(["decompose-dataset", str(src), "--out", str(tmp_path / "store"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2
    lines = own_lines(err)
    assert len(lines) == 1 and "symlink cycle" in lines[0] and "cat/loop" in lines[0], lines
    assert not (tmp_path / "store").exists()
    with pytest.raises(ValueError, match="symlink cycle"):
        list_images([src])


def test_an_image_over_the_pixel_limit_is_refused_undecoded(tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    with pytest.raises(ImageError, match=r"300 x 200 = 60,000 pixels is over the limit of 50,000"):
        load_image(big, 32, max_pixels=50_000)
    assert load_image(big, 32, max_pixels=60_000).shape == (32, 32, 3)
    # A bomb: a PNG header declaring 100000 x 100000 pixels in a few hundred bytes.
    bomb = tmp_path / "bomb.png"
    _png_header(bomb, 100_000, 100_000)
    with pytest.raises(ImageError, match="10,000,000,000 pixels is over the limit of 89,478,485"):
        load_image(bomb, 32)
    # In a job, the image is an error row naming the limit.
    from nextdetail.pipelines.decompose_worker import read_batch

    batch = read_batch({"index": np.array([0, 1]), "path": np.array([str(big), str(bomb)], object)}, 32,
                       max_pixels=50_000)
    assert "300 x 200 = 60,000 pixels is over the limit of 50,000" in batch["error"][0]
    assert "10,000,000,000 pixels is over the limit of 50,000" in batch["error"][1]


def _png_header(path, w: int, h: int) -> None:
    """A PNG whose IHDR declares w x h (1-bit grey) and whose data is one empty zlib stream."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_a_journal_left_by_a_killed_worker_is_not_read_as_a_part(tmp_path):
    """A worker killed mid-batch leaves its attempt journal beside the journal parts; the
    resume and the finish read the parts as a Parquet dataset, which must skip it. (Once named
    `attempts/`, it made a rerun after a killed driver fail intermittently.)"""
    from nextdetail.decomp import ATParams
    from nextdetail.pipelines import StoreParams
    from nextdetail.pipelines.attempts import ATTEMPTS
    from nextdetail.pipelines.decompose_worker import DecomposeWorker
    from nextdetail.stores.store_plan import finish_store
    from pipeline_data import merged_manifest, plan_sources, prepare_store, shard_rows, solve_shards

    params = StoreParams(order=2, size=16, at=ATParams(n_iter=2), backend="numpy", shard_images=2)
    src = list_sources(listing(photo_paths(3, tmp_path), tmp_path / "l.txt"))
    plan = prepare_store(tmp_path / "store", params, src, overwrite=False)
    solve_shards(plan, DecomposeWorker(str(tmp_path / "store"), params.to_dict(), run=plan.run, batch_size=2,
                                       read_size=16), shard_rows(plan)[:1])
    left = tmp_path / "store" / PARTS / f"run-{plan.run:04d}" / ATTEMPTS / "shard-0000001.log"
    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_text("start read:2\n")                                   # its worker died here
    assert merged_manifest(tmp_path / "store", params, 3)["status"].tolist() == ["ok", "ok", "pending"]
    plan = prepare_store(tmp_path / "store", params, src, overwrite=False)   # the rerun
    assert plan.shards == [1] and plan.todo == 1 and [s.index for s in plan_sources(plan, 1)] == [2]
    solve_shards(plan, DecomposeWorker(str(tmp_path / "store"), params.to_dict(), run=plan.run, batch_size=2,
                                       read_size=16))
    assert finish_store(plan, src="l.txt") == {"images": 3, "ok": 3, "error": 0}
