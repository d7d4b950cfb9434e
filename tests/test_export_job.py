"""`nextdetail export-tokens`: the Ray job writes the same bytes as the in-process export, a
finished store is not redone, a driver killed mid-way resumes to the same store, and bad
inputs are refused in one line without touching what is there."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from nextdetail import cli
from nextdetail.pipelines.encode_worker import PARTS
from nextdetail.pipelines.export import ExportConfig, export_in_process
from nextdetail.train import TokenDataset
from nextdetail.stores.tokens import INDEX, META, TOKENS
from pipeline_data import make_store
from token_data import near_tie_checkpoint, tiny_tokenizer
from conftest import kill_cli_when, own_lines



@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 64 px store of 40 images and a ch=32 tokenizer: ~25 ms per image to encode on one
    thread, so a one-worker export of one-image blocks lasts about a second after start-up."""
    tmp = tmp_path_factory.mktemp("export")
    store = make_store(tmp / "store", n=40, size=64, order=3)
    ckpt = tiny_tokenizer(store, tmp / "tokenizer", image_size=64, steps=1, ch=32)
    reference = tmp / "reference"
    export_in_process(ExportConfig(data=store, tokenizer=ckpt, out=reference))
    return store, ckpt, reference


def args(store, ckpt, out, *extra):
    return ["export-tokens", "--data", str(store), "--tokenizer", str(ckpt), "--out", str(out), *map(str, extra)]


def same_store(out: Path, reference: Path):
    for name in (TOKENS, INDEX):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (out / PARTS).exists()


def test_ray_job_equals_the_in_process_export(ray_session, inputs, tmp_path, capsys):
    store, ckpt, reference = inputs
    out = tmp_path / "tokens"
    assert cli.main(args(store, ckpt, out, "--workers", "2", "--block-rows", "3", "--batch-size", "2")) == 0
    summary = capsys.readouterr().out
    assert "40 images x" in summary and "in 14 blocks" in summary and "on 2 cpu workers" in summary
    same_store(out, reference)
    ds = TokenDataset(out, tokenizer=ckpt)
    assert ds.meta["tokenizer"]["sha256"] == TokenDataset(reference).meta["tokenizer"]["sha256"]
    assert ds.meta["encode"] == [{**ds.meta["encode"][0], "device": "cpu", "threads": 1, "micro_batch": 1}]
    # A finished store: the same command has nothing left to do and changes nothing.
    before = (out / META).read_bytes()
    assert cli.main(args(store, ckpt, out, "--workers", "2", "--block-rows", "3")) == 0
    assert "(40 already done)" in capsys.readouterr().out
    assert (out / META).read_bytes() == before


def test_gpu_plan_read_tasks_feeding_the_actors_gives_the_same_store(ray_session, inputs, tmp_path):
    """The GPU path (CPU tasks read and crop the blocks, actors only encode) run with CPU actors:
    the same code path as on GPUs, the same bytes as the in-process export."""
    from nextdetail.pipelines.export import run_export

    store, ckpt, reference = inputs
    report = run_export(ExportConfig(data=store, tokenizer=ckpt, out=tmp_path / "tokens", workers=1, block_rows=7),
                        read_tasks=True)
    assert report.processed == 40 and report.device == "cpu"
    same_store(tmp_path / "tokens", reference)


def test_token_bytes_do_not_depend_on_batching_workers_or_threads(ray_session, inputs, tmp_path):
    """A codebook whose codes all lie within 1e-5 of each other: nearly every token is decided
    in the 6th digit of a distance, so any float difference between batchings, thread counts or
    processes shows as flipped tokens (before fixed micro-batches, 27 of 40 rows differed).
    Each batching is run three times (Ray schedules blocks onto actors differently each time)."""
    import torch

    store, ckpt, _ = inputs
    ckpt = near_tie_checkpoint(ckpt, tmp_path / "ties.pt")
    reference = tmp_path / "reference"
    export_in_process(ExportConfig(data=store, tokenizer=ckpt, out=reference))
    threads = torch.get_num_threads()
    try:
        for repeat in range(3):
            torch.set_num_threads(1 + repeat)              # the caller's threads must not matter
            out = tmp_path / f"in-process-{repeat}"
            export_in_process(ExportConfig(data=store, tokenizer=ckpt, out=out, batch_size=5 + repeat,
                                           block_rows=7 + repeat))
            same_store(out, reference)
            assert torch.get_num_threads() == 1 + repeat       # given back to the caller
            for batch, workers in ((1, 1), (2, 2), (7, 1), (32, 2)):
                out = tmp_path / f"ray-{repeat}-{batch}-{workers}"
                assert cli.main(args(store, ckpt, out, "--batch-size", batch, "--workers", workers,
                                     "--block-rows", 9 + 4 * repeat)) == 0
                same_store(out, reference)
    finally:
        torch.set_num_threads(threads)


def test_sharded_ray_export(ray_session, inputs, tmp_path):
    store, ckpt, reference = inputs
    out = tmp_path / "tokens"
    assert cli.main(args(store, ckpt, out, "--workers", "2", "--shard-rows", "16")) == 0
    ds, ref = TokenDataset(out), TokenDataset(reference)
    assert [s["rows"] for s in ds.meta["shards"]] == [16, 16, 8]
    idx = list(range(39, -1, -3))
    assert ds.get_batch(idx)[0].equal(ref.get_batch(idx)[0])


