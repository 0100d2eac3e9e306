"""The one place that opens the ledger database and migrates it.

SQLite is the default (a file, ``ledger.db``); PostgreSQL is used by giving a
``postgresql://`` URL (``--db`` or the ``LEDGER_DATABASE_URL`` environment variable).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from ledger import guards
from ledger.errors import LedgerError

DEFAULT_URL = "sqlite:///ledger.db"
ENV_VAR = "LEDGER_DATABASE_URL"


def database_url(explicit: str | None) -> str:
    """The database URL to use: `explicit`, else ``$LEDGER_DATABASE_URL``, else `DEFAULT_URL`."""
    if explicit:
        return explicit
    return os.environ.get(ENV_VAR) or DEFAULT_URL


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite connections enforce foreign keys (``PRAGMA foreign_keys=ON``)."""
    try:
        engine = create_engine(url, **kwargs)
    except ModuleNotFoundError as exc:
        raise LedgerError(
            f"no database driver for {url.split(':', 1)[0]} ({exc.name} is not installed); "
            "for PostgreSQL: pip install 'provider-credit-ledger[postgres]'"
        ) from exc
    except ArgumentError as exc:
        raise LedgerError(f"invalid database URL {url!r}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # A 64 MiB page cache (the default is 2 MiB) keeps the credit indexes in memory while a
    # run's results are written and a statement reads them back.
    cursor.execute("PRAGMA cache_size=-65536")
    # Write-ahead logging: readers never block the writer, and commits append to the log
    # instead of rewriting pages through a rollback journal (synchronous stays FULL, so a
    # committed transaction survives a power loss).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def alembic_config(url: str | None = None) -> Config:
    """An Alembic `Config` pointing at the installed ``migrations`` package.

    Built in code (no ``alembic.ini`` needed) so migrations work from an installed wheel.
    """
    config = Config()
    config.set_main_option("script_location", str(files("migrations")))
    if url is not None:
        # ConfigParser treats '%' as interpolation; URLs may contain percent-escapes.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url_or_engine: str | Engine, revision: str = "head") -> None:
    """Migrate the database to `revision` (default: the newest), creating it if empty."""
    _run_alembic(url_or_engine, lambda cfg: command.upgrade(cfg, revision))


def downgrade(url_or_engine: str | Engine, revision: str) -> None:
    """Migrate the database down to `revision` (``"base"`` drops every ledger table)."""
    _run_alembic(url_or_engine, lambda cfg: command.downgrade(cfg, revision))


def _run_alembic(url_or_engine: str | Engine, action: Any) -> None:
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            action(config)
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for a database never migrated."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def has_ledger_tables(engine: Engine) -> bool:
    """Whether the database already holds the ledger's tables."""
    return inspect(engine).has_table("statements")


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session in one transaction: committed if the block succeeds, rolled back otherwise."""
    session = sessionmaker(bind=engine, expire_on_commit=False)()
    guards.install(session)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _plain_value(value: Any) -> Any:
    """Binary values as hex text (`\\x00ff`, as PostgreSQL prints them); others unchanged."""
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    return value


def read_only_query(engine: Engine, query: str) -> list[dict[str, Any]]:
    """The rows of one SQL query that cannot change the ledger.

    The database enforces it, whatever the query says: SQLite runs it under
    `PRAGMA query_only`, PostgreSQL in a `READ ONLY` transaction as a prepared statement (so it
    is one statement: `...; COMMIT; DELETE ...` is refused). Either way the transaction is
    rolled back. The text goes to the driver unchanged (no bind-parameter parsing, so `':'` and
    `'%'` in literals are plain text). Raises `LedgerError` for a database error or a
    statement that returns no rows.
    """
    with engine.connect() as conn:
        dialect = conn.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise LedgerError(
                f"read-only queries are supported on SQLite and PostgreSQL, not {dialect}"
            )
        raw = conn.connection.dbapi_connection
        cursor = raw.cursor()
        try:
            if dialect == "sqlite":
                cursor.execute("PRAGMA query_only = ON")
                cursor.execute(query)
            else:
                cursor.execute("SET TRANSACTION READ ONLY")
                cursor.execute(query, prepare=True)
            if cursor.description is None:
                raise LedgerError("the statement returns no rows; only queries that read are run")
            names = [d[0] for d in cursor.description]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise LedgerError(
                    f"the result has more than one column named {repeated[0]!r}; give each "
                    "column its own name (SELECT a.x AS a_x, b.x AS b_x ...)"
                )
            rows = [
                {n: _plain_value(v) for n, v in zip(names, row, strict=True)}
                for row in cursor.fetchall()
            ]
        except conn.dialect.loaded_dbapi.Error as exc:
            raise LedgerError(f"SQL error: {str(exc).strip().splitlines()[0]}") from exc
        finally:
            raw.rollback()
            if dialect == "sqlite":
                cursor.execute("PRAGMA query_only = OFF")
            cursor.close()
    return rows
