"""The real `ledger` entry point, driven as a user would (subprocesses), on SQLite and on
PostgreSQL: init → providers → shards → index → attribute → report, and what must not happen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import text

from attribution.config import DEFAULT_HEAD_K_OUT
from ledger.db import make_engine
from tests.attribution.reference import assert_rows_close
from tests.cli.workspace import PROVIDERS, ledger_counts
from tests.tolerance import assert_close_f32, assert_close_f64

LEDGER = [sys.executable, "-c", "from ledger.cli import main; main()"]


def ledger(cwd: Path, url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "LEDGER_QUIET": "1"}
    proc = subprocess.run(
        [*LEDGER, "--db", url, *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ledger {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def test_pipeline_credits_planted_providers_is_idempotent_and_pays_the_pool(
    workspace: Path, db_url: str, tmp_path: Path
) -> None:
    cwd, url = workspace, db_url
    ledger(cwd, url, "init")
    ledger(cwd, url, "providers", "add", *PROVIDERS)
    for name in PROVIDERS:
        ledger(cwd, url, "shards", "add", f"shards/{name}-000.jsonl", "--provider", name)
    listed = json.loads(ledger(cwd, url, "providers", "list", "--format", "json").stdout)
    assert [p["provider"] for p in listed] == sorted(PROVIDERS)
    assert all(p["shards"] == 1 and p["rows"] == 20 for p in listed)

    out = tmp_path / "indexes"
    ledger(
        cwd,
        url,
        "index",
        "--model",
        "model",
        "--out",
        str(out),
        "--k-in",
        "8",
        "--k-out",
        "8",
        "--max-length",
        "48",
    )
    first = json.loads(
        ledger(cwd, url, "attribute", "--outputs", "queries.jsonl", "--format", "json").stdout
    )
    queries = [json.loads(line) for line in (cwd / "queries.jsonl").read_text().splitlines()]
    assert first["queries"] == len(queries) == first["attributed"] + first["unattributed"]

    # Planted providers: each output's largest credit goes to the provider it imitates
    # (read through the licensing view, as an analyst would; `explain` shows the same).
    engine = make_engine(url)
    with engine.connect() as conn:
        credits = conn.execute(
            text(
                "SELECT query_external_id, provider, credit FROM query_credits "
                "ORDER BY query_external_id, credit DESC"
            )
        ).all()
    engine.dispose()
    by_query: dict[str, list[tuple[str, float]]] = {}
    for ext, provider, credit in credits:
        by_query.setdefault(ext, []).append((provider, credit))
    hits = sum(by_query.get(q["id"], [("", 0)])[0][0] == q["provider_hint"] for q in queries)
    assert hits >= 0.8 * len(queries)
    for q in queries:
        weight = Decimal(q.get("revenue", "1"))
        got = sum(c for _, c in by_query.get(q["id"], []))
        # float64 shares of the weight, one per provider, summed.
        assert_close_f64(got, float(weight), len(PROVIDERS), scale=float(weight))
    e = json.loads(
        ledger(cwd, url, "explain", "--query", queries[0]["id"], "--format", "json").stdout
    )
    assert [c["provider"] for c in e["credits"]] == [p for p, _ in by_query[queries[0]["id"]]]
    assert len(e["top"]) == 10 and e["top"][0]["rank"] == 1

    report_args = [
        "report",
        "--period",
        "2024-Q3",
        "--pool",
        "1000.00",
        "--currency",
        "USD",
        "--format",
        "json",
    ]
    statement = json.loads(ledger(cwd, url, *report_args, "--save").stdout)
    amounts = [Decimal(line["amount"]) for line in statement["lines"]]
    assert sum(amounts) == Decimal("1000.00")
    assert sum(line["amount_minor"] for line in statement["lines"]) == 100000
    assert statement["statement"]["runs"][0]["run_id"] == first["run_id"]
    shares = {line["provider"]: line["share"] for line in statement["lines"]}
    assert_close_f64(sum(shares.values()), 1.0, len(shares), scale=1)  # float64 quotients

    # Re-running attribute changes nothing: same run, everything skipped, same statement.
    before = ledger_counts(url)
    again = json.loads(
        ledger(cwd, url, "attribute", "--outputs", "queries.jsonl", "--format", "json").stdout
    )
    assert again["run_id"] == first["run_id"]
    assert again["attributed"] == 0 and again["skipped"] == len(queries)
    assert ledger_counts(url) == before
    assert json.loads(ledger(cwd, url, *report_args).stdout)["lines"] == statement["lines"]

    # Outputs that can only be judged against the model or the ledger are refused by line too.
    lines = (cwd / "queries.jsonl").read_text().splitlines()
    changed, blank = json.loads(lines[1]), json.loads(lines[2])
    changed["timestamp"] = "2024-08-01T00:00:00Z"
    blank["id"], blank["completion"] = "fresh", "   "
    for row, field in ((changed, "timestamp"), (blank, "completion")):
        bad = tmp_path / f"bad-{field}.jsonl"
        bad.write_text(lines[0] + "\n" + json.dumps(row) + "\n")
        proc = ledger(cwd, url, "attribute", "--outputs", str(bad), check=False)
        assert proc.returncode != 0 and f"line 2, field '{field}'" in proc.stderr, proc.stderr
    assert ledger_counts(url) == before

    verified = ledger(
        cwd, url, "verify", first["run_id"][:12], "--outputs", "queries.jsonl", "--sample", "3"
    )
    assert "re-computed 3/3 outputs agree" in verified.stdout

    csv = ledger(cwd, url, "report", "--period", "2024-Q3", "--format", "csv").stdout
    header, *rows, total = [line for line in csv.splitlines() if line]
    assert header.startswith("provider,value,share,amount_minor")
    # Shown again without --pool, the saved draft keeps its pool: amounts still sum to it.
    assert sum(int(r.split(",")[3]) for r in rows) == 100000 == int(total.split(",")[3])
    ledger(cwd, url, "report", "--period", "2024-Q3", "--pool", "1000.00", "--finalize")
    ledger(cwd, url, "report", "--period", "2024-Q3", "--finalize")  # already final: shown
    refused = ledger(cwd, url, "report", "--period", "2024-Q3", "--pool", "999.00", check=False)
    assert refused.returncode != 0 and "final" in refused.stderr


def test_bad_input_is_refused_with_one_line_and_nothing_written(
    workspace: Path, db_url: str, tmp_path: Path
) -> None:
    cwd, url = workspace, db_url
    ledger(cwd, url, "init")
    ledger(cwd, url, "providers", "add", "stellar")
    before = ledger_counts(url)

    good = (cwd / "queries.jsonl").read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([good[0], good[1], '{"id": "x", "timestamp": ', *good[2:]]) + "\n")
    cases = [
        (["attribute", "--outputs", str(bad)], "line 3"),
        (["report", "--period", "2024-Q5"], "2024-Q5"),
        (["shards", "add", "shards/galley-000.jsonl", "--provider", "nobody"], "nobody"),
        (["providers", "add", "stellar"], "already exists"),
        (["report", "--period", "2024-Q3", "--pool", "10.001"], "10.001"),
    ]
    bad_shard = tmp_path / "bad-shard.jsonl"
    bad_shard.write_text('{"text": "fine"}\n{"text": 5}\n')
    cases.append(
        (["shards", "add", str(bad_shard), "--provider", "stellar"], "line 2, field 'text'")
    )
    missing_ts = tmp_path / "missing.jsonl"
    row = json.loads(good[1])
    del row["timestamp"]
    missing_ts.write_text(good[0] + "\n" + json.dumps(row) + "\n")
    cases.append((["attribute", "--outputs", str(missing_ts)], "line 2, field 'timestamp'"))
    for args, expected in cases:
        proc = ledger(cwd, url, *args, check=False)
        assert proc.returncode != 0, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:"), proc.stderr
        assert expected in lines[0], (args, lines[0])
        assert "Traceback" not in proc.stderr
    assert ledger_counts(url) == before


def test_changed_shard_is_refused_by_index(workspace: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    shard = tmp_path / "s.jsonl"
    shard.write_text((workspace / "shards" / "stellar-000.jsonl").read_text())
    ledger(tmp_path, url, "init")
    ledger(tmp_path, url, "providers", "add", "stellar")
    ledger(tmp_path, url, "shards", "add", str(shard), "--provider", "stellar")
    shard.write_text(shard.read_text() + '{"text": "a new row"}\n')
    proc = ledger(
        tmp_path,
        url,
        "index",
        "--model",
        str(workspace / "model"),
        "--out",
        str(tmp_path / "idx"),
        check=False,
    )
    assert proc.returncode != 0 and "content changed" in proc.stderr
    assert not (tmp_path / "idx").exists()


def _ledger_with_one_shard(workspace: Path, tmp_path: Path) -> str:
    """A fresh SQLite ledger with stellar's shard registered; its URL."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    ledger(tmp_path, url, "init")
    ledger(tmp_path, url, "providers", "add", "stellar")
    ledger(tmp_path, url, "shards", "add", str(workspace / "shards" / "stellar-000.jsonl"),
           "--provider", "stellar")  # fmt: skip
    return url


