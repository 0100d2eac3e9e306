"""Whether an attribution run still has a process working on it.

A run is recorded as `running` when it starts and `finished` when its last output is written;
a process stopped in between (Ctrl-C, a kill, a lost machine) leaves it `running`. The process
that works on a run holds a lock that the operating system or the database server releases
when the process ends, so `ledger runs list` can tell a run in progress from an interrupted one:
on SQLite an exclusive `flock` on a file beside the database, on PostgreSQL a session-level
advisory lock on a connection of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from ledger.db import sqlite_file

RUN_LOCK_CLASS = 0x72756E  # "run": the namespace of the runs' advisory locks on PostgreSQL

_held: dict[str, Any] = {}  # run id -> open lock file or database connection, until finished


def _lock_path(engine: Engine, run_id: str) -> Path | None:
    db = sqlite_file(engine.url.render_as_string(hide_password=False))
    return None if db is None else db.with_name(f"{db.name}.run-{run_id[:16]}.lock")


def _pg_key(run_id: str) -> int:
    return int(run_id[:7], 16)  # 28 bits: a positive int4, distinct per run in practice


def hold(engine: Engine, run_id: str) -> None:
    """Mark `run_id` as worked on by this process until `release` or the process's end."""
    if run_id in _held:
        return
    if engine.dialect.name == "postgresql":
        connection = engine.raw_connection()
        connection.detach()  # its own session, closed (not pooled) when released
        with contextlib.closing(connection.cursor()) as cursor:
            cursor.execute(
                "SELECT pg_advisory_lock(%s::integer, %s::integer)",
                (RUN_LOCK_CLASS, _pg_key(run_id)),
            )
        connection.commit()
        _held[run_id] = connection
        return
    path = _lock_path(engine, run_id)
    if path is None:  # an in-memory database lives only as long as this process
        return
    handle = open(path, "a")  # noqa: SIM115 - held open until the run is released
    fcntl.flock(handle, fcntl.LOCK_EX)
    _held[run_id] = handle


def release(engine: Engine, run_id: str) -> None:
    """The run is finished: drop its lock (and the SQLite lock file)."""
    held = _held.pop(run_id, None)
    if held is None:
        return
    if engine.dialect.name == "postgresql":
        held.close()  # ends the session, and its advisory lock with it
        return
    path = _lock_path(engine, run_id)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    held.close()


def shown_status(engine: Engine, run: Any) -> str:
    """A run's status for people: `interrupted` for a `running` run that no process holds."""
    if run.status == "running" and not is_alive(engine, run.id):
        return "interrupted"
    return run.status


def is_alive(engine: Engine, run_id: str) -> bool:
    """Whether some process holds `run_id`'s lock now (this one included)."""
    if run_id in _held:
        return True
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            got = connection.execute(
                text("SELECT pg_try_advisory_lock(CAST(:c AS integer), CAST(:k AS integer))"),
                {"c": RUN_LOCK_CLASS, "k": _pg_key(run_id)},
            ).scalar_one()
            if got:
                connection.execute(
                    text("SELECT pg_advisory_unlock(CAST(:c AS integer), CAST(:k AS integer))"),
                    {"c": RUN_LOCK_CLASS, "k": _pg_key(run_id)},
                )
            connection.rollback()
        return not got
    path = _lock_path(engine, run_id)
    if path is None or not path.exists():
        return False
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False
