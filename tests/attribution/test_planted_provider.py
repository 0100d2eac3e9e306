"""A tiny GPT-2 trained here on providers with distinct topics: outputs in a provider's style
credit that provider most, through the language-model API end to end."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from attribution import IndexConfig, InputError, ProjectionConfig, ScoreConfig
from attribution.data import read_queries
from attribution.language import attribute_queries, index_language_model
from attribution.synthetic import (
    build_word_tokenizer,
    make_corpus,
    sample_queries,
    tiny_gpt2_config,
    train_tiny_lm,
    write_jsonl,
    write_shards,
    write_workspace_model,
)

PROVIDERS = ["astronomy", "cooking", "law"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    corpus = make_corpus(PROVIDERS, docs_per_provider=24, seed=3)
    texts = [t for docs in corpus.values() for t in docs]
    tokenizer = build_word_tokenizer(texts)
    config = tiny_gpt2_config(len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=48)
    model = train_tiny_lm(texts, tokenizer, config, steps=120, batch_size=16, seed=0)
    model_dir = write_workspace_model(model, tokenizer, root / "model")
    shards = write_shards(corpus, root / "shards")
    rows = sample_queries(
        model,
        tokenizer,
        corpus,
        n_per_provider=4,
        seed=1,
        start=datetime(2024, 7, 1, tzinfo=UTC),
        end=datetime(2024, 10, 1, tzinfo=UTC),
    )
    write_jsonl(rows, root / "queries.jsonl")
    return root, model_dir, shards, rows


@pytest.mark.parametrize("kind", ["pca", "random"])
def test_queries_in_a_providers_style_credit_that_provider_most(workspace, kind) -> None:
    root, model_dir, shards, rows = workspace
    config = IndexConfig(projection=ProjectionConfig(kind=kind, k_in=8, k_out=8))
    index = index_language_model(
        model_dir,
        shards,
        root / f"index-{kind}",
        config,
        max_length=48,
        batch_size=8,
        show_progress=False,
    )
    assert index.manifest["data"]["shards"][0]["provider"] in PROVIDERS
    queries = read_queries(root / "queries.jsonl")
    result = attribute_queries(model_dir, index, queries, ScoreConfig(top_k=5))
    shares = result.shares()
    hints = [r["provider_hint"] for r in rows]
    top = [result.providers[i] for i in shares.argmax(axis=1)]
    hits = sum(h == t for h, t in zip(hints, top, strict=True))
    assert hits >= 0.8 * len(rows), list(zip(hints, top, strict=True))
    for provider in PROVIDERS:
        mine = np.array([h == provider for h in hints])
        mean_share = shares[mine].mean(axis=0)
        assert result.providers[int(mean_share.argmax())] == provider
    # The top example of most queries comes from the query's own provider.
    meta = index.metadata
    top_providers = meta["provider"].to_numpy()[result.top_rows[:, 0]]
    assert (top_providers == np.array(hints)).mean() >= 0.75


def test_a_model_that_does_not_match_the_index_is_refused(workspace, tmp_path) -> None:
    root, model_dir, shards, rows = workspace
    index = index_language_model(
        model_dir,
        shards[:1],
        root / "index-small",
        IndexConfig(projection=ProjectionConfig(kind="random", k_in=4, k_out=4)),
        max_length=48,
        show_progress=False,
    )
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(model_dir, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="weights_sha256"):
        attribute_queries(other, index, read_queries(root / "queries.jsonl"))