def test_index_tracks_the_tied_head_unless_told_not_to(workspace: Path, tmp_path: Path) -> None:
    from attribution.store import GradientIndex

    url = _ledger_with_one_shard(workspace, tmp_path)
    built = {}
    for label, flags in (("default", ()), ("no-head", ("--no-tied-head",)),
                         ("head-pca", ("--head-projection", "pca")),
                         ("head-k", ("--head-k-out", "0")),
                         ("curv", ("--curvature-labels", "data",)),
                         ("draws", ("--curvature-draws", "2", "--curvature-examples", "5")),
                         ("alone", ("--curvature-draws", "2", "--curvature-examples", "5",
                                    "--curvature-prior-examples", "0"))):  # fmt: skip
        out = ledger(tmp_path, url, "index", "--model", str(workspace / "model"), "--out",
                     str(tmp_path / label), "--k-in", "4", "--k-out", "4", "--max-length", "48",
                     *flags).stdout  # fmt: skip
        built[label] = GradientIndex.open(out.strip().rsplit(" at ", 1)[1])
    config = {k: v.manifest["config"]["projection"] for k, v in built.items()}
    assert built["default"].layer_names[-1] == "lm_head"
    assert "lm_head" not in built["no-head"].layer_names
    assert (config["default"]["tied_head"], config["no-head"]["tied_head"]) == (True, False)
    assert config["head-pca"]["head_projection"] == "pca"
    heads = {k: v.projectors()[-1] for k, v in built.items() if k != "no-head"}
    assert torch.equal(heads["default"].p_in, heads["head-pca"].p_in)
    assert not torch.allclose(heads["default"].p_out, heads["head-pca"].p_out)
    # The vocabulary side keeps --head-k-out directions (0: --k-out), capped at the vocabulary.
    vocab = heads["default"].p_out.shape[1]
    assert heads["default"].p_out.shape[0] == min(DEFAULT_HEAD_K_OUT, vocab)
    assert heads["head-k"].p_out.shape[0] == 4 and config["head-k"]["head_k_out"] is None
    proc = ledger(tmp_path, url, "index", "--model", str(workspace / "model"), "--out",
                  str(tmp_path / "z"), "--head-k-out", "-1", check=False)  # fmt: skip
    assert proc.returncode != 0 and "--head-k-out" in proc.stderr
    # Eigenvalues: by default from sampled labels of at most 1,024 examples; from the stored
    # rows with --curvature-labels data. Same stored rows and eigenbasis, other eigenvalues.
    config = {k: v.manifest["config"] for k, v in built.items()}
    assert (config["default"]["curvature_labels"], config["default"]["curvature_examples"]) == (
        "sampled", 1024,
    )  # fmt: skip
    assert config["curv"]["curvature_labels"] == "data"
    assert (config["draws"]["curvature_draws"], config["draws"]["curvature_examples"]) == (2, 5)
    # The sample of 5 is smaller than the data: shrunk toward KFAC, unless told not to.
    assert config["draws"]["curvature_prior_examples"] == 64
    assert config["alone"]["curvature_prior_examples"] == 0
    rows = built["default"].rows
    assert built["default"].manifest["curvature_examples_used"] == rows
    assert built["draws"].manifest["curvature_examples_used"] < rows
    blocks = {k: np.concatenate([a for _, a in v.blocks()]) for k, v in built.items()}
    eig = {k: v.curvature.layers[-1].eigvals for k, v in built.items()}
    for other in ("curv", "draws", "alone"):
        # Same logging pass in separate processes, whose float32 products can round
        # differently (MKL picks kernels by memory alignment too): float32 precision.
        assert_rows_close(blocks[other], blocks["default"], built["default"], 48)
        assert not np.allclose(eig["default"], eig[other])
    assert not np.allclose(eig["draws"], eig["alone"])
    for flag in ("--curvature-examples", "--curvature-prior-examples"):
        proc = ledger(tmp_path, url, "index", "--model", str(workspace / "model"), "--out",
                      str(tmp_path / "z"), flag, "-3", check=False)  # fmt: skip
        assert proc.returncode != 0 and flag in proc.stderr


