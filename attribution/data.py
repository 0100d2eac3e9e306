"""Text data: the one JSONL reader, the one shard loader, and served queries.

Every reader reports bad input as an `InputError` naming the file, the 1-based line (for parquet,
the row number + 1) and the field, so that a caller can print one line and write nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

from attribution.types import InputError, first_line

SHARD_SUFFIXES = (".jsonl", ".parquet")


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's fields as a dict, refusing a name given twice (which `json` would
    otherwise resolve silently in favour of the last value)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return obj


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, object)` for each non-blank line of a JSONL file (1-based lines).

    The file is UTF-8, optionally with a byte-order mark (as some editors write). A line that
    is not valid UTF-8, not valid JSON, valid JSON but not an object, or an object (at any
    depth) that names a field twice raises `InputError` with its line number.
    """
    path = str(path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise InputError(path, None, None, f"cannot open file: {exc.strerror}") from exc
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    path, number, None, f"not valid UTF-8 (byte {exc.start + 1} of the line)"
                ) from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line, object_pairs_hook=_unique_keys)
            except _DuplicateKeyError as exc:
                raise InputError(
                    path, number, exc.key, "duplicate key: a JSON object names each field once"
                ) from exc
            except json.JSONDecodeError as exc:
                raise InputError(path, number, None, f"malformed JSON: {exc.msg}") from exc
            except ValueError as exc:  # an integer of more digits than Python converts
                detail = first_line(exc).split(":")[0]  # without the hint about sys internals
                raise InputError(path, number, None, f"malformed JSON: {detail}") from exc
            except RecursionError as exc:
                raise InputError(path, number, None, "malformed JSON: nested too deeply") from exc
            if not isinstance(obj, dict):
                raise InputError(
                    path, number, None, f"expected a JSON object, got {type(obj).__name__}"
                )
            yield number, obj


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ShardSpec:
    """One training shard and the provider that licensed it."""

    path: str
    """File path of the shard (`.jsonl` or `.parquet`, rows with a `text` field)."""
    provider: str
    """Name of the data provider that owns every row of the shard."""
    name: str = ""
    """Short name used in example ids (`name:row:chunk`); defaults to the file's basename."""
    sha256: str | None = None
    """Hex sha256 of the file, when known (filled by `with_hash`)."""

    def __post_init__(self) -> None:
        self.path = str(self.path)
        if not self.name:
            self.name = os.path.basename(self.path)

    def with_hash(self) -> ShardSpec:
        """Return a copy with `sha256` computed from the file."""
        return ShardSpec(self.path, self.provider, self.name, sha256_file(self.path))


def _shard_kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SHARD_SUFFIXES:
        raise InputError(
            path, None, None, f"unknown shard format '{suffix}'; expected .jsonl or .parquet"
        )
    if not os.path.isfile(path):
        raise InputError(path, None, None, "shard file not found")
    return suffix


def _check_unicode(path: str, line: int, name: str, value: str) -> str:
    """Refuse a lone UTF-16 surrogate (JSON allows the escape `"\\ud800"`): it is not a
    character, and tokenizers, hashes and databases all fail on it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            path,
            line,
            name,
            f"lone UTF-16 surrogate {value[exc.start]!r} at character {exc.start + 1}; "
            "not valid Unicode text",
        ) from exc
    return value


def _check_no_nul(path: str, line: int, name: str, value: str) -> str:
    """Refuse NUL in what the ledger stores or hashes: PostgreSQL cannot store it in text, and
    `Query.text_sha256` uses it to separate prompt and completion."""
    position = value.find("\x00")
    if position >= 0:
        raise InputError(
            path, line, name, f"contains a NUL character (\\u0000) at character {position + 1}"
        )
    return value


def _check_text(path: str, line: int, value: object) -> str:
    if value is None:
        raise InputError(path, line, "text", "missing")
    if not isinstance(value, str):
        raise InputError(path, line, "text", f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise InputError(path, line, "text", "empty")
    return _check_unicode(path, line, "text", value)


def _read_parquet_text(path: str):
    import polars as pl

    try:
        frame = pl.read_parquet(path)
    except Exception as exc:  # polars raises several error types for unreadable files
        raise InputError(path, None, None, f"cannot read parquet: {exc}") from exc
    if "text" not in frame.columns:
        raise InputError(path, None, "text", "missing column")
    return frame.get_column("text")


def read_shard_texts(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """Yield `(row, text)` for each row of a shard, rows 0-based in file order.

    JSONL shards skip blank lines (so `row` counts objects, not lines); errors name the JSONL
    line number, or the parquet row + 1 ("row 2").
    """
    path = str(path)
    if _shard_kind(path) == ".jsonl":
        for row, (line, obj) in enumerate(read_jsonl(path)):
            yield row, _check_text(path, line, obj.get("text"))
    else:
        column = _read_parquet_text(path)
        for row, value in enumerate(column):
            try:
                text = _check_text(path, row + 1, value)
            except InputError as exc:  # a table has rows, not lines
                raise InputError(exc.path, exc.line, exc.field, exc.message, unit="row") from None
            yield row, text


def count_shard_rows(path: str | os.PathLike[str]) -> int:
    """Number of rows (examples before chunking) in a shard, without validating texts."""
    path = str(path)
    if _shard_kind(path) == ".jsonl":
        return sum(1 for _ in read_jsonl(path))
    import polars as pl

    try:
        return int(pl.scan_parquet(path).select(pl.len()).collect().item())
    except Exception as exc:
        raise InputError(path, None, None, f"cannot read parquet: {exc}") from exc


@dataclass(frozen=True)
class Query:
    """One served output: the prompt, the completion the model gave, and what it was worth."""

    id: str
    timestamp: datetime
    """When it was served; always timezone-aware, in UTC."""
    prompt: str
    completion: str
    weight: Decimal = field(default=Decimal(1))
    """The query's weight in provider credit: its `weight` or `revenue` field, 1 by default."""

    @property
    def text_sha256(self) -> str:
        """Hex sha256 of `prompt + "\\x00" + completion` (UTF-8)."""
        data = (self.prompt + "\x00" + self.completion).encode("utf-8")
        return hashlib.sha256(data).hexdigest()


