"""Fixtures of the browser tests: one headless Chromium per test session (Debian's `chromium`,
driven by Playwright), the test ledger on SQLite, and `ledger serve` on it.

Without Chromium or Playwright the browser tests are skipped with the reason, except in CI
(`CI=true`), where they must run and fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from ledger.db import make_engine, upgrade
from tests.web.ledger_data import build_ledger

LEDGER = [sys.executable, "-c", "from ledger.cli import main; main()"]
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


@dataclass
class Visit:
    """A page opened in a fresh browser context, with what went wrong while it loaded."""

    page: Any
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@contextmanager
def visit(browser: Any, url: str) -> Iterator[Visit]:
    """Open `url`; console errors, page errors and every request are recorded."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    seen = Visit(page)
    page.on("console", lambda m: seen.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: seen.errors.append(str(exc)))
    page.on("requestfailed", lambda r: seen.errors.append(f"request failed: {r.url}"))
    page.on("request", lambda r: seen.requests.append(r.url))
    try:
        response = page.goto(url, wait_until="load")
        assert response is None or response.ok, f"{url}: HTTP {response.status}"
        yield seen
    finally:
        context.close()


def ledger_cli(url: str, *args: str) -> str:
    """The output of `ledger --db URL ARGS` (in this process); fails the test on an error."""
    from click.testing import CliRunner

    from ledger.cli import cli

    result = CliRunner().invoke(cli, ["--db", url, *args], env={"LEDGER_QUIET": "1"})
    assert result.exit_code == 0, f"ledger {' '.join(args)} failed: {result.output}"
    return result.stdout


@contextmanager
def serving(url: str, timeout: float = 60.0) -> Iterator[str]:
    """`ledger --db URL serve --port 0` in a subprocess; yields the address it announces."""
    proc = subprocess.Popen(
        [*LEDGER, "--db", url, "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    try:
        line = first[0] if first else ""
        address = re.search(r"http://\S+/", line)
        if address is None:
            proc.kill()
            raise AssertionError(f"ledger serve did not start: {line!r} {proc.stderr.read()}")
        yield address.group(0)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def sqlite_ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, int]]:
    """The test ledger on SQLite: (URL, statement id per quarter)."""
    path = tmp_path_factory.mktemp("web") / "ledger.db"
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    upgrade(engine)
    ids = build_ledger(engine)
    engine.dispose()
    return url, ids


@pytest.fixture(scope="module")
def served(sqlite_ledger: tuple[str, dict[str, int]]) -> Iterator[str]:
    """`ledger serve` on the SQLite test ledger: its base address (ending in /)."""
    with serving(sqlite_ledger[0]) as base:
        yield base
