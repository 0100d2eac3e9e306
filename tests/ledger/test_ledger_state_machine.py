"""Random sequences of ledger operations keep the ledger's invariants (SQLite and PostgreSQL).

A hypothesis `RuleBasedStateMachine` records runs of results (random providers, positive sums
and weights, outputs served in random months of 2024-2025, some re-attributed by later runs,
some runs left unfinished for a while), builds drafts for months and quarters with or without a
pool and a minimum payout in USD, JPY or EUR, finalises drafts in any order (with or without
allowing unfinished runs), adds positive and negative adjustments, and tries to record credits
into closed periods (through the API and with plain SQL). The ledger may refuse an operation
(a `LedgerError`), and where the outcome is certain the machine checks it: a late credit, a
rebuild of a final statement, finalising while a run is unfinished, a pool overlapping a
final one are refused; an adjustment goes to the earliest open pooled draft in its currency
after the corrected period, and is refused when there is none.

After every step:

- each output has at most one current result, the one of the run that recorded it last;
- each final statement counts each output of its period once: its total and output count are
  those of the current credits of its period (they cannot change once it is final), and final
  pools never overlap;
- per currency, Σ over final statements of the booked payments (amount + carried in − carried
  forward + adjustments, per provider as its rows print) plus the carried-forward balance still
  outstanding in the journal equals Σ pools + Σ adjustments of the final statements; each
  provider's carry balance equals what its final statements carried forward less what they
  carried in, and is never negative;
- every line's amount is within one minor unit of pool × share;
- a final statement's rows, summary, content and hash never change;
- adjustments are in the currency of the statement that carries them (drafts included).

and `ledger.audit.audit_ledger` finds nothing wrong.

Each example runs on a fresh database, copied from one migrated at the start of the test (a file
copy on SQLite, CREATE DATABASE ... TEMPLATE on PostgreSQL), so a failing example replays and
shrinks on its own.
"""

from __future__ import annotations

import itertools
import math
import shutil
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import DateTime, Engine, false, insert, literal, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError

from ledger import models as m
from ledger.audit import audit_ledger
from ledger.db import make_engine, session_scope, upgrade
from ledger.errors import ClosedPeriodError, LedgerError, StatementFinalError
from ledger.periods import parse_period
from ledger.recording import finish_run, record_results, start_run
from ledger.statements import (
    add_adjustment,
    build_statement,
    finalize_statement,
    statement_rows,
    statement_summary,
)
from tests.ledger.helpers import result, setup_index, sha

CURRENCIES = {"USD": 2, "JPY": 0, "EUR": 2}
WEIGHTS = [Decimal(1), Decimal("0.5"), Decimal("2.25"), Decimal(3), Decimal("0.000001")]
TABLES = ["attribution_runs", "queries", "query_results", "credits", "top_examples"]

