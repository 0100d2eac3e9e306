"""`ledger index`, `attribute` and `verify` as real `torchrun` jobs (Gloo on the CPU, 2 ranks)
against one process on the same workspace: the same index (manifest id and every file), the
same run and credits; and a rank that fails ends the job with its one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from attribution import GradientIndex
from ledger.cli import cli
from ledger.db import make_engine
from tests.cli.workspace import PROVIDERS

pytestmark = pytest.mark.slow

# Eight blocks of 8 examples (60 in all), batches of 3 straddling them; rank 1 of 2 takes 4..7.
INDEX = ["--k-in", "8", "--k-out", "8", "--max-length", "48", "--rows-per-block", "8",
         "--batch-size", "3"]  # fmt: skip
ROOT = Path(__file__).resolve().parents[2]


def job_env(timeout_s: int = 300) -> dict[str, str]:
    """One thread per process in every run: the thread count decides how a matrix product
    splits its sums, so results are bit-identical across runs only with the same count."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "LEDGER_QUIET": "1",
            "LEDGER_COLLECTIVE_TIMEOUT": str(timeout_s)}  # fmt: skip


def ledger(
    cwd: Path, url: str, *args: str, ranks: int = 1, timeout_s: int = 300
) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={ranks}", "-m", "ledger"]
        if ranks > 1 else [sys.executable, "-m", "ledger"]
    )  # fmt: skip
    return subprocess.run(
        [*launcher, "--db", url, *args], cwd=cwd, env=job_env(timeout_s), text=True,
        capture_output=True, timeout=600,
    )  # fmt: skip


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def prepared_ledger(workspace: Path, url: str) -> None:
    runner = CliRunner()
    for args in (["init"], ["providers", "add", *PROVIDERS]) + tuple(
        ["shards", "add", str(workspace / f"shards/{p}-000.jsonl"), "--provider", p]
        for p in PROVIDERS
    ):
        result = runner.invoke(cli, ["--db", url, "-q", *args])
        assert result.exit_code == 0, result.output


def credits(url: str) -> list[tuple]:
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT query_external_id, provider, credit FROM query_credits ORDER BY 1, 2")
        ).all()
    engine.dispose()
    return [tuple(r) for r in rows]


@pytest.fixture(scope="module")
def jobs(workspace: Path, tmp_path_factory) -> dict:
    """The same index and attribution run made by one process and by a job of 2 ranks."""
    tmp = tmp_path_factory.mktemp("torchrun")
    # 36 outputs (the workspace's, four times), attributed 20 per pass: whole query batches
    # of 16 per rank, so both ranks score outputs.
    rows = [json.loads(line) for line in (workspace / "queries.jsonl").read_text().splitlines()]
    outputs = tmp / "outputs.jsonl"
    outputs.write_text(
        "".join(json.dumps({**r, "id": f"{r['id']}-{k}"}) + "\n" for k in range(4) for r in rows)
    )
    found = {}
    for name, ranks in (("one", 1), ("two", 2)):
        url = f"sqlite:///{tmp / name}.db"
        prepared_ledger(workspace, url)
        index = ok(ledger(tmp, url, "index", "--model", str(workspace / "model"),
                          "--out", str(tmp / f"{name}-indexes"), *INDEX, ranks=ranks))  # fmt: skip
        run = ok(ledger(tmp, url, "attribute", "--outputs", "outputs.jsonl", "--batch-size",
                        "20", "--format", "json", ranks=ranks))  # fmt: skip
        (path,) = (tmp / f"{name}-indexes").iterdir()
        found[name] = {"url": url, "index": GradientIndex.open(path), "run": json.loads(run.stdout),
                       "stdout": index.stdout}  # fmt: skip
    found["tmp"] = tmp
    return found


def test_two_ranks_build_the_index_of_one_process(jobs: dict) -> None:
    one, two = jobs["one"]["index"], jobs["two"]["index"]
    assert two.build["blocks"] == 8
    assert two.id == one.id
    assert two.manifest == one.manifest  # every block's, the factors' and curvature's sha256
    assert two.metadata.equals(one.metadata)  # self-influence included, bit for bit
    assert jobs["two"]["stdout"].count("index ") == 1  # one report for the job


def test_two_ranks_record_the_credits_of_one_process_once(jobs: dict) -> None:
    one, two = jobs["one"]["run"], jobs["two"]["run"]
    assert two == one  # the same run id (its manifest), counts and index
    assert two["queries"] == two["attributed"] + two["unattributed"] == 36
    recorded = credits(jobs["two"]["url"])
    assert recorded == credits(jobs["one"]["url"])  # bit for bit
    assert len({(q, p) for q, p, _ in recorded}) == len(recorded)


def test_two_ranks_verify_a_run_by_shares(jobs: dict) -> None:
    two = jobs["two"]
    proc = ok(ledger(jobs["tmp"], two["url"], "verify", two["run"]["run_id"], "--all", ranks=2))
    assert "re-computed 36/36 outputs agree" in proc.stdout
    assert proc.stdout.count("re-computed") == 1


def test_a_failing_rank_ends_the_job_with_its_one_line_error(jobs: dict, workspace: Path) -> None:
    """Rank 1 cannot write block 7 (a directory stands where its file goes): the job exits
    non-zero with that rank's error on its own, not at the collectives' timeout (set to
    15 minutes here, so a job left waiting would not end in the 5 minutes allowed)."""
    tmp, name = jobs["tmp"], jobs["two"]["index"].root.name
    blocked = tmp / "blocked" / name / "blocks" / "grads-000007.npy.tmp"
    blocked.mkdir(parents=True)
    start = time.monotonic()
    proc = ledger(tmp, jobs["two"]["url"], "index", "--model", str(workspace / "model"),
                  "--out", str(tmp / "blocked"), *INDEX, ranks=2, timeout_s=900)  # fmt: skip
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    cause = f"Error: rank 1 of 2: IsADirectoryError: [Errno 21] Is a directory: '{blocked}'"
    assert cause in errors
    # Rank 0, waiting for rank 1, may report before torchrun stops it: as a consequence.
    others = [e for e in errors if e != cause]
    assert all(e.startswith("Error: rank 0 of 2: stopped: another rank") for e in others)
    assert elapsed < 300
    assert not (tmp / "blocked" / name / "manifest.json").exists()


@pytest.mark.postgres
def test_two_ranks_write_their_credits_at_once_on_postgres(
    jobs: dict, workspace: Path, make_database_url
) -> None:
    """On PostgreSQL each rank records its own outputs' results in its own transactions; the
    ledger holds the one-process run's credits, each once."""
    url = make_database_url("postgresql")
    prepared_ledger(workspace, url)
    tmp = jobs["tmp"]
    # The index built by the 2-rank job, reopened (nothing is rebuilt) and registered here.
    ok(ledger(tmp, url, "index", "--model", str(workspace / "model"),
              "--out", str(tmp / "two-indexes"), *INDEX, ranks=2))  # fmt: skip
    run = ok(ledger(tmp, url, "attribute", "--outputs", "outputs.jsonl", "--batch-size", "20",
                    "--format", "json", ranks=2))  # fmt: skip
    assert json.loads(run.stdout) == jobs["one"]["run"]
    assert credits(url) == credits(jobs["one"]["url"])
