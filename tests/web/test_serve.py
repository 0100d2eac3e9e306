"""`ledger serve` in real headless Chromium: pages load without errors or requests elsewhere,
charts render, the numbers are `ledger report --format json`'s, text is escaped, nothing can be
written (405 for every method but GET; the database refuses writes on the server's
connections), on SQLite and on PostgreSQL."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from ledger.db import make_engine, upgrade
from ledger.web import check_readable, read_only_engine
from tests.web.ledger_data import (
    HOSTILE,
    HOSTILE_COMPLETION,
    HOSTILE_OUTPUT,
    HOSTILE_PROMPT,
    PROVIDERS,
    RUN_MANIFEST,
    build_ledger,
)
from tests.web.pages import (
    LEDGER,
    assert_charts_drawn,
    assert_loaded_cleanly,
    assert_page_matches_report,
    ledger_cli,
    report_json,
    serving,
    visit,
)


def test_statement_page_shows_the_reports_numbers_and_draws_its_charts(
    browser: Any, served: str, sqlite_ledger: tuple[str, dict[str, int]]
) -> None:
    url, ids = sqlite_ledger
    for period in ("2024-Q2", "2024-Q3"):  # a final statement, then a draft with an adjustment
        doc = report_json(url, period)
        with visit(browser, f"{served}statements/{ids[period]}") as seen:
            assert_loaded_cleanly(seen, served)
            assert_page_matches_report(seen.page, doc)
            quarters = 2 if period == "2024-Q2" else 3
            assert_charts_drawn(seen.page, bars=len(doc["lines"]), points=4 * quarters)
            adjustments = seen.page.locator("#adjustments tbody tr")
            assert adjustments.count() == len(doc["statement"]["adjustments"])
            # The provider named like markup is shown as its name, as text.
            cell = seen.page.locator(f"#lines tr[data-provider={json.dumps(HOSTILE)}] td").first
            assert cell.inner_text().strip() == HOSTILE
    assert any(line["adjustments_minor"] for line in doc["lines"])  # the Q3 draft has one


def test_statements_providers_outputs_and_runs_pages(
    browser: Any, served: str, sqlite_ledger: tuple[str, dict[str, int]]
) -> None:
    url, ids = sqlite_ledger
    with visit(browser, served) as seen:
        assert_loaded_cleanly(seen, served)
        rows = seen.page.locator("#statements tbody tr")
        assert rows.count() == 3
        seen.page.get_by_role("link", name="2024-Q3").click()
        seen.page.wait_for_url(f"{served}statements/{ids['2024-Q3']}")
        # From a statement line to that provider's own statement, then to the provider.
        seen.page.locator("#lines a", has_text=HOSTILE).click()
        assert seen.page.locator("#lines tbody tr").count() == 1
        assert seen.page.locator("h1").inner_text().startswith(f"Statement of {HOSTILE}")
        assert seen.errors == []

    with visit(browser, f"{served}providers") as seen:
        assert_loaded_cleanly(seen, served)
        assert sorted(seen.page.locator("#providers tbody a").all_inner_texts()) == sorted(
            PROVIDERS
        )
        seen.page.get_by_role("link", name="harbor-logs").click()
        seen.page.wait_for_load_state()
        history = seen.page.locator("#history tbody tr")
        assert history.count() == 3
        assert seen.page.locator("figure.chart svg g.mark-symbol.role-mark path").count() == 3
        assert seen.errors == []

    doc = report_json(url, "2024-Q3")
    with visit(browser, f"{served}statements/{ids['2024-Q3']}") as seen:
        seen.page.locator("#top-outputs a", has_text=HOSTILE_OUTPUT).click()
        seen.page.wait_for_load_state()
        assert_loaded_cleanly(seen, served)
        assert seen.page.locator("h1").inner_text() == f"Output {HOSTILE_OUTPUT}"
        credits = seen.page.eval_on_selector_all(
            "#credits tbody tr",
            "rows => rows.map(r => [r.cells[0].innerText, r.cells[1].dataset.exact])",
        )
        # Recorded with positive influence 9 and 1 and weight 1: credits 9/10 and 1/10.
        assert [(name, float(exact)) for name, exact in credits] == [
            (HOSTILE, 9.0 / 10.0),
            ("stellar-press", 1.0 / 10.0),
        ]
        # The prompt and completion, which are markup, are shown as text.
        assert seen.page.locator("#prompt").inner_text() == HOSTILE_PROMPT
        assert seen.page.locator("#completion").inner_text() == HOSTILE_COMPLETION
        assert seen.page.locator("img, b").count() == 0
        examples = seen.page.locator("#top-examples tbody tr td:nth-child(2)").all_inner_texts()
        assert examples == [HOSTILE, "stellar-press"]
        seen.page.locator("a[href^='/runs/']").first.click()
        seen.page.wait_for_load_state()
        manifest = json.loads(seen.page.locator("#run-manifest").inner_text())
        assert manifest == RUN_MANIFEST
        assert [r["run_id"] for r in doc["statement"]["runs"]] == [seen.page.url.rsplit("/", 1)[1]]
        assert seen.errors == []


def request(base: str, method: str, path: str = "") -> int:
    req = urllib.request.Request(
        base + path, method=method, data=b"x=1" if method != "GET" else None
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_only_get_is_answered(served: str, sqlite_ledger: tuple[str, dict[str, int]], method: str):
    ids = sqlite_ledger[1]
    for path in ("", f"statements/{ids['2024-Q3']}", "no/such/page"):
        assert request(served, method, path) == 405
    assert request(served, "GET", f"statements/{ids['2024-Q3']}") == 200
    assert request(served, "GET", "statements/999") == 404


def test_requests_for_other_host_names_are_refused(served: str) -> None:
    """Bound to 127.0.0.1, the view answers only requests addressed to the loopback names, so
    a page elsewhere cannot reach it through a DNS name that points at this machine."""
    address = urllib.parse.urlsplit(served)

    def status(host: str) -> int:
        conn = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
        try:
            conn.request("GET", "/", headers={"Host": host})
            return conn.getresponse().status
        finally:
            conn.close()

    assert status(f"attacker.example:{address.port}") == 400
    assert status(f"localhost:{address.port}") == 200
    assert status(f"127.0.0.1:{address.port}") == 200


def test_the_database_refuses_writes_on_the_servers_connections(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    engine.dispose()
    reader = read_only_engine(db_url)
    try:
        with reader.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM providers")).scalar_one() == 0
        with pytest.raises(DBAPIError, match="(?i)read.only|readonly|query_only"):
            with reader.begin() as conn:
                conn.execute(
                    text("INSERT INTO providers (name, created_at) VALUES ('x', '2024-01-01')")
                )
    finally:
        reader.dispose()


@pytest.mark.postgres
def test_serve_and_html_report_on_postgresql_show_the_reports_numbers(
    browser: Any, make_database_url: Any, tmp_path: Path
) -> None:
    url = make_database_url("postgresql")
    engine = make_engine(url)
    upgrade(engine)
    ids = build_ledger(engine, outputs_per_quarter=6)
    engine.dispose()
    doc = report_json(url, "2024-Q3")
    with serving(url) as base:
        with visit(browser, f"{base}statements/{ids['2024-Q3']}") as seen:
            assert_loaded_cleanly(seen, base)
            assert_page_matches_report(seen.page, doc)
            assert_charts_drawn(seen.page, bars=len(doc["lines"]), points=4 * 3)
        assert request(base, "POST", f"statements/{ids['2024-Q3']}") == 405
    out = tmp_path / "statement.html"
    ledger_cli(url, "report", "--period", "2024-Q3", "--format", "html", "--out", str(out))
    with visit(browser, out.as_uri()) as seen:
        assert_loaded_cleanly(seen, out.as_uri())
        assert_page_matches_report(seen.page, doc)


def test_a_port_in_use_is_one_line_error(sqlite_ledger: tuple[str, dict[str, int]]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [*LEDGER, "--db", sqlite_ledger[0], "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


@pytest.mark.postgres
def test_serve_refuses_a_user_who_sees_only_the_views(make_database_url: Any) -> None:
    """A ledger_reader reads the views, not the tables the pages are built from: one line says
    whom to connect as; a ledger_writer may serve."""
    from sqlalchemy.engine import make_url

    from ledger.db import grant_role

    url = make_database_url("postgresql")
    owner = make_engine(url)
    upgrade(owner)
    suffix = url.rsplit("_", 1)[-1]
    as_user = {}
    for role in ("reader", "writer"):
        grant_role(owner, role, f"web_{role}_{suffix}", create=True)
        as_user[role] = make_url(url).set(username=f"web_{role}_{suffix}").render_as_string(False)
    owner.dispose()
    proc = subprocess.run(
        [*LEDGER, "--db", as_user["reader"], "serve", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("Error: ledger serve cannot read the table providers")
    assert "ledger_writer" in line
    writer = read_only_engine(as_user["writer"])
    try:
        check_readable(writer)
    finally:
        writer.dispose()


def test_ctrl_c_stops_the_view_quietly(sqlite_ledger: tuple[str, dict[str, int]]) -> None:
    proc = subprocess.Popen(
        [*LEDGER, "--db", sqlite_ledger[0], "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("Serving the ledger read-only at http://")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
