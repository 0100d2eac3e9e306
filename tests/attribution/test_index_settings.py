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
        ({"damping_factor": 0.0}, "damping factor must be positive, got 0.0"),
        ({"damping_factor": float("nan")}, "damping factor must be positive, got nan"),
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