def test_index_records_its_fisher_labels(workspace: Path, tmp_path: Path) -> None:
    from attribution.store import GradientIndex

    url = _ledger_with_one_shard(workspace, tmp_path)
    built = {}
    for labels in ("sampled", "data"):
        out = ledger(tmp_path, url, "index", "--model", str(workspace / "model"),
                     "--out", str(tmp_path / labels), "--kind", "random", "--k-in", "4",
                     "--k-out", "4", "--max-length", "48", "--fisher-labels", labels).stdout  # fmt: skip
        built[labels] = GradientIndex.open(out.strip().rsplit(" at ", 1)[1])
        assert built[labels].manifest["config"]["fisher_labels"] == labels
    # Same stored gradients; output-gradient factors from other labels.
    rows = {k: np.concatenate([a for _, a in v.blocks()]) for k, v in built.items()}
    np.testing.assert_array_equal(rows["sampled"], rows["data"])
    assert not np.allclose(built["sampled"].factors()[0].s, built["data"].factors()[0].s)
    proc = ledger(tmp_path, url, "index", "--model", str(workspace / "model"), "--out",
                  str(tmp_path / "x"), "--fisher-labels", "model", check=False)  # fmt: skip
    assert proc.returncode != 0 and "--fisher-labels" in proc.stderr
    # Settings the model cannot satisfy: one line, exit 1, no index directory left behind.
    proc = ledger(tmp_path, url, "index", "--model", str(workspace / "model"), "--out",
                  str(tmp_path / "y"), "--max-length", "48", "--modules", "nothing.*",
                  check=False)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "Error: no Linear, Conv1D or Conv2d layer matches the projection's module patterns ['nothing.*']"
    ]
    assert not any(p.is_file() for p in (tmp_path / "y").rglob("*"))


