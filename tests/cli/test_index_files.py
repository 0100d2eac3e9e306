"""An index's files are readable by whoever can read the index, and its folder can be found
from the listings (it is named by a fingerprint of its inputs, known before its id is)."""

from __future__ import annotations

import json
import os
import stat

from click.testing import CliRunner

from ledger.cli import cli


def test_every_index_file_follows_the_umask(demo_workspace) -> None:
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in (demo_workspace / "indexes").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"curvature.safetensors", "factors.safetensors", "projections.safetensors"} <= names
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert modes == dict.fromkeys(modes, oct(0o666 & ~mask))


def test_runs_list_names_the_index_folder(demo_workspace) -> None:
    url = f"sqlite:///{demo_workspace / 'ledger.db'}"
    result = CliRunner().invoke(cli, ["--db", url, "runs", "list", "--format", "json"])
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.output)
    (folder,) = (demo_workspace / "indexes").iterdir()
    assert run["index_dir"] == folder.name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["id"].startswith(run["index"])
