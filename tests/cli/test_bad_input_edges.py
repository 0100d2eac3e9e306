"""Bad input at the edges of what Python, the tokenizer, the model and SQL accept: each case is
refused like any other bad input, with one line naming the file, line and field (or the option),
exit status 1, and nothing written: no ledger rows, no running run, no index files.

Driven in-process through click's runner (the entry point itself is covered by
test_end_to_end.py), against one SQLite ledger with an index and an attributed file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ledger.cli import cli
from ledger.db import make_engine, session_scope
from tests.cli.workspace import PROVIDERS, ledger_counts


def run(url: str, *args: str):
    return CliRunner().invoke(cli, ["--db", url, *args], env={"LEDGER_QUIET": "1"})


def ok(url: str, *args: str) -> str:
    result = run(url, *args)
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout


def refused(url: str, *args: str) -> str:
    """Run a command that must be refused; return its one line of error."""
    result = run(url, *args)
    assert isinstance(result.exception, SystemExit), (args, result.exception)  # no traceback
    assert result.exit_code == 1, (args, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


counts = ledger_counts


def workspace_ledger(workspace: Path, root: Path) -> str:
    """A new SQLite ledger in `root` with the workspace's providers and shards registered."""
    url = f"sqlite:///{root / 'ledger.db'}"
    ok(url, "init")
    ok(url, "providers", "add", *PROVIDERS)
    for name in PROVIDERS:
        ok(url, "shards", "add", str(workspace / "shards" / f"{name}-000.jsonl"), "--provider",
           name)  # fmt: skip
    return url


@pytest.fixture(scope="module")
def ledger_url(workspace: Path, tmp_path_factory) -> str:
    """A ledger with the workspace's shards plus one long text (more tokens than the model's
    48 positions), an index over them, and the workspace's outputs attributed."""
    root = tmp_path_factory.mktemp("edges")
    url = workspace_ledger(workspace, root)
    rows = (workspace / "shards" / "stellar-000.jsonl").read_text().splitlines()
    long_text = " ".join(json.loads(row)["text"] for row in rows)
    (root / "stellar-long.jsonl").write_text(json.dumps({"text": long_text}) + "\n")
    ok(url, "shards", "add", str(root / "stellar-long.jsonl"), "--provider", "stellar")
    # No --max-length: the default (128) is capped at the model's 48 positions.
    ok(url, "index", "--model", str(workspace / "model"), "--out", str(root / "indexes"),
       "--kind", "random", "--k-in", "4", "--k-out", "4")  # fmt: skip
    ok(url, "attribute", "--outputs", str(workspace / "queries.jsonl"))
    return url


