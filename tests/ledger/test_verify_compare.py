"""`ledger verify`'s comparison of a re-computed result with the recorded one."""

from datetime import datetime
from decimal import Decimal

from ledger.jobs import compare_result
from ledger.recording import ProviderCredit, QueryRecord, QueryResult, TopExample

RECORD = QueryRecord("q1", datetime(2024, 8, 1), Decimal("2.5"), "0" * 64)


def fresh(credits: dict[str, float], top: list[tuple[int, float]]) -> QueryResult:
    return QueryResult(
        RECORD,
        [ProviderCredit(p, c, c) for p, c in credits.items()],
        [TopExample(i + 1, f"e{row}", "s", row, "p", score) for i, (row, score) in enumerate(top)],
        False,
    )


def stored(credits: dict[str, float], top: list[tuple[int, float]]) -> dict:
    return {
        "credits": [{"provider": p, "credit": c} for p, c in credits.items()],
        "top": [{"row": row, "score": score} for row, score in top],
    }


CREDITS = {"a": 1.5, "b": 1.0}
TOP = [(7, 2.0), (3, 1.2), (9, 1.2 - 1e-7), (4, 0.5)]


def test_float32_noise_and_near_ties_trading_places_agree() -> None:
    noisy = {"a": 1.5 + 2e-6, "b": 1.0 - 2e-6}
    swapped = [(7, 2.0 + 1e-7), (9, 1.2), (3, 1.2 - 1e-7), (4, 0.5)]
    diff, agrees = compare_result(stored(CREDITS, TOP), fresh(noisy, swapped), 1e-4)
    assert agrees and abs(diff - 2e-6) < 1e-12


def test_a_changed_credit_a_missing_provider_or_other_top_rows_disagree() -> None:
    record = stored(CREDITS, TOP)
    # Off by 1e-3 of the weight: more than 1e-4 × 2.5 allows.
    diff, agrees = compare_result(record, fresh({"a": 1.5 - 1e-3, "b": 1.0 + 1e-3}, TOP), 1e-4)
    assert not agrees and abs(diff - 1e-3) < 1e-12
    diff, agrees = compare_result(record, fresh({"a": 2.5}, TOP), 1e-4)
    assert not agrees and diff == 1.0
    # Rows 3 and 4 trade places, but their scores are far apart: not a near-tie.
    other = [(7, 2.0), (4, 1.2), (9, 1.2 - 1e-7), (3, 0.5)]
    assert not compare_result(record, fresh(CREDITS, other), 1e-4)[1]
    assert not compare_result(record, fresh(CREDITS, TOP[:3]), 1e-4)[1]
    # The tolerance scales with the weight, never below 1 (credits sum to the weight).
    assert compare_result(record, fresh({"a": 1.5 + 2e-4, "b": 1.0 - 2e-4}, TOP), 1e-4)[1]
    assert not compare_result(record, fresh({"a": 1.5 + 3e-4, "b": 1.0 - 3e-4}, TOP), 1e-4)[1]


def test_a_near_tie_at_the_cut_off_may_leave_the_list_but_nothing_else_may() -> None:
    record = stored(CREDITS, TOP)
    edge = [(7, 2.0), (3, 1.2), (9, 1.2 - 1e-7), (11, 0.5 + 1e-6)]
    assert compare_result(record, fresh(CREDITS, edge), 1e-4)[1]
    inside = [(7, 2.0), (11, 1.2), (9, 1.2 - 1e-7), (4, 0.5)]  # row 3 gone from rank 2
    assert not compare_result(record, fresh(CREDITS, inside), 1e-4)[1]
