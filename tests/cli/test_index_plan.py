"""`ledger index --plan`: what a build will take, checked against the build itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attribution import IndexConfig, ProjectionConfig, build_index
from attribution import plan as plan_module
from attribution.plan import plan_build
from tests.attribution.tiny import lm_batches, lm_fisher_loss, lm_loss, tiny_gpt2
from tests.cli.test_end_to_end import _ledger_with_one_shard, ledger


def test_the_plan_gives_the_rows_dims_and_disk_of_the_build(tmp_path) -> None:
    model, batches = tiny_gpt2(), lm_batches(n=10, batch_size=4)
    config = IndexConfig(projection=ProjectionConfig(kind="random", k_in=3, k_out=2),
                         rows_per_block=4)  # fmt: skip
    plan = plan_build(model, lm_loss, batches, 10, config, tmp_path / "index")
    assert not (tmp_path / "index").exists() and plan.problems == []
    index = build_index(model, lm_loss, batches, tmp_path / "index", config,
                        fisher_loss=lm_fisher_loss, show_progress=False)  # fmt: skip
    assert (plan.rows, plan.dim, plan.batches) == (index.rows, index.dim, len(batches))
    assert [(p.name, p.k_in * p.k_out) for p in plan.layers] == [
        (layer["name"], layer["stop"] - layer["start"]) for layer in index.build["layers"]
    ]
    # The blocks' float32 rows, without their .npy headers, are the plan's rows × dims.
    blocks = sum(np.load(p, mmap_mode="r").nbytes for p in index.block_files())
    assert blocks == plan.rows * plan.dim * 4 <= plan.disk_bytes
    # Logging, and a first pass over all 10 examples (under the 1,024 cap), each of whose
    # batches costs `FIRST_PASS_COST` logging batches.
    assert plan.seconds_per_batch > 0 and plan.passes == 1 + plan_module.FIRST_PASS_COST
    capped = plan_build(model, lm_loss, batches, 4096, config, tmp_path / "index")
    assert capped.passes == 1 + plan_module.FIRST_PASS_COST * 1024 / 4096
    text = "\n".join(plan.lines())
    assert f"{plan.dim:,} dims per row" in text and "time: about" in text


def test_a_build_that_cannot_fit_is_refused_up_front(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(plan_module.shutil, "disk_usage", lambda p: type("U", (), {"free": 100}))
    model, batches = tiny_gpt2(), lm_batches(n=6)
    config = IndexConfig(projection=ProjectionConfig(kind="random", k_in=3, k_out=2))
    plan = plan_build(model, lm_loss, batches, 6, config, tmp_path / "index")
    assert len(plan.problems) == 1 and plan.problems[0].startswith("the index needs ")
    assert "cannot fit: the index needs" in "\n".join(plan.lines())
    monkeypatch.setattr(plan_module, "available_host_bytes", lambda: 10)
    plan = plan_build(model, lm_loss, batches, 6, config, tmp_path / "index")
    assert any(p.startswith("the host needs about") for p in plan.problems)


def test_ledger_index_plan_prints_the_plan_writes_nothing_and_refuses_what_cannot_fit(
    workspace: Path, tmp_path: Path, monkeypatch
) -> None:
    from click.testing import CliRunner

    from ledger.cli import cli

    url = _ledger_with_one_shard(workspace, tmp_path)
    out = tmp_path / "indexes"
    args = ["index", "--model", str(workspace / "model"), "--out", str(out), "--k-in", "4",
            "--k-out", "4", "--device", "cpu", "--plan"]  # fmt: skip
    text = ledger(tmp_path, url, *args).stdout
    assert "examples (index rows):" in text and "dims per row" in text
    assert "on disk:" in text and "host memory:" in text and "time: about" in text
    assert not out.exists()
    # A partition with 100 free bytes: the plan is printed, the build refused in one line.
    monkeypatch.setattr(plan_module.shutil, "disk_usage", lambda p: type("U", (), {"free": 100}))
    result = CliRunner().invoke(cli, ["--db", url, *args])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: the build cannot fit: the index needs")
    assert not out.exists()
