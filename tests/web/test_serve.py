"""`ledger serve` in real headless Chromium: pages load without errors or requests elsewhere,
charts render, the numbers are `ledger report --format json`'s, text is escaped, nothing can be
written (405 for every method but GET; the database refuses writes on the server's
connections), on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from ledger.db import make_engine, upgrade
from ledger.web import read_only_engine
from tests.web.conftest import ledger_cli, serving, visit
from tests.web.ledger_data import HOSTILE, HOSTILE_OUTPUT, PROVIDERS, build_ledger

LINES_JS = """rows => rows.map(r => ({
  provider: r.dataset.provider,
  cells: Object.fromEntries([...r.querySelectorAll('td[data-field]')].map(
    td => [td.dataset.field, {exact: td.dataset.exact, text: td.innerText.trim()}]))
}))"""
SUMMARY_JS = """dds => Object.fromEntries(dds.map(dd => [dd.dataset.key,
  {exact: dd.dataset.exact, text: dd.innerText.trim()}]))"""


def report_json(url: str, period: str) -> dict[str, Any]:
    return json.loads(ledger_cli(url, "report", "--period", period, "--format", "json"))


def grouped(amount: str) -> str:
    """An exact amount as the page writes it: thousands separated, digits unchanged."""
    whole, _, cents = amount.lstrip("-").partition(".")
    groups = f"{int(whole):,}"
    return ("-" if amount.startswith("-") else "") + groups + (f".{cents}" if cents else "")


def minor_text(minor: int, places: int = 2) -> str:
    return str(Decimal(minor).scaleb(-places).quantize(Decimal(1).scaleb(-places)))


def assert_page_matches_report(page: Any, doc: dict[str, Any]) -> None:
    """Every line's value, share and money on the page equals the JSON report's, exactly (the
    data-exact attributes) and as shown (the cells' text, formatted here independently)."""
    shown = page.eval_on_selector_all("#lines tbody tr", LINES_JS)
    lines = doc["lines"]
    assert [row["provider"] for row in shown] == [line["provider"] for line in lines]
    for row, line in zip(shown, lines, strict=True):
        cells = row["cells"]
        assert float(cells["value"]["exact"]) == line["value"]
        assert cells["value"]["text"] == f"{line['value']:,.6f}"
        assert float(cells["share"]["exact"]) == line["share"]
        assert cells["share"]["text"] == f"{100 * line['share']:.2f}%"
        for field in ("amount", "payable"):
            assert cells[field]["exact"] == line[field]
            assert cells[field]["text"] == grouped(line[field])
        for field in ("carried_in", "carried_forward", "adjustments"):
            assert cells[field]["exact"] == minor_text(line[f"{field}_minor"])
    summary = page.eval_on_selector_all("#summary dd[data-key]", SUMMARY_JS)
    s = doc["statement"]
    assert summary["pool"]["exact"] == s["pool"]
    assert summary["pool"]["text"] == f"{grouped(s['pool'])} {s['currency']}"
    assert int(summary["queries"]["exact"]) == s["queries"]
    assert int(summary["unattributed_queries"]["exact"]) == s["unattributed_queries"]
    total_payable = sum(line["payable_minor"] for line in lines)
    assert summary["total_payable"]["exact"] == minor_text(total_payable)
    total_amount = page.get_attribute("#lines tfoot [data-field=total_amount]", "data-exact")
    assert total_amount == s["pool"] == minor_text(sum(line["amount_minor"] for line in lines))


def assert_charts_drawn(page: Any, bars: int | None, points: int) -> None:
    """Each chart is an SVG with a real size and one mark per bar or point."""
    charts = ["#trend-chart svg"] + (["#share-chart svg"] if bars is not None else [])
    for selector in charts:
        box = page.locator(selector).bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 50, selector
    if bars is not None:
        assert page.locator("#share-chart g.mark-rect.role-mark path").count() == bars
    assert page.locator("#trend-chart g.mark-symbol.role-mark path").count() == points


def assert_loaded_cleanly(seen: Any, base: str) -> None:
    assert seen.errors == []
    assert all(url.startswith(base) for url in seen.requests), seen.requests
    # Markup in names is text: no script element was created, none ran.
    assert seen.page.evaluate("document.scripts.length") == 0
    assert seen.page.title() != "pwned"


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
    explained = json.loads(
        ledger_cli(url, "explain", "--query", HOSTILE_OUTPUT, "--format", "json")
    )
    with visit(browser, f"{served}statements/{ids['2024-Q3']}") as seen:
        seen.page.locator("#top-outputs a", has_text=HOSTILE_OUTPUT).click()
        seen.page.wait_for_load_state()
        assert_loaded_cleanly(seen, served)
        assert seen.page.locator("h1").inner_text() == f"Output {HOSTILE_OUTPUT}"
        credits = seen.page.eval_on_selector_all(
            "#credits tbody tr",
            "rows => rows.map(r => [r.cells[0].innerText, r.cells[1].dataset.exact])",
        )
        assert [(name, float(exact)) for name, exact in credits] == [
            (c["provider"], c["credit"]) for c in explained["credits"]
        ]
        assert seen.page.locator("#top-examples tbody tr").count() == len(explained["top"])
        seen.page.locator("a[href^='/runs/']").first.click()
        seen.page.wait_for_load_state()
        manifest = json.loads(seen.page.locator("#run-manifest").inner_text())
        assert manifest == {"run": "quarters"}
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
def test_serve_on_postgresql_shows_the_reports_numbers(
    browser: Any, make_database_url: Any
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
