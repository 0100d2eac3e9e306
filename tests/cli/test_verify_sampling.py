"""`ledger verify` cannot be fooled by tampering outside a fixed sample: the sample is drawn
with a fresh seed (printed, and accepted back with --seed), --all re-computes every output,
every output's stored credits are checked in SQL, and a superseded run is verified against its
own kept results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text

from ledger.db import make_engine
from tests.cli.test_bad_input_edges import ok, run, workspace_ledger


@pytest.fixture(scope="module")
def attributed(workspace: Path, tmp_path_factory) -> tuple[str, str, int]:
    """A ledger with the workspace's outputs attributed: (url, run id, number of outputs)."""
    root = tmp_path_factory.mktemp("verify")
    url = workspace_ledger(workspace, root)
    ok(url, "index", "--model", str(workspace / "model"), "--out", str(root / "indexes"),
       "--kind", "random", "--k-in", "4", "--k-out", "4")  # fmt: skip
    outputs = str(workspace / "queries.jsonl")
    summary = json.loads(ok(url, "attribute", "--outputs", outputs, "--format", "json"))
    return url, summary["run_id"], summary["queries"]


def verify(url: str, run_id: str, workspace: Path, *args: str) -> tuple[int, dict]:
    outputs = str(workspace / "queries.jsonl")
    result = run(url, "verify", run_id[:12], "--outputs", outputs, "--format", "json", *args)
    return result.exit_code, json.loads(result.stdout)


def test_the_sample_is_unpredictable_repeatable_by_seed_or_all(
    attributed: tuple[str, str, int], workspace: Path
) -> None:
    url, run_id, n = attributed
    code, first = verify(url, run_id, workspace, "--sample", "2")
    _, second = verify(url, run_id, workspace, "--sample", "2")
    assert code == 0 and first["ok"] and first["sampled"] == 2 and first["outputs"] == n
    assert first["seed"] != second["seed"]
    _, again = verify(url, run_id, workspace, "--sample", "2", "--seed", str(first["seed"]))
    assert again["seed"] == first["seed"]
    assert again["sampled_outputs"] == first["sampled_outputs"]
    code, every = verify(url, run_id, workspace, "--all")
    assert code == 0 and every["sampled"] == every["agreeing"] == n
    text_out = run(url, "verify", run_id[:12], "--outputs", str(workspace / "queries.jsonl"),
                   "--sample", "1", "--seed", "7").stdout  # fmt: skip
    assert f"ok   stored credits add up to each output's weight ({n} outputs)" in text_out
    assert "re-computed 1/1 outputs agree" in text_out and "sample seed 7" in text_out


def _tamper(url: str, sql: str, external_id: str) -> None:
    """Rewrite credits the way direct SQL would, past the ledger's own guards."""
    engine = make_engine(url)
    with engine.begin() as conn:
        for (name,) in conn.execute(
            text("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'credits'")
        ).all():
            conn.execute(text(f'DROP TRIGGER "{name}"'))
        qid = conn.execute(
            text("SELECT id FROM queries WHERE external_id = :e"), {"e": external_id}
        ).scalar_one()
        conn.execute(text(sql), {"q": qid})
    engine.dispose()


def test_credits_rewritten_outside_the_sample_fail_verify(
    attributed: tuple[str, str, int], workspace: Path, tmp_path: Path
) -> None:
    import sqlite3

    url, run_id, _ = attributed
    # A copy of the ledger (its write-ahead log included), so the other tests see it untouched;
    # beside the original, in the workspace whose paths the ledger records relative to it.
    copy = Path(url.removeprefix("sqlite:///")).with_name(f"tampered-{tmp_path.name}.db")
    with sqlite3.connect(url.removeprefix("sqlite:///")) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    url = f"sqlite:///{copy}"
    _, clean = verify(url, run_id, workspace, "--sample", "1", "--seed", "1")
    picked = clean["sampled_outputs"][0]
    engine = make_engine(url)
    with engine.connect() as conn:
        ids = [
            e for (e,) in conn.execute(
                text("SELECT q.external_id FROM queries q JOIN query_results r "
                     "ON r.query_id = q.id WHERE NOT r.unattributed ORDER BY q.external_id")
            ) if e != picked
        ]  # fmt: skip
    engine.dispose()
    # Shift half of one output's largest credit to another of its providers: the sum is kept.
    _tamper(
        url,
        "UPDATE credits SET credit = credit * 1.5 WHERE query_id = :q AND provider_id = "
        "(SELECT MIN(provider_id) FROM credits WHERE query_id = :q)",
        ids[0],
    )
    code, report = verify(url, run_id, workspace, "--sample", "1", "--seed", "1")
    assert report["sampled_outputs"] == [picked] and report["agreeing"] == 1  # sample is fine
    assert code == 1 and not report["checks"]["stored credits add up to each output's weight"]
    assert any(repr(ids[0]) in note for note in report["notes"])


def test_a_superseded_run_is_verified_against_its_own_results(
    attributed: tuple[str, str, int], workspace: Path
) -> None:
    url, run_id, n = attributed
    outputs = str(workspace / "queries.jsonl")
    later = json.loads(ok(url, "attribute", "--outputs", outputs, "--top-k", "3",
                          "--format", "json"))  # fmt: skip
    assert later["run_id"] != run_id
    code, report = verify(url, run_id, workspace, "--all")
    assert code == 0 and report["sampled"] == report["agreeing"] == n
    code, report = verify(url, later["run_id"], workspace, "--sample", "2")
    assert code == 0 and report["agreeing"] == 2
