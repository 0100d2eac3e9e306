"""Commands that compute no gradient start without importing torch or transformers.

`ledger --help` used to take seconds because the command line imported the attribution core
(torch, transformers) at start; now only `index`, `attribute`, `verify RUN` and `demo` do.
Each command runs in one child process that imports nothing else first, and reports which
heavy modules it had loaded after each command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

from ledger.cli import cli

HEAVY = ("torch", "transformers", "attribution.lm", "attribution.scoring")

CHILD = """
import json, sys
from ledger.cli import main
heavy = json.loads(sys.argv[1])
for args in json.loads(sys.argv[2]):
    sys.argv = ["ledger", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    loaded = [name for name in heavy if name in sys.modules]
    print("@@" + json.dumps({"args": args, "code": code, "loaded": loaded}), flush=True)
"""


def command_paths(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand of `ledger`, as the words that name it."""
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths.extend(command_paths(command, (*prefix, name)))
    return paths


def run_child(commands: list[list[str]], cwd: Path) -> list[dict]:
    env = {**os.environ, "LEDGER_DATABASE_URL": f"sqlite:///{cwd / 'ledger.db'}"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(HEAVY), json.dumps(commands)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    print(done.stderr)  # shown when a command fails
    return [json.loads(line[2:]) for line in done.stdout.splitlines() if line.startswith("@@")]


def test_help_and_version_of_every_command_import_no_torch(tmp_path) -> None:
    commands = [["--help"], ["--version"]] + [[*path, "--help"] for path in command_paths()]
    results = run_child(commands, tmp_path)
    assert [r["args"] for r in results] == commands
    for r in results:
        assert r["code"] == 0, r
        assert r["loaded"] == [], f"`ledger {' '.join(r['args'])}` imported {r['loaded']}"


def test_ledger_only_commands_import_no_torch(demo_copy) -> None:
    shard = demo_copy / "new-press.jsonl"
    shard.write_text('{"text": "a new text about the stars"}\n')
    from sqlalchemy import text

    from ledger.db import make_engine

    engine = make_engine(f"sqlite:///{demo_copy / 'ledger.db'}")
    with engine.connect() as conn:
        run = conn.execute(text("SELECT id FROM attribution_runs")).scalar_one()[:12]
    engine.dispose()
    commands = [
        ["init"],
        ["providers", "list"],
        ["providers", "add", "new-press"],
        ["shards", "add", str(shard), "--provider", "new-press"],
        ["shards", "list"],
        ["runs", "list"],
        ["runs", "show", run],
        ["explain", "--query", "q000001"],
        ["report", "--period", "2024-Q3", "--format", "csv"],
        ["statements", "list"],
        ["statements", "finalize", "2024-Q3"],
        ["statements", "verify", "2024-Q3"],
        ["verify", "--statement", "2024-Q3"],
        ["sql", "SELECT provider, share FROM statement_lines_named"],
        ["audit"],
    ]
    results = run_child(commands, demo_copy)
    assert [r["args"] for r in results] == commands
    for r in results:
        assert r["code"] == 0, r
        assert r["loaded"] == [], f"`ledger {' '.join(r['args'])}` imported {r['loaded']}"
