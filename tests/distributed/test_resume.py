"""A data-parallel build (real `torchrun` jobs, Gloo on the CPU) killed in one rank and resumed
with another number of ranks gives the index of one process, bit for bit, and rewrites none
of the blocks it had completed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attribution import GradientIndex
from attribution.store import BLOCKS_DIR

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "tests.distributed.build_script"


def job_env() -> dict[str, str]:
    """One thread per process in every run: the thread count decides how a matrix product
    splits its sums, so rows are bit-identical across runs only with the same count."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "LEDGER_QUIET": "1",
            "LEDGER_COLLECTIVE_TIMEOUT": "300"}  # fmt: skip


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", *args]  # fmt: skip


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=ROOT, env=job_env(), text=True, capture_output=True, timeout=timeout
    )


def files(root: Path) -> dict[str, tuple[int, str]]:
    """Every complete block file: (modification time in ns, sha256)."""
    out = {}
    for path in sorted((root / BLOCKS_DIR).glob("*")):
        if path.suffix in (".npy", ".parquet"):
            out[path.name] = (
                path.stat().st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return out


def test_killed_rank_then_resume_with_other_ranks_equals_one_process(tmp_path: Path) -> None:
    one = run([sys.executable, "-m", SCRIPT, str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    reference = GradientIndex.open(tmp_path / "one")

    out = tmp_path / "parallel"
    killed = run(torchrun(3, SCRIPT, str(out), "--kill-on", "2"))
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr
    before = files(out)
    # Rank 2's share is blocks 5..7 of 8: its first block was complete at the kill.
    assert "meta-000005.parquet" in before and "meta-000007.parquet" not in before

    resumed = run(torchrun(2, SCRIPT, str(out)))
    assert resumed.returncode == 0, resumed.stderr
    index = GradientIndex.open(out)
    assert resumed.stdout.split() == [index.id]
    assert index.id == reference.id  # every file's sha256, the curvature's included
    assert index.manifest == reference.manifest
    after = files(out)
    for name, (mtime, digest) in before.items():  # none was written twice
        assert after[name] == (mtime, digest), name
    digests = lambda found: {name: digest for name, (_, digest) in found.items()}  # noqa: E731
    assert digests(after) == digests(files(tmp_path / "one"))
