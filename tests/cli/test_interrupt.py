"""Ctrl-C says what to do, and a run nobody works on any more is listed as interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ledger.cli import INTERRUPTED, cli
from ledger.db import make_engine
from ledger.liveness import is_alive

# Records the first batch of results, then stops as Ctrl-C would in the middle of the second.
CHILD = """
import sys
import ledger.jobs as jobs
calls = []
def record_then_stop(*args, **kwargs):
    calls.append(1)
    if len(calls) > 1:
        raise KeyboardInterrupt
    return real(*args, **kwargs)
real, jobs.record_results = jobs.record_results, record_then_stop
from ledger.cli import main
sys.argv = ["ledger", *sys.argv[1:]]
main()
"""

HOLDER = """
import sys
from ledger.db import make_engine
from ledger.liveness import hold
hold(make_engine(sys.argv[1]), sys.argv[2])
print("held", flush=True)
sys.stdin.read()
"""


def runs(url: str) -> dict[str, str]:
    result = CliRunner().invoke(cli, ["--db", url, "runs", "list", "--format", "json"])
    assert result.exit_code == 0, result.output
    return {r["queries_file"]: r["status"] for r in json.loads(result.output)}


def test_ctrl_c_prints_one_line_exits_130_and_the_run_resumes(demo_copy) -> None:
    url = f"sqlite:///{demo_copy / 'ledger.db'}"
    lines = (demo_copy / "queries.jsonl").read_text().splitlines()[:4]
    outputs = demo_copy / "more.jsonl"
    outputs.write_text(
        "".join(
            json.dumps({**json.loads(x), "id": f"more-{i}"}) + "\n" for i, x in enumerate(lines)
        )
    )
    args = ["--db", url, "-q", "attribute", "--outputs", str(outputs), "--batch-size", "2"]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == [INTERRUPTED]
    assert runs(url) == {"queries.jsonl": "finished", "more.jsonl": "interrupted"}

    again = CliRunner().invoke(cli, [*args[:3], "attribute", "--outputs", str(outputs),
                                     "--batch-size", "2", "--format", "json"])  # fmt: skip
    assert again.exit_code == 0, again.output
    summary = json.loads(again.output)
    assert (summary["attributed"], summary["skipped"]) == (2, 2)  # the first batch was kept
    assert runs(url) == {"queries.jsonl": "finished", "more.jsonl": "finished"}


def test_a_run_is_alive_while_its_process_holds_it(db_url) -> None:
    run_id = "ab" * 32
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, db_url, run_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    engine = make_engine(db_url)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_alive(engine, run_id)
        assert not is_alive(engine, "cd" * 32)
        holder.stdin.close()  # the process ends: its lock goes with it
        assert holder.wait(timeout=60) == 0
        assert not is_alive(engine, run_id)
    finally:
        if holder.poll() is None:
            holder.kill()
        engine.dispose()


@pytest.mark.parametrize("where", ["before click", "inside a command"])
def test_ctrl_c_anywhere_gives_the_same_line(tmp_path, where) -> None:
    code = (
        "import sys, click\nfrom ledger import cli\n"
        + (
            "def stop(*a, **k): raise KeyboardInterrupt\ncli.cli.main = stop\n"
            if where == "before click"
            else "@cli.cli.command('stop')\ndef stop(): raise KeyboardInterrupt\n"
        )
        + "sys.argv = ['ledger', 'stop']\ncli.main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 130
    assert done.stderr.strip() == INTERRUPTED
