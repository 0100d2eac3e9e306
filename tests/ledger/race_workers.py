"""Race scenarios for tests/ledger/test_races.py: two OS processes against one database.

`RacePair` starts two worker processes (multiprocessing, 'spawn'), each with its own engine.
For every round the parent prepares the database, hands each worker one step (a function of
this module), and both workers wait at a shared `multiprocessing.Barrier` before running it, so
the two transactions really overlap; one of them is delayed by a small random offset so that
successive rounds try different interleavings.

Each scenario is a `Scenario`: `setup(engine, round)` prepares one round (fresh periods and
outputs per round, so one database serves all rounds), the two `steps` run in the workers, and
`check(engine, context, outcomes)` returns the list of invariant violations seen (empty when the
ledger held). The checks only read the ledger through its public API and plain SQL, and keep
working on the code before issue #19 (no transfers table, `finalize_statement(session, id)`),
so the same scenarios measure how often each race broke the ledger there.
"""

from __future__ import annotations

import inspect
import math
import multiprocessing
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy import inspect as sa_inspect

from ledger.db import make_engine, session_scope
from ledger.errors import LedgerError
from ledger.periods import parse_period
from ledger.recording import finish_run, record_results, start_run
from ledger.statements import (
    add_adjustment,
    build_statement,
    finalize_statement,
    statement_rows,
)
from tests.ledger.helpers import result, setup_index, sha

PROVIDERS = ["p0", "p1", "p2", "p3"]
BARRIER_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- worker processes


def _worker_main(url: str, barrier: Any, conn: Any) -> None:
    """A worker: run each step it is sent right after the barrier; answer with its outcome."""
    engine = make_engine(url)
    try:
        while True:
            task = conn.recv()
            if task is None:
                return
            name, kwargs, delay = task
            step = globals()[name]
            with engine.connect():  # a pooled connection ready before the start signal
                pass
            try:
                barrier.wait(BARRIER_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a broken barrier is reported, not fatal
                conn.send(("broken", repr(exc)))
                continue
            if delay:
                time.sleep(delay)
            try:
                conn.send(("ok", step(engine, **kwargs)))
            except LedgerError as exc:
                conn.send(("refused", f"{type(exc).__name__}: {exc}"))
            except Exception as exc:  # noqa: BLE001 - the database's refusals come back too
                conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        engine.dispose()


@dataclass
class Outcome:
    """What a worker's step did: kind is ok / refused (a LedgerError) / error / broken."""

    kind: str
    value: Any

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


class RacePair:
    """Two spawned worker processes that run one step each per round, released together."""

    def __init__(self, url: str, parties: int = 2) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.barrier = ctx.Barrier(parties)
        self.conns = []
        self.procs = []
        for _ in range(parties):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(url, self.barrier, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, steps: list[tuple[str, dict[str, Any]]], delays: list[float]) -> list[Outcome]:
        for conn, (name, kwargs), delay in zip(self.conns, steps, delays, strict=True):
            conn.send((name, kwargs, delay))
        outcomes = []
        for conn in self.conns:
            if not conn.poll(BARRIER_TIMEOUT_S + 60):
                raise TimeoutError("a race worker did not answer")
            outcomes.append(Outcome(*conn.recv()))
        if any(o.kind == "broken" for o in outcomes):
            self.barrier.reset()
        return outcomes

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)

    def __enter__(self) -> RacePair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- shared helpers


def _finalize(session: Any, statement_id: int, allow_unfinished: bool = False) -> Any:
    """`finalize_statement`, also on the code before issue #19 (no allow_unfinished)."""
    if "allow_unfinished" in inspect.signature(finalize_statement).parameters:
        return finalize_statement(session, statement_id, allow_unfinished=allow_unfinished)
    return finalize_statement(session, statement_id)


def _rows(session: Any, statement_id: int) -> list[dict[str, Any]]:
    return sorted(statement_rows(session, statement_id).to_dicts(), key=lambda r: r["provider"])


def _served(year: int, month: int, i: int) -> datetime:
    return datetime(year, month, 1 + i % 27, (i * 7) % 24, i % 60)


def _outputs(tag: str, year: int, month: int, n: int) -> list[tuple[str, datetime]]:
    return [(f"{tag}-{year}-{month:02d}-{i}", _served(year, month, i)) for i in range(n)]


