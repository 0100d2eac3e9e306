"""The one place that opens the ledger database and migrates it.

SQLite is the default (a file, ``ledger.db``); PostgreSQL is used by giving a
``postgresql://`` URL (``--db`` or the ``LEDGER_DATABASE_URL`` environment variable).
"""

from __future__ import annotations

import getpass
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from ledger import guards
from ledger.errors import LedgerError

if TYPE_CHECKING:  # alembic is imported when a migration runs, not for every command
    from alembic.config import Config

DEFAULT_URL = "sqlite:///ledger.db"
LEDGER_LOCK_KEY = 0x6C656467  # "ledg": the ledger's advisory lock on PostgreSQL
ENV_VAR = "LEDGER_DATABASE_URL"


def database_url(explicit: str | None) -> str:
    """The database URL to use: `explicit`, else ``$LEDGER_DATABASE_URL``, else `DEFAULT_URL`."""
    if explicit:
        return explicit
    return os.environ.get(ENV_VAR) or DEFAULT_URL


SUPPORTED = ("sqlite", "postgresql")
"""The databases the ledger runs on (its migrations and guards are written for these two)."""


def checked_url(url: str) -> str:
    """`url` if the ledger can run on it; ``postgres://`` (libpq's spelling) and a PostgreSQL URL
    without a driver name mean psycopg 3, the driver of the ``[postgres]`` extra.

    Any other database is refused in one line, and so is a SQLite file in a directory that
    does not exist (the driver would only say "unable to open database file").
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise LedgerError(f"invalid database URL {url!r}: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "postgres":  # what libpq, Heroku and many hosts write
        url = "postgresql" + url[len("postgres") :]
        parsed, backend = make_url(url), "postgresql"
    if parsed.drivername == "postgresql":  # the driver the [postgres] extra installs
        url = "postgresql+psycopg" + url[len("postgresql") :]
    if backend not in SUPPORTED:
        raise LedgerError(
            f"unsupported database {backend!r} in {parsed.render_as_string()}: the ledger runs "
            "on SQLite (sqlite:///ledger.db) or PostgreSQL (postgresql://user@host/ledger)"
        )
    path = sqlite_file(url)
    if path is not None and not path.parent.is_dir():
        raise LedgerError(
            f"the SQLite database {parsed.database} cannot be created: directory "
            f"{path.parent} does not exist"
        )
    return url


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (absolute), or None for another database or an in-memory one."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.query.get("uri"):
        return None
    if parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).absolute()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite connections enforce foreign keys (``PRAGMA foreign_keys=ON``)."""
    url = checked_url(url)
    if url.startswith("sqlite") and "connect_args" not in kwargs:
        # Writers take the database's write lock up front (`lock_ledger`); another writer
        # waits for it up to this many seconds instead of failing at once.
        kwargs["connect_args"] = {"timeout": 60}
    try:
        engine = create_engine(url, **kwargs)
    except ModuleNotFoundError as exc:
        raise LedgerError(
            f"no database driver for {url.split(':', 1)[0]} ({exc.name} is not installed); "
            "pip install 'provider-credit-ledger[postgres]'"
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
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(files("migrations")))
    if url is not None:
        # ConfigParser treats '%' as interpolation; URLs may contain percent-escapes.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url_or_engine: str | Engine, revision: str = "head") -> None:
    """Migrate the database to `revision` (default: the newest), creating it if empty."""
    from alembic import command

    _run_alembic(url_or_engine, lambda cfg: command.upgrade(cfg, revision))


def downgrade(url_or_engine: str | Engine, revision: str) -> None:
    """Migrate the database down to `revision` (``"base"`` drops every ledger table)."""
    from alembic import command

    _run_alembic(url_or_engine, lambda cfg: command.downgrade(cfg, revision))


def _run_alembic(url_or_engine: str | Engine, action: Any) -> None:
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                # The driver opens transactions only before INSERT, UPDATE and DELETE, so DDL
                # would commit statement by statement: a migration that fails half-way would
                # leave the schema half-changed. Open the transaction explicitly.
                raw = connection.connection.dbapi_connection
                if raw is not None and not raw.in_transaction:
                    raw.execute("BEGIN")
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


def lock_ledger(session: Session, exclusive: bool = True) -> None:
    """Serialise the ledger's money writes; call first in the transaction.

    PostgreSQL: a transaction-scoped advisory lock, exclusive for building, finalising and
    adjusting statements, shared for recording credits (so batches record side by side, but
    never while a statement is being built or closed). SQLite: the write lock up front
    (``BEGIN IMMEDIATE``), so what the transaction reads cannot change before it writes.
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        connection.exec_driver_sql(f"SELECT {function}({LEDGER_LOCK_KEY})")
    elif connection.dialect.name == "sqlite":
        raw = connection.connection.dbapi_connection
        if raw is not None and not raw.in_transaction:
            raw.execute("BEGIN IMMEDIATE")


def database_user(session: Session) -> str:
    """Who is writing: the database's session user on PostgreSQL, the OS user on SQLite."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        return str(connection.exec_driver_sql("SELECT session_user").scalar())
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (containers)
        return f"uid {os.getuid()}"


