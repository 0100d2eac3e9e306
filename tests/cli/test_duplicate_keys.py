"""A JSON line that names a field twice is refused with one line naming file, line and key.

`json.loads` keeps the last of two equal keys, so `{"id": "d1", "id": "d2"}` used to be read as
d2 and credited; the one JSONL reader refuses it, for shards and for outputs files alike.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from attribution.data import read_jsonl, read_queries, read_shard_texts
from attribution.types import InputError
from ledger.cli import cli
from tests.cli.workspace import ledger_counts

OUTPUT = (
    '{"id": "d1", "timestamp": "2024-08-01T00:00:00Z", "prompt": "The", '
    '"completion": " stars", "id": "d2"}'
)


def test_reader_refuses_a_key_given_twice_at_any_depth(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "fine"}\n\n{"meta": {"k": 1, "k": 2}, "text": "x"}\n')
    with pytest.raises(InputError) as info:
        list(read_jsonl(path))
    assert (info.value.line, info.value.field) == (3, "k")
    assert str(info.value).startswith(f"{path}, line 3, field 'k': duplicate key")


def test_reader_keeps_equal_values_under_different_keys(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1, "b": 1, "c": {"a": 1}}\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1, "b": 1, "c": {"a": 1}})]


def test_outputs_and_shards_with_a_duplicate_key_are_refused(tmp_path) -> None:
    outputs = tmp_path / "queries.jsonl"
    outputs.write_text(OUTPUT + "\n")
    with pytest.raises(InputError, match=r"line 1, field 'id': duplicate key"):
        read_queries(outputs)
    shard = tmp_path / "s.jsonl"
    shard.write_text('{"text": "one"}\n{"text": "two", "text": "three"}\n')
    with pytest.raises(InputError, match=r"line 2, field 'text': duplicate key"):
        list(read_shard_texts(shard))


def test_shards_add_refuses_a_duplicate_key_and_writes_nothing(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", url, "init"]).exit_code == 0
    assert runner.invoke(cli, ["--db", url, "providers", "add", "p"]).exit_code == 0
    shard = tmp_path / "s.jsonl"
    shard.write_text('{"text": "one", "text": "two"}\n')
    before = ledger_counts(url)
    result = runner.invoke(cli, ["--db", url, "shards", "add", str(shard), "--provider", "p"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {shard}, line 1, field 'text': duplicate key: a JSON object names each field once"
    ]
    assert ledger_counts(url) == before


def test_attribute_refuses_an_output_with_a_duplicate_key(demo_copy) -> None:
    url = f"sqlite:///{demo_copy / 'ledger.db'}"
    outputs = demo_copy / "dup.jsonl"
    good = json.loads((demo_copy / "queries.jsonl").read_text().splitlines()[0])
    outputs.write_text(json.dumps({**good, "id": "new-1"}) + "\n" + OUTPUT + "\n")
    before = ledger_counts(url)
    result = CliRunner().invoke(cli, ["--db", url, "attribute", "--outputs", str(outputs)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {outputs}, line 2, field 'id': duplicate key: a JSON object names each field once"
    )
    assert ledger_counts(url) == before