def outputs_file(workspace: Path, tmp_path: Path, **changes: object) -> Path:
    """The workspace's first two outputs, the second with `changes`, written as JSON escapes
    (json.dumps escapes a lone surrogate as "\\ud800" and NUL as "\\u0000")."""
    lines = (workspace / "queries.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["id"] = "edge-case"
    row.update(changes)
    row = {k: v for k, v in row.items() if v is not None}
    path = tmp_path / "outputs.jsonl"
    path.write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    return path


@pytest.mark.parametrize(
    ("field", "value"),
    [("id", "q\ud800"), ("prompt", "a \udfff star"), ("completion", " is \ud83d faint")],
)
def test_a_lone_surrogate_in_an_output_is_refused(
    ledger_url: str, workspace: Path, tmp_path: Path, field: str, value: str
) -> None:
    path = outputs_file(workspace, tmp_path, **{field: value})
    assert "\\ud" in path.read_text()
    before = counts(ledger_url)
    line = refused(ledger_url, "attribute", "--outputs", str(path))
    assert f"{path}, line 2, field '{field}': lone UTF-16 surrogate" in line
    assert counts(ledger_url) == before


@pytest.mark.parametrize("kind", ["empty", "blank lines", "parquet without rows"])
def test_a_shard_without_rows_is_refused_and_nothing_is_registered(
    workspace: Path, tmp_path: Path, kind: str
) -> None:
    import polars as pl

    url = f"sqlite:///{tmp_path / 'l.db'}"
    ok(url, "init")
    ok(url, "providers", "add", "stellar")
    if kind == "parquet without rows":
        shard = tmp_path / "none.parquet"
        pl.DataFrame({"text": []}, schema={"text": pl.String}).write_parquet(shard)
    else:
        shard = tmp_path / "none.jsonl"
        shard.write_text("" if kind == "empty" else "\n  \n")
    good = workspace / "shards" / "stellar-000.jsonl"
    line = refused(url, "shards", "add", str(good), str(shard), "--provider", "stellar")
    assert line == f"Error: {shard}: no rows: a shard needs at least one text"
    assert counts(url)["shards"] == 0


def test_a_lone_surrogate_in_a_shard_is_refused_by_shards_add_and_by_index(
    workspace: Path, tmp_path: Path
) -> None:
    from attribution.data import sha256_file
    from ledger.registry import add_shard

    url = f"sqlite:///{tmp_path / 'l.db'}"
    ok(url, "init")
    ok(url, "providers", "add", "stellar")
    shard = tmp_path / "bad.jsonl"
    shard.write_text('{"text": "the star shines ."}\n{"text": "a comet \\udc80 orbits"}\n')
    line = refused(url, "shards", "add", str(shard), "--provider", "stellar")
    assert f"{shard}, line 2, field 'text': lone UTF-16 surrogate" in line
    assert counts(url)["shards"] == 0
    # A shard registered before rows were checked for this is refused when indexed.
    engine = make_engine(url)
    with session_scope(engine) as session:
        add_shard(session, str(shard), sha256_file(shard), "stellar", 2)
    engine.dispose()
    out = tmp_path / "indexes"
    line = refused(url, "index", "--model", str(workspace / "model"), "--out", str(out),
                   "--max-length", "48")  # fmt: skip
    assert f"{shard}, line 2, field 'text': lone UTF-16 surrogate" in line
    assert counts(url)["gradient_indexes"] == 0
    assert not any(p.is_file() for p in out.rglob("*"))


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_timestamp_outside_the_years_of_utc_is_refused(
    ledger_url: str, workspace: Path, tmp_path: Path, stamp: str
) -> None:
    path = outputs_file(workspace, tmp_path, timestamp=stamp)
    before = counts(ledger_url)
    line = refused(ledger_url, "attribute", "--outputs", str(path))
    assert f"line 2, field 'timestamp': '{stamp}' is outside years 1 to 9999" in line
    assert counts(ledger_url) == before


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"revenue": "1e30"}, "revenue", "'1e30' is too large for the ledger"),
        ({"revenue": "9223372036854.775808"}, "revenue", "'9223372036854.775808' is too"),
        ({"weight": 1e30}, "weight", "1e+30 is too large for the ledger"),
        ({"weight": "0.1234567"}, "weight", "'0.1234567' has more than 6 decimal places"),
        ({"id": "q" * 201}, "id", "longer than 200 characters (201)"),
    ],
)
def test_values_the_ledger_cannot_store_are_refused_before_a_run_is_recorded(
    ledger_url: str, workspace: Path, tmp_path: Path, changes: dict, field: str, message: str
) -> None:
    path = outputs_file(workspace, tmp_path, **changes)
    before = counts(ledger_url)
    line = refused(ledger_url, "attribute", "--outputs", str(path))
    assert f"{path}, line 2, field '{field}': {message}" in line
    assert counts(ledger_url) == before  # in particular no run left 'running'


@pytest.mark.parametrize(
    "args",
    [
        ["--pool", "1e30"],
        ["--pool", "9" * 30],
        ["--pool", "92233720368547758.08"],
        ["--pool", "1e999999999"],
        ["--pool", "1000", "--min-payout", "1e30"],
        ["--pool", "1000", "--currency", "JPY", "--min-payout", "9223372036854775808"],
    ],
)
def test_a_pool_or_minimum_beyond_bigint_minor_units_is_refused(
    ledger_url: str, args: list[str]
) -> None:
    before = counts(ledger_url)
    line = refused(ledger_url, "report", "--period", "2024-Q3", *args)
    assert f"invalid amount '{args[-1]}': too large for the ledger" in line
    assert counts(ledger_url) == before