def _random_result(ext: str, served: datetime, rng: random.Random) -> Any:
    chosen = rng.sample(PROVIDERS, rng.randint(1, len(PROVIDERS)))
    return result(ext, served, {p: rng.uniform(0.1, 5.0) for p in chosen})


def _record(engine: Engine, label: str, index_id: str, results: list[Any], finish: bool = True):
    run_id = sha("run:" + label)
    with session_scope(engine) as s:
        start_run(s, run_id, index_id, {"run": label})
        record_results(s, run_id, results)
        if finish:
            finish_run(s, run_id)
    return run_id


def _index(engine: Engine) -> str:
    with session_scope(engine) as s:
        known = s.execute(text("SELECT id FROM gradient_indexes")).scalars().first()
        if known is not None:
            return known
        return setup_index(s, PROVIDERS)


def _final_statements(engine: Engine) -> list[tuple[int, str, datetime, datetime, int | None]]:
    with engine.connect() as c:
        return [
            tuple(r)
            for r in c.execute(
                text(
                    "SELECT id, period_label, period_start, period_end, pool_minor "
                    "FROM statements WHERE status = 'final' ORDER BY id"
                )
            )
        ]


def _current_per_output(engine: Engine, externals: list[str]) -> dict[str, list[str]]:
    """External id → the runs whose result for it is current."""
    found: dict[str, list[str]] = {e: [] for e in externals}
    with engine.connect() as c:
        for ext, run_id in c.execute(
            text(
                "SELECT q.external_id, r.run_id FROM queries q "
                "JOIN query_results r ON r.query_id = q.id WHERE r.is_current"
            )
        ):
            if ext in found:
                found[ext].append(run_id)
    return found


def _credit_sums(engine: Engine) -> dict[str, float]:
    """External id → Σ of its current credits."""
    sums: dict[str, list[float]] = {}
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT q.external_id, c.credit FROM queries q "
                "JOIN query_results r ON r.query_id = q.id "
                "JOIN credits c ON c.run_id = r.run_id AND c.query_id = r.query_id "
                "WHERE r.is_current"
            )
        )
        for ext, credit in rows:
            sums.setdefault(ext, []).append(credit)
    return {ext: math.fsum(v) for ext, v in sums.items()}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


@dataclass
class Scenario:
    """One race: per-round setup in the parent, two steps in the workers, and the check."""

    name: str
    setup: Callable[[Engine, int], dict[str, Any]]
    steps: Callable[[dict[str, Any]], list[tuple[str, dict[str, Any]]]]
    check: Callable[[Engine, dict[str, Any], list[Outcome]], list[str]]
    jitter_s: float = 0.02
    """One worker (chosen at random) starts up to this many seconds after the other."""
    late: int | None = None
    """If set, always this worker is the one that may start late."""

    def delays(self, rng: random.Random) -> list[float]:
        delays = [0.0, 0.0]
        delays[rng.randrange(2) if self.late is None else self.late] = rng.uniform(0, self.jitter_s)
        return delays


def _year(round_no: int) -> int:
    return 2100 + round_no

def _record_quarter(engine: Engine, tag: str, round_no: int) -> int:
    """Record ten random outputs in each month of the round's third quarter; returns its year."""
    index_id = _index(engine)
    rng = random.Random(round_no)
    year = _year(round_no)
    results = [
        _random_result(e, t, rng)
        for month in (7, 8, 9)
        for e, t in _outputs(tag, year, month, 10)
    ]
    _record(engine, f"{tag}-{round_no}", index_id, results)
    return year



# ------------------------------------------------------------ (1) two runs record the same outputs

OUTPUTS_1 = 40


def setup_same_outputs(engine: Engine, round_no: int) -> dict[str, Any]:
    index_id = _index(engine)
    rng = random.Random(round_no)
    year = _year(round_no)
    outputs = _outputs("same", year, 8, OUTPUTS_1)
    # Even rounds: the outputs were attributed before (the two runs supersede that result at
    # once); odd rounds: both runs bring the same new outputs.
    if round_no % 2 == 0:
        _record(
            engine,
            f"same-{round_no}-base",
            index_id,
            [_random_result(e, t, rng) for e, t in outputs],
        )
    runs = []
    for k in range(2):
        label = f"same-{round_no}-{k}"
        with session_scope(engine) as s:
            start_run(s, sha("run:" + label), index_id, {"run": label})
        runs.append(label)
    return {"round": round_no, "year": year, "outputs": outputs, "runs": runs}


