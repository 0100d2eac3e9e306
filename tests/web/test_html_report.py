"""`ledger report --format html`: one self-contained file (nothing fetched, nothing run) with the
report's numbers and its charts, checked in headless Chromium; `--provider NAME` writes that
provider's own statement, in which no other provider appears."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from markupsafe import escape

from ledger.cli import cli
from tests.web.ledger_data import HOSTILE, PROVIDERS
from tests.web.pages import (
    assert_charts_drawn,
    assert_loaded_cleanly,
    assert_page_matches_report,
    ledger_cli,
    report_json,
    visit,
)

# The only URLs a self-contained page may hold: the SVG namespaces, which are names, not fetched.
NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


def write_html(url: str, out: Path, *args: str) -> str:
    ledger_cli(url, "report", "--format", "html", "--out", str(out), *args)
    return out.read_text(encoding="utf-8")


def assert_self_contained(text: str) -> None:
    assert text.startswith("<!doctype html>")
    assert not re.search(r"<script|<link|<iframe|<img|<object|<embed|@import|url\(", text, re.I)
    assert not re.search(r"\b(src|href|xlink:href)\s*=", text, re.I)
    assert set(re.findall(r"[a-z]+://[^\s\"'<>)]+", text)) <= NAMESPACES


def test_html_statement_is_self_contained_with_the_reports_numbers_and_charts(
    browser: Any, sqlite_ledger: tuple[str, dict[str, int]], tmp_path: Path
) -> None:
    url, _ = sqlite_ledger
    for period in ("2024-Q2", "2024-Q3"):
        doc = report_json(url, period)
        out = tmp_path / f"{period}.html"
        text = write_html(url, out, "--period", period)
        assert_self_contained(text)
        with visit(browser, out.as_uri()) as seen:
            assert seen.requests == [out.as_uri()]  # nothing else was fetched
            assert_loaded_cleanly(seen, out.as_uri())
            assert_page_matches_report(seen.page, doc)
            quarters = 2 if period == "2024-Q2" else 3
            assert_charts_drawn(seen.page, bars=len(doc["lines"]), points=4 * quarters)
            page = seen.page
            runs = page.locator("#runs tbody tr code").first.inner_text()
            assert [r["run_id"][:16] for r in doc["statement"]["runs"]] == [runs]
            assert page.locator("details pre").count() == 2  # run and index manifests
            adjustments = [(r["provider"], r["amount"]) for r in doc["statement"]["adjustments"]]
            shown = page.eval_on_selector_all(
                "#adjustments tbody tr",
                "rows => rows.map(r => [r.cells[1].innerText, r.cells[2].dataset.exact])",
            )
            assert [tuple(row) for row in shown] == adjustments
            for provider in PROVIDERS:
                top = page.locator(f"#top-outputs section[data-provider={provider!r}] tbody tr")
                assert 1 <= top.count() <= 5
    assert adjustments == [("harbor-logs", "-150.25")]  # Q3 carries the correction of Q1


def test_html_preview_is_marked_and_shows_the_previews_numbers(
    browser: Any, sqlite_ledger: tuple[str, dict[str, int]], tmp_path: Path
) -> None:
    url, _ = sqlite_ledger
    args = ("--period", "2024-Q3", "--pool", "300000.25")  # another pool: rebuilt, not saved
    doc = json.loads(ledger_cli(url, "report", *args, "--format", "json"))
    assert doc["statement"]["status"] == "preview"
    text = write_html(url, tmp_path / "preview.html", *args)
    assert_self_contained(text)
    with visit(browser, (tmp_path / "preview.html").as_uri()) as seen:
        assert_page_matches_report(seen.page, doc)
        assert "Preview, not saved" in seen.page.locator(".sub").inner_text()
        assert seen.errors == []
    assert report_json(url, "2024-Q3")["statement"]["pool"] == "250000.00"  # nothing saved


def test_provider_statement_holds_no_other_provider(
    browser: Any, sqlite_ledger: tuple[str, dict[str, int]], tmp_path: Path
) -> None:
    url, _ = sqlite_ledger
    doc = report_json(url, "2024-Q3")
    for number, provider in enumerate(PROVIDERS):
        out = tmp_path / f"provider-{number}.html"
        text = write_html(url, out, "--period", "2024-Q3", "--provider", provider)
        assert_self_contained(text)
        for other in PROVIDERS:
            if other == provider:
                continue
            escaped = {html.escape(other), html.escape(other, quote=False), str(escape(other))}
            for form in {other, *escaped}:
                assert form not in text, f"{other!r} in {provider!r}'s statement"
        if provider != HOSTILE:
            assert "alert(" not in text
        attributes = re.findall(r'data-provider="([^"]*)"', text)
        assert {html.unescape(value) for value in attributes} == {provider}
        assert ("double-counted shard" in text) == (provider == "harbor-logs")
        with visit(browser, out.as_uri()) as seen:
            assert_loaded_cleanly(seen, out.as_uri())
            visible = seen.page.locator("body").inner_text()
            assert not any(other in visible for other in PROVIDERS if other != provider)
            line = next(line for line in doc["lines"] if line["provider"] == provider)
            cells = seen.page.eval_on_selector_all(
                "#lines tbody tr td[data-field]",
                "tds => Object.fromEntries(tds.map(td => [td.dataset.field, td.dataset.exact]))",
            )
            assert float(cells["value"]) == line["value"]
            assert float(cells["share"]) == line["share"]
            assert cells["amount"] == line["amount"] and cells["payable"] == line["payable"]
            assert seen.page.locator("#lines tfoot [data-field=pool]").inner_text() == "250,000.00"
            assert_charts_drawn(seen.page, bars=None, points=3)  # their value in three quarters
            assert seen.page.locator("#share-chart").count() == 0
            assert seen.page.locator("#trend tbody tr").count() == 3


def test_provider_option_refusals_write_nothing(
    sqlite_ledger: tuple[str, dict[str, int]], tmp_path: Path
) -> None:
    url, _ = sqlite_ledger
    out = tmp_path / "refused.html"
    base = ["--db", url, "report", "--period", "2024-Q3", "--out", str(out)]
    unknown = CliRunner().invoke(cli, [*base, "--format", "html", "--provider", "nobody"])
    assert unknown.exit_code == 1
    assert unknown.output.strip().splitlines() == ["Error: unknown provider 'nobody'"]
    not_html = CliRunner().invoke(cli, [*base, "--format", "json", "--provider", "harbor-logs"])
    assert not_html.exit_code == 2
    assert "--format html" in not_html.output
    assert not out.exists()


def test_html_statement_without_a_pool_shows_values_and_shares_only(
    browser: Any, sqlite_ledger: tuple[str, dict[str, int]], tmp_path: Path
) -> None:
    url, _ = sqlite_ledger
    doc = report_json(url, "2024-08")  # a month: no statement, no pool
    out = tmp_path / "month.html"
    assert_self_contained(write_html(url, out, "--period", "2024-08"))
    with visit(browser, out.as_uri()) as seen:
        assert_loaded_cleanly(seen, out.as_uri())
        rows = seen.page.eval_on_selector_all(
            "#lines tbody tr",
            """rows => rows.map(r => [r.dataset.provider,
                ...[...r.querySelectorAll('td[data-field]')].map(td => td.dataset.field),
                r.querySelector('[data-field=value]').dataset.exact,
                r.querySelector('[data-field=share]').dataset.exact])""",
        )
        assert [(p, fields, float(v), float(s)) for p, *fields, v, s in rows] == [
            (line["provider"], ["value", "share"], line["value"], line["share"])
            for line in doc["lines"]
        ]
        assert seen.page.get_attribute("#summary [data-key=pool]", "data-exact") == ""
        assert seen.page.locator("#lines tfoot").count() == 0
        # Only this month: no earlier statement of a month.
        assert_charts_drawn(seen.page, bars=len(doc["lines"]), points=len(doc["lines"]))