def test_a_statement_id_beyond_any_sql_integer_is_unknown(ledger_url: str) -> None:
    line = refused(ledger_url, "statements", "finalize", "9" * 20)
    assert line == f"Error: unknown statement {'9' * 20}"


def test_without_max_length_chunks_take_the_models_positions_when_fewer_than_128(
    ledger_url: str,
) -> None:
    runs = json.loads(ok(ledger_url, "runs", "list", "--format", "json"))
    shown = json.loads(ok(ledger_url, "runs", "show", runs[0]["run"]))
    assert shown["index"]["manifest"]["data"]["max_length"] == 48


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncated weights", "SafetensorError: "),
        ("config of another width", "RuntimeError: the weights' shapes do not match config.json"),
        ("malformed config.json", "OSError: "),
    ],
)
def test_a_damaged_model_directory_is_refused_in_one_line(
    ledger_url: str, workspace: Path, tmp_path: Path, damage: str, expected: str
) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(workspace / "model", model)
    if damage == "truncated weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "config of another width":
        config = json.loads((model / "config.json").read_text())
        config["n_embd"] *= 2
        (model / "config.json").write_text(json.dumps(config))
    else:
        (model / "config.json").write_text("{not json")
    out = tmp_path / "indexes"
    before = counts(ledger_url)
    line = refused(ledger_url, "index", "--model", str(model), "--out", str(out))
    assert line.startswith(f"Error: {model}: cannot load model or tokenizer: {expected}")
    assert counts(ledger_url) == before
    assert not any(p.is_file() for p in out.rglob("*"))


def test_a_max_length_beyond_the_models_positions_is_refused(
    ledger_url: str, workspace: Path, tmp_path: Path
) -> None:
    out = tmp_path / "indexes"
    before = counts(ledger_url)
    line = refused(ledger_url, "index", "--model", str(workspace / "model"), "--out", str(out),
                   "--kind", "random", "--k-in", "4", "--k-out", "4", "--max-length", "49")  # fmt: skip
    model_config = workspace / "model" / "config.json"
    assert line == (
        f"Error: {model_config}, field 'n_positions': the model takes at most 48 tokens, so the "
        "max length must be at most 48 (got 49)"
    )
    assert counts(ledger_url) == before
    assert not any(p.is_file() for p in out.rglob("*"))


@pytest.mark.parametrize(
    "args",
    [
        ["report", "--period", "\uff12\uff10\uff12\uff14-Q3"],  # fullwidth 2024
        ["report", "--period", "2024-Q\uff13"],
        ["report", "--period", "\u0662\u0660\u0662\u0664"],  # Arabic-Indic 2024
        ["report", "--period", "2024-Q3", "--pool", "\uff11\uff10\uff10"],
        ["statements", "finalize", "\uff11"],
        ["statements", "finalize", "\u00b2"],  # superscript two: isdigit, but not int()
    ],
)
def test_periods_and_numbers_with_non_ascii_digits_are_refused(
    ledger_url: str, args: list[str]
) -> None:
    before = counts(ledger_url)
    line = refused(ledger_url, *args)
    assert "invalid period" in line or "invalid amount" in line, line
    assert args[-1] in line
    assert counts(ledger_url) == before


@pytest.mark.parametrize("field", ["id", "prompt", "completion"])
def test_a_nul_character_in_an_output_is_refused(
    ledger_url: str, workspace: Path, tmp_path: Path, field: str
) -> None:
    path = outputs_file(workspace, tmp_path, **{field: "x\u0000y"})
    assert "\\u0000" in path.read_text()
    before = counts(ledger_url)
    line = refused(ledger_url, "attribute", "--outputs", str(path))
    assert f"{path}, line 2, field '{field}': contains a NUL character" in line
    assert counts(ledger_url) == before