def step_record(engine: Engine, label: str, outputs: list[tuple[str, datetime]], seed: int) -> str:
    rng = random.Random(seed)
    run_id = sha("run:" + label)
    with session_scope(engine) as s:
        record_results(s, run_id, [_random_result(e, t, rng) for e, t in outputs])
        finish_run(s, run_id)
    return run_id


def steps_same_outputs(ctx: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (
            "step_record",
            {"label": label, "outputs": ctx["outputs"], "seed": 1000 * ctx["round"] + k},
        )
        for k, label in enumerate(ctx["runs"])
    ]


def check_same_outputs(engine: Engine, ctx: dict[str, Any], outcomes: list[Outcome]) -> list[str]:
    problems = []
    for k, o in enumerate(outcomes):
        if not o.ok:
            problems.append(f"writer {k} failed: {str(o.value).splitlines()[0]}")
    externals = [e for e, _ in ctx["outputs"]]
    current = _current_per_output(engine, externals)
    several = {e: runs for e, runs in current.items() if len(runs) != 1}
    if several:
        ext, runs = next(iter(several.items()))
        problems.append(
            f"{len(several)} outputs without exactly one current result (first: {ext}: {len(runs)})"
        )
    sums = _credit_sums(engine)
    off = [e for e in externals if not _close(sums.get(e, 0.0), 1.0)]
    if off:
        problems.append(f"{len(off)} outputs whose current credits do not sum to their weight 1")
    try:
        with session_scope(engine) as s:
            st = build_statement(s, parse_period(f"{ctx['year']}-08"), None)
            total, count = st.total_value, st.query_count
    except LedgerError as exc:
        problems.append(f"statement could not be built: {exc}")
    else:
        if not _close(total, len(externals)) or count != len(externals):
            problems.append(
                f"statement values sum to {total} over {count} outputs, not {len(externals)}"
            )
    return problems


SAME_OUTPUTS = Scenario(
    "two runs record the same outputs",
    setup_same_outputs,
    steps_same_outputs,
    check_same_outputs,
    jitter_s=0.01,
)


# ----------------------------------------------------- (4) add_adjustment races finalize_statement


def setup_adjust_finalize(engine: Engine, round_no: int) -> dict[str, Any]:
    year = _record_quarter(engine, "adj", round_no)
    ids = {}
    with session_scope(engine) as s:
        ids["s1"] = build_statement(s, parse_period(f"{year}-07"), Decimal(300)).id
    with session_scope(engine) as s:
        _finalize(s, ids["s1"])
    for key, month in (("s2", 8), ("s3", 9)):
        with session_scope(engine) as s:
            ids[key] = build_statement(s, parse_period(f"{year}-{month:02d}"), Decimal(300)).id
    provider = PROVIDERS[round_no % len(PROVIDERS)]
    return {"round": round_no, **ids, "provider": provider}


def step_finalize_rows(engine: Engine, statement_id: int) -> list[dict[str, Any]]:
    """Finalise; return the statement's rows as the finalising transaction sees them."""
    with session_scope(engine) as s:
        _finalize(s, statement_id)
        return _rows(s, statement_id)


def step_adjust(engine: Engine, corrects: int, provider: str) -> int:
    """Adjust `corrects` by +5.00 for `provider`; return the statement that carries it."""
    with session_scope(engine) as s:
        return add_adjustment(s, corrects, provider, Decimal("5.00"), "race").statement_id


def steps_adjust_finalize(ctx: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("step_finalize_rows", {"statement_id": ctx["s2"]}),
        ("step_adjust", {"corrects": ctx["s1"], "provider": ctx["provider"]}),
    ]


def _payments(engine: Engine, statement_id: int) -> dict[int, int] | None:
    """Provider id → what the journal pays it on a statement (None before the journal)."""
    if not sa_inspect(engine).has_table("transfers"):
        return None
    with engine.connect() as c:
        return {
            pid: int(total)
            for pid, total in c.execute(
                text(
                    "SELECT provider_id, SUM(CASE WHEN credit_account = 'paid' THEN amount_minor "
                    "ELSE -amount_minor END) FROM transfers WHERE statement_id = :s "
                    "AND 'paid' IN (credit_account, debit_account) GROUP BY provider_id"
                ),
                {"s": statement_id},
            )
        }


