"""The exit statuses are worded once (errors.EXIT_STATUS): every command's --help shows them and
the README's paragraph names each."""
import re
from pathlib import Path

from nextdetail.cli import build_parser
from nextdetail.commands import COMMANDS
from nextdetail.errors import EXIT_STATUS, PARTIAL

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_command_help_lists_its_exit_statuses():
    for name, command in COMMANDS.items():
        epilog = command.exit_statuses()
        listed = [int(k) for k in re.findall(r"(?:^exit status: |; )(\d+) ", epilog)]
        expected = [k for k in EXIT_STATUS if k != PARTIAL or command.partial is not None]
        assert listed == expected, name
        if command.partial is not None:
            assert f"{PARTIAL} {command.partial}" in epilog
        text = " ".join(build_parser(name)._subparsers._group_actions[0].choices[name].format_help().split())
        assert " ".join(epilog.split()) in text, name


def test_readme_names_every_exit_status():
    text = README.read_text()
    para = text[text.index("**Exit status**"):]
    para = para[:para.index("\n\n")]
    for status in EXIT_STATUS:
        assert re.search(rf"\b{status}\b", para), f"README's exit-status paragraph does not name {status}"