@pytest.mark.parametrize("finalize", [(), ("--finalize",)])
def test_a_report_to_a_missing_directory_is_refused_before_the_statement_is_built(
    ledger_url: str, tmp_path: Path, finalize: tuple[str, ...]
) -> None:
    before = counts(ledger_url)
    out = tmp_path / "missing" / "statement.csv"
    line = refused(ledger_url, "report", "--period", "2024-Q3", "--pool", "1000", "--currency",
                   "USD", "--format", "csv", "--out", str(out), *finalize)  # fmt: skip
    assert str(out.parent) in line and "does not exist" in line
    assert counts(ledger_url) == before and not out.parent.exists()


@pytest.mark.parametrize("finalize", [(), ("--finalize",)])
def test_a_parquet_report_without_out_is_refused_before_the_statement_is_built(
    ledger_url: str, finalize: tuple[str, ...]
) -> None:
    before = counts(ledger_url)
    line = refused(ledger_url, "report", "--period", "2024-Q3", "--pool", "1000", "--format",
                   "parquet", *finalize)  # fmt: skip
    assert line == "Error: --format parquet writes a file: give --out FILE"
    assert counts(ledger_url) == before


def test_a_shard_that_yields_no_training_example_is_named_in_a_warning(
    workspace: Path, tmp_path: Path, caplog
) -> None:
    """A one-token text (this tokenizer adds no BOS) makes no next-token example, so its
    provider would silently earn nothing: indexing says so."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ok(url, "init")
    ok(url, "providers", "add", "stellar", "lone-voice")
    ok(url, "shards", "add", str(workspace / "shards" / "stellar-000.jsonl"), "--provider",
       "stellar")  # fmt: skip
    lone = tmp_path / "lone.jsonl"
    lone.write_text(json.dumps({"text": "zzzz"}) + "\n")
    ok(url, "shards", "add", str(lone), "--provider", "lone-voice")
    with caplog.at_level("WARNING", logger="ledger.jobs"):
        ok(url, "index", "--model", str(workspace / "model"), "--out", str(tmp_path / "indexes"),
           "--kind", "random", "--k-in", "2", "--k-out", "2", "--max-length", "48")  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if "no training example" in r.getMessage()]
    assert len(warnings) == 1 and str(lone) in warnings[0] and "lone-voice" in warnings[0]


def test_verify_takes_a_moved_model_and_reports_a_damaged_index(
    workspace: Path, tmp_path: Path
) -> None:
    import shutil

    url = workspace_ledger(workspace, tmp_path)
    ok(url, "index", "--model", str(workspace / "model"), "--out", str(tmp_path / "indexes"),
       "--kind", "random", "--k-in", "4", "--k-out", "4")  # fmt: skip
    outputs = str(workspace / "queries.jsonl")
    run_id = json.loads(ok(url, "attribute", "--outputs", outputs, "--format", "json"))["run_id"]
    moved = tmp_path / "moved-model"
    shutil.copytree(workspace / "model", moved)
    args = ("verify", run_id[:12], "--outputs", outputs, "--sample", "2")
    assert "re-computed 2/2 outputs agree" in ok(url, *args, "--model", str(moved))

    # A credit changed in the ledger after the run (by an owner who dropped the database's
    # guard on credits) is caught by the re-computation.
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER credits_no_update"))
        conn.execute(text("UPDATE credits SET credit = credit + 0.01"))
    tampered = run(url, *args)
    assert tampered.exit_code == 1 and "FAIL re-computed 0/2 outputs agree" in tampered.stdout
    with engine.begin() as conn:
        conn.execute(text("UPDATE credits SET credit = credit - 0.01"))
    engine.dispose()
    assert "re-computed 2/2 outputs agree" in ok(url, *args)

    index_dir = next((tmp_path / "indexes").iterdir())
    curvature = index_dir / "curvature.safetensors"
    curvature.write_bytes(curvature.read_bytes()[:100])
    result = run(url, *args)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert "FAIL index files intact" in lines
    assert "ok   run manifest id" in lines and "ok   queries file sha256" in lines
    assert any("the gradient index is damaged (curvature.safetensors: " in x for x in lines)
    report = json.loads(run(url, *args, "--format", "json").stdout)
    assert report["ok"] is False and report["checks"]["index files intact"] is False
    assert "curvature.safetensors" in report["notes"][0]


def _run_id(url: str) -> str:
    return json.loads(ok(url, "sql", "--format", "json", "SELECT id FROM attribution_runs"))[0][
        "id"
    ]


def test_a_model_whose_config_differs_is_refused_by_attribute_and_fails_verify(
    ledger_url: str, workspace: Path, tmp_path: Path
) -> None:
    import shutil

    other = tmp_path / "model-relu"
    shutil.copytree(workspace / "model", other)  # the same weights and tokenizer
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    path = outputs_file(workspace, tmp_path)  # one output the ledger has not seen
    before = counts(ledger_url)
    line = refused(ledger_url, "attribute", "--outputs", str(path), "--model", str(other))
    assert line.startswith(f"Error: {other / 'config.json'}, field 'activation_function': 'relu'")
    assert counts(ledger_url) == before
    args = ("verify", _run_id(ledger_url), "--outputs", str(workspace / "queries.jsonl"))
    result = run(ledger_url, *args, "--model", str(other), "--sample", "2")
    assert result.exit_code == 1
    assert "FAIL model weights, tokenizer and config" in result.stdout
    assert "field 'activation_function'" in result.stdout
    assert "re-computed 2/2 outputs agree" in ok(ledger_url, *args, "--sample", "2")


def test_verify_with_another_queries_file_fails_its_hash_and_recomputes_nothing(
    ledger_url: str, workspace: Path, tmp_path: Path
) -> None:
    path = outputs_file(workspace, tmp_path)
    result = run(ledger_url, "verify", _run_id(ledger_url), "--outputs", str(path))
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert "FAIL queries file sha256" in lines and "ok   run manifest id" in lines
    assert lines[-1].strip() == f"{path} is not the run's queries file: no output was re-computed"
    usage = run(ledger_url, "verify", _run_id(ledger_url), "--sample", "0")
    assert usage.exit_code == 2 and "0 is not in the range x>=1" in usage.stderr


def test_an_unreadable_source_file_of_the_index_is_refused_in_one_line(
    ledger_url: str, workspace: Path, tmp_path: Path
) -> None:
    query = "SELECT path FROM gradient_indexes"
    stored = json.loads(ok(ledger_url, "sql", "--format", "json", query))[0]["path"]
    # Stored relative to the workspace (the database's directory) when inside it.
    index_dir = Path(ledger_url.removeprefix("sqlite:///")).parent / stored
    source = index_dir / "source.json"
    saved = source.read_bytes()
    path = outputs_file(workspace, tmp_path)
    before = counts(ledger_url)
    try:
        for damaged in (b"", b"[]", b"\xff{"):
            source.write_bytes(damaged)
            line = refused(ledger_url, "attribute", "--outputs", str(path))
            assert line.startswith(f"Error: {source}: unreadable") and "--model DIR" in line
            assert counts(ledger_url) == before
    finally:
        source.write_bytes(saved)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"id": ' + "9" * 5000 + "}", "malformed JSON: Exceeds the limit (4300 digits)"),
        ('{"id": ' + "[" * 100_000 + "]" * 100_000 + "}", "malformed JSON: nested too deeply"),
    ],
)
def test_json_that_python_cannot_read_is_refused_with_its_line(
    ledger_url: str, workspace: Path, tmp_path: Path, row: str, message: str
) -> None:
    path = tmp_path / "outputs.jsonl"
    first = (workspace / "queries.jsonl").read_text().splitlines()[0]
    path.write_text(first + "\n" + row + "\n")
    before = counts(ledger_url)
    line = refused(ledger_url, "attribute", "--outputs", str(path))
    assert line.startswith(f"Error: {path}, line 2: {message}")
    assert counts(ledger_url) == before


def test_amounts_and_weights_with_underscores_are_refused(
    ledger_url: str, workspace: Path, tmp_path: Path
) -> None:
    before = counts(ledger_url)
    line = refused(ledger_url, "report", "--period", "2024-Q3", "--pool", "1_000")
    assert "invalid amount '1_000': not a decimal number" in line
    path = outputs_file(workspace, tmp_path, weight="1_000")
    line = refused(ledger_url, "attribute", "--outputs", str(path))
    assert f"{path}, line 2, field 'weight': not a number: '1_000'" in line
    assert counts(ledger_url) == before


def test_a_copy_of_a_registered_shard_is_refused_and_a_path_given_twice_counts_once(
    workspace: Path, tmp_path: Path
) -> None:
    import shutil

    url = f"sqlite:///{tmp_path / 'l.db'}"
    ok(url, "init")
    ok(url, "providers", "add", "stellar", "harbor")
    shard = workspace / "shards" / "stellar-000.jsonl"
    rows = len(shard.read_text().splitlines())
    out = ok(url, "shards", "add", str(shard), str(shard), "--provider", "stellar")
    assert out.strip() == f"registered 1 shard(s) for stellar: {rows} rows"
    copy = tmp_path / "copy.jsonl"
    shutil.copy(shard, copy)
    for provider in ("stellar", "harbor"):
        line = refused(url, "shards", "add", str(copy), "--provider", provider)
        assert f"the same content is already registered as '{shard}'" in line
    assert counts(url)["shards"] == 1


def test_sql_results_are_written_whole_or_refused(ledger_url: str) -> None:
    line = refused(ledger_url, "sql", "SELECT 1 AS a, 2 AS a")
    assert "more than one column named 'a'" in line
    rows = json.loads(
        ok(ledger_url, "sql", "--format", "json", "SELECT X'00ff' AS b, 1e999 AS x, -1e999 AS y")
    )
    assert rows == [{"b": "\\x00ff", "x": "Infinity", "y": "-Infinity"}]
    csv = ok(ledger_url, "sql", "--format", "csv", "SELECT X'00' AS b UNION ALL SELECT 'x'")
    assert csv.splitlines() == ["b", "\\x00", "x"]


def test_a_file_that_is_not_a_database_is_refused_in_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "x.db"
    garbage.write_text("hello world this is not sqlite at all")
    line = refused(f"sqlite:///{garbage}", "providers", "list")
    assert line == "Error: database error: file is not a database"


def test_an_argument_that_is_not_utf8_is_refused_before_anything_runs(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    name = os.fsencode(tmp_path) + b"/shard\xff.jsonl"
    with open(name, "w") as handle:
        handle.write('{"text": "a comet"}\n')
    db = tmp_path / "l.db"
    proc = subprocess.run(
        [sys.executable, "-c", "from ledger.cli import main; main()", "--db", f"sqlite:///{db}",
         "shards", "add", name, "--provider", "stellar"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "shard\\\\xff.jsonl' is not valid UTF-8" in lines[0]
    assert not db.exists()


def test_an_index_refused_for_its_settings_leaves_no_directory(
    ledger_url: str, workspace: Path, tmp_path: Path
) -> None:
    out = tmp_path / "new-indexes"
    line = refused(ledger_url, "index", "--model", str(workspace / "model"), "--out", str(out),
                   "--modules", "nomatch")  # fmt: skip
    assert "module patterns ['nomatch']" in line
    assert not out.exists()


def test_a_model_that_fails_on_the_data_is_reported_in_one_line(
    ledger_url: str, workspace: Path, tmp_path: Path, monkeypatch
) -> None:
    import ledger.jobs

    def broken(*args, **kwargs):  # as a config torch cannot run raises from the forward pass
        raise RuntimeError("The size of tensor a (2) must match the size of tensor b (32)\nmore")

    monkeypatch.setattr(ledger.jobs, "index_language_model", broken)
    out = tmp_path / "indexes"
    before = counts(ledger_url)
    line = refused(ledger_url, "index", "--model", str(workspace / "model"), "--out", str(out))
    assert line == (
        f"Error: {workspace / 'model'}: the model failed on the training data: The size of "
        "tensor a (2) must match the size of tensor b (32)"
    )
    assert counts(ledger_url) == before and not out.exists()