def _parse_id(path: str, line: int, value: object) -> str:
    if value is None:
        raise InputError(path, line, "id", "missing")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InputError(
            path, line, "id", f"expected a string or integer, got {type(value).__name__}"
        )
    text = str(value)
    if not text.strip():
        raise InputError(path, line, "id", "empty")
    return _check_no_nul(path, line, "id", _check_unicode(path, line, "id", text))


def _parse_timestamp(path: str, line: int, value: object) -> datetime:
    if value is None:
        raise InputError(path, line, "timestamp", "missing")
    if not isinstance(value, str):
        raise InputError(path, line, "timestamp", "expected an ISO 8601 string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InputError(path, line, "timestamp", f"not an ISO 8601 timestamp: {value!r}") from exc
    if stamp.tzinfo is None or stamp.utcoffset() is None:
        raise InputError(
            path,
            line,
            "timestamp",
            f"{value!r} has no UTC offset; add one, e.g. '{value}Z' or '{value}+00:00'",
        )
    try:
        return stamp.astimezone(UTC)
    except OverflowError as exc:  # e.g. 0001-01-01T00:00:00+01:00 is a moment in year 0 UTC
        raise InputError(
            path, line, "timestamp", f"{value!r} is outside years 1 to 9999 when converted to UTC"
        ) from exc


def _parse_weight(path: str, line: int, obj: dict) -> Decimal:
    present = [name for name in ("weight", "revenue") if obj.get(name) is not None]
    if len(present) == 2:
        raise InputError(path, line, "revenue", "give either 'weight' or 'revenue', not both")
    if not present:
        return Decimal(1)
    name = present[0]
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InputError(path, line, name, f"expected a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(path, line, name, f"must be a finite number, got {value}")
    if isinstance(value, str) and (not value.isascii() or "_" in value):
        # Decimal() reads any Unicode digits ('１２' is 12) and underscores ('1_000'); a number
        # here is plain ASCII digits.
        raise InputError(path, line, name, f"not a number: {value!r}")
    try:
        # str() first: Decimal(0.1) would carry the float's binary error into money.
        number = Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise InputError(path, line, name, f"not a number: {value!r}") from exc
    if not number.is_finite():
        raise InputError(path, line, name, f"must be a finite number, got {value!r}")
    if number < 0:
        raise InputError(path, line, name, f"must not be negative, got {value!r}")
    return number


def _parse_text_field(path: str, line: int, obj: dict, name: str, allow_empty: bool) -> str:
    value = obj.get(name)
    if value is None:
        raise InputError(path, line, name, "missing")
    if not isinstance(value, str):
        raise InputError(path, line, name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise InputError(path, line, name, "empty")
    return _check_no_nul(path, line, name, _check_unicode(path, line, name, value))


def parse_query(path: str, line: int, obj: dict) -> Query:
    """Validate one queries.jsonl object; fields other than the known ones are ignored."""
    return Query(
        id=_parse_id(path, line, obj.get("id")),
        timestamp=_parse_timestamp(path, line, obj.get("timestamp")),
        prompt=_parse_text_field(path, line, obj, "prompt", allow_empty=True),
        completion=_parse_text_field(path, line, obj, "completion", allow_empty=False),
        weight=_parse_weight(path, line, obj),
    )


def read_queries(path: str | os.PathLike[str]) -> list[Query]:
    """Read and validate every line of a queries.jsonl file before returning any of it.

    Each line: `id` (string or integer, unique in the file), `timestamp` (ISO 8601 with an
    offset or `Z`; naive timestamps, and those outside years 1 to 9999 in UTC, are rejected),
    `prompt` (string, may be empty), `completion` (non-empty string), and optionally `weight` or
    `revenue` (non-negative number). `id`, `prompt` and `completion` must be valid Unicode (no
    lone surrogate) without NUL.
    """
    path = str(path)
    queries: list[Query] = []
    first_line: dict[str, int] = {}
    for line, obj in read_jsonl(path):
        query = parse_query(path, line, obj)
        if query.id in first_line:
            raise InputError(
                path,
                line,
                "id",
                f"duplicate id {query.id!r} (first on line {first_line[query.id]})",
            )
        first_line[query.id] = line
        queries.append(query)
    return queries
