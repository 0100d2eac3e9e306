"""The migrations build exactly the models' schema, downgrade cleanly, and enforce the rules."""

from __future__ import annotations

import importlib

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError

from ledger.db import current_revision, database_url, downgrade, make_engine, upgrade
from ledger.models import Base

SET_CHECKED_FOREIGN_KEYS = importlib.import_module(
    "migrations.versions.0003_ledger_invariants"
).SET_CHECKED_FOREIGN_KEYS
RESULT_FOREIGN_KEYS = importlib.import_module(
    "migrations.versions.0005_result_guards_per_output"
).SET_CHECKED_FOREIGN_KEYS

VIEWS = {
    "query_credits",
    "statement_lines_named",
    "provider_value_by_period",
    "provider_value_by_month",
    "statement_adjustments_named",
}


def test_migrations_and_models_agree(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    if engine.dialect.name == "postgresql":
        # These foreign keys are checked per INSERT by set-based triggers there (0003, 0005).
        set_checked = {name for fks in SET_CHECKED_FOREIGN_KEYS.values() for name, _ in fks}
        set_checked |= {name for name, _ in RESULT_FOREIGN_KEYS}
        moved = {d[1].name for d in diff if d[0] == "add_fk"}
        assert moved == set_checked
        diff = [d for d in diff if d[0] != "add_fk"]
    assert diff == []


@pytest.mark.postgres
def test_set_checked_foreign_keys_still_refuse_rows_without_a_result(make_database_url) -> None:
    engine = make_engine(make_database_url("postgresql"))
    upgrade(engine)
    try:
        for table, columns in (
            ("credits", "run_id, query_id, provider_id, positive_sum, credit"),
            ("top_examples", "run_id, query_id, rank, example_id, shard, row, provider_id, score"),
            (
                "query_results",
                "run_id, query_id, unattributed, positive_total, is_current, recorded_at",
            ),
        ):
            values = {
                "credits": "('r', 1, 1, 1.0, 1.0)",
                "top_examples": "('r', 1, 1, 'e', 's', 0, 1, 1.0)",
                "query_results": "('r', 1, false, 1.0, true, '2024-07-01')",
            }[table]
            with pytest.raises(IntegrityError, match="does not hold"), engine.begin() as conn:
                conn.execute(text(f"INSERT INTO {table} ({columns}) VALUES {values}"))
    finally:
        engine.dispose()


def test_migrations_create_the_views_and_downgrade_to_an_empty_database(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        assert current_revision(engine) is not None
        assert VIEWS <= set(inspect(engine).get_view_names())
        downgrade(engine, "base")
        inspector = inspect(engine)
        assert set(inspector.get_table_names()) <= {"alembic_version"}
        assert inspector.get_view_names() == []
        upgrade(engine)
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_accepts_a_url(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        assert "credits" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_foreign_keys_are_enforced(engine: Engine) -> None:
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO shards (path, sha256, provider_id, row_count, created_at) "
                "VALUES ('x', 'y', 999, 1, CURRENT_TIMESTAMP)"
            )
        )


def test_database_url_prefers_explicit_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEDGER_DATABASE_URL", raising=False)
    assert database_url(None) == "sqlite:///ledger.db"
    monkeypatch.setenv("LEDGER_DATABASE_URL", "sqlite:///env.db")
    assert database_url(None) == "sqlite:///env.db"
    assert database_url("sqlite:///x.db") == "sqlite:///x.db"
