"""`make demo`'s generation chain: decompose-dataset -> train-tokenizer -> export-tokens -> train ->
sample, each step a real command, each printing where its output is (tiny sizes and steps)."""
from PIL import Image

from pipeline_data import photo_paths

from nextdetail import demo


def test_the_chain_runs_every_command_and_says_where_the_outputs_are(ray_session, tmp_path, capsys):
    photos = [str(p) for p in photo_paths(3, tmp_path)]
    out = tmp_path / "chain"
    assert demo.run_chain(photos, out, size=32, backend="numba", tokenizer_steps=2, train_steps=2) == 0
    stdout = capsys.readouterr().out
    for line in (f"decomposition store: {out / 'store'}", f"tokenizer run (checkpoint, log.jsonl, loss.png): "
                 f"{out / 'tokenizer'}", f"token store: {out / 'tokens'}", f"{out / 'transformer'}",
                 f"samples (grid.png; sample_XXX.png: base, then + each detail factor): {out / 'samples'}"):
        assert line in stdout
    for cmd in ("decompose-dataset", "train-tokenizer", "export-tokens", "train", "sample"):
        assert f"$ nextdetail {cmd} " in stdout
    assert (out / "transformer" / "ckpt-0000002.pt").is_file()
    strip = Image.open(out / "samples" / "sample_003.png")
    assert strip.size == (4 * 32 + 3 * 2, 32)               # base, +D_3, +D_2, +D_1
    # a rerun starts both runs afresh instead of refusing their folders
    assert demo.run_chain(photos, out, size=32, backend="numba", tokenizer_steps=2, train_steps=2) == 0


def test_the_demo_explains_its_tokenizers_low_codebook_usage(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 100, "map_usage": [0.004, 0.2]}\n{"step": 101}\n')
    note = demo.usage_note(run)
    assert note.startswith("note: the tokenizer's warning about token map 1 (under 1% of the codes) is expected")
    (run / "log.jsonl").write_text('{"step": 100, "map_usage": [0.05, 0.2]}\n')
    assert demo.usage_note(run) is None
    assert demo.usage_note(tmp_path / "none") is None