SETTINGS = settings(
    max_examples=20,
    stateful_step_count=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _money(places: int, minor: int) -> Decimal:
    return Decimal(minor).scaleb(-places)


class Databases:
    """Fresh migrated databases, copied from one migrated at the start (a file copy on SQLite,
    CREATE DATABASE ... TEMPLATE on PostgreSQL): one per example, so a failing example can be
    replayed and shrunk on its own."""

    def __init__(self, template_url: str) -> None:
        self.template = make_url(template_url)
        engine = make_engine(template_url)
        upgrade(engine)
        if engine.dialect.name == "sqlite":
            with engine.connect() as c:
                c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        engine.dispose()
        self.count = itertools.count()

    def _admin(self) -> Any:
        import psycopg

        t = self.template
        conn = psycopg.connect(host=t.host, port=t.port, user=t.username, dbname="postgres")
        conn.autocommit = True
        return conn

    def new(self) -> str:
        n = next(self.count)
        if self.template.get_backend_name() == "sqlite":
            path = f"{self.template.database}.{n}"
            shutil.copyfile(self.template.database, path)
            return self.template.set(database=path).render_as_string(hide_password=False)
        name = f"{self.template.database}_{n}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template.database}"')
        return self.template.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{parsed.database}{suffix}").unlink(missing_ok=True)
            return
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')


class LedgerMachine(RuleBasedStateMachine):
    """The ledger driven at random on a fresh database; `databases` is set by the test."""

    databases: Databases

    def __init__(self) -> None:
        super().__init__()
        self.url = self.databases.new()
        self.engine = make_engine(self.url)
        self.base = 2024
        self.providers = [f"p{i}" for i in range(4)]
        self.runs = 0
        self.outputs: dict[str, tuple[datetime, Decimal]] = {}
        self.current: dict[str, str] = {}  # output → run whose result is current
        self.pending: list[str] = []  # runs started and not finished
        self.final_views: dict[int, tuple[Any, ...]] = {}
        self.known: list[dict[str, Any]] = []  # the statements, read after every step
        with session_scope(self.engine) as s:
            self.index_id = setup_index(s, self.providers)

    # ------------------------------------------------------------------ reading the ledger

    def _statements(self, s: Any) -> list[dict[str, Any]]:
        """The statements, as the database holds them now."""
        t = m.Statement.__table__
        rows = s.execute(
            select(
                t.c.id,
                t.c.period_label,
                t.c.period_start,
                t.c.period_end,
                t.c.currency,
                t.c.pool_minor,
                t.c.min_payout_minor,
                t.c.status,
            ).order_by(t.c.period_start, t.c.id)
        ).mappings()
        return [dict(r) for r in rows]

    def _closed(self, s: Any, served: datetime) -> bool:
        return any(
            st_["status"] == "final" and st_["period_start"] <= served < st_["period_end"]
            for st_ in self._statements(s)
        )

    def _counts(self) -> dict[str, int]:
        with self.engine.connect() as c:
            return {t: c.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar() for t in TABLES}

    def _final_view(self, s: Any, statement_id: int) -> tuple[Any, ...]:
        raw = s.execute(
            text("SELECT content, content_sha256, status FROM statements WHERE id = :i"),
            {"i": statement_id},
        ).one()
        return (
            statement_rows(s, statement_id).to_dicts(),
            repr(statement_summary(s, statement_id)),
            tuple(raw),
        )

    # ------------------------------------------------------------------ drawing values

    def _served(self, data: Any, period: Any = None) -> datetime:
        if period is not None:
            span = int((period["period_end"] - period["period_start"]).total_seconds())
            return period["period_start"] + timedelta(seconds=data.draw(st.integers(0, span - 1)))
        # Mostly the example's busy months, so that periods have outputs to close.
        busy = data.draw(st.integers(0, 4)) < 4
        month = data.draw(st.sampled_from(self.months) if busy else st.integers(0, 23))
        return datetime(
            self.base + month // 12,
            month % 12 + 1,
            data.draw(st.integers(1, 28)),
            data.draw(st.integers(0, 23)),
            data.draw(st.integers(0, 59)),
        )

    def _result(self, data: Any, ext: str) -> Any:
        served, weight = self.outputs[ext]
        unattributed = data.draw(st.integers(0, 9)) == 9
        positive = (
            {}
            if unattributed
            else data.draw(
                st.dictionaries(
                    st.sampled_from(self.providers),
                    st.floats(0.01, 100.0, allow_nan=False),
                    min_size=1,
                    max_size=4,
                )
            )
        )
        return result(ext, served, positive, weight)

    def _period(self, data: Any) -> str:
        """A month or quarter of 2024-2025, mostly one in which outputs were served."""
        served = sorted(
            {(at.year - self.base) * 12 + at.month - 1 for at, _ in self.outputs.values()}
        )
        busy = served and data.draw(st.integers(0, 4)) < 4
        month = data.draw(st.sampled_from(served) if busy else st.integers(0, 23))
        year = self.base + month // 12
        if data.draw(st.booleans()):
            return f"{year}-{month % 12 + 1:02d}"
        return f"{year}-Q{month % 12 // 3 + 1}"

    def _new_run(self, s: Any) -> str:
        self.runs += 1
        run_id = sha(f"run:{self.runs}")
        start_run(s, run_id, self.index_id, {"run": self.runs})
        return run_id

    # ------------------------------------------------------------------ rules

    @initialize(
        months=st.lists(st.integers(0, 23), min_size=1, max_size=4, unique=True),
        currency=st.sampled_from(sorted(CURRENCIES)),
    )
    def busy_months(self, months: list[int], currency: str) -> None:
        """The months (0 = January 2024) in which most of the example's outputs are served, and
        the currency of most of its statements."""
        self.months = months
        self.currency = currency

    @rule(data=st.data(), unfinished=st.integers(0, 4))
    def record(self, data: Any, unfinished: int) -> None:
        """A run records new outputs and re-attributes some earlier ones."""
        fresh = []
        for _ in range(data.draw(st.integers(1, 4))):
            ext = f"q{len(self.outputs) + len(fresh)}"
            fresh.append((ext, self._served(data), data.draw(st.sampled_from(WEIGHTS))))
        again = (
            data.draw(st.lists(st.sampled_from(sorted(self.outputs)), unique=True, max_size=3))
            if self.outputs
            else []
        )
        # One run in five is left running for a while.
        self._record(data, fresh, again, unfinished=unfinished == 4)

    def _record(
        self,
        data: Any,
        fresh: list[tuple[str, datetime, Decimal]],
        again: list[str],
        unfinished: bool = False,
    ) -> bool:
        known = dict(self.outputs)
        self.outputs.update({ext: (served, w) for ext, served, w in fresh})
        batch = [self._result(data, ext) for ext in [e for e, _, _ in fresh] + again]
        with session_scope(self.engine) as s:
            closed = any(self._closed(s, r.query.served_at) for r in batch)
        before = self._counts()
        try:
            with session_scope(self.engine) as s:
                run_id = self._new_run(s)
                record_results(s, run_id, batch)
                if not unfinished:
                    finish_run(s, run_id)
        except ClosedPeriodError:
            event("record: refused, closed period")
            assert closed, "credits refused as late although no final statement covers them"
            assert self._counts() == before, "a refused batch wrote something"
            self.outputs = known
            return False
        assert not closed, "credits were recorded into a period whose statement is final"
        event("record: recorded")
        for r in batch:
            self.current[r.query.external_id] = run_id
        if unfinished:
            self.pending.append(run_id)
        return True

    @precondition(lambda self: bool(self.pending))
    @rule()
    def finish_pending(self) -> None:
        with session_scope(self.engine) as s:
            for run_id in self.pending:
                finish_run(s, run_id)
        self.pending = []

    @precondition(lambda self: bool(self.outputs))
    @rule(data=st.data(), currency=st.sampled_from(sorted(CURRENCIES)))
    def build(self, data: Any, currency: str) -> None:
        if data.draw(st.integers(0, 3)) < 3:
            currency = self.currency
        label = self._period(data)
        period = parse_period(label)
        places = CURRENCIES[currency]
        pool = min_payout = None
        if data.draw(st.integers(0, 3)) < 3:
            pool = _money(places, data.draw(st.integers(0, 10**places * 1000)))
            if data.draw(st.booleans()):
                min_payout = _money(places, data.draw(st.integers(0, 10**places * 200)))
        with session_scope(self.engine) as s:
            existing = [
                x
                for x in self._statements(s)
                if x["period_start"] == period.start.replace(tzinfo=None)
                and x["period_end"] == period.end.replace(tzinfo=None)
            ]
            overlapping = [
                x
                for x in self._statements(s)
                if x["pool_minor"] is not None
                and x["period_start"] < period.end.replace(tzinfo=None)
                and x["period_end"] > period.start.replace(tzinfo=None)
                and not (existing and x["id"] == existing[0]["id"])
            ]
        try:
            with session_scope(self.engine) as s:
                statement = build_statement(s, period, pool, currency, min_payout)
                built = statement.id
        except StatementFinalError:
            event("build: refused, final")
            assert existing and existing[0]["status"] == "final"
            return
        except LedgerError as exc:
            event(f"build: refused, {type(exc).__name__}")
            assert not (existing and existing[0]["status"] == "final"), "wrong refusal"
            return
        assert not (existing and existing[0]["status"] == "final"), "a final statement rebuilt"
        assert pool is None or not overlapping, f"{label}'s pool overlaps {overlapping}"
        assert not existing or existing[0]["id"] == built
        event(f"build: built, {'pool' if pool is not None else 'values only'}")

    @precondition(lambda self: any(x["status"] == "draft" for x in self.known))
    @rule(data=st.data(), allow_unfinished=st.booleans())
    def finalize(self, data: Any, allow_unfinished: bool) -> None:
        """Finalise a draft, most times after rebuilding it as it was (as an operator would
        after `ledger report`), so that it is up to date."""
        with session_scope(self.engine) as s:
            statements = self._statements(s)
        drafts = [x for x in statements if x["status"] == "draft"]
        if not drafts:
            return
        draft = data.draw(st.sampled_from(drafts))
        if data.draw(st.integers(0, 3)) < 3:
            places = CURRENCIES[draft["currency"]]
            try:
                with session_scope(self.engine) as s:
                    build_statement(
                        s,
                        parse_period(draft["period_label"]),
                        None
                        if draft["pool_minor"] is None
                        else _money(places, draft["pool_minor"]),
                        draft["currency"],
                        None
                        if draft["min_payout_minor"] is None
                        else _money(places, draft["min_payout_minor"]),
                    )
            except LedgerError as exc:
                event(f"finalize: rebuild refused, {type(exc).__name__}")
        overlaps_final = draft["pool_minor"] is not None and any(
            x["status"] == "final"
            and x["pool_minor"] is not None
            and x["period_start"] < draft["period_end"]
            and x["period_end"] > draft["period_start"]
            for x in statements
        )
        try:
            with session_scope(self.engine) as s:
                finalize_statement(s, draft["id"], allow_unfinished=allow_unfinished)
        except LedgerError as exc:
            event(f"finalize: refused, {str(exc).split(' is ', 1)[-1][:40]}")
            return
        event("finalize: final")
        assert allow_unfinished or not self.pending, "finalised while a run was unfinished"
        assert not overlaps_final, "finalised a pool that overlaps a final one"
        with session_scope(self.engine) as s:
            self.final_views[draft["id"]] = self._final_view(s, draft["id"])

    @precondition(
        lambda self: any(x["status"] == "final" and x["pool_minor"] is not None for x in self.known)
    )
    @rule(data=st.data())
    def adjust(self, data: Any) -> None:
        with session_scope(self.engine) as s:
            statements = self._statements(s)
        corrected_choices = [
            x for x in statements if x["status"] == "final" and x["pool_minor"] is not None
        ]
        if not corrected_choices:
            return

        def targets(corrected: dict[str, Any]) -> list[dict[str, Any]]:
            return [
                x
                for x in statements
                if x["status"] == "draft"
                and x["pool_minor"] is not None
                and x["currency"] == corrected["currency"]
                and x["period_start"] >= corrected["period_end"]
            ]

        # Mostly a statement that an open draft follows (else most adjustments are refused);
        # half the time when there is none, first record an output in the month after a final
        # statement and build that month's draft in the statement's currency.
        followed = [x for x in corrected_choices if targets(x)]
        if not followed and data.draw(st.booleans()):
            corrected = data.draw(st.sampled_from(corrected_choices))
            after = corrected["period_end"] + timedelta(hours=data.draw(st.integers(0, 24 * 27)))
            ext = f"q{len(self.outputs)}"
            if self._record(data, [(ext, after, Decimal(1))], []):
                places = CURRENCIES[corrected["currency"]]
                pool = _money(places, data.draw(st.integers(0, 10**places * 1000)))
                try:
                    with session_scope(self.engine) as s:
                        build_statement(
                            s, parse_period(after.strftime("%Y-%m")), pool, corrected["currency"]
                        )
                except LedgerError as exc:
                    event(f"adjust: next draft refused, {type(exc).__name__}")
            with session_scope(self.engine) as s:
                statements = self._statements(s)
            followed = [x for x in corrected_choices if targets(x)]
        if followed and data.draw(st.integers(0, 3)) < 3:
            corrected_choices = followed
        corrected = data.draw(st.sampled_from(corrected_choices))
        places = CURRENCIES[corrected["currency"]]
        minor = data.draw(st.integers(-(10**places) * 50, 10**places * 50).filter(bool))
        provider = data.draw(st.sampled_from(self.providers))
        open_after = targets(corrected)
        try:
            with session_scope(self.engine) as s:
                adjustment = add_adjustment(
                    s, corrected["id"], provider, _money(places, minor), "state machine"
                )
                carried_by = adjustment.statement_id
                currency = adjustment.currency
        except LedgerError:
            event("adjust: refused")
            assert not open_after, f"adjustment refused although {open_after[0]['id']} is open"
            return
        assert open_after, "an adjustment was carried although no open draft follows"
        assert carried_by == open_after[0]["id"], "the adjustment went to the wrong draft"
        assert currency == corrected["currency"]
        event("adjust: carried")

    @precondition(lambda self: any(x["status"] == "final" for x in self.known))
    @rule(data=st.data())
    def late_credit(self, data: Any) -> None:
        """Credits for outputs served in a closed period are refused and write nothing."""
        with session_scope(self.engine) as s:
            finals = [x for x in self._statements(s) if x["status"] == "final"]
        if not finals:
            return
        closed = data.draw(st.sampled_from(finals))
        ext = f"late{data.draw(st.integers(0, 10**6))}"
        served = self._served(data, period=closed)
        inside = [
            e
            for e, (at, _) in self.outputs.items()
            if closed["period_start"] <= at < closed["period_end"]
        ]
        again = (
            data.draw(st.lists(st.sampled_from(inside), unique=True, max_size=2)) if inside else []
        )
        self.outputs[ext] = (served, data.draw(st.sampled_from(WEIGHTS)))
        batch = [self._result(data, e) for e in [ext, *again]]
        del self.outputs[ext]
        before = self._counts()
        with pytest.raises(ClosedPeriodError), session_scope(self.engine) as s:
            run_id = self._new_run(s)
            record_results(s, run_id, batch)
        assert self._counts() == before
        event("late credit: refused")
        if not inside:
            return
        # The database refuses it too, whatever the application does.
        with pytest.raises(DatabaseError), session_scope(self.engine) as s:
            run_id = self._new_run(s)
            s.flush()
            qr, q = m.QueryResult.__table__, m.Query.__table__
            s.execute(
                insert(qr).from_select(
                    [
                        "run_id",
                        "query_id",
                        "unattributed",
                        "positive_total",
                        "is_current",
                        "recorded_at",
                    ],
                    select(
                        literal(run_id),
                        q.c.id,
                        false(),
                        literal(1.0),
                        false(),
                        literal(datetime(2030, 1, 1), DateTime),
                    ).where(q.c.external_id == inside[0]),
                )
            )
        assert self._counts() == before

    # ------------------------------------------------------------------ invariants

    @invariant()
    def ledger_invariants(self) -> None:
        with session_scope(self.engine) as s:
            self._check(s)
            self._audit(s)

    def _check(self, s: Any) -> None:
        doubled = s.execute(
            text(
                "SELECT query_id FROM query_results WHERE is_current "
                "GROUP BY query_id HAVING COUNT(*) > 1"
            )
        ).all()
        assert not doubled, f"outputs with several current results: {doubled}"
        current = dict(
            s.execute(
                text(
                    "SELECT q.external_id, r.run_id FROM queries q JOIN query_results r "
                    "ON r.query_id = q.id WHERE r.is_current AND q.external_id LIKE :p"
                ),
                {"p": "q%"},
            ).all()
        )
        assert current == self.current, "current results are not the latest recorded"

        statements = self.known = self._statements(s)
        finals = [x for x in statements if x["status"] == "final"]
        pooled_finals = [x for x in finals if x["pool_minor"] is not None]
        for a, b in itertools.combinations(pooled_finals, 2):
            assert not (
                a["period_start"] < b["period_end"] and b["period_start"] < a["period_end"]
            ), f"final pools overlap: {a['period_label']} and {b['period_label']}"

        # Each final statement counts each output of its period once.
        r_, q_, c_ = m.QueryResult.__table__, m.Query.__table__, m.Credit.__table__
        for x in finals:
            credits: list[float] = []
            outputs: set[int] = set()
            for qid, credit in s.execute(
                select(r_.c.query_id, c_.c.credit)
                .select_from(
                    r_.join(q_, q_.c.id == r_.c.query_id).outerjoin(
                        c_, (c_.c.run_id == r_.c.run_id) & (c_.c.query_id == r_.c.query_id)
                    )
                )
                .where(
                    r_.c.is_current,
                    q_.c.served_at >= x["period_start"],
                    q_.c.served_at < x["period_end"],
                )
            ):
                outputs.add(qid)
                if credit is not None:
                    credits.append(credit)
            summary = statement_summary(s, x["id"])
            assert summary["queries"] == len(outputs), f"{x['period_label']}: output count"
            assert summary["total_value"] == math.fsum(credits), f"{x['period_label']}: total"

        # Money: per currency, payments + outstanding carry == pools + adjustments.
        provider_ids = dict(
            s.execute(text("SELECT name, id FROM providers WHERE name LIKE :p"), {"p": "p%"}).all()
        )
        ids = list(provider_ids.values())
        journal: dict[tuple[str, str, int], int] = {}
        for debit, credit, cur, pid, minor in s.execute(
            text(
                "SELECT debit_account, credit_account, currency, provider_id, amount_minor "
                "FROM transfers"
            )
        ):
            if pid in ids:
                journal[(credit, cur, pid)] = journal.get((credit, cur, pid), 0) + minor
                journal[(debit, cur, pid)] = journal.get((debit, cur, pid), 0) - minor
        for cur in CURRENCIES:
            sealed = [x for x in pooled_finals if x["currency"] == cur]
            pools = sum(x["pool_minor"] for x in sealed)
            adjustments = 0
            payable = 0
            expected_carry: dict[int, int] = {}
            for x in sealed:
                rows = statement_rows(s, x["id"]).to_dicts()
                assert sum(r["amount_minor"] for r in rows) == x["pool_minor"]
                for r in rows:
                    adj = r["adjustments_minor"] or 0
                    assert r["payable_minor"] == (
                        r["amount_minor"] + r["carried_in_minor"] - r["carried_forward_minor"] + adj
                    ), f"{x['period_label']}: {r}"
                    payable += r["payable_minor"]
                    adjustments += adj
                    pid = provider_ids[r["provider"]]
                    expected_carry[pid] = (
                        expected_carry.get(pid, 0)
                        + r["carried_forward_minor"]
                        - r["carried_in_minor"]
                    )
            paid = sum(journal.get(("paid", cur, pid), 0) for pid in ids)
            carry = {pid: journal.get(("carry", cur, pid), 0) for pid in ids}
            assert paid == payable, f"{cur}: journal pays {paid}, statements say {payable}"
            assert paid + sum(carry.values()) == pools + adjustments, (
                f"{cur}: paid {paid} + carried {sum(carry.values())} != pools {pools} "
                f"+ adjustments {adjustments}"
            )
            for pid in ids:
                assert carry[pid] >= 0, f"{cur}: negative carry for provider {pid}"
                assert carry[pid] == expected_carry.get(pid, 0), f"{cur}: carry of {pid}"

        # Every line's amount is within one minor unit of pool × share.
        for x in statements:
            if x["pool_minor"] is None:
                continue
            for r in statement_rows(s, x["id"]).to_dicts():
                exact = x["pool_minor"] * r["share"]
                assert abs(r["amount_minor"] - exact) <= 1 + 1e-9 * x["pool_minor"], (
                    f"{x['period_label']}: {r['provider']} gets {r['amount_minor']} of "
                    f"{x['pool_minor']} at share {r['share']}"
                )

        # A final statement never changes.
        for statement_id, view in self.final_views.items():
            assert self._final_view(s, statement_id) == view, f"statement {statement_id} changed"

        # Adjustments are in the currency of the statement carrying them (drafts too).
        mixed = s.execute(
            text(
                "SELECT a.id FROM adjustments a JOIN statements t ON t.id = a.statement_id "
                "JOIN statements c ON c.id = a.corrects_statement_id "
                "WHERE a.currency <> t.currency OR a.currency <> c.currency"
            )
        ).all()
        assert not mixed, f"adjustments in another currency than their statement: {mixed}"

    def _audit(self, s: Any) -> None:
        breaches = [(c.name, c.detail) for c in audit_ledger(s).checks if not c.ok]
        assert not breaches, breaches

    def teardown(self) -> None:
        try:
            if self.pending:
                with session_scope(self.engine) as s:
                    for run_id in self.pending:
                        finish_run(s, run_id)
            with session_scope(self.engine) as s:
                self._audit(s)
        finally:
            self.engine.dispose()
            self.databases.drop(self.url)


def test_random_ledger_operations_keep_the_invariants(db_url: str) -> None:
    """20 examples of up to 20 steps, on SQLite and on PostgreSQL (a fresh database each)."""
    machine = type("Ledger", (LedgerMachine,), {"databases": Databases(db_url)})
    run_state_machine_as_test(machine, settings=SETTINGS)


def test_finishing_a_run_after_finalising_keeps_the_audit_clean(engine: Engine) -> None:
    """Finalising with allow_unfinished, then finishing the run: the audit must stay clean."""
    with session_scope(engine) as s:
        index_id = setup_index(s, ["a", "b"])
        start_run(s, sha("r1"), index_id, {})
        record_results(s, sha("r1"), [result("q1", datetime(2024, 8, 3), {"a": 1.0, "b": 3.0})])
    with session_scope(engine) as s:
        statement_id = build_statement(s, parse_period("2024-08"), Decimal(100)).id
    with session_scope(engine) as s:
        finalize_statement(s, statement_id, allow_unfinished=True)
    with session_scope(engine) as s:
        assert audit_ledger(s).ok
    with session_scope(engine) as s:
        finish_run(s, sha("r1"))
    with session_scope(engine) as s:
        report = audit_ledger(s)
    assert report.ok, [c.detail for c in report.checks if not c.ok]
