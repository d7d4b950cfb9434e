"""Issue 24, part 1: what cannot work is refused before any work, in one line, exit 2.

- every command against each wrong kind of folder (a decomposition store, a token store, a
  tokenizer run, a transformer run, an empty folder, a random file);
- every command with an option that cannot fit in memory (estimated on torch's meta device);
- every kind of bad number (nan, inf, negative, zero where it must be positive).

All in-process through `cli.main` on one set of tiny real outputs (module fixture): seconds, and
the estimates allocate nothing, so "cannot fit" costs no memory.
"""
from __future__ import annotations

import resource
from contextlib import contextmanager
from pathlib import Path

import pytest

from nextdetail import cli
from conftest import own_lines
from token_data import make_token_store, tiny_transformer


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """One folder of each kind, and a photo for the commands that take images."""
    from PIL import Image
    import numpy as np

    tmp = tmp_path_factory.mktemp("kinds")
    tokens, ckpt, store = make_token_store(tmp, n=4)
    run2 = tiny_transformer(tokens, ckpt, tmp / "run2", steps=2)
    (tmp / "empty").mkdir()
    (tmp / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp / "photos").mkdir()
    photo = tmp / "photos" / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(photo)
    return {"store": store, "tokens": tokens, "tokenizer": ckpt.parent, "transformer": run2,
            "empty": tmp / "empty", "file": tmp / "random.bin", "photo": photo, "tmp": tmp}


