"""HTML pages of the ledger: a statement as one self-contained file (`ledger report --format
html`), and the pages of the read-only web view (`ledger serve`, ledger/web.py).

Pages are Jinja2 templates (ledger/templates) with autoescaping, so provider names, output ids
and reasons are text, never markup. Nothing on a page is fetched or run: the styles are inline,
the charts inline SVG (ledger/charts.py), and a Content-Security-Policy forbids scripts and
requests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from typing import Any

import jinja2
from sqlalchemy.orm import Session

from ledger import charts
from ledger.money import format_minor
from ledger.statement_view import StatementView, statement_view


@dataclass(frozen=True)
class Links:
    """URLs of the web view's pages; a page written to a file has none (`links=None`)."""

    database: str

    def statement(self, statement_id: int) -> str:
        return f"/statements/{statement_id}"

    def provider_statement(self, statement_id: int, provider_id: int | None) -> str | None:
        return (
            None if provider_id is None else f"/statements/{statement_id}/providers/{provider_id}"
        )

    def provider(self, provider_id: int) -> str:
        return f"/providers/{provider_id}"

    def output(self, query_id: int) -> str:
        return f"/outputs/{query_id}"

    def run(self, run_id: str) -> str:
        return f"/runs/{run_id}"


def money(text: str | None) -> str:
    """An exact amount ("93106.03") with thousands separators ("93,106.03"), digits unchanged."""
    if text is None or text == "":
        return ""
    return format(Decimal(text), ",")


def value(number: float | None) -> str:
    """A provider's value as `ledger report` prints it (six decimals), with separators."""
    return "" if number is None else f"{number:,.6f}"


def pct(share: float | None) -> str:
    """A share as `ledger report` prints it (percent, two decimals)."""
    return "" if share is None else f"{100 * share:.2f}%"


def credit(number: float | None) -> str:
    return "" if number is None else f"{number:.4f}"


def exact(number: float | None) -> str:
    """The float's shortest round-tripping text: what `ledger report --format json` writes."""
    return "" if number is None else repr(float(number))


def minor(amount: int | None, currency: str) -> str:
    return "" if amount is None else format_minor(amount, currency)


def when(moment: datetime | str | None) -> str:
    if moment is None:
        return ""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def day(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d")


def pretty_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str)


@cache
def environment() -> jinja2.Environment:
    """The templates, escaping every value unless a template marks it `safe` (only charts)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("ledger", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    filters: dict[str, Callable[..., str]] = {
        "money": money,
        "value": value,
        "pct": pct,
        "credit": credit,
        "exact": exact,
        "minor": minor,
        "when": when,
        "day": day,
        "pretty_json": pretty_json,
    }
    env.filters.update(filters)
    return env


def render(template: str, **context: Any) -> str:
    """A page from `template` (in ledger/templates) with `context`; `links` None unless given."""
    context.setdefault("links", None)
    return environment().get_template(template).render(**context)


def statement_charts(view: StatementView, palette: dict[str, str]) -> dict[str, str]:
    """The statement's charts as SVG: provider shares (not on one provider's statement) and
    each provider's value over the periods."""
    period = view.summary["period"]
    out = {
        "trend": charts.trend_chart(
            view.trend,
            palette,
            f"Value of {view.provider} by period" if view.provider else "Value by period",
        )
    }
    if view.provider is None:
        out["shares"] = charts.share_chart(view.lines, palette, f"Shares of {period}")
    return out


def render_statement(view: StatementView, links: Links | None = None) -> str:
    """A statement's page: the full statement, or one provider's when `view.provider` is set."""
    names = [line["provider"] for line in view.lines]
    palette = charts.colours(names)
    name = "preview" if view.summary["id"] is None else view.summary["id"]
    title = f"Statement {name} for {view.summary['period']}"
    if view.provider is not None:
        title = f"{view.provider}: {title}"
    return render(
        "statement.html",
        title=title,
        view=view,
        palette=palette,
        charts=statement_charts(view, palette),
        links=links,
        generated=None if links is not None else datetime.now(UTC),
    )


def statement_html(
    session: Session, statement_id: int, provider: str | None = None, preview: bool = False
) -> str:
    """The self-contained HTML file of a statement (one provider's if `provider`; `preview`:
    built only to be shown, as `ledger report` does without --save)."""
    return render_statement(statement_view(session, statement_id, provider, preview))
