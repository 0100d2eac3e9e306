"""Which index pays is always an explicit choice: re-attributing a file after another index
was built refuses in one line (naming what would be superseded) unless `--index` names the
index or `--supersede` is given, and then says what it supersedes before writing."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import text

from ledger.db import make_engine
from tests.cli.test_bad_input_edges import counts, ok, refused, run, workspace_ledger


def _current_indexes(url: str) -> dict[str, int]:
    """Index id → outputs whose current result comes from a run over it."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(text(
                "SELECT a.index_id, COUNT(*) FROM query_results r JOIN attribution_runs a "
                "ON a.id = r.run_id WHERE r.is_current GROUP BY a.index_id"
            )).all())  # fmt: skip
    finally:
        engine.dispose()


def _index(url: str, workspace: Path, out: Path, k: str) -> str:
    line = ok(url, "index", "--model", str(workspace / "model"), "--out", str(out), "--kind",
              "random", "--k-in", k, "--k-out", k, "--max-length", "48", "--curvature-labels",
              "data")  # fmt: skip
    return line.split()[1].rstrip(":")


def test_another_index_supersedes_results_only_when_named_or_asked(
    workspace: Path, tmp_path: Path
) -> None:
    url = workspace_ledger(workspace, tmp_path)
    outputs = str(workspace / "queries.jsonl")
    n = sum(1 for line in Path(outputs).read_text().splitlines() if line.strip())
    first = _index(url, workspace, tmp_path / "a", "4")
    run1 = json.loads(ok(url, "attribute", "--outputs", outputs, "--format", "json"))
    assert run1["index_id"].startswith(first)
    second = _index(url, workspace, tmp_path / "b", "8")  # now the newest
    before = counts(url)

    line = refused(url, "attribute", "--outputs", outputs)
    assert f"{n} output(s) of {outputs}" in line and run1["run_id"][:16] in line
    assert first in line and second in line and "--supersede" in line
    assert counts(url) == before and _current_indexes(url) == {run1["index_id"]: n}

    # The index that pays, named: same index, same outputs, nothing changes.
    same = json.loads(ok(url, "attribute", "--outputs", outputs, "--index", first,
                         "--format", "json"))  # fmt: skip
    assert same["run_id"] == run1["run_id"] and same["skipped"] == n
    assert counts(url) == before

    result = run(url, "attribute", "--outputs", outputs, "--supersede", "--format", "json")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"superseding: {n} output(s) of {outputs}")
    run2 = json.loads(result.stdout)
    assert run2["index_id"].startswith(second) and run2["attributed"] == n
    assert _current_indexes(url) == {run2["index_id"]: n}
    # Again over the newest, which now pays: nothing to supersede, nothing changes.
    after = counts(url)
    again = json.loads(ok(url, "attribute", "--outputs", outputs, "--format", "json"))
    assert again["run_id"] == run2["run_id"] and counts(url) == after
