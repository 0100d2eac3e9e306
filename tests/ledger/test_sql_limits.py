"""`ledger sql` reads the views and nothing more: on PostgreSQL as the role ledger_reader in a
READ ONLY transaction, on SQLite under query_only and an authorizer; within a time limit; and
with its rows streamed, never held whole."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, make_url, text

from ledger.cli import cli
from ledger.db import make_engine, read_only_query, upgrade
from ledger.errors import LedgerError

COUNTER = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT n FROM c"
"""Rows without end: only a streaming reader gets any of them."""


def refused(engine: Engine, query: str, timeout: float = 30.0) -> str:
    """The one-line error `read_only_query` raises for `query`."""
    with pytest.raises(LedgerError) as info:
        list(read_only_query(engine, query, timeout=timeout))
    message = str(info.value)
    assert "\n" not in message
    return message


def _migrated(make_database_url, kind: str) -> Iterator[Engine]:
    engine = make_engine(make_database_url(kind))
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(make_database_url) -> Iterator[Engine]:
    """A migrated PostgreSQL ledger (roles and server functions exist only there)."""
    yield from _migrated(make_database_url, "postgresql")


@pytest.fixture
def sqlite_engine(make_database_url) -> Iterator[Engine]:
    """A migrated SQLite ledger (its own functions and pragmas)."""
    yield from _migrated(make_database_url, "sqlite")


@pytest.mark.parametrize(
    "query",
    [
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT pg_reload_conf()",
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
        "SELECT PG_CATALOG.Pg_Terminate_Backend(pg_backend_pid())",
        "SELECT set_config('role', current_user, true)",
        "SELECT set_config('statement_timeout', '0', true)",
        "SELECT query_to_xml('SELECT 1', true, false, '')",
        "SELECT pg_advisory_lock(1)",
        'SELECT U&"pg\\005fsleep"(0)',
    ],
)
@pytest.mark.postgres
def test_server_functions_are_refused_on_postgresql(pg_engine: Engine, query: str) -> None:
    engine = pg_engine
    assert refused(engine, query).startswith("ledger sql does not run ")


@pytest.mark.postgres
def test_the_reader_role_itself_refuses_tables_and_superuser_functions(pg_engine: Engine) -> None:
    engine = pg_engine
    with engine.connect() as conn:  # the engine's user is a superuser, and may do all this
        assert conn.execute(text("SELECT COUNT(*) FROM credits")).scalar_one() == 0
    # Not in the list of refused names: the role is what stops them.
    assert "permission denied for table credits" in refused(engine, "SELECT * FROM credits")
    assert "permission denied" in refused(engine, "SELECT * FROM pg_ls_waldir()")
    assert "permission denied" in refused(engine, "SELECT * FROM pg_authid")
    assert list(read_only_query(engine, "SELECT current_user AS u")) == [{"u": "ledger_reader"}]
    assert list(read_only_query(engine, "SELECT COUNT(*) AS n FROM query_credits")) == [{"n": 0}]


@pytest.mark.postgres
def test_a_user_who_may_not_be_the_reader_is_told_what_to_do(
    pg_engine: Engine, postgres_server
) -> None:
    engine = pg_engine
    role = f"analyst_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
    url = make_url(str(engine.url.render_as_string(hide_password=False))).set(username=role)
    other = make_engine(url.render_as_string(hide_password=False))
    try:
        message = refused(other, "SELECT 1 AS one")
        assert "runs as the database role ledger_reader" in message
        assert "ledger init" in message and "GRANT ledger_reader TO" in message
    finally:
        other.dispose()
        with engine.begin() as conn:
            conn.execute(text(f"DROP ROLE {role}"))


@pytest.mark.parametrize(
    "query",
    [
        "SELECT fts3_tokenizer('simple')",
        "SELECT load_extension('/tmp/x')",
        "ATTACH DATABASE ':memory:' AS other",
        "PRAGMA query_only = OFF",
    ],
)
def test_harmful_sqlite_statements_are_refused(sqlite_engine: Engine, query: str) -> None:
    engine = sqlite_engine
    message = refused(engine, query)
    assert message.startswith(("ledger sql does not run ", "SQL error: ")), message
    assert list(read_only_query(engine, "PRAGMA query_only")) == [{"query_only": 1}]


def test_a_slow_query_is_stopped_at_the_time_limit(engine: Engine) -> None:
    slow = "SELECT pg_sleep(5) AS s" if engine.dialect.name == "postgresql" else (
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000000000) "
        "SELECT MAX(n) AS m FROM c"
    )  # fmt: skip
    started = time.monotonic()
    message = refused(engine, slow, timeout=1)
    assert time.monotonic() - started < 4
    assert message.startswith("the query ran past its time limit of 1 s and was stopped")
    assert list(read_only_query(engine, "SELECT 1 AS one")) == [{"one": 1}]  # still usable


def test_rows_come_as_they_are_read_and_the_query_ends_when_the_reader_stops(
    engine: Engine,
) -> None:
    rows = read_only_query(engine, COUNTER, timeout=20, chunk_rows=500)
    assert isinstance(rows, Iterator)
    started = time.monotonic()
    assert [r["n"] for r in itertools.islice(rows, 1200)] == list(range(1, 1201))
    rows.close()  # rolls the transaction back and gives the connection back
    assert time.monotonic() - started < 10
    assert list(read_only_query(engine, "SELECT 2 AS two")) == [{"two": 2}]
    # The endless query only ends by its time limit when nobody stops reading.
    assert refused(engine, COUNTER, timeout=1).startswith("the query ran past its time limit")


def test_the_command_streams_csv_and_json_and_caps_the_table(engine: Engine) -> None:
    url = engine.url.render_as_string(hide_password=False)
    runner = CliRunner()

    def ledger(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(cli, ["--db", url, "sql", *args])
        return result.exit_code, result.stdout, result.stderr

    code, out, _ = ledger("--format", "csv", "--limit", "3", COUNTER)
    assert (code, out.splitlines()) == (0, ["n", "1", "2", "3"])
    code, out, _ = ledger("--format", "json", "--limit", "2", COUNTER)
    assert code == 0 and out == '[\n  {\n    "n": 1\n  },\n  {\n    "n": 2\n  }\n]\n'
    code, out, err = ledger("--limit", "2", COUNTER)
    assert code == 0 and out.splitlines()[2:] == ["1", "2"]
    assert "the first 2 rows" in err
    code, out, err = ledger("--format", "csv", "--timeout", "1", COUNTER)
    assert code == 1 and out.startswith("n\n1\n2\n")  # streamed until stopped
    assert err.strip().splitlines() == [
        "Error: the query ran past its time limit of 1 s and was stopped; narrow it, or give "
        "a longer --timeout"
    ]
