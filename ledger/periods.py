"""Statement periods: half-open UTC intervals [start, end) parsed from short labels.

Accepted forms (all in UTC):

- ``2024``                      the calendar year
- ``2024-H1``, ``2024-H2``      half years
- ``2024-Q1`` .. ``2024-Q4``    quarters
- ``2024-07``                   a calendar month
- ``2024-07-01..2024-10-01``    an explicit range of dates; the end date is *exclusive*, so this
                                example is the third quarter of 2024
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime

from ledger.errors import PeriodError

ACCEPTED_FORMS = "YYYY, YYYY-H1|H2, YYYY-Q1..Q4, YYYY-MM, or YYYY-MM-DD..YYYY-MM-DD (end exclusive)"

# [0-9], not \d: \d and int() also accept other scripts' digits ('２０２４-Q3' would be 2024-Q3).
_YEAR = re.compile(r"^([0-9]{4})$")
_HALF = re.compile(r"^([0-9]{4})-H([12])$")
_QUARTER = re.compile(r"^([0-9]{4})-Q([0-9])$")
_MONTH = re.compile(r"^([0-9]{4})-([0-9]{2})$")
_RANGE = re.compile(r"^([0-9]{4}-[0-9]{2}-[0-9]{2})\.\.([0-9]{4}-[0-9]{2}-[0-9]{2})$")


@dataclass(frozen=True)
class Period:
    """A labelled half-open interval of time [start, end), both timezone-aware UTC datetimes."""

    label: str
    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if value.tzinfo is None or value.utcoffset() != UTC.utcoffset(None):
                raise PeriodError(f"period {self.label!r}: {name} must be a UTC datetime")
        if self.end <= self.start:
            raise PeriodError(
                f"period {self.label!r}: end {self.end.date()} must be after start "
                f"{self.start.date()}"
            )

    @classmethod
    def from_dates(cls, start: date | datetime, end: date | datetime) -> Period:
        """The period from `start` (inclusive) to `end` (exclusive).

        Dates mean midnight UTC; naive datetimes are taken as UTC. The label is
        ``START..END`` in ISO form; for whole dates `parse_period` reads it back to the same period.
        """
        s, e = _as_utc(start), _as_utc(end)
        label = f"{_iso(s)}..{_iso(e)}"
        if e <= s:
            raise PeriodError(f"period {label!r}: end must be after start")
        return cls(label, s, e)

    def contains(self, moment: datetime) -> bool:
        """Whether `moment` (naive means UTC) falls inside [start, end)."""
        return self.start <= _as_utc(moment) < self.end


def parse_period(text: str) -> Period:
    """Parse a period label such as ``2024-Q3`` into a `Period`.

    Raises `PeriodError` (a `ValueError`) naming the bad value and the accepted forms.
    """
    raw = text.strip() if isinstance(text, str) else ""
    try:
        if m := _YEAR.match(raw):
            year = int(m[1])
            return Period(raw, _utc(year, 1), _utc(year + 1, 1))
        if m := _HALF.match(raw):
            year, half = int(m[1]), int(m[2])
            return Period(raw, _utc(year, 6 * half - 5), _next_month(year, 6 * half))
        if m := _QUARTER.match(raw):
            year, quarter = int(m[1]), int(m[2])
            if 1 <= quarter <= 4:
                return Period(raw, _utc(year, 3 * quarter - 2), _next_month(year, 3 * quarter))
        elif m := _MONTH.match(raw):
            year, month = int(m[1]), int(m[2])
            if 1 <= month <= 12:
                return Period(raw, _utc(year, month), _next_month(year, month))
        elif m := _RANGE.match(raw):
            start, end = date.fromisoformat(m[1]), date.fromisoformat(m[2])
            if end <= start:
                raise PeriodError(
                    f"invalid period {text!r}: the end date must be after the start date "
                    "(the end is exclusive)"
                )
            return Period.from_dates(start, end)
    except PeriodError:
        raise
    except ValueError as exc:  # e.g. 2024-02-30, year 0
        raise PeriodError(f"invalid period {text!r} ({exc}); expected {ACCEPTED_FORMS}") from exc
    raise PeriodError(f"invalid period {text!r}; expected {ACCEPTED_FORMS}")


def _utc(year: int, month: int) -> datetime:
    return datetime(year, month, 1, tzinfo=UTC)


def _next_month(year: int, month: int) -> datetime:
    return _utc(year + 1, 1) if month == 12 else _utc(year, month + 1)


def _as_utc(value: date | datetime) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return datetime(value.year, value.month, value.day, tzinfo=UTC)


def _iso(moment: datetime) -> str:
    if moment.time() == datetime.min.time():
        return moment.date().isoformat()
    return moment.isoformat().replace("+00:00", "Z")


def next_period(period: Period) -> Period:
    """The period that follows `period`, of the same kind: 2024-Q4 → 2025-Q1, 2024-07 →
    2024-08, 2024-H1 → 2024-H2, 2024 → 2025; a range of days → the same number of days after
    it."""
    raw = period.label
    year = period.start.year
    if _YEAR.match(raw):
        return parse_period(f"{year + 1:04d}")
    if m := _HALF.match(raw):
        return parse_period(f"{year:04d}-H2" if m[2] == "1" else f"{year + 1:04d}-H1")
    if m := _QUARTER.match(raw):
        q = int(m[2])
        return parse_period(f"{year:04d}-Q{q + 1}" if q < 4 else f"{year + 1:04d}-Q1")
    if _MONTH.match(raw):
        return Period(
            _month_label(period.end), period.end, _next_month(period.end.year, period.end.month)
        )
    return Period.from_dates(period.end, period.end + (period.end - period.start))


def _month_label(moment: datetime) -> str:
    return f"{moment.year:04d}-{moment.month:02d}"
