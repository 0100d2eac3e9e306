"""Fixtures of the browser tests: one headless Chromium per test session (Debian's `chromium`,
driven by Playwright), the test ledger on SQLite, and `ledger serve` on it.

Without Chromium or Playwright the browser tests are skipped with the reason, except in CI
(`CI=true`), where they must run and fail instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledger.db import make_engine, upgrade
from tests.web.ledger_data import build_ledger, write_outputs_file
from tests.web.pages import serving

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must run the browser tests")
    pytest.skip(reason)


def chromium_path() -> str | None:
    """$LEDGER_CHROMIUM, else the first Chromium on PATH."""
    explicit = os.environ.get("LEDGER_CHROMIUM")
    if explicit:
        return explicit
    return next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium, launched once for the session."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    path = chromium_path()
    if path is None:
        _unavailable("no Chromium found (apt-get install chromium, or set LEDGER_CHROMIUM)")
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=path, headless=True)
    except Exception as exc:  # noqa: BLE001 - any launch failure: say why
        playwright.stop()
        _unavailable(f"Chromium at {path} did not start: {str(exc).splitlines()[0]}")
    try:
        yield chromium
    finally:
        chromium.close()
        playwright.stop()


@pytest.fixture(scope="module")
def sqlite_ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, int]]:
    """The test ledger on SQLite: (URL, statement id per quarter)."""
    path = tmp_path_factory.mktemp("web") / "ledger.db"
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    upgrade(engine)
    ids = build_ledger(engine)
    engine.dispose()
    write_outputs_file(path.parent)
    return url, ids


@pytest.fixture(scope="module")
def served(sqlite_ledger: tuple[str, dict[str, int]]) -> Iterator[str]:
    """`ledger serve` on the SQLite test ledger: its base address (ending in /)."""
    url = sqlite_ledger[0]
    with serving(url, cwd=Path(url.removeprefix("sqlite:///")).parent) as base:
        yield base
