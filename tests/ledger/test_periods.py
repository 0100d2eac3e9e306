"""Period labels parse to half-open UTC intervals; bad labels give a clear error."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from ledger.errors import PeriodError
from ledger.periods import Period, parse_period


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("2024", utc(2024, 1, 1), utc(2025, 1, 1)),
        ("2024-H1", utc(2024, 1, 1), utc(2024, 7, 1)),
        ("2024-H2", utc(2024, 7, 1), utc(2025, 1, 1)),
        ("2024-Q1", utc(2024, 1, 1), utc(2024, 4, 1)),
        ("2024-Q3", utc(2024, 7, 1), utc(2024, 10, 1)),
        ("2024-Q4", utc(2024, 10, 1), utc(2025, 1, 1)),
        ("2024-02", utc(2024, 2, 1), utc(2024, 3, 1)),
        ("2024-12", utc(2024, 12, 1), utc(2025, 1, 1)),
        ("2024-07-01..2024-10-01", utc(2024, 7, 1), utc(2024, 10, 1)),
        ("2024-02-29..2024-03-01", utc(2024, 2, 29), utc(2024, 3, 1)),
    ],
)
def test_period_labels_parse_to_half_open_utc_intervals(
    text: str, start: datetime, end: datetime
) -> None:
    period = parse_period(text)
    assert (period.label, period.start, period.end) == (text, start, end)


@pytest.mark.parametrize(
    "text",
    [
        "2024-Q5",
        "2024-Q0",
        "24-Q3",
        "2024-13",
        "2024-00",
        "",
        "   ",
        "2024-H3",
        "Q3-2024",
        "2024-10-01..2024-07-01",
        "2024-07-01..2024-07-01",
        "2024-02-30..2024-03-01",
        "2024-7",
        # Only ASCII digits: \\d, str.isdigit and int() also take other scripts' digits.
        "\uff12\uff10\uff12\uff14-Q3",  # fullwidth 2024
        "2024-Q\uff13",
        "2024-\uff10\uff17",
        "\uff12\uff10\uff12\uff14",
        "2024-H\uff11",
        "\u0662\u0660\u0662\u0664-Q3",  # Arabic-Indic 2024
        "2024-07-01..2024-10-\uff10\uff11",
    ],
)
def test_bad_period_labels_raise_a_value_error_naming_the_value_and_the_forms(text: str) -> None:
    with pytest.raises(PeriodError) as info:
        parse_period(text)
    assert isinstance(info.value, ValueError)
    assert repr(text) in str(info.value)
    if "Q5" in text or text.strip() == "":
        assert "YYYY-Q1..Q4" in str(info.value)


def test_period_boundaries_are_half_open() -> None:
    q3 = parse_period("2024-Q3")
    assert q3.contains(datetime(2024, 7, 1))
    assert q3.contains(datetime(2024, 9, 30, 23, 59, 59, 999999))
    assert not q3.contains(datetime(2024, 10, 1))
    assert not q3.contains(datetime(2024, 6, 30, 23, 59, 59))


def test_from_dates_round_trips_through_its_label() -> None:
    period = Period.from_dates(date(2024, 7, 1), date(2024, 8, 15))
    assert parse_period(period.label) == period
    with pytest.raises(PeriodError):
        Period.from_dates(date(2024, 8, 15), date(2024, 7, 1))
