"""End to end: the workspace's outputs repeated into a larger log, attributed from a recorded
sample (`ledger attribute --sample`), give a statement whose shares lie within their 95%
intervals of the full statement's; `verify` re-draws the sample from its seed; `sample-size`
plans from the pilot; a period mixing full and sampled outputs is refused."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from ledger.db import make_engine
from tests.cli.test_bad_input_edges import ok, refused, run, workspace_ledger

COPIES = 30


def _index(url: str, workspace: Path, root: Path) -> None:
    ok(url, "index", "--model", str(workspace / "model"), "--out", str(root / "indexes"),
       "--kind", "random", "--k-in", "4", "--k-out", "4")  # fmt: skip


@pytest.fixture(scope="module")
def logs(workspace: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A log of COPIES copies of each workspace output (ids, revenues and months varied), and
    the same outputs once each with the summed revenue of their copies: their full statement
    is the full statement of the large log (a copy's credits are its text's, times revenue)."""
    root = tmp_path_factory.mktemp("logs")
    base = [json.loads(line) for line in (workspace / "queries.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(4)
    big, summed = [], []
    for row in base:
        total = Decimal(0)
        for k in range(COPIES):
            revenue = Decimal(f"{rng.uniform(0.5, 3.0):.2f}")
            total += revenue
            served = datetime(2024, 7 + k % 3, 1 + k % 28, 12).isoformat() + "Z"
            big.append({**row, "id": f"{row['id']}-{k}", "timestamp": served,
                        "revenue": str(revenue), "weight": None})  # fmt: skip
        summed.append({**row, "revenue": str(total), "weight": None})
    for rows, name in ((big, "log.jsonl"), (summed, "summed.jsonl")):
        with (root / name).open("w") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n")
    return root / "log.jsonl", root / "summed.jsonl"


@pytest.fixture(scope="module")
def sampled(workspace: Path, logs: tuple[Path, Path], tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("sampled")
    url = workspace_ledger(workspace, root)
    _index(url, workspace, root)
    summary = json.loads(ok(url, "attribute", "--outputs", str(logs[0]), "--sample", "60",
                            "--weight-field", "revenue", "--strata", "month", "--seed", "11",
                            "--format", "json"))  # fmt: skip
    assert summary["queries"] == 60
    return url, summary["run_id"]


def _lines(url: str, *args: str) -> dict[str, dict]:
    doc = json.loads(ok(url, "report", "--period", "2024-Q3", "--format", "json", *args))
    return {line["provider"]: line for line in doc["lines"]} | {"": doc["statement"]}


def test_sampled_shares_are_within_their_intervals_of_the_full_statement(
    workspace: Path, logs: tuple[Path, Path], sampled: tuple[str, str], tmp_path: Path
) -> None:
    full_url = workspace_ledger(workspace, tmp_path)
    _index(full_url, workspace, tmp_path)
    ok(full_url, "attribute", "--outputs", str(logs[1]))
    full = _lines(full_url)
    url, _ = sampled
    estimate = _lines(url, "--pool", "1000.00")
    head = estimate.pop("")
    assert head["sample"]["sampled_outputs"] == 60
    # Σ 1/π estimates the log's 270 outputs (not exactly: the sample is drawn by revenue).
    assert 150 < head["sample"]["estimated_outputs"] < 450
    assert sum(line["amount_minor"] for line in estimate.values()) == 100000
    for name, line in estimate.items():
        assert full[name]["share_half_width"] is None
        assert 0 < line["share_half_width"] < 0.5
        assert abs(line["share"] - full[name]["share"]) <= line["share_half_width"], name
    table = ok(url, "report", "--period", "2024-Q3")
    assert "Estimated from a sample: 60 sampled outputs" in table and "% ± " in table
    csv_head = ok(url, "report", "--period", "2024-Q3", "--format", "csv").splitlines()[0]
    assert "share_half_width" in csv_head.split(",")


def test_verify_redraws_the_sample_from_its_seed(
    logs: tuple[Path, Path], sampled: tuple[str, str]
) -> None:
    import sqlite3

    url, run_id = sampled
    args = ("verify", run_id[:12], "--outputs", str(logs[0]), "--sample", "2", "--seed", "1")
    out = ok(url, *args)
    assert "ok   sample re-drawn from its seed is the recorded one" in out
    # Tamper with a copy next to the ledger (the other tests keep the ledger untouched).
    path = Path(url.removeprefix("sqlite:///"))
    copy = path.with_name("tampered.db")
    with sqlite3.connect(path) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    url = f"sqlite:///{copy}"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:  # tamper past the append-only triggers
            conn.execute(text("DROP TRIGGER sample_units_no_update"))
            conn.execute(text(
                "UPDATE sample_units SET inclusion_probability = inclusion_probability / 2 "
                "WHERE external_id = (SELECT MIN(external_id) FROM sample_units)"
            ))  # fmt: skip
    finally:
        engine.dispose()
    result = run(url, *args)
    assert result.exit_code == 1
    assert "FAIL sample re-drawn from its seed is the recorded one" in result.stdout
    assert "1 with another stratum or probability" in result.stdout


def test_sample_size_is_planned_from_the_pilot(sampled: tuple[str, str]) -> None:
    url, _ = sampled
    plan = json.loads(ok(url, "sample-size", "--period", "2024-Q3", "--precision", "0.05",
                         "--format", "json"))  # fmt: skip
    assert plan["pilot_outputs"] == 60 and plan["outputs_per_second"] > 0
    finer = json.loads(ok(url, "sample-size", "--period", "2024-Q3", "--precision", "0.025",
                          "--format", "json", "--throughput", "2"))  # fmt: skip
    # Halving the half-width needs four times the sample before the finite population
    # correction n = n0 / (1 + n0 / N); n0 recovered from the first plan (±1 for rounding up).
    big_n = plan["population"]
    n0 = big_n * plan["outputs"] / (big_n - plan["outputs"])
    assert abs(finer["outputs"] - 4 * n0 / (1 + 4 * n0 / big_n)) <= 4
    assert finer["seconds"] == finer["outputs"] / 2
    text_out = ok(url, "sample-size", "--period", "2024-Q3", "--precision", "0.05")
    assert text_out.startswith(f"2024-Q3: attribute {plan['outputs']} of about")


def test_bad_sample_options_are_refused_in_one_line(
    logs: tuple[Path, Path], sampled: tuple[str, str], workspace: Path
) -> None:
    url, _ = sampled
    line = refused(url, "attribute", "--outputs", str(logs[0]), "--sample", "5",
                   "--weight-field", "cost")  # fmt: skip
    assert "log.jsonl, line 1" in line and "cost" in line and "missing" in line
    # The workspace's own outputs are in 2024-Q3 too: attributing them in full mixes the period
    # (in a copy beside the ledger, so that the module's other tests see it sampled only).
    import sqlite3

    path = Path(url.removeprefix("sqlite:///"))
    copy = path.with_name("mixed.db")
    with sqlite3.connect(path) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    url = f"sqlite:///{copy}"
    ok(url, "attribute", "--outputs", str(workspace / "queries.jsonl"))
    line = refused(url, "report", "--period", "2024-Q3")
    assert "mixes outputs attributed in full" in line


def test_a_saved_sampled_draft_is_discarded_with_its_intervals(sampled: tuple[str, str]) -> None:
    url = sampled[0]

    def rows(table: str) -> int:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                return conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
        finally:
            engine.dispose()

    before = rows("statements"), rows("statement_estimates")
    ok(url, "report", "--period", "2024-08", "--save")
    assert rows("statement_estimates") > before[1]
    ok(url, "statements", "discard", "2024-08")
    assert (rows("statements"), rows("statement_estimates")) == before
