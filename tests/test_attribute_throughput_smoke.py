"""`benchmarks.attribute_throughput --quick` runs its three stages end to end: query gradients
of a model built in code, scoring a synthetic index, and a batch written to a fresh ledger."""

from __future__ import annotations

import json

import benchmarks.common as common
from benchmarks import attribute_throughput


def test_quick_attribute_throughput_times_the_three_stages(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(common, "DEFAULT_DATA_DIR", tmp_path)
    payload = attribute_throughput.main(["--quick", "--data-dir", str(tmp_path)])
    (row,) = payload["results"]
    assert row["rows"] == 2000 and row["outputs_per_second"] > 0
    stages = ("query_gradients", "scoring", "ledger_writes")
    total = sum(row[f"{s}_seconds"]["median"] for s in stages)
    assert abs(row["outputs_per_second"] - payload["setup"]["batch"] / total) < 1e-9 * total
    assert abs(sum(row["split"].values()) - 1) < 1e-12
    written = json.loads((tmp_path / "results" / "attribute_throughput.quick.json").read_text())
    assert written["quick"] is True
