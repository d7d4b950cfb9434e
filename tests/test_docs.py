"""The docs agree with the program: each command's synopsis lists exactly its options (the
defaults and choices it shows are the real ones), every command line in the docs uses options
that exist, and every Python block of docs/*.md runs as it stands on the tiny stores the other
tests make. A new option without its docs line fails here."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from nextdetail.cli import build_parser
from nextdetail.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
COMMAND_LINE = re.compile(r"^(\s+)(?:.*\s)?(?:nextdetail|-m nextdetail\.cli) ([a-z][a-z-]*)(?:\s|$)")
MENU = "# each line alone, after importing its library"
METAVAR = re.compile(r"^[A-Z][A-Z0-9_]*(?:[.,]*[A-Z0-9_]*)*(?:\.\.\.|,\.\.)?$")   # N, FILE, P,.., REF...


def command_parser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def options(name: str) -> dict:
    """flag -> its argparse action, for every option of the command but --help."""
    return {s: a for a in command_parser(name)._actions for s in a.option_strings
            if s.startswith("--") and s != "--help"}


def command_lines(page: Path):
    """(command, text, is_synopsis) of each command line of an indented or fenced block: the line
    with its continuation lines (deeper indented, or after a trailing backslash), comments cut."""
    lines = page.read_text().splitlines()
    fenced = [False] * len(lines)           # inside a ``` block (not python: those run below)
    fence = None                            # the open fence's language, "" for none
    for k, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fence = line.strip()[3:] if fence is None else None
        elif fence == "":
            fenced[k] = True
    i = 0
    while i < len(lines):
        m = COMMAND_LINE.match(lines[i]) or (fenced[i] and COMMAND_LINE.match(" " + lines[i]))
        if not m or m.group(2) not in COMMANDS or not (fenced[i] or lines[i].startswith("    ")):
            i += 1
            continue
        indent, parts = len(lines[i]) - len(lines[i].lstrip()), [lines[i]]
        i += 1
        while i < len(lines) and (parts[-1].rstrip().endswith("\\") or (
                lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > indent
                and not COMMAND_LINE.match(lines[i]) and not lines[i].strip().startswith("#"))):
            parts.append(lines[i])
            i += 1
        text = " ".join(re.sub(r"\s#\s.*$", "", p).rstrip("\\ ") for p in parts)
        text = text[text.index(m.group(2), text.index("nextdetail")):]
        yield m.group(2), text, "[" in text


def synopses(name: str) -> list:
    """(page, text) of every synopsis of the command (a command line with [options]) in the docs."""
    return [(page, text) for page in PAGES for command, text, is_synopsis in command_lines(page)
            if command == name and is_synopsis]


def flags_in(text: str) -> set:
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", text))


def default_text(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def same_value(text: str, default) -> bool:
    """'1e-4' is 0.0001, '0,0.5,2' is (0.0, 0.5, 2.0): numbers compare as numbers."""
    if text == default_text(default):
        return True
    values = default if isinstance(default, tuple) else (default,)
    try:
        return [float(v) for v in text.split(",")] == [float(v) for v in values]
    except (TypeError, ValueError):
        return False


def shown_values(text: str):
    """(flag, value) of each "[--flag VALUE" in a synopsis: a default, or choices "a|b"."""
    for m in re.finditer(r"\[(--[a-z0-9-]+)(?: ([^\s\[\]|]+(?:\|[^\s\[\]|]+)*))?", text):
        yield m.group(1), m.group(2)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_has_a_synopsis_of_exactly_its_options(name):
    """Its synopses together (sample has one per mode) list every option; each shows real
    defaults and choices."""
    found = synopses(name)
    assert found, f"no synopsis of `nextdetail {name}` ([--options]) in docs/*.md or README.md"
    have = options(name)
    shown = set().union(*(flags_in(text) for _, text in found))
    pages = ", ".join(sorted({page.name for page, _ in found}))
    missing, unknown = sorted(set(have) - shown), sorted(shown - set(have))
    assert not missing, f"{pages}: the synopsis of `{name}` lacks {', '.join(missing)}"
    assert not unknown, f"{pages}: the synopsis of `{name}` shows {', '.join(unknown)}, which it has not"
    for page, text in found:
        check_values(name, page, text, have)


def check_values(name: str, page: Path, text: str, have: dict) -> None:
    for flag, value in shown_values(text):
        if flag not in have:
            continue            # named by the test below
        action = have[flag]
        if value is None or METAVAR.match(value):
            continue
        if "|" in value:
            if action.choices is not None:
                assert set(value.split("|")) == {str(c) for c in action.choices}, \
                    f"{page.name}: {name} {flag} {value}: its choices are {'|'.join(map(str, action.choices))}"
            continue
        if action.choices is not None and action.default is None:
            continue
        assert same_value(value, action.default), \
            f"{page.name}: {name} {flag} {value}: its default is {default_text(action.default)}"


def test_every_command_line_in_the_docs_uses_options_that_exist():
    wrong = []
    for page in PAGES:
        for name, text, _ in command_lines(page):
            have = options(name)
            wrong += [f"{page.name}: nextdetail {name} {flag}" for flag in sorted(flags_in(text)) if flag not in have]
    assert not wrong, "; ".join(wrong)


def python_blocks():
    """(page, first line, code) of every ```python block of the docs."""
    for page in PAGES:
        lines = page.read_text().splitlines()
        start = None
        for k, line in enumerate(lines):
            if start is None and line.strip() == "```python":
                start = k + 1
            elif start is not None and line.strip() == "```":
                yield page, start, "\n".join(lines[start:k])
                start = None


@pytest.fixture(scope="module")
def doc_folders(tmp_path_factory):
    """A folder where the docs' placeholders are real: STORE (a decomposition store), RUN (a
    tokenizer run trained on it), TOKENS (its token store)."""
    from token_data import make_token_store

    root = tmp_path_factory.mktemp("docs")
    (root / "made").mkdir()
    tokens, ckpt, store = make_token_store(root / "made", n=6, size=40)
    for name, target in (("STORE", store), ("RUN", ckpt.parent), ("TOKENS", tokens)):
        (root / name).symlink_to(target)
    return root


def test_there_are_python_blocks_to_run():
    assert len(list(python_blocks())) >= 4


@pytest.mark.parametrize("page, line, code", list(python_blocks()),
                         ids=[f"{p.name}:{n}" for p, n, _ in python_blocks()])
def test_every_python_block_of_the_docs_runs_as_it_stands(page, line, code, doc_folders, monkeypatch):
    """A block that says it is a choice of one-liners for other libraries (MENU) is compiled, not
    run: its libraries need not be installed here."""
    program = compile(code, f"{page.name}:{line}", "exec")
    if code.startswith(MENU):
        return
    monkeypatch.chdir(doc_folders)
    exec(program, {"__name__": "docs"})


def test_flag_of_names_a_field_by_its_option():
    from nextdetail.options import flag_of, option_name
    from nextdetail.tokenize.config import QuantConfig, TokenizerConfig
    from nextdetail.tokenize.evaluate import EvalConfig

    assert flag_of(TokenizerConfig, "image_size") == "--image-size"
    assert flag_of(TokenizerConfig, "kind") == "--quantizer"          # nested, with its own flag
    assert flag_of(QuantConfig, "base_patch_sizes") == "--base-patch-sizes"
    assert flag_of(EvalConfig, "lpips") == "--no-lpips" and flag_of(EvalConfig, "runs") == "RUN"
    assert option_name(QuantConfig, "phi_ratio") is None                # a fixed setting, no option
    with pytest.raises(KeyError):
        flag_of(QuantConfig, "phi_ratio")
