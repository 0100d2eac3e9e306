"""The workspace `ledger demo` builds, made once per test session and copied for each test that
changes it (the docs' command blocks, the command-line start-up checks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory) -> Path:
    """A finished demo workspace (`ledger demo`, quietly); never changed by the tests."""
    from ledger.demo import run_demo

    root = tmp_path_factory.mktemp("demo") / "demo-workspace"
    run_demo(root, quiet=True)
    return root


@pytest.fixture
def demo_copy(demo_workspace: Path, tmp_path: Path) -> Path:
    """A copy of the demo workspace that a test may change (its shards and index stay those
    of the original, which the ledger names by absolute path)."""
    copy = tmp_path / "demo-workspace"
    shutil.copytree(demo_workspace, copy)
    return copy
