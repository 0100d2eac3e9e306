"""`--device` and `--precision` of the commands that run a model, on a machine without a GPU."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from ledger.cli import cli


@pytest.mark.parametrize(
    "command",
    [
        ["index", "--model", "model"],
        ["attribute", "--outputs", "queries.jsonl"],
        ["verify", "RUN"],
    ],
)
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_an_unavailable_gpu_is_refused_in_one_line_before_any_work(
    tmp_path, monkeypatch, command: list[str], device: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    result = CliRunner().invoke(cli, ["--db", db, *command, "--device", device])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert error == [
        f"Error: Invalid value for '--device': device '{device}' is not available: this torch "
        f"({torch.__version__}) sees no CUDA GPU; use --device cpu (or auto)"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the database


def test_unknown_devices_and_precisions_are_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    result = CliRunner().invoke(cli, ["--db", db, "index", "--model", "m", "--device", "tpu"])
    assert result.exit_code == 2 and "unknown device 'tpu'" in result.output
    result = CliRunner().invoke(cli, ["--db", db, "index", "--model", "m", "--precision", "int8"])
    assert result.exit_code == 2 and "'int8' is not one of 'float32', 'bfloat16'" in result.output
    assert list(tmp_path.iterdir()) == []