def run(capsys, argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(capsys, argv, *words, status=2):
    rc, out, err = run(capsys, argv)
    lines = own_lines(err)
    assert rc == status, (argv, rc, err)
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    for w in words:
        assert w in lines[0], (argv, lines[0], w)
    return lines[0]


# --------------------------------------------------------------------------- wrong kinds of folder

WRONG = ("store", "tokens", "tokenizer", "transformer", "empty", "file")

# command -> (argv with {X} where the folder under test goes, the kind it needs)
COMMANDS = {
    "train-tokenizer --data": (["train-tokenizer", "--data", "{X}", "--out", "{new}", "--steps", "1",
                                "--lpips-weight", "0"], "store"),
    "eval-tokenizer RUN": (["eval-tokenizer", "{X}", "--data", "{store}", "--out", "{new}", "--no-lpips",
                            "--no-rfid"], "tokenizer"),
    "eval-tokenizer --data": (["eval-tokenizer", "{tokenizer}", "--data", "{X}", "--out", "{new}", "--no-lpips",
                               "--no-rfid"], "store"),
    "export-tokens --data": (["export-tokens", "--data", "{X}", "--tokenizer", "{tokenizer}", "--out", "{new}"],
                             "store"),
    "export-tokens --tokenizer": (["export-tokens", "--data", "{store}", "--tokenizer", "{X}", "--out", "{new}"],
                                  "tokenizer"),
    "train --tokens": (["train", "--tokens", "{X}", "--tokenizer", "{tokenizer}", "--out", "{new}", "--steps", "1"],
                       "tokens"),
    "train --tokenizer": (["train", "--tokens", "{tokens}", "--tokenizer", "{X}", "--out", "{new}", "--steps", "1"],
                          "tokenizer"),
    "sample RUN2": (["sample", "{X}", "--out", "{new}", "--n", "1"], "transformer"),
    "upscale --run": (["upscale", "{photo}", "--run", "{X}", "--out", "{new}"], "transformer"),
    "edit RUN2": (["edit", "{X}", "--out", "{new}", "--edit", "recolor"], "transformer"),
    "eval-samples SAMPLES": (["eval-samples", "{X}", "--out", "{new}.json"], "images"),
}


def _argv(template, kinds, x, new):
    values = {**{k: str(v) for k, v in kinds.items()}, "X": str(kinds[x]), "new": str(new)}
    return [a.format(**values) for a in template]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_each_wrong_kind_of_folder_in_one_line(kinds, command, capsys, tmp_path):
    template, needed = COMMANDS[command]
    for i, x in enumerate(k for k in WRONG if k != needed):
        if command == "eval-samples SAMPLES" and x in ("store",):
            continue                    # a store's images are a valid set of samples
        new = tmp_path / f"out{i}"
        line = assert_refused(capsys, _argv(template, kinds, x, new), str(kinds[x]))
        assert not new.exists() or not any(new.iterdir()), (command, x, line)


def test_decompose_dataset_refuses_an_output_of_another_kind(kinds, capsys):
    for x in ("tokens", "tokenizer", "transformer", "file"):
        assert_refused(capsys, ["decompose-dataset", kinds["photo"].parent, "--out", kinds[x]], str(kinds[x]))


# --------------------------------------------------------------------------- options that cannot fit

def test_every_command_refuses_what_cannot_fit_before_any_work(kinds, capsys, tmp_path):
    k = {n: str(v) for n, v in kinds.items()}
    big = "--max-memory", "1G"      # refused on any machine; the machine's own limit is every other test's
    cases = [
        (["decompose", k["photo"], "--out", tmp_path / "d", "--size", "30000", *big], "--size 30000"),
        (["decompose-dataset", k["empty"], "--out", tmp_path / "s", "--size", "30000", *big], "--size 30000"),
        (["train-tokenizer", "--data", k["store"], "--out", tmp_path / "t", "--image-size", "32", "--ch", "8",
          "--batch-size", "100000", "--lpips-weight", "0", *big], "--batch-size 100000"),
        (["eval-tokenizer", k["tokenizer"], "--data", k["store"], "--out", tmp_path / "e", "--batch-size",
          "1000000", "--no-lpips", "--no-rfid", *big], "--batch-size 1000000"),
        (["export-tokens", "--data", k["store"], "--tokenizer", k["tokenizer"], "--out", tmp_path / "x",
          "--batch-size", "1000000", *big], "--batch-size 1000000"),
        (["train", "--tokens", k["tokens"], "--tokenizer", k["tokenizer"], "--out", tmp_path / "r",
          "--depth", "200", "--width", "4096", "--heads", "64", *big], "--depth 200 --width 4096"),
        (["sample", k["transformer"], "--out", tmp_path / "p", "--highres", "128", "--n", "16", *big],
         "--highres 128"),
        (["upscale", k["photo"], "--run", k["transformer"], "--out", tmp_path / "u", "--input-size", "16384",
          *big], "--input-size"),
        (["edit", k["transformer"], "--out", tmp_path / "ed", "--edit", "recolor", "--n", "1000000", *big],
         "--n 1000000"),
        (["eval-samples", k["store"], "--out", tmp_path / "f.json", "--batch-size", "1000000", *big],
         "--batch-size 1000000"),
    ]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with address_space_limit(6 << 30):      # an estimate that let a command through fails, never OOMs
        for argv, option in cases:
            line = assert_refused(capsys, argv, option, "needs about", "can have")
            out = Path(argv[argv.index("--out") + 1])
            assert not out.exists(), (argv, line)
    # bounded memory: the estimates ran on meta tensors (ru_maxrss in KB on Linux)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2 * 1024 * 1024


@contextmanager
def address_space_limit(extra: int):
    """RLIMIT_AS at the address space in use plus `extra` bytes, for the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_max_memory_off_skips_the_check_and_a_bad_size_is_refused(kinds, capsys, tmp_path):
    assert_refused(capsys, ["decompose", kinds["photo"], "--out", tmp_path / "d", "--max-memory", "lots"],
                   "--max-memory")
    rc, out, err = run(capsys, ["decompose", kinds["photo"], "--out", tmp_path / "d", "--size", "16",
                                "--max-memory", "off", "--n-iter", "2", "--backend", "numpy"])
    assert rc == 0, err


# --------------------------------------------------------------------------- bad numbers

@pytest.mark.parametrize("argv,option", [
    (["train-tokenizer", "--data", "S", "--out", "R", "--lr", "nan"], "--lr"),
    (["train-tokenizer", "--data", "S", "--out", "R", "--lr", "inf"], "--lr"),
    (["train-tokenizer", "--data", "S", "--out", "R", "--batch-size", "0"], "--batch-size"),
    (["train-tokenizer", "--data", "S", "--out", "R", "--vocab", "70000"], "--vocab"),
    (["train-tokenizer", "--data", "S", "--out", "R", "--term-grace", "-1"], "--term-grace"),
    (["train", "--tokens", "T", "--tokenizer", "R", "--out", "R2", "--cond-drop", "-0.5"], "--cond-drop"),
    (["train", "--tokens", "T", "--tokenizer", "R", "--out", "R2", "--width", "2.5"], "--width"),
    (["decompose", "x.png", "--out", "o", "--alpha=-inf"], "--alpha"),
    (["decompose-dataset", "x", "--out", "o", "--workers", "-2"], "--workers"),
    (["export-tokens", "--data", "S", "--tokenizer", "R", "--out", "T", "--block-rows", "0"], "--block-rows"),
    (["sample", "R2", "--top-p", "5"], "--top-p"),
    (["upscale", "x.png", "--run", "R2", "--temperature", "0"], "--temperature"),
    (["edit", "R2", "--edit", "recolor", "--top-p", "nan"], "--top-p"),
    (["eval-samples", "S", "--batch-size", "-1"], "--batch-size"),
    (["eval-tokenizer", "R", "--data", "S", "--images", "0"], "--images"),
])
def test_each_kind_of_bad_number_is_named_where_it_is_parsed(argv, option, capsys):
    line = assert_refused(capsys, argv, option, "must be")
    assert "--help" in line
