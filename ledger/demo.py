"""`ledger demo`: a complete workspace built in code, and the main job run in it.

Four providers write about their own topics (two of them also borrow each other's style); a
tiny GPT-2 is trained on their documents and saved as safetensors; outputs sampled from it in
2024-Q3 are attributed, and the quarter's statement is printed for a sample pool.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import click

from attribution.config import LANGUAGE_MODEL_INDEX
from attribution.synthetic import (
    TOPICS,
    build_word_tokenizer,
    make_corpus,
    sample_queries,
    tiny_gpt2_config,
    train_tiny_lm,
    write_jsonl,
    write_shards,
    write_workspace_model,
)
from ledger.db import make_engine, session_scope, upgrade
from ledger.jobs import attribute_outputs, build_ledger_index
from ledger.periods import parse_period
from ledger.registry import get_or_create_provider, register_shards
from ledger.statements import build_statement, find_statement

log = logging.getLogger(__name__)

PROVIDERS = {
    "stellar-press": "astronomy",
    "harbor-logs": "sailing",
    "kitchen-table": "cooking",
    "lexis-archive": "law",
}
# Outputs served per provider's topic in the quarter: demand differs, and so does credit.
DEMAND = {"stellar-press": 12, "harbor-logs": 4, "kitchen-table": 8, "lexis-archive": 2}
POOL = Decimal("250000")
CURRENCY = "USD"


def run_demo(
    directory: Path, *, quiet: bool = False, docs_per_provider: int = 40, train_steps: int = 150
) -> dict:
    """Build the workspace in `directory` and run init → shards → index → attribute → report."""
    say = (lambda *_: None) if quiet else click.echo
    root = directory.resolve()
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def step(text: str) -> None:
        say(f"[{time.perf_counter() - started:5.1f}s] {text}")

    step(f"workspace {root}")
    topics = {name: TOPICS[topic] for name, topic in PROVIDERS.items()}
    corpus = make_corpus(
        topics,
        docs_per_provider,
        seed=0,
        overlap=0.25,
        overlap_pairs=[("stellar-press", "harbor-logs")],
    )
    texts = [t for docs in corpus.values() for t in docs]
    tokenizer = build_word_tokenizer(texts)
    config = tiny_gpt2_config(len(tokenizer), n_layer=2, n_embd=48, n_head=2, n_positions=64)
    step(f"training a tiny GPT-2 on {len(texts)} documents from {len(corpus)} providers")
    model = train_tiny_lm(texts, tokenizer, config, steps=train_steps, batch_size=16, seed=0)
    model_dir = write_workspace_model(model, tokenizer, root / "model")
    shards = write_shards(corpus, root / "shards")
    rows = _served_outputs(model, tokenizer, make_corpus(topics, docs_per_provider, seed=1))
    write_jsonl(rows, root / "queries.jsonl")

    url = f"sqlite:///{root / 'ledger.db'}"
    engine = make_engine(url)
    upgrade(engine)
    with session_scope(engine) as session:
        for name in PROVIDERS:
            get_or_create_provider(session, name)
    for shard in shards:
        register_shards(engine, [shard.path], shard.provider)
    step(f"ledger initialised, {len(shards)} shards registered; building the gradient index")
    index = build_ledger_index(
        engine,
        model_dir,
        root / "indexes",
        LANGUAGE_MODEL_INDEX,
        max_length=64,
        batch_size=16,
        show_progress=not quiet,
    )
    step(
        f"index {index.id[:16]}: {index.rows} examples × {index.dim} dims; attributing "
        f"{len(rows)} outputs"
    )
    summary = attribute_outputs(engine, str(root / "queries.jsonl"), show_progress=not quiet)
    step(f"{summary.attributed} attributed, {summary.unattributed} unattributed")

    period = parse_period("2024-Q3")
    with session_scope(engine) as session:
        existing = find_statement(session, period)
        if existing is None or existing.status != "final":
            build_statement(session, period, POOL, CURRENCY)
    engine.dispose()
    step("done")
    if not quiet:
        from ledger.cli import cli

        cli.main(
            [
                "--db",
                url,
                "report",
                "--period",
                "2024-Q3",
                "--pool",
                str(POOL),
                "--currency",
                CURRENCY,
            ],
            standalone_mode=False,
        )
        say("")
        say("Try the commands yourself:")
        say(f"  cd {root}")
        for line in (
            "ledger providers list",
            "ledger shards list",
            "ledger runs list",
            f"ledger explain --query {rows[0]['id']}",
            f"ledger verify {summary.run_id[:16]} --outputs queries.jsonl",
            "ledger report --period 2024-Q3 --pool 250000 --currency USD --format csv",
            "ledger attribute --outputs queries.jsonl   # again: nothing changes",
            'ledger sql "SELECT provider, share, amount FROM statement_lines_named"',
        ):
            say(f"  {line}")
    return {
        "root": str(root),
        "run_id": summary.run_id,
        "index_id": index.id,
        "queries": len(rows),
        "seconds": time.perf_counter() - started,
    }


def _served_outputs(model, tokenizer, prompts_corpus: dict[str, list[str]]) -> list[dict]:
    """Outputs sampled from the model in 2024-Q3, prompted in each provider's style as often
    as `DEMAND` says, with ids in time order."""
    rows = sample_queries(
        model,
        tokenizer,
        prompts_corpus,
        max(DEMAND.values()),
        seed=2,
        start=datetime(2024, 7, 1, tzinfo=UTC),
        end=datetime(2024, 10, 1, tzinfo=UTC),
    )
    kept, seen = [], dict.fromkeys(DEMAND, 0)
    for row in rows:
        hint = row["provider_hint"]
        if seen[hint] < DEMAND[hint]:
            seen[hint] += 1
            kept.append(row)
    return [{**row, "id": f"q{i + 1:06d}"} for i, row in enumerate(kept)]
