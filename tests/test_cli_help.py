"""Every command's `--help` has an example, and docs/cli.md is the help text as it is now."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from ledger.cli import cli
from ledger.cli_reference import commands, reference, root_context

ROOT = root_context()
ALL = [(cli, ROOT), *commands(cli, ROOT)]


@pytest.mark.parametrize(("command", "ctx"), ALL, ids=[ctx.command_path for _, ctx in ALL])
def test_every_help_has_an_example(command: click.Command, ctx: click.Context) -> None:
    text = command.get_help(ctx)
    assert re.search(r"\bExamples?\b", text), (
        f"`{ctx.command_path} --help` shows no example: add `Example: ...` to its docstring"
    )


def test_the_command_reference_is_up_to_date() -> None:
    path = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert path.read_text() == reference(), (
        "docs/cli.md is out of date with the commands' --help: run `python -m ledger.cli_reference`"
    )


def test_the_readme_links_the_command_reference() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "docs/cli.md" in readme
