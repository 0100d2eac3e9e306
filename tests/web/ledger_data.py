"""A small ledger for the HTML and web-view tests: three quarters of credits for four providers
(one of them named like markup), two final statements with pools, a draft carrying an
adjustment to the first, and an output whose id is markup."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from hashlib import sha256
from pathlib import Path

from sqlalchemy import Engine

from ledger.db import session_scope
from ledger.periods import parse_period
from ledger.recording import finish_run, record_results, start_run
from ledger.statements import add_adjustment, build_statement, finalize_statement
from tests.ledger.helpers import result, setup_index, sha

HOSTILE = "<script>alert('x')</script> & co"
"""A provider name that is markup: pages must show it as text."""
HOSTILE_OUTPUT = "out-<script>document.title='pwned'</script>"
HOSTILE_PROMPT = "Say <b>hello</b> & <script>document.title='pwned'</script>"
HOSTILE_COMPLETION = "</pre><img src=x onerror=\"document.title='pwned'\">"
OUTPUTS_FILE = "outputs.jsonl"
"""The queries file the run names: `ledger serve` and `ledger explain` read prompts from it."""
PROVIDERS = ["stellar-press", "kitchen-table", "harbor-logs", HOSTILE]
QUARTERS = ["2024-Q1", "2024-Q2", "2024-Q3"]
RUN_MANIFEST = {"run": "quarters", "queries_file": {"name": OUTPUTS_FILE}}
POOLS = {
    "2024-Q1": Decimal("100000"),
    "2024-Q2": Decimal("120000.50"),
    "2024-Q3": Decimal("250000"),
}


def write_outputs_file(directory: Path) -> Path:
    """The run's queries file, holding the markup-named output's prompt and completion."""
    row = {"id": HOSTILE_OUTPUT, "timestamp": "2024-08-02T12:00:00Z", "prompt": HOSTILE_PROMPT,
           "completion": HOSTILE_COMPLETION}  # fmt: skip
    path = directory / OUTPUTS_FILE
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    return path


def build_ledger(engine: Engine, outputs_per_quarter: int = 12) -> dict[str, int]:
    """Record the credits, build the statements (Q1 and Q2 final, Q3 a draft with an adjustment
    of Q1 for harbor-logs); returns the statement id of each quarter."""
    rng = random.Random(23)
    results = []
    for quarter in QUARTERS:
        start = parse_period(quarter).start.replace(tzinfo=None)
        for i in range(outputs_per_quarter):
            providers = rng.sample(PROVIDERS, rng.randint(1, 3))
            positive = {p: rng.uniform(0.05, 5.0) for p in providers}
            served = start + timedelta(days=rng.randint(0, 85), minutes=rng.randint(0, 1400))
            weight = Decimal(rng.randint(1, 400)) / 100
            results.append(result(f"{quarter}-out-{i:02d}", served, positive, weight))
    hostile = result(HOSTILE_OUTPUT, datetime(2024, 8, 2, 12), {HOSTILE: 9.0, "stellar-press": 1.0})
    text = (HOSTILE_PROMPT + "\x00" + HOSTILE_COMPLETION).encode()
    results.append(
        replace(hostile, query=replace(hostile.query, text_sha256=sha256(text).hexdigest()))
    )
    results.append(result("2024-Q3-unattributed", datetime(2024, 8, 3), {}))
    ids = {}
    with session_scope(engine) as s:
        index_id = setup_index(s, PROVIDERS)
        run_id = sha("run:quarters")
        start_run(s, run_id, index_id, RUN_MANIFEST)
        record_results(s, run_id, results)
        finish_run(s, run_id)
    for quarter in QUARTERS:
        with session_scope(engine) as s:
            statement = build_statement(s, parse_period(quarter), POOLS[quarter], "USD")
            ids[quarter] = statement.id
        if quarter != "2024-Q3":
            with session_scope(engine) as s:
                finalize_statement(s, ids[quarter])
    with session_scope(engine) as s:
        add_adjustment(s, ids["2024-Q1"], "harbor-logs", Decimal("-150.25"), "double-counted shard")
    return ids
