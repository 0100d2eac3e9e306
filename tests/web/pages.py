"""What the browser tests check on a statement page, whether served or written to a file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

LEDGER = [sys.executable, "-c", "from ledger.cli import main; main()"]


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
def serving(url: str, cwd: Path | None = None, timeout: float = 60.0) -> Iterator[str]:
    """`ledger --db URL serve --port 0` in a subprocess (in `cwd`); yields the address it
    announces."""
    proc = subprocess.Popen(
        [*LEDGER, "--db", url, "serve", "--port", "0"],
        cwd=cwd,
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
        for name in ("amount", "payable"):
            assert cells[name]["exact"] == line[name]
            assert cells[name]["text"] == grouped(line[name])
        for name in ("carried_in", "carried_forward", "adjustments"):
            assert cells[name]["exact"] == minor_text(line[f"{name}_minor"])
    summary = page.eval_on_selector_all("#summary dd[data-key]", SUMMARY_JS)
    s = doc["statement"]
    assert summary["pool"]["exact"] == s["pool"]
    assert summary["pool"]["text"] == f"{grouped(s['pool'])} {s['currency']}"
    assert int(summary["queries"]["exact"]) == s["queries"]
    assert int(summary["unattributed_queries"]["exact"]) == s["unattributed_queries"]
    total_payable = sum(line["payable_minor"] for line in lines)
    assert summary["total_payable"]["exact"] == minor_text(total_payable) == s["totals"]["payable"]
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
