"""The README's set-up commands and the Python API guide's examples (docs/api.md) run as written."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

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

README = Path(__file__).resolve().parents[1] / "README.md"
API = README.parent / "docs" / "api.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", API.read_text(), flags=re.S)


def python_block(marker: str) -> str:
    """The one Python block of docs/api.md that contains `marker`."""
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"{len(found)} docs/api.md Python blocks contain {marker!r}"
    return found[0]


GENERIC, LANGUAGE, MODEL_OBJECT, CHECKPOINTS = (
    "def loss_fn(",
    "index_language_model(",
    "AutoModelForCausalLM.from_pretrained(",
    "checkpoints=earlier",
)


def test_readme_has_the_two_setup_commands() -> None:
    text = README.read_text()
    assert "pip install torch==2.13.0 && pip install -e . && ledger demo" in text
    assert "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest" in text
    assert "python -m pytest" in (README.parent / ".ci" / "run").read_text()


def test_generic_api_example_runs(capsys) -> None:
    exec(compile(python_block(GENERIC), "docs/api.md", "exec"), {})
    out = capsys.readouterr().out
    assert "['north', 'south']" in out


def test_checkpoint_example_runs_after_the_generic_one(capsys) -> None:
    namespace: dict = {}
    exec(compile(python_block(GENERIC), "docs/api.md", "exec"), namespace)
    capsys.readouterr()
    exec(compile(python_block(CHECKPOINTS), "docs/api.md", "exec"), namespace)
    assert capsys.readouterr().out.strip() == "2 checkpoint2/2"
    assert namespace["result"].positive.shape == (2, 2)


def test_language_model_example_runs(tmp_path, monkeypatch, capsys) -> None:
    topics = {"stellar-press": TOPICS["astronomy"], "kitchen-table": TOPICS["cooking"]}
    corpus = make_corpus(topics, docs_per_provider=8, seed=0)
    texts = [t for docs in corpus.values() for t in docs]
    tokenizer = build_word_tokenizer(texts)
    config = tiny_gpt2_config(len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=64)
    model = train_tiny_lm(texts, tokenizer, config, steps=5, batch_size=4, seed=0)
    write_workspace_model(model, tokenizer, tmp_path / "model")
    write_shards(corpus, tmp_path / "shards")
    write_jsonl(
        sample_queries(
            model,
            tokenizer,
            corpus,
            1,
            seed=0,
            start=datetime(2024, 7, 1, tzinfo=UTC),
            end=datetime(2024, 8, 1, tzinfo=UTC),
        ),
        tmp_path / "queries.jsonl",
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LEDGER_QUIET", "1")
    exec(compile(python_block(LANGUAGE), "docs/api.md", "exec"), {})
    shares = eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(shares) == {"stellar-press", "kitchen-table"}
    assert sum(shares.values()) == pytest.approx(1.0)


def test_model_object_example_runs(tmp_path, monkeypatch, capsys) -> None:
    """A library user's whole path for a Hugging Face model object, as the README shows it."""
    from attribution.config import LANGUAGE_MODEL_INDEX

    topics = {"stellar-press": TOPICS["astronomy"], "kitchen-table": TOPICS["cooking"]}
    corpus = make_corpus(topics, docs_per_provider=8, seed=0)
    texts = [t for docs in corpus.values() for t in docs]
    block = python_block(MODEL_OBJECT)
    quoted = re.findall(r'"([a-z ,.]+ [a-z ,.]+)"', block)  # the example's texts
    tokenizer = build_word_tokenizer(texts + quoted)
    config = tiny_gpt2_config(len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=64)
    model = train_tiny_lm(texts, tokenizer, config, steps=5, batch_size=4, seed=0)
    write_workspace_model(model, tokenizer, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LEDGER_QUIET", "1")
    namespace: dict = {}
    exec(compile(block, "docs/api.md", "exec"), namespace)
    lines = capsys.readouterr().out.strip().splitlines()
    shares = eval(lines[-1])
    assert set(shares) == {"stellar-press", "kitchen-table"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert "output-1" not in "".join(lines[:-1]) and "sp-1:0" in "".join(lines)
    index = namespace["index"]
    assert index.config == LANGUAGE_MODEL_INDEX
    assert index.metadata["example_id"].to_list() == ["sp-1:0", "sp-2:0", "kt-1:0", "kt-2:0"]
    assert index.metadata["provider"].to_list() == ["stellar-press"] * 2 + ["kitchen-table"] * 2
    unknown = tokenizer.unk_token_id
    assert all(unknown not in s for s in namespace["sequences"])  # the words are the model's
