"""`ledger demo` on a workspace that is already there: no retraining unless --force."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

import ledger.demo
from ledger.cli import cli

CHILD = """
import sys
from ledger.cli import main
sys.argv = ["ledger", "demo", sys.argv[1]]
try:
    main()
except SystemExit as exc:
    print("@@", exc.code, "torch" in sys.modules)
"""


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_a_finished_workspace_is_left_as_it_is(demo_copy) -> None:
    before = snapshot(demo_copy)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(demo_copy)], capture_output=True, text=True, timeout=120
    )
    *printed, last = done.stdout.strip().splitlines()
    assert last == "@@ 0 False", done.stderr  # exit 0, and nothing was trained (no torch)
    assert printed == [
        f"demo workspace {demo_copy} exists; try `cd {demo_copy} && ledger report --period "
        "2024-Q3`, or rebuild it with `ledger demo --force`"
    ]
    assert snapshot(demo_copy) == before


def test_an_unfinished_workspace_needs_force(tmp_path) -> None:
    (tmp_path / "queries.jsonl").write_text("{}\n")
    result = CliRunner().invoke(cli, ["demo", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {tmp_path} holds an unfinished demo workspace; rebuild it with "
        "`ledger demo --force`"
    )
    assert (tmp_path / "queries.jsonl").read_text() == "{}\n"


def test_force_removes_the_demo_files_only_and_rebuilds(tmp_path, monkeypatch) -> None:
    for name in ("model", "shards", "indexes/abc"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "f").write_text("x")
    for name in ("ledger.db", "ledger.db-wal", "queries.jsonl", "notes.txt"):
        (tmp_path / name).write_text("x")
    built = []
    monkeypatch.setattr(ledger.demo, "run_demo", lambda root, quiet: built.append(root))
    result = CliRunner().invoke(cli, ["demo", "--force", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert built == [tmp_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
