"""Races between two OS processes on PostgreSQL: the ledger's invariants hold under concurrency.

Each test starts two worker processes (multiprocessing, 'spawn'; tests/ledger/race_workers.py),
and repeats a race ROUNDS times on one database, with fresh periods and outputs each round.
In every round both workers wait at a shared barrier and then run their transaction at once
(one of them delayed by a random few milliseconds, so the rounds try different
interleavings); afterwards the parent checks the ledger. A round passes only if the invariant
held and every refusal was the ledger's own (a `LedgerError`).

How often the same rounds caught the bug on the code before the fix (commit afa6dcd, the
ledger before issue #19, with its own migrations; `run_scenario` with ROUNDS = 20 and these
jitters, on 2 CPU cores; a "catch" is a round with at least one failed check):

(1) two runs record the same outputs: caught 17 and 20 of 20 tries (two runs). In the rounds
    whose outputs were attributed before, 7 and 10 of 10 left two current results per output
    (credits summing to twice the weight, the statement's values to 80 instead of 40); in the
    rounds with new outputs, 10 and 10 of 10 failed a writer with a unique violation on
    queries.external_id.
(4) add_adjustment races finalize_statement: caught 8, 8 and 4 of 20 tries (three runs): the
    final statement's rows (its payable) changed after it was finalised in 3, 3 and 0 of 20
    (the adjustment landed on it after finalisation), and the adjustment failed with the
    database trigger's error instead of going to the next draft in 5, 5 and 4 of 20.
(5) the month's and the quarter's pooled statements (pools 300 and 900) each built and
    finalised at once: caught 14, 9 and 8 of 20 tries (both became final).
(7) a statement built and finalised while a batch is recorded into its period: caught 14, 15
    and 14 of 20 tries; its runs list and its amounts came from different moments in 0, 2 and
    1 of 20 (the narrow window between the two queries of the old build), and the batch was
    recorded into the period after its statement was final in 14, 13 and 13 of 20.

On the code that fixed issue #19 (commit 1c1e352) every round of every race holds.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ledger.db import upgrade
from tests.ledger.race_workers import (
    ADJUST_FINALIZE,
    OVERLAPPING,
    SAME_OUTPUTS,
    SNAPSHOT,
    Scenario,
    run_scenario,
)

pytestmark = pytest.mark.postgres

ROUNDS = 20
"""Rounds per race; each race's test takes about 10 s."""


@pytest.fixture
def pg_url(make_database_url: Callable[[str], str]) -> str:
    """A fresh PostgreSQL database migrated to head (fails in CI if no server can start)."""
    url = make_database_url("postgresql")
    upgrade(url)
    return url


def _race(url: str, scenario: Scenario, seed: int) -> None:
    found = run_scenario(url, scenario, ROUNDS, seed=seed)
    failed = [(n, problems) for n, problems in enumerate(found) if problems]
    assert not failed, (
        f"{scenario.name}: {len(failed)} of {ROUNDS} rounds broke the ledger; first: "
        f"round {failed[0][0]}: {failed[0][1]}"
    )


def test_two_runs_recording_the_same_outputs_leave_one_current_result(pg_url: str) -> None:
    """(1) Two runs record the same 40 outputs at once (attributed before in even rounds, new
    in odd ones): both succeed, each output has exactly one current result whose credits sum
    to its weight, and the period's statement values sum to the number of outputs."""
    _race(pg_url, SAME_OUTPUTS, seed=1)


def test_an_adjustment_racing_finalisation_is_paid_once_or_goes_to_the_next_draft(
    pg_url: str,
) -> None:
    """(4) add_adjustment on a final statement, whose next open draft is being finalised at
    the same moment: either the adjustment is on that statement when it becomes final (its
    rows and its booked payment include it) or it goes to the draft after; the rows that the
    finalising transaction saw are the rows read afterwards (a final payable never changes)."""
    _race(pg_url, ADJUST_FINALIZE, seed=4)


def test_overlapping_pools_finalised_at_once_leave_at_most_one_final(pg_url: str) -> None:
    """(5) The month's statement (pool 300) and its quarter's (pool 900) each built and
    finalised at the same moment: exactly one becomes final, the other is refused by the
    ledger."""
    _race(pg_url, OVERLAPPING, seed=5)


def test_a_statement_finalised_while_credits_are_recorded_rests_on_one_snapshot(
    pg_url: str,
) -> None:
    """(7) A statement built and finalised (allowing the unfinished run) while another process
    records a batch of new outputs into its period: its total, its output count and every
    provider's value equal what the results of exactly the runs it lists give for the period,
    and the batch either is among those runs or was refused as a closed period."""
    _race(pg_url, SNAPSHOT, seed=7)
