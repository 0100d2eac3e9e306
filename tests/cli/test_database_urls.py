"""Database URLs: PostgreSQL in libpq's spelling, other databases refused in one line, SQLite
files named when their directory is missing, and never created by a command that only reads."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from ledger.cli import cli
from ledger.db import checked_url


def run(url: str, *args: str):
    return CliRunner().invoke(cli, ["--db", url, *args])


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgres://u@h:5432/ledger", "postgresql+psycopg://u@h:5432/ledger"),
        ("postgresql://u@h/ledger", "postgresql+psycopg://u@h/ledger"),
        ("postgres+psycopg://u@h/ledger", "postgresql+psycopg://u@h/ledger"),
        ("postgresql+psycopg://u@h/ledger", "postgresql+psycopg://u@h/ledger"),
        ("sqlite:///ledger.db", "sqlite:///ledger.db"),
        ("sqlite://", "sqlite://"),
    ],
)
def test_supported_urls(given: str, used: str) -> None:
    assert checked_url(given) == used


@pytest.mark.parametrize("url", ["mysql://u:secret@h/db", "mssql+pyodbc://h/db", "oracle://h"])
def test_other_databases_are_refused_in_one_line(url: str) -> None:
    result = run(url, "init")
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: unsupported database '{url.split(':')[0].split('+')[0]}'")
    assert "SQLite" in line and "PostgreSQL" in line
    assert "secret" not in line  # the password is not printed


@pytest.mark.postgres
def test_postgres_scheme_reaches_postgresql(postgres_server) -> None:
    url = postgres_server.create_database().replace("postgresql+psycopg://", "postgres://")
    try:
        assert run(url, "init").exit_code == 0
        assert run(url, "providers", "add", "p").exit_code == 0
        result = run(url, "providers", "list", "--format", "csv")
        assert result.exit_code == 0 and result.output.splitlines()[1].startswith("p,")
    finally:
        postgres_server.drop_database(url)


def test_sqlite_file_in_a_missing_directory_is_named(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    result = run(f"sqlite:///{missing}/ledger.db", "init")
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: the SQLite database {missing}/ledger.db cannot be created: directory "
        f"{missing} does not exist"
    )
    assert not missing.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["providers", "list"],
        ["runs", "list"],
        ["report", "--period", "2024-Q3"],
        ["sql", "SELECT 1"],
        ["audit"],
    ],  # fmt: skip
)
def test_a_read_command_does_not_create_a_sqlite_file(tmp_path, command) -> None:
    path = tmp_path / "ledger.db"
    result = run(f"sqlite:///{path}", *command)
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: no ledger at {path}; run `ledger init` to create one"
    assert list(tmp_path.iterdir()) == []


def test_init_creates_the_sqlite_file(tmp_path) -> None:
    path = tmp_path / "ledger.db"
    assert run(f"sqlite:///{path}", "init").exit_code == 0
    assert path.is_file()
    assert run(f"sqlite:///{path}", "providers", "list").exit_code == 0
