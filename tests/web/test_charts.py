"""Charts are drawing only: a provider's name, whatever it holds, is text in the SVG, and any
SVG that could run, fetch or link something is refused before it reaches a page."""

from __future__ import annotations

from datetime import datetime
from xml.etree import ElementTree

import pytest

from ledger.charts import colours, share_chart, trend_chart, unsafe_part

NAMES = ["online=1 onload=alert(1)", "<script>alert(1)</script>", "a & b", "plain"]


def texts(svg: str) -> set[str]:
    return {t.text for t in ElementTree.fromstring(svg).iter() if t.text and t.text.strip()}


def test_names_that_look_like_markup_are_text_in_the_charts() -> None:
    palette = colours(NAMES)
    lines = [{"provider": n, "share": s} for n, s in zip(NAMES, (0.4, 0.3, 0.2, 0.1), strict=True)]
    bars = share_chart(lines, palette, "shares")
    assert NAMES[1] in texts(bars) and "<script" not in bars
    trend = trend_chart(
        [
            {"period": p, "period_start": datetime(2024, m, 1), "provider": n, "value": 1.0}
            for p, m in (("2024-Q1", 1), ("2024-Q2", 4))
            for n in NAMES
        ],
        palette,
        "trend",
    )
    assert set(NAMES) <= texts(trend)  # the legend
    assert unsafe_part(bars) is None and unsafe_part(trend) is None


@pytest.mark.parametrize(
    ("svg", "found"),
    [
        ("<script>alert(1)</script>", "a <script> element"),
        ("<foreignObject><div/></foreignObject>", "a <foreignobject> element"),
        ('<a href="https://example.org"><path d="M0,0"/></a>', "a <a> element"),
        ('<image href="https://example.org/x.png"/>', "a <image> element"),
        ('<path d="M0,0" onmouseover="alert(1)"/>', "a onmouseover attribute"),
        ('<g><text xlink:href="#x">t</text></g>', "a href attribute"),
    ],
)
def test_svg_that_could_run_or_fetch_is_refused(svg: str, found: str) -> None:
    doc = (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">'
        f"{svg}</svg>"
    )
    assert unsafe_part(doc) == found
