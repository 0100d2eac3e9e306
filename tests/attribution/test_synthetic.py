"""Specifications of the procedural corpus, word tokenizer, tiny GPT-2 and query sampler."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
import torch

from attribution.data import read_queries, read_shard_texts
from attribution.lm import lm_loss, train_batches
from attribution.synthetic import (
    TEMPLATES,
    TOPICS,
    build_word_tokenizer,
    make_corpus,
    sample_queries,
    tiny_gpt2_config,
    train_tiny_lm,
    write_jsonl,
    write_shards,
)

FUNCTION_WORDS = set(" ".join(TEMPLATES).split())


def content_words(docs: list[str]) -> set[str]:
    return {w for doc in docs for w in doc.split()} - FUNCTION_WORDS


def all_texts(corpus: dict[str, list[str]]) -> list[str]:
    return [doc for docs in corpus.values() for doc in docs]


def test_corpus_is_deterministic_for_a_seed_and_varies_with_it():
    assert make_corpus(3, 20, seed=4, overlap=0.3) == make_corpus(3, 20, seed=4, overlap=0.3)
    assert make_corpus(3, 20, seed=4) != make_corpus(3, 20, seed=5)
    assert make_corpus(8, 2, seed=1) == make_corpus(8, 2, seed=1)


def test_corpus_shape_and_names():
    corpus = make_corpus(3, 7, seed=0)
    assert list(corpus) == list(TOPICS)[:3]
    assert all(len(docs) == 7 and all(docs) for docs in corpus.values())
    named = make_corpus(["cooking", "zeta"], 3, seed=0)
    assert list(named) == ["cooking", "zeta"]
    many = make_corpus(len(TOPICS) + 2, 3, seed=0)
    assert list(many)[-2:] == [f"topic{len(TOPICS)}", f"topic{len(TOPICS) + 1}"]


def test_builtin_topic_words_are_not_template_words():
    topic_words = {w for t in TOPICS.values() for w in t.nouns + t.verbs + t.adjectives}
    assert not topic_words & FUNCTION_WORDS


def test_providers_without_overlap_share_only_function_words():
    corpus = make_corpus(len(TOPICS) + 2, 30, seed=0)
    vocab = {name: content_words(docs) for name, docs in corpus.items()}
    names = list(vocab)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not vocab[a] & vocab[b], (a, b)


def test_overlap_mixes_the_first_pair_and_leaves_the_others_distinct():
    corpus = make_corpus(4, 60, seed=0, overlap=0.4)
    vocab = {name: content_words(docs) for name, docs in corpus.items()}
    first, second, third, fourth = vocab
    assert vocab[first] & set(TOPICS[second].nouns)
    assert vocab[second] & set(TOPICS[first].nouns)
    assert not vocab[third] & vocab[fourth]
    assert not (vocab[first] | vocab[second]) & (vocab[third] | vocab[fourth])
    with pytest.raises(ValueError):
        make_corpus(2, 1, overlap=1.5)


def test_word_tokenizer_has_fixed_specials_and_covers_the_corpus():
    corpus = make_corpus(3, 20, seed=0)
    tok = build_word_tokenizer(all_texts(corpus))
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<pad>", "<eos>")] == [0, 1, 2]
    assert tok.pad_token_id == 1 and tok.eos_token_id == 2
    for doc in all_texts(corpus):
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == doc
    assert tok("unseen", add_special_tokens=False)["input_ids"] == [0]
    assert build_word_tokenizer(reversed(all_texts(corpus))).get_vocab() == tok.get_vocab()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_shards_hold_each_providers_documents_in_order(tmp_path, fmt):
    corpus = make_corpus(2, 5, seed=0)
    specs = write_shards(corpus, tmp_path, fmt=fmt, shards_per_provider=2)
    assert [s.name for s in specs] == [f"{p}-{i:03d}.{fmt}" for p in corpus for i in range(2)]
    for provider, docs in corpus.items():
        parts = [s for s in specs if s.provider == provider]
        texts = [t for s in parts for _, t in read_shard_texts(s.path)]
        assert texts == docs
        assert all(s.sha256 and len(s.sha256) == 64 for s in parts)


def test_config_is_small_and_deterministic():
    config = tiny_gpt2_config(50)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_positions) == (2, 64, 2, 64)
    assert config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.0


def test_training_is_deterministic_for_a_seed():
    corpus = make_corpus(2, 10, seed=0)
    tok = build_word_tokenizer(all_texts(corpus))
    config = tiny_gpt2_config(len(tok), n_embd=16, n_positions=32)
    a = train_tiny_lm(all_texts(corpus), tok, config, steps=3, batch_size=4, seed=7)
    b = train_tiny_lm(all_texts(corpus), tok, config, steps=3, batch_size=4, seed=7)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def mean_token_nll(model, tok, specs) -> float:
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in train_batches(specs, tok, 64, 32):
            total += lm_loss(model, batch).sum().item()
            tokens += sum(n - 1 for n in batch.token_counts)
    return total / tokens


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT-2 trained on the first provider only; the second is held out."""
    corpus = make_corpus(2, 80, seed=0)
    held_out = make_corpus(2, 20, seed=1)
    tok = build_word_tokenizer(all_texts(corpus))
    own, other = list(corpus)
    config = tiny_gpt2_config(len(tok))
    model = train_tiny_lm(corpus[own], tok, config, steps=60, batch_size=16, lr=3e-3, seed=0)
    shards = write_shards(held_out, tmp_path_factory.mktemp("held_out"))
    return model, tok, corpus, {s.provider: s for s in shards}, own, other


@pytest.mark.slow
def test_tiny_model_learns_its_providers_text(trained):
    model, tok, _, shards, own, other = trained
    uniform = math.log(len(tok))
    own_nll = mean_token_nll(model, tok, [shards[own]])
    other_nll = mean_token_nll(model, tok, [shards[other]])
    assert own_nll < 0.6 * uniform
    assert own_nll < other_nll


@pytest.mark.slow
def test_sampled_queries_are_valid_deterministic_and_in_range(trained, tmp_path):
    model, tok, corpus, _, own, _ = trained
    start, end = datetime(2024, 7, 1, tzinfo=UTC), datetime(2024, 10, 1, tzinfo=UTC)
    rows = sample_queries(model, tok, corpus, 3, seed=2, start=start, end=end)
    assert rows == sample_queries(model, tok, corpus, 3, seed=2, start=start, end=end)
    assert len(rows) == 6
    assert sorted(r["provider_hint"] for r in rows) == sorted([*corpus] * 3)
    write_jsonl(rows, tmp_path / "queries.jsonl")
    queries = read_queries(tmp_path / "queries.jsonl")
    assert [q.id for q in queries] == [r["id"] for r in rows]
    assert all(start <= q.timestamp < end for q in queries)
    assert [q.timestamp for q in queries] == sorted(q.timestamp for q in queries)
    for row in rows:
        words = row["prompt"].split()
        assert 3 <= len(words) <= 6
        assert any(doc.split()[: len(words)] == words for doc in corpus[row["provider_hint"]])
        n_completion = len(tok(row["completion"], add_special_tokens=False)["input_ids"])
        assert 3 <= n_completion <= 8
        assert "<unk>" not in row["completion"] and "<pad>" not in row["completion"]
