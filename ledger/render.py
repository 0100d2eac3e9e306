"""Plain-text, CSV, JSON and Parquet renderings of ledger tables for the command line."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # polars is imported by the callers that build frames, not for a table
    import polars as pl


def number(value: float, digits: int = 6) -> str:
    """A float in plain decimal notation, never with an exponent: every digit before the
    point, and decimals up to `digits` significant digits in all, trailing zeros dropped
    (7994255852388.72 → "7994255852388", 3.95846e+11 → "395846000000", 0.000123456789 →
    "0.000123457"). Beyond 1e21 or below 1e-15, where plain notation would run to dozens of
    zeros, the exponent form of `digits` significant digits. Money is never a float here: it
    is printed from minor units."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if not -15 <= magnitude < 21:
        return f"{value:.{digits}g}"
    text = f"{value:.{max(0, digits - 1 - magnitude)}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return number(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def table(
    rows: list[dict[str, Any]], columns: list[str] | None = None, right: tuple[str, ...] = ()
) -> str:
    """An aligned text table; `right` names columns aligned right (numbers)."""
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if c in right else v.ljust(w)
            for v, w, c in zip(values, widths, columns, strict=True)
        ).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal | Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(obj: Any) -> Any:
    """Non-finite floats as the strings "Infinity", "-Infinity" and "NaN" (JSON has no such
    numbers), in nested lists and dicts too."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def to_json(obj: Any) -> str:
    return json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False)


def to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV of query rows (header from the first row); empty cells for NULL, ISO times. Any mix
    of types in a column is written as it comes (SQLite columns need not have one type)."""
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(list(rows[0]))
    for row in rows:
        writer.writerow(
            "" if v is None else v.isoformat() if isinstance(v, datetime | date) else v
            for v in row.values()
        )
    return out.getvalue()


def write_frame(frame: pl.DataFrame, fmt: str, out: str | None) -> str | None:
    """CSV or Parquet of a frame, to `out` (or CSV text returned for stdout)."""
    if fmt == "parquet":
        if not out:
            raise ValueError("parquet is written to a file: give `out`")
        frame.write_parquet(out)
        return None
    text = frame.write_csv()
    if out:
        Path(out).write_text(text)
        return None
    return text


def json_lines(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The text of `to_json(list(rows))`, piece by piece as the rows come (one piece per row,
    so a long result is never held whole)."""
    first = True
    for row in rows:
        body = to_json(row).replace("\n", "\n  ")
        yield ("[\n  " if first else ",\n  ") + body
        first = False
    yield "[]\n" if first else "\n]\n"


def csv_lines(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The text of `to_csv(list(rows))`, piece by piece as the rows come: the header (from the
    first row) with the first row, then one piece per row; nothing for no rows."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    first = True
    for row in rows:
        if first:
            writer.writerow(list(row))
            first = False
        writer.writerow(
            "" if v is None else v.isoformat() if isinstance(v, datetime | date) else v
            for v in row.values()
        )
        yield out.getvalue()
        out.seek(0)
        out.truncate()
