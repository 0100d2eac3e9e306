"""Recording runs: one transaction, idempotent per (run, query), newer runs supersede older."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import Engine, func, select, text

from ledger import models as m
from ledger.db import session_scope
from ledger.errors import ConflictError, LedgerError, NotFoundError
from ledger.recording import (
    already_recorded,
    get_run,
    list_runs,
    query_explanation,
    record_results,
    start_run,
    weight_to_micros,
)
from ledger.registry import (
    add_provider,
    add_shard,
    get_or_create_provider,
    list_providers,
    list_shards,
    register_index,
)
from tests.ledger.helpers import record_run, result, setup_index, sha

T0 = datetime(2024, 7, 15, 12, 0)


def count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()


def test_a_shard_reached_through_a_link_is_the_shard_itself(engine: Engine, tmp_path) -> None:
    shard = tmp_path / "a.jsonl"
    shard.write_text('{"text": "a b"}\n')
    (tmp_path / "link.jsonl").symlink_to(shard)
    with session_scope(engine) as s:
        first = add_shard(s, str(shard), sha("a"), "books", 1)
        assert add_shard(s, str(tmp_path / "link.jsonl"), sha("a"), "books", 1).id == first.id
        with pytest.raises(ConflictError, match="registered for provider 'books'"):
            add_shard(s, str(tmp_path / "link.jsonl"), sha("a"), "acme", 1)
        assert [x.path for x in list_shards(s)] == [str(shard)]


def test_providers_and_shards_are_registered_once(engine: Engine) -> None:
    with session_scope(engine) as s:
        add_provider(s, "acme")
        with pytest.raises(ConflictError, match="already exists"):
            add_provider(s, "acme")
        assert get_or_create_provider(s, "acme").name == "acme"
        shard = add_shard(s, "a.jsonl", sha("a"), "books", 5)
        assert add_shard(s, "a.jsonl", sha("a"), "books", 5).id == shard.id
        with pytest.raises(ConflictError, match="content changed"):
            add_shard(s, "a.jsonl", sha("b"), "books", 5)
        # A copy of registered content, under this provider or another, would be indexed twice.
        for provider in ("books", "acme"):
            with pytest.raises(ConflictError, match="already registered as 'a.jsonl'"):
                add_shard(s, "copy.jsonl", sha("a"), provider, 5)
        assert [p.name for p in list_providers(s)] == ["acme", "books"]
        assert [x.path for x in list_shards(s)] == ["a.jsonl"]
        index = register_index(s, sha("i"), "/idx", {"k": 1})
        assert register_index(s, sha("i"), "/idx", {"k": 1}).id == index.id
        with pytest.raises(ConflictError):
            register_index(s, sha("i"), "/idx", {"k": 2})


@pytest.mark.parametrize(
    "name, message",
    [
        ("p" * 201, "longer than 200 characters"),
        ("acme\x00", "NUL"),
        ("acme\udcff", "not valid Unicode"),  # undecodable byte from a command line
        ("  ", "non-empty"),
    ],
)
def test_provider_names_the_ledger_cannot_store_are_refused(engine, name, message) -> None:
    with session_scope(engine) as s:
        with pytest.raises(LedgerError, match=message):
            add_provider(s, name)
        with pytest.raises(LedgerError, match=message):
            get_or_create_provider(s, name)
        add_provider(s, "p" * 200)  # the longest name that fits
    assert count(engine, "providers") == 1


def test_recording_twice_does_not_double_count(engine: Engine) -> None:
    results = [result("q1", T0, {"a": 3.0, "b": 1.0}), result("q2", T0, {"a": 1.0})]
    with session_scope(engine) as s:
        index_id = setup_index(s, ["a", "b"])
        run_id = sha("run")
        start_run(s, run_id, index_id, {"r": 1})
        assert record_results(s, run_id, results) == 2
    with session_scope(engine) as s:
        assert start_run(s, run_id, index_id, {"r": 1}).id == run_id
        assert already_recorded(s, run_id, ["q1", "q2", "q3"]) == {"q1", "q2"}
        assert record_results(s, run_id, results) == 0
    assert count(engine, "credits") == 3
    assert count(engine, "queries") == 2
    assert count(engine, "top_examples") == 3


def test_a_newer_run_supersedes_older_credits_instead_of_adding(engine: Engine) -> None:
    with session_scope(engine) as s:
        index_id = setup_index(s, ["a", "b"])
        old, _ = record_run(s, index_id, "old", [result("q1", T0, {"a": 1.0})])
        new, _ = record_run(s, index_id, "new", [result("q1", T0, {"b": 1.0})])
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT provider, credit, run_id FROM query_credits ORDER BY provider")
        ).all()
    assert [tuple(r) for r in rows] == [("b", 1.0, new)]
    assert count(engine, "credits") == 2  # the old result is kept for audit
    with session_scope(engine) as s:
        explanation = query_explanation(s, "q1")
        assert explanation["run_id"] == new
        assert explanation["credits"] == [{"provider": "b", "positive_sum": 1.0, "credit": 1.0}]
        assert [r.id for r in list_runs(s)] == [old, new]


def test_unattributed_queries_are_recorded_with_no_credit(engine: Engine) -> None:
    with session_scope(engine) as s:
        index_id = setup_index(s, ["a"])
        record_run(s, index_id, "r", [result("q1", T0, {}), result("q2", T0, {"a": 2.0})])
        assert query_explanation(s, "q1")["unattributed"] is True
        assert query_explanation(s, "q1")["credits"] == []
    with engine.connect() as conn:
        flags = conn.execute(
            select(m.Query.external_id, m.QueryResult.unattributed)
            .join(m.QueryResult, m.QueryResult.query_id == m.Query.id)
            .order_by(m.Query.external_id)
        ).all()
    assert [(e, bool(u)) for e, u in flags] == [("q1", True), ("q2", False)]
    assert count(engine, "credits") == 1


def test_a_failed_batch_writes_nothing(engine: Engine) -> None:
    with session_scope(engine) as s:
        index_id = setup_index(s, ["a"])
        start_run(s, sha("run"), index_id, {})
    good = result("q1", T0, {"a": 1.0})
    unknown = result("q2", T0, {"nobody": 1.0})
    with pytest.raises(NotFoundError, match="unknown provider 'nobody'"):
        with session_scope(engine) as s:
            record_results(s, sha("run"), [good, unknown])
    assert count(engine, "queries") == 0
    assert count(engine, "query_results") == 0


def test_inconsistent_inputs_are_refused(engine: Engine) -> None:
    with session_scope(engine) as s:
        index_id = setup_index(s, ["a"])
        run_id, _ = record_run(s, index_id, "r1", [result("q1", T0, {"a": 1.0})])
        run2 = sha("run2")
        start_run(s, run2, index_id, {"x": 1})
        with pytest.raises(ConflictError, match="different served_at"):
            record_results(s, run2, [result("q1", T0 + timedelta(days=1), {"a": 1.0})])
        with pytest.raises(LedgerError, match="appears twice"):
            record_results(s, run2, [result("q9", T0, {"a": 1.0})] * 2)
        bad = result("q8", T0, {"a": 1.0})
        object.__setattr__(bad.credits[0], "credit", 0.5)
        with pytest.raises(LedgerError, match="weight"):
            record_results(s, run2, [bad])
        with pytest.raises(LedgerError, match="more than 6 decimal"):
            record_results(s, run2, [result("q7", T0, {"a": 1.0}, weight=Decimal("0.0000001"))])
        with pytest.raises(LedgerError, match="finished"):
            record_results(s, run_id, [result("q6", T0, {"a": 1.0})])
        with pytest.raises(ConflictError):
            start_run(s, run2, index_id, {"x": 2})
        with pytest.raises(NotFoundError):
            get_run(s, sha("nope"))


def test_served_at_is_stored_in_utc_and_weights_exactly(engine: Engine) -> None:
    plus2 = timezone(timedelta(hours=2))
    served = datetime(2024, 7, 1, 1, 30, tzinfo=plus2)  # 2024-06-30 23:30 UTC
    with session_scope(engine) as s:
        index_id = setup_index(s, ["a"])
        record_run(
            s, index_id, "r", [result("q1", served, {"a": 1.0}, weight=Decimal("12345.678901"))]
        )
        q = s.scalar(select(m.Query))
        assert q.served_at == datetime(2024, 6, 30, 23, 30)
        assert q.weight_micros == 12345678901
        assert query_explanation(s, "q1")["weight"] == "12345.678901"
        assert s.scalar(select(func.count()).select_from(m.Query)) == 1
    assert served.astimezone(UTC).replace(tzinfo=None) == datetime(2024, 6, 30, 23, 30)


def test_weights_must_fit_bigint_millionths() -> None:
    assert weight_to_micros(Decimal("9223372036854.775807")) == 2**63 - 1
    assert weight_to_micros(Decimal("1e3")) == 1_000_000_000
    for weight, message in [
        (Decimal("9223372036854.775808"), "too large for the ledger"),
        (Decimal("1e30"), "too large for the ledger"),
        (Decimal("1e999999999"), "too large for the ledger"),  # beyond the decimal context
        (Decimal("0.1234567"), "more than 6 decimal places"),
        # 29 significant digits: the context's rounding to 28 would hide the 7th place.
        (Decimal("1234567890123.4567890000000000001"), "more than 6 decimal places"),
    ]:
        with pytest.raises(LedgerError, match=message):
            weight_to_micros(weight, "q1")
