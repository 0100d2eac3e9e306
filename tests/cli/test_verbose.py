"""`ledger -v` logs what a command does, on stderr; without -v the same commands log nothing."""

from __future__ import annotations

import subprocess
import sys


def ledger(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ledger", "--db", f"sqlite:///{cwd / 'ledger.db'}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def info_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("INFO ")]


def test_index_attribute_and_report_say_what_they_do(demo_copy) -> None:
    # The demo's own settings, so the index is found complete and only checked.
    index = ["index", "--model", "model", "--max-length", "64", "--batch-size", "16"]
    attribute = ["attribute", "--outputs", "queries.jsonl"]
    report = ["report", "--period", "2024-Q3"]
    expected = {
        "index": ["registered shards checked", "model model loaded on cpu", "recorded in the ledger"],
        "attribute": ["queries.jsonl: 26 outputs read", "matches its manifest",
                      "0 outputs to attribute, 26 already recorded"],
        "report": ["statement 1 for 2024-Q3"],
    }  # fmt: skip
    for args in (index, attribute, report):
        quiet = ledger(demo_copy, "-q", *args)
        assert quiet.returncode == 0, quiet.stderr
        assert info_lines(quiet.stderr) == []
        loud = ledger(demo_copy, "-q", "-v", *args)
        assert loud.returncode == 0, loud.stderr
        logged = "\n".join(info_lines(loud.stderr))
        assert f"INFO ledger: ledger {args[0]}, database sqlite:///" in logged
        for fragment in expected[args[0]]:
            assert fragment in logged, (args[0], fragment, logged)