def test_bad_inputs_are_refused_in_one_line(inputs, tmp_path, capsys):
    store, ckpt, reference = inputs
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    cases = [(args(store, ckpt, foreign), "is not a token store"),
             (args(tmp_path, ckpt, tmp_path / "t1"), "not a decomposition store"),
             (args(store, tmp_path / "nothing", tmp_path / "t2"), "no checkpoint"),
             (args(store, ckpt, tmp_path / "t3", "--block-rows", "0"), "--block-rows must be an integer >= 1")]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(own_lines(err)) == 1, err
    assert (foreign / "notes.txt").read_text() == "mine\n"


def test_another_tokenizer_is_refused_unless_overwrite(inputs, tmp_path, capsys):
    store, ckpt, reference = inputs
    out = tmp_path / "tokens"
    export_in_process(ExportConfig(data=store, tokenizer=ckpt, out=out))
    other = tiny_tokenizer(store, tmp_path / "other", image_size=64, steps=1, ch=8)
    assert cli.main(args(store, other, out)) == 2
    assert "exported from another tokenizer checkpoint" in capsys.readouterr().err
    same_store(out, reference)                                  # nothing lost
    export_in_process(ExportConfig(data=store, tokenizer=other, out=out, overwrite=True))
    assert TokenDataset(out, tokenizer=other).L == TokenDataset(reference).L


def test_driver_killed_mid_way_then_rerun_equals_uninterrupted(ray_session, inputs, tmp_path, capsys):
    store, ckpt, reference = inputs
    out = tmp_path / "tokens"
    argv = args(store, ckpt, out, "--workers", "1", "--block-rows", "1", "--batch-size", "1")
    parts = lambda: list((out / PARTS).glob("block-*.bin")) if (out / PARTS).is_dir() else []  # noqa: E731
    kill_cli_when(argv, lambda: len(parts()) >= 3, "export")
    time.sleep(1)
    assert not (out / META).exists(), "the kill came too late: the export had finished"
    done = len(parts())
    assert 0 < done < 40
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"resuming: {done} images already exported" in err
    same_store(out, reference)


def test_sigterm_stops_the_export_in_one_line_and_a_rerun_equals_uninterrupted(ray_session, inputs, tmp_path, capsys):
    """Preemption: exit 143, one line, no Ray stack dump; the rerun finishes the same bytes."""
    store, ckpt, reference = inputs
    out = tmp_path / "tokens"
    argv = args(store, ckpt, out, "--workers", "1", "--block-rows", "1", "--batch-size", "1")
    parts = lambda: list((out / PARTS).glob("block-*.bin")) if (out / PARTS).is_dir() else []  # noqa: E731
    rc, err = kill_cli_when(argv, lambda: len(parts()) >= 2, "export", sig=signal.SIGTERM)
    assert rc == 143 and "stopped by SIGTERM; rerun the same command to resume" in err, err
    assert "SIGTERM received" not in err and "Traceback" not in err, err
    time.sleep(1)
    assert not (out / META).exists(), "the signal came too late: the export had finished"
    assert cli.main(argv) == 0
    capsys.readouterr()
    same_store(out, reference)


def encode_actor_pids():
    """PIDs of live Ray actor processes running EncodeWorker (from their process titles)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"EncodeWorker" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the actor through /proc")
def test_killed_worker_is_restarted_and_its_block_redone(ray_session, inputs, tmp_path):
    import threading

    from nextdetail.pipelines.export import run_export

    store, ckpt, reference = inputs
    out = tmp_path / "tokens"
    cfg = ExportConfig(data=store, tokenizer=ckpt, out=out, workers=2, block_rows=1, batch_size=1)
    result = {}
    job = threading.Thread(target=lambda: result.update(report=run_export(cfg)), daemon=True)
    job.start()
    deadline = time.monotonic() + 240
    while not ((out / PARTS).is_dir() and list((out / PARTS).glob("block-*.bin"))):
        assert job.is_alive(), "the export ended before a worker could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victims = encode_actor_pids()
    assert victims, "no EncodeWorker process found"
    os.kill(victims[0], signal.SIGKILL)
    assert not (out / META).exists(), "the kill came too late: the export had finished"
    job.join(timeout=240)
    assert not job.is_alive() and result["report"].processed == 40
    same_store(out, reference)


def test_meta_json_is_o1_in_n_and_reads_a_0_1_plan(inputs, tmp_path):
    """The plan records the rows' store indices as a digest (they are in index.parquet), so
    meta.json does not grow with N; a plan written by 0.1, which listed them, still matches."""
    import json

    from nextdetail.pipelines.export_plan import indices_digest
    from nextdetail.stores.decomposition import DecompositionStore

    store, ckpt, reference = inputs
    out = tmp_path / "tokens"
    export_in_process(ExportConfig(data=store, tokenizer=ckpt, out=out))
    meta = json.loads((out / META).read_text())
    ok = DecompositionStore(store).ok_indices
    assert meta["plan"]["store_indices_sha256"] == indices_digest(ok) and "store_indices" not in meta["plan"]
    old = dict(meta, plan={k: v for k, v in meta["plan"].items() if k != "store_indices_sha256"})
    old["plan"]["store_indices"] = [int(i) for i in ok]
    (out / META).write_text(json.dumps(old))
    report = export_in_process(ExportConfig(data=store, tokenizer=ckpt, out=out))
    assert report.skipped == 40 and report.processed == 0
