"""Fixtures for the ledger tests: a migrated database on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from ledger.db import make_engine, upgrade


def pytest_configure(config: pytest.Config) -> None:
    # tests/conftest.py may already register the plugin; register it here otherwise.
    if not config.pluginmanager.has_plugin("tests.pg"):
        config.pluginmanager.import_plugin("tests.pg")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a fresh database migrated to head (SQLite and PostgreSQL)."""
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()
