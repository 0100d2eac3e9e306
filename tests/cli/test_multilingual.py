"""Text beyond ASCII end to end: a byte-level BPE tokenizer (GPT-2's kind, trained here in code)
over Chinese, Arabic and emoji shards, through index, attribute, report, explain and verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ledger.cli import cli

TEXTS = {
    "zh": ["天文学家观察星星和彗星。", "月亮在夜空中发光，行星绕着太阳转。", "望远镜让我们看到遥远的星系。"],
    "ar": ["الطاهي يطبخ الحساء في المطبخ.", "نضيف الملح والفلفل إلى الطعام.", "الخبز الطازج لذيذ جدا."],
    "emoji": ["🚀 launch the rocket 🌙 to the moon ✨", "🍲 soup 🥖 bread 🧂 salt 👩‍🍳 chef", "café naïve Ångström ß"],
}  # fmt: skip
OUTPUTS = [("天文学家", "观察星星"), ("الطاهي", " يطبخ الحساء"), ("🚀 launch", " the rocket 🌙")]


def run(url: str, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--db", url, *args], env={"LEDGER_QUIET": "1"})
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("multilingual")
    bpe = ByteLevelBPETokenizer()
    corpus = [t for texts in TEXTS.values() for t in texts]
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).eval().save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for provider, texts in TEXTS.items():
        lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts * 3]
        (root / f"{provider}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = [
        {"id": f"u{i}", "timestamp": "2024-08-01T00:00:00Z", "prompt": p, "completion": c}
        for i, (p, c) in enumerate(OUTPUTS)
    ]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    (root / "outputs.jsonl").write_text(text, encoding="utf-8")
    return root


def test_non_ascii_text_runs_end_to_end_and_verifies(workspace: Path) -> None:
    url = f"sqlite:///{workspace / 'ledger.db'}"
    run(url, "init")
    run(url, "providers", "add", *TEXTS)
    for provider in TEXTS:
        run(url, "shards", "add", str(workspace / f"{provider}.jsonl"), "--provider", provider)
    run(url, "index", "--model", str(workspace / "model"), "--out", str(workspace / "indexes"))
    outputs = str(workspace / "outputs.jsonl")
    summary = json.loads(run(url, "attribute", "--outputs", outputs, "--format", "json"))
    assert summary["attributed"] + summary["unattributed"] == len(OUTPUTS) == summary["queries"]
    statement = json.loads(run(url, "report", "--period", "2024-Q3", "--pool", "100",
                               "--format", "json"))  # fmt: skip
    assert sum(line["amount_minor"] for line in statement["lines"]) == 10000
    explained = json.loads(run(url, "explain", "--query", "u0", "--format", "json"))
    assert explained["top"] and all(t["provider"] in TEXTS for t in explained["top"])
    verified = run(url, "verify", summary["run_id"][:12], "--outputs", outputs)
    assert f"re-computed {len(OUTPUTS)}/{len(OUTPUTS)} outputs agree" in verified