def test_uninitialised_ledger_says_how_to_start(tmp_path: Path) -> None:
    proc = ledger(tmp_path, f"sqlite:///{tmp_path / 'new.db'}", "providers", "list", check=False)
    assert proc.returncode != 0 and "ledger init" in proc.stderr


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["init"],
        ["providers", "add"],
        ["shards", "add"],
        ["index"],
        ["attribute"],
        ["report"],
        ["statements", "finalize"],
        ["statements", "adjust"],
        ["runs", "show"],
        ["verify"],
        ["explain"],
        ["demo"],
    ],
)
def test_every_command_explains_itself(command: list[str], tmp_path: Path) -> None:
    proc = subprocess.run(
        [*LEDGER, *command, "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0
    assert "Usage:" in proc.stdout and len(proc.stdout.splitlines()) > 4


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["index", "--model", "m", "--k-in", "0"], "Error: Invalid value for --k-in: must be positive, got 0 (see `ledger index --help`)"),
        (["index", "--model", "m", "--max-length", "1"], "Error: Invalid value for --max-length: must be at least 2, got 1"),
        (["index", "--model", "m", "--seed", "9" * 20], "Error: Invalid value for '--seed': "),
        (["verify", "abc", "--sample", "0"], "Error: Invalid value for '--sample': 0 is not in the range x>=1."),
        (["report"], "Error: Missing option '--period'. (see `ledger report --help`)"),
        (["report", "--period", "2024-Q3", "--format", "xml"], "Error: Invalid value for '--format': "),
        (["shards", "add", "--provider", "p"], "Error: Missing argument 'PATHS...'. (see `ledger shards add --help`)"),
        (["nosuchcommand"], "Error: No such command 'nosuchcommand'. (see `ledger --help`)"),
    ],
)  # fmt: skip
def test_a_usage_error_is_one_line_with_exit_status_2(
    command: list[str], expected: str, tmp_path: Path
) -> None:
    proc = subprocess.run([*LEDGER, *command], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr


def test_a_group_without_a_command_shows_its_help(tmp_path: Path) -> None:
    proc = subprocess.run([*LEDGER, "statements"], capture_output=True, text=True, cwd=tmp_path)
    assert "Usage: ledger statements" in proc.stderr and "finalize" in proc.stderr
    assert not proc.stderr.startswith("Error")


def _earlier_checkpoint(workspace: Path, out: Path, scale: float) -> Path:
    """A stand-in for an earlier checkpoint of the workspace model: its weights shrunk toward
    zero, saved as weights and config only (no tokenizer)."""
    from attribution.lm import load_causal_lm

    model, _ = load_causal_lm(workspace / "model")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    model.save_pretrained(out, safe_serialization=True)
    return out


def test_index_over_checkpoints_attributes_and_verifies(workspace: Path, tmp_path: Path) -> None:
    from attribution.data import read_queries
    from attribution.language import load_checkpoints
    from attribution.lm import hash_model_weights, lm_loss, load_causal_lm, query_batches
    from attribution.scoring import query_gradients
    from attribution.store import GradientIndex

    url = _ledger_with_one_shard(workspace, tmp_path)
    checkpoint = _earlier_checkpoint(workspace, tmp_path / "epoch-1", 0.8)
    args = ("--out", str(tmp_path / "indexes"), "--k-in", "4", "--k-out", "4", "--max-length",
            "48")  # fmt: skip
    out = ledger(tmp_path, url, "index", "--model", str(workspace / "model"),
                 "--checkpoint", str(checkpoint), *args).stdout  # fmt: skip
    index = GradientIndex.open(out.strip().rsplit(" at ", 1)[1])
    assert index.checkpoints == 1
    assert index.manifest["model"]["checkpoints"] == [
        {"weights_sha256": hash_model_weights(checkpoint)}
    ]
    assert index.layer_names[-1] == "checkpoint1/lm_head"

    outputs = str(workspace / "queries.jsonl")
    summary = json.loads(ledger(tmp_path, url, "attribute", "--outputs", outputs,
                                "--format", "json").stdout)  # fmt: skip
    assert summary["attributed"] + summary["unattributed"] == summary["queries"] > 0
    proc = ledger(tmp_path, url, "verify", summary["run_id"], "--outputs", outputs, check=False)
    assert proc.returncode == 0, proc.stdout
    # The recorded top score of an output is the sum of both models' influence: recomputed here
    # from each model's part of the query gradient and of the stored rows.
    model, tokenizer = load_causal_lm(workspace / "model")
    queries = read_queries(outputs)[:1]
    batches = query_batches(queries, tokenizer, 48, 1)
    _, q = query_gradients(model, lm_loss, batches, index, load_checkpoints([checkpoint]))
    rows = index.dense().numpy().astype(np.float64)
    half = index.dim // 2
    assert (
        index.layer_names.index("checkpoint1/" + index.layer_names[0])
        == len(index.layer_names) // 2
    )
    pre = index.curvature.precondition(q)
    each = [pre[:, :half] @ rows[:, :half].T, pre[:, half:] @ rows[:, half:].T]
    assert np.abs(each[1]).max() > 0.01 * np.abs(each[0]).max()  # both models count
    inv = 1 / np.sqrt(index.self_influence)
    engine = make_engine(url)
    with engine.connect() as conn:
        top = conn.execute(
            text("SELECT MAX(t.score) FROM top_examples t JOIN queries q ON q.id = t.query_id "
                 "WHERE q.external_id = :id"), {"id": queries[0].id}
        ).scalar_one()  # fmt: skip
    engine.dispose()
    # A float32 score (a dot product over the index's dimensions, of a query gradient of a
    # float32 model computed in another process): float32 precision of its terms.
    terms = (np.abs(pre) @ np.abs(rows).T * inv).max()
    assert_close_f32(top, ((each[0] + each[1]) * inv).max(), index.dim, scale=terms)
    # The Python API gives the same, and wants the checkpoints the index was built over.
    from attribution.language import attribute_queries
    from attribution.types import InputError

    api = attribute_queries(workspace / "model", index, queries, checkpoint_dirs=[checkpoint])
    assert_close_f32(api.top_scores[0, 0], top, index.dim, scale=2 * terms)  # two roundings
    with pytest.raises(InputError, match="built over 1 further checkpoint"):
        attribute_queries(workspace / "model", index, queries)

    # A checkpoint whose weights changed since is refused by attribute and fails verify.
    _earlier_checkpoint(workspace, checkpoint, 0.7)
    before = ledger_counts(url)
    proc = ledger(tmp_path, url, "attribute", "--outputs", outputs, check=False)
    assert proc.returncode == 1
    assert "weights_sha256" in proc.stderr and "checkpoint 1 of the index" in proc.stderr
    assert ledger_counts(url) == before
    proc = ledger(tmp_path, url, "verify", summary["run_id"], "--outputs", outputs, check=False)
    assert proc.returncode == 1 and "FAIL model weights, tokenizer and config" in proc.stdout
    # A checkpoint that is not a model directory is refused before anything is written.
    proc = ledger(tmp_path, url, "index", "--model", str(workspace / "model"),
                  "--checkpoint", str(tmp_path), "--out", str(tmp_path / "other"),
                  check=False)  # fmt: skip
    assert proc.returncode == 1 and "no config.json" in proc.stderr
    assert not (tmp_path / "other").exists()
