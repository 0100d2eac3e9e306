"""A tiny workspace for the command-line tests: model, shards and outputs built in code."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

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

PROVIDERS = {"stellar": "astronomy", "galley": "cooking", "statute": "law"}


def ledger_counts(url: str) -> dict[str, int]:
    """Rows in every table a command may write: compared before and after a refused one."""
    from sqlalchemy import text

    from ledger.db import make_engine

    tables = ("providers", "shards", "gradient_indexes", "attribution_runs", "queries",
              "query_results", "credits", "top_examples", "statements", "statement_lines")  # fmt: skip
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in tables}
    finally:
        engine.dispose()


def build_workspace(root: Path) -> Path:
    """Three providers with distinct topics, a tiny GPT-2 trained on them, outputs in 2024-Q3
    imitating each provider (`provider_hint`), one of them carrying revenue."""
    topics = {name: TOPICS[t] for name, t in PROVIDERS.items()}
    corpus = make_corpus(topics, docs_per_provider=20, seed=5)
    texts = [t for docs in corpus.values() for t in docs]
    tokenizer = build_word_tokenizer(texts)
    config = tiny_gpt2_config(len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=48)
    model = train_tiny_lm(texts, tokenizer, config, steps=120, batch_size=16, seed=0)
    write_workspace_model(model, tokenizer, root / "model")
    write_shards(corpus, root / "shards")
    rows = sample_queries(
        model,
        tokenizer,
        make_corpus(topics, 20, seed=6),
        n_per_provider=3,
        seed=1,
        start=datetime(2024, 7, 1, tzinfo=UTC),
        end=datetime(2024, 10, 1, tzinfo=UTC),
    )
    rows[0]["revenue"] = "2.50"
    write_jsonl(rows, root / "queries.jsonl")
    return root