def check_adjust_finalize(
    engine: Engine, ctx: dict[str, Any], outcomes: list[Outcome]
) -> list[str]:
    problems = []
    fin, adj = outcomes
    if not fin.ok:
        problems.append(f"finalising failed: {str(fin.value).splitlines()[0]}")
    if adj.kind == "error":
        problems.append(f"adjusting failed outside the ledger: {str(adj.value).splitlines()[0]}")
    s2 = ctx["s2"]
    with session_scope(engine) as s:
        later = _rows(s, s2)
        status = s.execute(text("SELECT status FROM statements WHERE id = :i"), {"i": s2}).scalar()
        carried = s.execute(
            text(
                "SELECT a.statement_id, a.amount_minor FROM adjustments a "
                "WHERE a.corrects_statement_id = :c"
            ),
            {"c": ctx["s1"]},
        ).all()
        pid = s.execute(
            text("SELECT id FROM providers WHERE name = :n"), {"n": ctx["provider"]}
        ).scalar()
    if fin.ok and later != fin.value:
        problems.append("the final statement's rows changed after it was finalised")
    on_final = [a for a in carried if a[0] == s2]
    if status == "final" and on_final:
        row = next((r for r in later if r["provider"] == ctx["provider"]), None)
        if row is None or row["adjustments_minor"] != sum(a[1] for a in on_final):
            problems.append("an adjustment on the final statement is not on its rows")
        payments = _payments(engine, s2)
        if payments is not None and row is not None and payments.get(pid) != row["payable_minor"]:
            problems.append(
                f"booked payment {payments.get(pid)} differs from payable {row['payable_minor']}"
            )
    if adj.ok and adj.value not in (s2, ctx["s3"]):
        problems.append(f"the adjustment went to statement {adj.value}")
    # Close the round's drafts: before issue #19 an earlier pooled draft blocked finalising.
    for statement_id in (s2, ctx["s3"]):
        with session_scope(engine) as s:
            if (
                s.execute(
                    text("SELECT status FROM statements WHERE id = :i"), {"i": statement_id}
                ).scalar()
                == "draft"
            ):
                _finalize(s, statement_id)
    return problems


ADJUST_FINALIZE = Scenario(
    "add_adjustment races finalize_statement",
    setup_adjust_finalize,
    steps_adjust_finalize,
    check_adjust_finalize,
    jitter_s=0.015,
)


# ----------------------------------------------------- (5) two overlapping pools finalised at once


def setup_overlapping(engine: Engine, round_no: int) -> dict[str, Any]:
    year = _record_quarter(engine, "ovl", round_no)
    return {"round": round_no, "year": year}


def step_build_finalize(engine: Engine, period: str, pool: str) -> int:
    with session_scope(engine) as s:
        statement = build_statement(s, parse_period(period), Decimal(pool))
        _finalize(s, statement.id)
        return statement.id


