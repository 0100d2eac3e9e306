"""A statement estimated from a sample says so in HTML, each share with its 95% half-width, as
`ledger report --format json` gives them."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from ledger.db import make_engine, session_scope, upgrade
from ledger.periods import parse_period
from ledger.samples import SamplePlan
from ledger.statements import build_statement
from tests.ledger.test_sampled_statements import _outputs, _sampled_run
from tests.web.pages import assert_loaded_cleanly, ledger_cli, report_json, visit


def test_sampled_statement_shows_shares_with_their_half_widths(
    browser: Any, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    upgrade(engine)
    _sampled_run(engine, _outputs(tmp_path), SamplePlan(seed=5, sample=60), "sampled")
    with session_scope(engine) as s:
        build_statement(s, parse_period("2024-Q3"), Decimal("1000"), "USD")
    engine.dispose()
    doc = report_json(url, "2024-Q3")
    assert all(line["share_half_width"] for line in doc["lines"])
    out = tmp_path / "sampled.html"
    ledger_cli(url, "report", "--period", "2024-Q3", "--format", "html", "--out", str(out))
    with visit(browser, out.as_uri()) as seen:
        assert_loaded_cleanly(seen, out.as_uri())
        shown = seen.page.eval_on_selector_all(
            "#lines tbody tr",
            """rows => rows.map(r => [r.dataset.provider,
                r.querySelector('[data-field=share] .half-width').dataset.exact,
                r.querySelector('[data-field=share]').innerText])""",
        )
        assert [(p, float(h), text) for p, h, text in shown] == [
            (
                line["provider"],
                line["share_half_width"],
                f"{100 * line['share']:.2f}% ± {100 * line['share_half_width']:.2f}%",
            )
            for line in doc["lines"]
        ]
        note = seen.page.locator("#sample").inner_text()
        assert f"{doc['statement']['sample']['sampled_outputs']} sampled outputs" in note
