"""docs/cli.md: every command's `--help`, generated from the command line itself.

`python -m ledger.cli_reference` rewrites docs/cli.md; tests/test_cli_help.py fails when the file
is out of date with the help texts (the way sqlite-utils keeps its CLI reference in step).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click

WIDTH = 100

HEADER = """# Command reference

Every `ledger` command's `--help`, as the command prints it. This page is generated: after
changing a command, run `python -m ledger.cli_reference` (a test fails while it is out of date).
The [README](../README.md) shows the commands in the order a user runs them.
"""


def commands(
    group: click.Group, parent: click.Context
) -> Iterator[tuple[click.Command, click.Context]]:
    """The group's commands, depth first in name order, each with a context for its help."""
    for name in sorted(group.commands):
        command = group.commands[name]
        ctx = click.Context(command, info_name=name, parent=parent, max_content_width=WIDTH)
        yield command, ctx
        if isinstance(command, click.Group):
            yield from commands(command, ctx)


def root_context() -> click.Context:
    """The context `ledger --help` runs in, at a fixed width (click caches each command's help
    option from the first context made for it, so every caller starts here)."""
    from ledger.cli import cli

    return click.Context(
        cli,
        info_name="ledger",
        max_content_width=WIDTH,
        terminal_width=WIDTH,
        **cli.context_settings,
    )


def reference() -> str:
    from ledger.cli import cli

    root = root_context()
    parts = [HEADER]
    for command, ctx in [(cli, root), *commands(cli, root)]:
        title = ctx.command_path
        anchor = title.replace(" ", "-")
        parts.append(
            f'<a id="{anchor}"></a>\n\n## {title}\n\n```text\n{command.get_help(ctx)}\n```\n'
        )
    return "\n".join(parts)


def main() -> None:
    path = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    path.write_text(reference())
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