def steps_overlapping(ctx: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    y = ctx["year"]
    return [
        ("step_build_finalize", {"period": f"{y}-08", "pool": "300"}),
        ("step_build_finalize", {"period": f"{y}-Q3", "pool": "900"}),
    ]


def check_overlapping(engine: Engine, ctx: dict[str, Any], outcomes: list[Outcome]) -> list[str]:
    problems = []
    y = ctx["year"]
    finals = [f for f in _final_statements(engine) if f[1] in (f"{y}-08", f"{y}-Q3")]
    if len(finals) > 1:
        problems.append(f"overlapping pools both final: {[f[1] for f in finals]}")
    if not finals:
        problems.append("neither statement became final")
    for o in outcomes:
        if o.kind in ("error", "broken"):
            problems.append(
                f"a finaliser failed outside the ledger: {str(o.value).splitlines()[0]}"
            )
    return problems


OVERLAPPING = Scenario(
    "two overlapping pooled statements finalised at once",
    setup_overlapping,
    steps_overlapping,
    check_overlapping,
    jitter_s=0.03,
)


# -------------------------------------------- (7) finalising while a batch is recorded in the period

OUTPUTS_7 = 30


def setup_snapshot(engine: Engine, round_no: int) -> dict[str, Any]:
    index_id = _index(engine)
    rng = random.Random(round_no)
    year = _year(round_no)
    _record(
        engine,
        f"snap-{round_no}-base",
        index_id,
        [_random_result(e, t, rng) for e, t in _outputs("snapa", year, 8, OUTPUTS_7)],
    )
    label = f"snap-{round_no}-late"
    with session_scope(engine) as s:  # the batch's run is already running when the race starts
        start_run(s, sha("run:" + label), index_id, {"run": label})
    return {
        "round": round_no,
        "year": year,
        "late_run": label,
        "late_outputs": _outputs("snapb", year, 8, OUTPUTS_7),
    }


def step_build_finalize_unfinished(engine: Engine, period: str, pool: str) -> int:
    with session_scope(engine) as s:
        statement = build_statement(s, parse_period(period), Decimal(pool))
        _finalize(s, statement.id, allow_unfinished=True)
        return statement.id


def steps_snapshot(ctx: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("step_build_finalize_unfinished", {"period": f"{ctx['year']}-08", "pool": "1000"}),
        (
            "step_record",
            {"label": ctx["late_run"], "outputs": ctx["late_outputs"], "seed": ctx["round"]},
        ),
    ]


def check_snapshot(engine: Engine, ctx: dict[str, Any], outcomes: list[Outcome]) -> list[str]:
    problems = []
    fin, rec = outcomes
    if not fin.ok:
        return [f"finalising failed: {str(fin.value).splitlines()[0]}"]
    if rec.kind != "ok" and not (
        rec.kind == "refused" and str(rec.value).startswith("ClosedPeriodError")
    ):
        problems.append(f"recording failed otherwise than as a closed period: {rec.value}")
    statement_id = fin.value
    late_run = sha("run:" + ctx["late_run"])
    with session_scope(engine) as s:
        st = s.execute(
            text("SELECT total_value, query_count FROM statements WHERE id = :i"),
            {"i": statement_id},
        ).one()
        runs = sorted(
            s.execute(
                text("SELECT run_id FROM statement_runs WHERE statement_id = :i"),
                {"i": statement_id},
            ).scalars()
        )
        rows = {r["provider"]: r["value"] for r in _rows(s, statement_id)}
        by_provider: dict[str, list[float]] = {}
        credits: list[float] = []
        outputs: set[str] = set()
        for ext, name, credit in s.execute(
            text(
                "SELECT q.external_id, p.name, c.credit FROM queries q "
                "JOIN credits c ON c.query_id = q.id JOIN providers p ON p.id = c.provider_id "
                "WHERE c.run_id = ANY(:runs) AND q.served_at >= :a AND q.served_at < :b"
            ),
            {"runs": runs, "a": datetime(ctx["year"], 8, 1), "b": datetime(ctx["year"], 9, 1)},
        ):
            by_provider.setdefault(name, []).append(credit)
            credits.append(credit)
            outputs.add(ext)
    expected = math.fsum(credits)
    if st.total_value != expected or st.query_count != len(outputs):
        problems.append(
            f"runs listed ({len(runs)}) and amounts disagree: total {st.total_value} over "
            f"{st.query_count} outputs, its runs give {expected} over {len(outputs)}"
        )
    elif {p: math.fsum(v) for p, v in by_provider.items()} != rows:
        problems.append("per-provider values differ from the listed runs' credits")
    if rec.ok and late_run not in runs:
        problems.append("a batch was recorded into the period after its statement was final")
    return problems


SNAPSHOT = Scenario(
    "finalising while a batch is recorded into the period",
    setup_snapshot,
    steps_snapshot,
    check_snapshot,
    jitter_s=0.05,
)

SCENARIOS = {"1": SAME_OUTPUTS, "4": ADJUST_FINALIZE, "5": OVERLAPPING, "7": SNAPSHOT}


def run_scenario(url: str, scenario: Scenario, rounds: int, seed: int = 0) -> list[list[str]]:
    """Run `rounds` rounds of a race; returns each round's list of violations."""
    engine = make_engine(url)
    rng = random.Random(seed)
    found = []
    try:
        with RacePair(url) as pair:
            for round_no in range(rounds):
                ctx = scenario.setup(engine, round_no)
                outcomes = pair.run(scenario.steps(ctx), scenario.delays(rng))
                found.append(scenario.check(engine, ctx, outcomes))
    finally:
        engine.dispose()
    return found
