"""Index settings that cannot build an index are refused before any work, in one line."""

from __future__ import annotations

import re

import pytest

from attribution import IndexConfig, ProjectionConfig, build_index
from tests.attribution.tiny import (
    classification_fisher_loss,
    classification_loss,
    mlp_batches,
    tiny_mlp,
)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"dtype": "int8"}, "unknown storage dtype 'int8' (float32 or float16)"),
        ({"curvature": "kfac"}, "unknown curvature kind 'kfac' (ekfac or full)"),
        ({"fisher_labels": "true"}, "unknown fisher_labels 'true' (sampled or data)"),
        ({"damping_factor": 0.0}, "damping factor must be positive and at most 1e+06, got 0.0"),
        ({"damping_factor": float("nan")}, "must be positive and at most 1e+06, got nan"),
        ({"damping_factor": 1e300}, "must be positive and at most 1e+06, got 1e+300"),
        ({"rows_per_block": 0}, "rows_per_block must be a positive integer, got 0"),
        ({"curvature_prior_examples": -1}, "curvature_prior_examples must be 0 or positive"),
        ({"curvature_labels": "model"}, "unknown curvature_labels 'model' (data or sampled)"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_anything_is_written(
    tmp_path, settings: dict, message: str
) -> None:
    config = IndexConfig(ProjectionConfig(kind="random", k_in=2, k_out=2), **settings)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_index(tiny_mlp(), classification_loss, mlp_batches(n=8), tmp_path / "index",
                    config, fisher_loss=classification_fisher_loss,
                    show_progress=False)  # fmt: skip
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"top_k": -1}, "top_k must be 0 or a positive integer, got -1"),
        ({"top_k": 2.5}, "top_k must be 0 or a positive integer, got 2.5"),
        ({"memory_budget_mb": -5}, "memory_budget_mb must be 0 or positive, got -5"),
    ],
)
def test_score_settings_that_cannot_work_are_refused_in_one_line(
    tmp_path, settings: dict, message: str
) -> None:
    from attribution import ScoreConfig, score
    from attribution.scoring import query_gradients

    model, batches = tiny_mlp(), mlp_batches(n=8)
    config = IndexConfig(ProjectionConfig(kind="random", k_in=2, k_out=2))
    index = build_index(model, classification_loss, batches, tmp_path / "index", config,
                        fisher_loss=classification_fisher_loss, show_progress=False)  # fmt: skip
    _, q = query_gradients(model, classification_loss, batches[:1], index)
    with pytest.raises(ValueError, match=re.escape(message)):
        score(index, q, ScoreConfig(**settings))
    assert score(index, q, ScoreConfig(top_k=0)).top_rows.shape == (len(q), 0)


def test_gradients_beyond_float16_are_refused_not_stored_as_inf(tmp_path) -> None:
    """float16 holds at most 65504: a gradient beyond it would be stored as inf and every
    score made from its row NaN. Such an index is refused, and the same data in float32 is
    fine; a query whose gradient is not finite is refused when scored."""
    import numpy as np

    from attribution import score

    def loud_loss(model, batch):  # finite in float32, far beyond float16
        return classification_loss(model, batch) * 1e7

    projection = ProjectionConfig(kind="random", k_in=2, k_out=2)
    with pytest.raises(ValueError, match="beyond float16's largest 65504; build the index with"):
        build_index(tiny_mlp(), loud_loss, mlp_batches(n=8), tmp_path / "f16",
                    IndexConfig(projection, dtype="float16"),
                    fisher_loss=classification_fisher_loss, show_progress=False)  # fmt: skip
    index = build_index(tiny_mlp(), loud_loss, mlp_batches(n=8), tmp_path / "f32",
                        IndexConfig(projection, dtype="float32"),
                        fisher_loss=classification_fisher_loss, show_progress=False)  # fmt: skip
    rows = index.dense().numpy()
    assert np.isfinite(rows).all() and np.abs(rows).max() > 65504
    queries = rows[:2].astype(np.float64)
    assert np.isfinite(score(index, queries).positive).all()
    with pytest.raises(ValueError, match="scores of query '0' are not finite"):
        score(index, queries * 1e40)  # finite in float64, beyond float32 once scored
    queries[1, 0] = np.nan
    with pytest.raises(ValueError, match="gradient of query '1' is not finite"):
        score(index, queries)