LEDGER_ROLES = {"reader": "ledger_reader", "writer": "ledger_writer", "approver": "ledger_approver"}
_TIMEOUT = re.compile(r"\d{1,7}(ms|s|min)?")


def grant_role(
    engine: Engine, role: str, user: str, *, create: bool = False, timeout: str = "60s"
) -> None:
    """Make PostgreSQL `user` a member of the ledger's `role` (reader, writer or approver).

    With `create`, `user` is created first as a login role. A reader's sessions get a
    statement timeout (`timeout`, e.g. ``60s``). The roles come from the migrations; this
    refuses on SQLite, whose file permissions are its only access control.
    """
    if role not in LEDGER_ROLES:
        raise LedgerError(f"unknown role {role!r}: reader, writer or approver")
    if _TIMEOUT.fullmatch(timeout) is None:
        raise LedgerError(f"--timeout {timeout!r}: expected a number with ms, s or min")
    with engine.begin() as conn:
        if conn.dialect.name != "postgresql":
            raise LedgerError(
                "roles are a PostgreSQL feature; a SQLite ledger is protected by its file's "
                "permissions"
            )
        name = LEDGER_ROLES[role]
        if (
            conn.exec_driver_sql("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).first()
            is None
        ):
            raise LedgerError(
                f"role {name} does not exist: migrate the database as a user who may create "
                "roles (`ledger init`)"
            )
        quoted = conn.dialect.identifier_preparer.quote(user)
        exists = conn.exec_driver_sql("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).first()
        if create and exists is None:
            conn.exec_driver_sql(f"CREATE ROLE {quoted} LOGIN")
        elif exists is None:
            raise LedgerError(f"database user {user!r} does not exist (add --create)")
        conn.exec_driver_sql(f"GRANT {name} TO {quoted}")
        if role == "reader":
            conn.exec_driver_sql(f"ALTER ROLE {quoted} SET statement_timeout = '{timeout}'")
            conn.exec_driver_sql(f"ALTER ROLE {quoted} SET default_transaction_read_only = on")


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


DEFAULT_QUERY_TIMEOUT_S = 60.0
"""How long `read_only_query` may run, from its start to its last row, unless told otherwise."""
READER_ROLE = "ledger_reader"
"""The PostgreSQL role `read_only_query` runs as: SELECT on the views, nothing else."""
CHUNK_ROWS = 1000
"""Rows fetched from the database at a time: memory stays flat however many rows there are."""

# Functions refused by name on PostgreSQL although the reader role may call them: set_config
# could switch the role back to the login user (or lift the time limit), and these run SQL text
# given as a string (so could call set_config unseen); the rest signal other sessions, read
# files or take locks that outlive the query. Most are also refused to the reader role itself;
# naming them gives a clear error instead of one from deep in the server.
_PG_REFUSED_FUNCTIONS = (
    "set_config",
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "dblink",
    "pg_cancel_backend",
    "pg_terminate_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "lo_import",
    "lo_export",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
)
# SQLite: load_extension is already off in Python's sqlite3 ("not authorized"); fts3_tokenizer
# hands out (and with two arguments takes) raw pointers.
_SQLITE_REFUSED_FUNCTIONS = ("load_extension", "fts3_tokenizer")
_NAME_PATTERN = r"(?<![\w$])({})(?![\w$])"


def _refused_function(query: str, dialect: str) -> str | None:
    """The first function named in `query` that `read_only_query` refuses on `dialect`."""
    names = _PG_REFUSED_FUNCTIONS if dialect == "postgresql" else _SQLITE_REFUSED_FUNCTIONS
    match = re.search(_NAME_PATTERN.format("|".join(names)), query, flags=re.IGNORECASE)
    if match:
        return match.group(1).lower()
    if dialect == "postgresql" and re.search(r"u&\s*\"", query, flags=re.IGNORECASE):
        return 'U&"..." (an identifier spelled with escapes)'
    return None


def read_only_query(
    engine: Engine,
    query: str,
    *,
    timeout: float = DEFAULT_QUERY_TIMEOUT_S,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[dict[str, Any]]:
    """The rows of one SQL query that cannot change the ledger, as they come from the database.

    A generator: the query starts at the first `next()`, rows are fetched `chunk_rows` at a
    time (a PostgreSQL server-side cursor, SQLite's stepping cursor), so memory does not grow
    with the number of rows; closing the generator early ends the query. The transaction is
    always rolled back.

    The database enforces that nothing is written, whatever the query says: SQLite runs it under
    `PRAGMA query_only` with an authorizer that allows only reading; PostgreSQL in a `READ ONLY`
    transaction as the role `ledger_reader` (which may read the views and nothing else, and
    cannot signal other sessions or read server files), and as one statement (a cursor, or a
    prepared statement for EXPLAIN: `...; COMMIT; DELETE ...` is refused). Functions that could
    undo those limits or reach outside the query are refused by name (`_refused_function`).
    The query and the reading of its rows must finish within `timeout` seconds: PostgreSQL's
    `statement_timeout` (set to the time left before each fetch), SQLite's progress handler.
    The text goes to the driver unchanged (no bind-parameter parsing, so `':'` and `'%'` in
    literals are plain text). Raises `LedgerError` (one line) for a database error, a refused
    function, the time limit, a missing reader role, or a statement that returns no rows.
    """
    if not timeout > 0:
        raise LedgerError(f"the time limit must be positive, not {timeout}")
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        dialect = conn.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise LedgerError(
                f"read-only queries are supported on SQLite and PostgreSQL, not {dialect}"
            )
        refused = _refused_function(query, dialect)
        if refused:
            raise LedgerError(
                f"ledger sql does not run {refused}: it could reach beyond reading the ledger"
            )
        raw = conn.connection.dbapi_connection
        if dialect == "sqlite":
            yield from _sqlite_rows(raw, query, deadline, timeout, chunk_rows)
        else:
            yield from _postgres_rows(raw, query, deadline, timeout, chunk_rows)


def _time_limit_error(timeout: float) -> LedgerError:
    return LedgerError(
        f"the query ran past its time limit of {timeout:g} s and was stopped; narrow it, or "
        "give a longer --timeout"
    )


def _rows_of(cursor: Any, fetch: Any) -> Iterator[dict[str, Any]]:
    """Rows as dicts of plain values, after checking the result's columns."""
    if cursor.description is None:
        raise LedgerError("the statement returns no rows; only queries that read are run")
    names = [d[0] for d in cursor.description]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LedgerError(
            f"the result has more than one column named {repeated[0]!r}; give each "
            "column its own name (SELECT a.x AS a_x, b.x AS b_x ...)"
        )
    while chunk := fetch():
        for row in chunk:
            yield {n: _plain_value(v) for n, v in zip(names, row, strict=True)}


_SQLITE_READS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}


def _sqlite_authorizer(action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
    """Allow reading, reading a pragma's value and calling functions other than the refused."""
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in _SQLITE_REFUSED_FUNCTIONS else 0
    if action in _SQLITE_READS or (action == sqlite3.SQLITE_PRAGMA and arg2 is None):
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _sqlite_rows(
    raw: Any, query: str, deadline: float, timeout: float, chunk_rows: int
) -> Iterator[dict[str, Any]]:
    cursor = raw.cursor()
    timed_out = False

    def past_deadline() -> int:
        nonlocal timed_out
        timed_out = time.monotonic() > deadline
        return int(timed_out)

    cursor.execute("PRAGMA query_only = ON")
    raw.set_authorizer(_sqlite_authorizer)
    raw.set_progress_handler(past_deadline, 10_000)
    try:
        cursor.execute(query)
        yield from _rows_of(cursor, lambda: cursor.fetchmany(chunk_rows))
    except sqlite3.Error as exc:
        if timed_out:
            raise _time_limit_error(timeout) from exc
        raise LedgerError(f"SQL error: {str(exc).strip().splitlines()[0]}") from exc
    finally:
        raw.set_progress_handler(None, 0)
        raw.set_authorizer(None)
        raw.rollback()
        cursor.execute("PRAGMA query_only = OFF")
        cursor.close()


def _postgres_rows(
    raw: Any, query: str, deadline: float, timeout: float, chunk_rows: int
) -> Iterator[dict[str, Any]]:
    import psycopg

    def set_time_left(cursor: Any) -> None:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise _time_limit_error(timeout)
        cursor.execute(f"SET LOCAL statement_timeout = {left_ms}")

    setup = raw.cursor()
    explain = query.lstrip().split(None, 1)[0].lower() == "explain" if query.strip() else False
    cursor = setup if explain else raw.cursor(name="ledger_sql")
    try:
        setup.execute("SET TRANSACTION READ ONLY")
        try:
            setup.execute(f"SET LOCAL ROLE {READER_ROLE}")
        except psycopg.Error as exc:
            raise LedgerError(
                f"ledger sql runs as the database role {READER_ROLE}, which this database does "
                f"not have or this user may not use ({str(exc).strip().splitlines()[0]}); run "
                "the migrations (ledger init) as a user that may create roles, or GRANT "
                f"{READER_ROLE} TO this user"
            ) from exc
        set_time_left(setup)
        if explain:
            cursor.execute(query, prepare=True)
        else:
            cursor.execute(query)  # DECLARE ... CURSOR FOR <query>: one statement

        def fetch() -> list[tuple]:
            set_time_left(setup)
            return cursor.fetchmany(chunk_rows)

        yield from _rows_of(cursor, fetch)
    except psycopg.errors.QueryCanceled as exc:
        raise _time_limit_error(timeout) from exc
    except psycopg.Error as exc:
        raise LedgerError(f"SQL error: {str(exc).strip().splitlines()[0]}") from exc
    finally:
        raw.rollback()  # ends the cursor, the role and the time limit with the transaction
        if cursor is not setup:
            cursor.close()
        setup.close()
