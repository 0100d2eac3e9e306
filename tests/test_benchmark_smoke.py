"""The throughput benchmark's synthetic index is a real index: written, opened and scored.

A smoke run of `benchmarks.scoring_throughput --quick`: it builds a synthetic index in the
on-disk format (projections, KFAC factors, blocks, curvature, manifest) and checks the library's
top-1 rows against a plain matmul of the same rows before timing anything.
"""

from __future__ import annotations

import json

import numpy as np

import benchmarks.common as common
from attribution import GradientIndex, ScoreConfig, score
from benchmarks import scoring_throughput


def test_quick_scoring_benchmark_builds_and_scores_a_synthetic_index(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DEFAULT_DATA_DIR", tmp_path)
    payload = scoring_throughput.main(["--quick", "--data-dir", str(tmp_path), "--threads", "1"])
    assert payload["score_pairs_per_s"] > 0 and payload["matmul_pairs_per_s"] > 0
    written = json.loads((tmp_path / "results" / "scoring_throughput.quick.json").read_text())
    assert written["quick"] is True
    (root,) = [p for p in tmp_path.iterdir() if p.name.startswith("score-")]
    index = GradientIndex.open(root)
    assert index.rows == 5000
    q = np.random.default_rng(0).standard_normal((3, index.dim))
    top = score(index, q, ScoreConfig(top_k=2)).top_rows
    assert top.shape == (3, 2)
