"""Specifications of the JSONL reader, the shard loader and the queries reader."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from attribution.data import (
    Query,
    ShardSpec,
    count_shard_rows,
    read_jsonl,
    read_queries,
    read_shard_texts,
    sha256_file,
)
from attribution.types import InputError


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def query_line(**fields) -> str:
    row = {"id": "q1", "timestamp": "2024-07-01T12:00:00Z", "prompt": "p", "completion": "c"}
    row.update(fields)
    return json.dumps({k: v for k, v in row.items() if v is not ...})


def test_read_jsonl_numbers_lines_from_one_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", ['{"a": 1}', "", "   ", '{"a": 2}'])
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_read_jsonl_reports_the_line_of_malformed_json(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", ['{"a": 1}', "", '{"a": 2'])
    with pytest.raises(InputError) as err:
        list(read_jsonl(path))
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 3, None)
    assert str(err.value).startswith(f"{path}, line 3: malformed JSON")


def test_read_jsonl_rejects_a_line_that_is_not_an_object(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", ['{"a": 1}', "[1, 2]"])
    with pytest.raises(InputError, match="line 2: expected a JSON object, got list"):
        list(read_jsonl(path))


def test_read_jsonl_accepts_a_byte_order_mark_and_crlf_line_ends(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"b": "\xc3\xa9"}\r\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (2, {"b": "\u00e9"})]
    queries = tmp_path / "q.jsonl"
    queries.write_bytes(b"\xef\xbb\xbf" + query_line().encode() + b"\n")
    assert [q.id for q in read_queries(queries)] == ["q1"]
    # Only at the very start: a mark inside the file is no JSON.
    path.write_bytes(b'{"a": 1}\n\xef\xbb\xbf{"a": 2}\n')
    with pytest.raises(InputError, match="line 2: malformed JSON"):
        list(read_jsonl(path))


def test_read_jsonl_names_the_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": "caf\xe9"}\n')
    with pytest.raises(InputError) as err:
        list(read_jsonl(path))
    assert (err.value.line, err.value.field) == (3, None)
    assert "not valid UTF-8" in str(err.value) and str(path) in str(err.value)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot open file"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_parquet_and_jsonl_shards_read_identically(tmp_path):
    texts = ["the star shines .", "ünïcode text", "a\nmulti-line text"]
    jsonl = write_lines(tmp_path / "s.jsonl", [json.dumps({"text": t, "x": 1}) for t in texts])
    parquet = tmp_path / "s.parquet"
    pl.DataFrame({"text": texts, "x": [1, 2, 3]}).write_parquet(parquet)
    expected = list(enumerate(texts))
    assert list(read_shard_texts(jsonl)) == expected
    assert list(read_shard_texts(parquet)) == expected
    assert count_shard_rows(jsonl) == count_shard_rows(parquet) == 3


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"other": "x"}, "missing"),
        ({"text": 5}, "expected a string"),
        ({"text": " "}, "empty"),
        ({"text": "a \ud800 b"}, "lone UTF-16 surrogate '\\\\ud800' at character 3"),
    ],
)
def test_jsonl_shard_errors_name_the_line_and_the_text_field(tmp_path, row, message):
    path = write_lines(tmp_path / "s.jsonl", [json.dumps({"text": "ok"}), "", json.dumps(row)])
    with pytest.raises(InputError, match=message) as err:
        list(read_shard_texts(path))
    assert (err.value.line, err.value.field) == (3, "text")


def test_parquet_shard_errors_name_row_plus_one(tmp_path):
    path = tmp_path / "s.parquet"
    pl.DataFrame({"text": ["ok", None, "ok"]}).write_parquet(path)
    with pytest.raises(InputError, match="missing") as err:
        list(read_shard_texts(path))
    assert (err.value.line, err.value.field) == (2, "text")
    assert str(err.value) == f"{path}, row 2, field 'text': missing"


def test_parquet_shard_without_text_column_is_rejected(tmp_path):
    path = tmp_path / "s.parquet"
    pl.DataFrame({"body": ["ok"]}).write_parquet(path)
    with pytest.raises(InputError, match="field 'text': missing column"):
        list(read_shard_texts(path))


def test_unknown_shard_extension_is_rejected(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(InputError, match="unknown shard format '.csv'"):
        list(read_shard_texts(path))


def test_shard_spec_defaults_name_to_basename_and_hashes_the_file(tmp_path):
    path = write_lines(tmp_path / "astro-000.jsonl", ['{"text": "x y"}'])
    spec = ShardSpec(str(path), "astronomy")
    assert spec.name == "astro-000.jsonl" and spec.sha256 is None
    import hashlib

    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == expected == spec.with_hash().sha256


def test_read_queries_parses_fields_and_ignores_unknown_ones(tmp_path):
    path = write_lines(
        tmp_path / "q.jsonl",
        [
            query_line(id=7, timestamp="2024-07-01T14:00:00+02:00", provider_hint="x"),
            query_line(id="b", prompt="", revenue="0.10"),
            query_line(id="c", weight=2.5),
        ],
    )
    first, second, third = read_queries(path)
    assert first == Query("7", datetime(2024, 7, 1, 12, tzinfo=UTC), "p", "c", Decimal(1))
    assert first.timestamp.tzinfo == UTC
    assert second.prompt == "" and second.weight == Decimal("0.10")
    assert third.weight == Decimal("2.5")


def test_weight_floats_are_parsed_exactly_via_their_decimal_text(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [query_line(weight=0.1)])
    assert read_queries(path)[0].weight == Decimal("0.1")


def test_query_text_sha256_hashes_prompt_nul_completion():
    import hashlib

    q = Query("1", datetime(2024, 1, 1, tzinfo=UTC), "ab", "cd")
    assert q.text_sha256 == hashlib.sha256(b"ab\x00cd").hexdigest()
    assert q.text_sha256 != Query("1", q.timestamp, "a", "bcd").text_sha256


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"timestamp": "yesterday"}, "timestamp", "not an ISO 8601 timestamp"),
        ({"timestamp": "2024-07-01T12:00:00"}, "timestamp", "no UTC offset"),
        ({"timestamp": ...}, "timestamp", "missing"),
        ({"timestamp": 1719835200}, "timestamp", "ISO 8601 string"),
        ({"weight": -1}, "weight", "negative"),
        ({"weight": "NaN"}, "weight", "finite"),
        ({"revenue": "ten"}, "revenue", "not a number"),
        ({"revenue": "\uff11\uff12"}, "revenue", "not a number"),  # fullwidth digits: ASCII only
        ({"weight": True}, "weight", "expected a number"),
        ({"weight": 1, "revenue": 2}, "revenue", "not both"),
        ({"id": ""}, "id", "empty"),
        ({"id": ...}, "id", "missing"),
        ({"id": 1.5}, "id", "string or integer"),
        ({"prompt": ...}, "prompt", "missing"),
        ({"completion": ""}, "completion", "empty"),
        ({"completion": ["x"]}, "completion", "expected a string"),
        # JSON may escape a lone UTF-16 surrogate; it is not a character and cannot be encoded.
        ({"id": "q\ud800"}, "id", "lone UTF-16 surrogate"),
        ({"prompt": "\udfff p"}, "prompt", "lone UTF-16 surrogate"),
        ({"completion": "c \ud83d"}, "completion", "lone UTF-16 surrogate"),
        # NUL cannot be stored in PostgreSQL text and separates prompt from completion in hashes.
        ({"id": "q\u0000"}, "id", "NUL character"),
        ({"prompt": "p\u0000"}, "prompt", "NUL character"),
        ({"completion": "\u0000c"}, "completion", "NUL character"),
        # Valid offsets whose UTC moment falls outside years 1..9999.
        ({"timestamp": "0001-01-01T00:00:00+01:00"}, "timestamp", "years 1 to 9999"),
        ({"timestamp": "9999-12-31T23:59:59-01:00"}, "timestamp", "years 1 to 9999"),
    ],
)
def test_bad_query_fields_name_file_line_and_field(tmp_path, fields, field, message):
    lines = [query_line(id="a"), "", query_line(**{"id": "b", **fields})]
    path = write_lines(tmp_path / "q.jsonl", lines)
    with pytest.raises(InputError, match=message) as err:
        read_queries(path)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 3, field)


def test_naive_timestamp_error_suggests_an_offset(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [query_line(timestamp="2024-07-01T12:00:00")])
    with pytest.raises(InputError, match=r"2024-07-01T12:00:00Z"):
        read_queries(path)


def test_duplicate_id_names_the_second_occurrence(tmp_path):
    path = write_lines(
        tmp_path / "q.jsonl", [query_line(id="a"), query_line(id="b"), query_line(id="a")]
    )
    with pytest.raises(InputError, match="duplicate id 'a' \\(first on line 1\\)") as err:
        read_queries(path)
    assert (err.value.line, err.value.field) == (3, "id")


def test_integer_and_string_ids_that_match_are_duplicates(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [query_line(id=1), query_line(id="1")])
    with pytest.raises(InputError, match="duplicate id") as err:
        read_queries(path)
    assert err.value.line == 2


def test_non_utc_offsets_are_converted_to_utc(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [query_line(timestamp="2024-07-01T00:30:00-05:00")])
    stamp = read_queries(path)[0].timestamp
    assert stamp == datetime(2024, 7, 1, 0, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert stamp.utcoffset() == timedelta(0) and stamp.hour == 5


def test_surrogate_pairs_are_characters_and_accepted(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [query_line(completion="\U0001f600")])
    assert '"\\ud83d\\ude00"' in path.read_text()  # written as an escaped pair
    assert read_queries(path)[0].completion == "\U0001f600"


def test_extreme_timestamps_that_stay_in_range_are_accepted(tmp_path):
    lines = [
        query_line(id="a", timestamp="0001-01-01T00:00:00-01:00"),
        query_line(id="b", timestamp="9999-12-31T23:59:59+01:00"),
    ]
    first, second = read_queries(write_lines(tmp_path / "q.jsonl", lines))
    assert first.timestamp == datetime(1, 1, 1, 1, tzinfo=UTC)
    assert second.timestamp == datetime(9999, 12, 31, 22, 59, 59, tzinfo=UTC)
