"""Fixtures of the command-line tests."""

from pathlib import Path

import pytest

from tests.cli.workspace import build_workspace


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """Model, shards and queries of three providers (built once per test session)."""
    return build_workspace(tmp_path_factory.mktemp("workspace"))
