"""`ledger explain` shows what an auditor needs to judge an output's credit: its prompt and
completion, and the texts of its most influential training examples (cut to a line, whole
with --full), each checked against the hashes the ledger recorded."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from click.testing import CliRunner

from ledger.cli import cli
from ledger.db import make_engine, session_scope, upgrade
from ledger.recording import ProviderCredit, QueryRecord, QueryResult, TopExample
from ledger.registry import register_index
from tests.ledger.helpers import record_run

LONG = "the harbour pilot reads the tide tables " * 8  # 320 characters


def _ledger(db_url: str, tmp_path: Path) -> tuple[str, Path]:
    """Two registered shards, one output whose top examples are row 1 of each."""
    shards = {"harbor": ["short text", LONG.strip()], "stellar": ["comet tails", "a red dwarf"]}
    for name, texts in shards.items():
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts)
        )
    prompt, completion = "Tell me about tides", " The pilot reads the tables."
    queries = tmp_path / "served.jsonl"
    queries.write_text(json.dumps({"id": "q1", "timestamp": "2024-07-02T10:00:00Z",
                                   "prompt": prompt, "completion": completion}) + "\n")  # fmt: skip
    runner = CliRunner()
    for args in (["init"], ["providers", "add", *shards]):
        assert runner.invoke(cli, ["--db", db_url, *args]).exit_code == 0
    for name in shards:
        res = runner.invoke(cli, ["--db", db_url, "shards", "add",
                                  str(tmp_path / f"{name}.jsonl"), "--provider", name])  # fmt: skip
        assert res.exit_code == 0, res.output
    text_sha = hashlib.sha256((prompt + "\x00" + completion).encode()).hexdigest()
    engine = make_engine(db_url)
    upgrade(engine)
    with session_scope(engine) as session:
        register_index(session, "a" * 64, str(tmp_path / "index"), {"shards": list(shards)})
        record = QueryRecord("q1", datetime(2024, 7, 2, 10, tzinfo=UTC), Decimal(1), text_sha)
        top = [TopExample(1, "harbor.jsonl:1:0", "harbor.jsonl", 1, "harbor", 2.5),
               TopExample(2, "stellar.jsonl:1:0", "stellar.jsonl", 3, "stellar", 0.5)]  # fmt: skip
        credits = [ProviderCredit("harbor", 2.5, 0.8), ProviderCredit("stellar", 0.5, 0.2)]
        record_run(session, "a" * 64, "one", [QueryResult(record, credits, top, False)])
    engine.dispose()
    return db_url, queries


def explain(url: str, *args: str) -> str:
    res = CliRunner().invoke(cli, ["--db", url, "explain", "--query", "q1", *args])
    assert res.exit_code == 0, res.output
    return res.stdout


def test_explain_shows_the_output_and_its_examples_texts(db_url: str, tmp_path: Path) -> None:
    url, queries = _ledger(db_url, tmp_path)
    out = explain(url, "--outputs", str(queries))
    assert "prompt:     Tell me about tides" in out
    assert "completion: The pilot reads the tables." in out
    harbor = next(line for line in out.splitlines() if "harbor.jsonl:1:0" in line)
    assert "the harbour pilot reads" in harbor and harbor.endswith("…") and LONG not in out
    assert "a red dwarf" in out
    full = explain(url, "--outputs", str(queries), "--full")
    assert LONG.strip() in full
    doc = json.loads(explain(url, "--outputs", str(queries), "--format", "json"))
    assert doc["output"]["completion"] == " The pilot reads the tables."
    assert [t["text"] for t in doc["top"]] == [LONG.strip(), "a red dwarf"]


def test_explain_shows_no_text_that_is_not_the_recorded_one(db_url: str, tmp_path: Path) -> None:
    url, queries = _ledger(db_url, tmp_path)
    (tmp_path / "stellar.jsonl").write_text('{"text": "comet tails"}\n{"text": "forged"}\n')
    queries.write_text(queries.read_text().replace("tides", "tidal"))
    out = explain(url, "--outputs", str(queries))
    assert "forged" not in out and "text unavailable" in out
    assert "tidal" not in out and "differs from what the ledger recorded" in out
    assert "the harbour pilot reads" in out


def test_example_ids_of_another_shape_get_no_text_instead_of_an_error(tmp_path: Path) -> None:
    from ledger.db import make_engine, session_scope, upgrade
    from ledger.explain import example_texts

    engine = make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    upgrade(engine)
    top = [{"example_id": i} for i in ("doc-7", "a:b:c", "shard.jsonl:3")]
    with session_scope(engine) as session:
        assert example_texts(session, top) == {"doc-7": None, "a:b:c": None, "shard.jsonl:3": None}
    engine.dispose()
