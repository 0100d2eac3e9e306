"""Charts of a statement as inline SVG: Vega-Lite specifications written with Altair and rendered
by vl-convert (no browser, no network, no script in the result).

Text in the charts (provider names, periods) is escaped by the SVG writer; `to_svg` refuses any
result with an element or attribute that could run, fetch or link something, so a chart is
safe to inline in a page.
"""

from __future__ import annotations

from typing import Any
from xml.etree import ElementTree

PALETTE = (
    "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2",
    "#b279a2", "#ff9da6", "#9d755d", "#bab0ac", "#eeca3b",
)  # fmt: skip
"""Vega's tableau10 colours; a provider keeps its colour across the charts of a page."""

_UNSAFE_ELEMENTS = {"script", "foreignobject", "iframe", "a", "image", "use", "style"}


def colours(providers: list[str]) -> dict[str, str]:
    """A colour per provider, by name order, so the same provider has the same colour on every
    chart of one page."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(providers))}


def unsafe_part(svg: str) -> str | None:
    """The first element or attribute of `svg` that could run, fetch or link anything (a
    script, an embedded document, a reference, an event handler), or None: only drawing."""
    for element in ElementTree.fromstring(svg).iter():
        tag = element.tag.rsplit("}", 1)[-1].lower()
        if tag in _UNSAFE_ELEMENTS:
            return f"a <{tag}> element"
        for name in element.attrib:
            local = name.rsplit("}", 1)[-1].lower()
            if local.startswith("on") or local in ("href", "src"):
                return f"a {local} attribute"
    return None


def to_svg(chart: Any) -> str:
    """The SVG text of an Altair chart; `ValueError` if it holds anything but drawing."""
    import vl_convert

    svg = vl_convert.vegalite_to_svg(chart.to_dict())
    problem = unsafe_part(svg)
    if problem is not None:
        raise ValueError(f"the chart's SVG holds {problem}")
    # Scales with the page instead of overflowing a narrow window.
    return svg.replace("<svg ", '<svg role="img" style="max-width:100%;height:auto" ', 1)


def share_chart(
    lines: list[dict[str, Any]],
    palette: dict[str, str],
    title: str,
    axis_title: str = "share of the period's value",
) -> str:
    """Horizontal bars of each provider's `share` (of a statement's value, or of an output's
    credit), largest first."""
    import altair as alt

    data = [
        {"provider": line["provider"], "share": line["share"], "label": f"{line['share']:.2%}"}
        for line in lines
    ]
    order = [row["provider"] for row in sorted(data, key=lambda r: (-r["share"], r["provider"]))]
    names = list(palette)
    base = alt.Chart(alt.Data(values=data), title=title).encode(
        y=alt.Y("provider:N", sort=order, title=None, axis=alt.Axis(labelLimit=260)),
        x=alt.X(
            "share:Q",
            title=axis_title,
            axis=alt.Axis(format="%"),
            scale=alt.Scale(domain=[0, max([1e-12] + [r["share"] for r in data]) * 1.15]),
        ),
    )
    bars = base.mark_bar().encode(
        color=alt.Color(
            "provider:N",
            scale=alt.Scale(domain=names, range=[palette[n] for n in names]),
            legend=None,
        )
    )
    text = base.mark_text(align="left", dx=4).encode(text="label:N")
    return to_svg((bars + text).properties(width=340, height=max(40, 28 * len(data))))


def trend_chart(
    trend: list[dict[str, Any]], palette: dict[str, str], title: str, field: str = "value"
) -> str:
    """Each provider's `field` (value or share) per period, oldest period first."""
    import altair as alt

    periods: list[str] = []
    for row in sorted(trend, key=lambda r: r["period_start"]):
        if row["period"] not in periods:
            periods.append(row["period"])
    data = [{"period": r["period"], "provider": r["provider"], field: r[field]} for r in trend]
    names = list(palette)
    axis = alt.Axis(format="%") if field == "share" else alt.Axis(format="~s")
    chart = (
        alt.Chart(alt.Data(values=data), title=title)
        .mark_line(point=alt.OverlayMarkDef(size=60))
        .encode(
            x=alt.X("period:O", sort=periods, title=None, axis=alt.Axis(labelAngle=0)),
            y=alt.Y(f"{field}:Q", title=field, axis=axis),
            color=alt.Color(
                "provider:N",
                scale=alt.Scale(domain=names, range=[palette[n] for n in names]),
                legend=alt.Legend(orient="bottom", columns=2, labelLimit=260)
                if len(names) > 1
                else None,
            ),
        )
        .properties(width=max(260, 80 * len(periods)), height=220)
    )
    return to_svg(chart)
