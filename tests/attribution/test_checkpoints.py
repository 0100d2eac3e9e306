"""An index over several checkpoints scores the sum of each checkpoint's influence."""

from __future__ import annotations

import numpy as np
import pytest

from attribution import IndexConfig, ProjectionConfig, ScoreConfig, build_index, score
from attribution.lm import lm_fisher_loss, lm_loss
from attribution.scoring import query_gradients, score_queries
from tests.attribution.reference import score_scale
from tests.attribution.tiny import (
    classification_fisher_loss,
    classification_loss,
    lm_batches,
    mlp_batches,
    tiny_gpt2,
    tiny_mlp,
)
from tests.tolerance import assert_close_f32

SETTINGS = [
    pytest.param(IndexConfig(ProjectionConfig(kind="pca", k_in=3, k_out=3)), id="pca-ekfac"),
    pytest.param(
        IndexConfig(ProjectionConfig(kind="random", k_in=3, k_out=2), curvature="full"),
        id="random-full",
    ),
    pytest.param(
        IndexConfig(ProjectionConfig(kind="pca", k_in=3, k_out=3), curvature_labels="sampled"),
        id="pca-sampled-eigenvalues",
    ),
]


def _dense(index, q) -> np.ndarray:
    return score(index, q, ScoreConfig(relatif=False, dense=True, top_k=3)).dense.astype(float)


@pytest.mark.parametrize("config", SETTINGS)
def test_scores_are_the_sum_of_separate_indexes_of_each_checkpoint(tmp_path, config) -> None:
    """Independent computation: one index per model, built alone, scored alone, summed."""
    models = [tiny_mlp(seed=s) for s in (0, 1, 2)]
    data, queries = mlp_batches(n=12), mlp_batches(n=4, seed=9)
    build = lambda m, root, extra=(): build_index(  # noqa: E731
        m, classification_loss, data, tmp_path / root, config,
        fisher_loss=classification_fisher_loss, show_progress=False, checkpoints=extra,
    )  # fmt: skip
    stacked = build(models[0], "stacked", models[1:])
    assert stacked.checkpoints == 2
    assert stacked.dim == 3 * build(models[0], "alone-0").dim
    assert stacked.layer_names[-1].startswith("checkpoint2/")

    separate = 0.0
    for number, m in enumerate(models):
        alone = build(m, f"alone-{number}")
        _, q = query_gradients(m, classification_loss, queries, alone)
        separate = separate + _dense(alone, q)
    _, q = query_gradients(models[0], classification_loss, queries, stacked, models[1:])
    together = score(stacked, q, ScoreConfig(relatif=False, dense=True, top_k=3))
    # float32 scores on both sides, over the stacked dimensions: float32 precision of their
    # terms (twice: the sum of separate scores rounds on its own).
    scale = 2 * score_scale(stacked, q, relatif=False)
    assert_close_f32(together.dense, separate, stacked.dim, scale=scale, what="scores")
    # Credit is the positive part of the summed score, not a sum of positive parts.
    providers = stacked.metadata["provider"].to_numpy()
    for p, name in enumerate(together.providers):
        cols = providers == name
        expected = np.maximum(separate[:, cols], 0).sum(axis=1)
        assert_close_f32(together.positive[:, p], expected, stacked.dim + int(cols.sum()),
                         scale=scale[:, cols].sum(1), what=f"positive sums of {name}")  # fmt: skip


def test_a_language_model_index_over_checkpoints_resumes_and_checks_its_models(tmp_path) -> None:
    models = [tiny_gpt2(seed=s) for s in (0, 1)]
    data, queries = lm_batches(n=8), lm_batches(n=2, seed=7)
    config = IndexConfig(ProjectionConfig(kind="pca", k_in=2, k_out=2), rows_per_block=3)
    kwargs = dict(fisher_loss=lm_fisher_loss, show_progress=False, checkpoints=models[1:])
    first = build_index(models[0], lm_loss, data, tmp_path / "index", config, **kwargs)
    result = score_queries(models[0], lm_loss, queries, first, checkpoints=models[1:])
    # A second build of the same directory reopens it; the rows are those of the first build.
    again = build_index(models[0], lm_loss, data, tmp_path / "index", config, **kwargs)
    assert again.id == first.id and again.manifest["checkpoints"] == 1
    # The same rows scored by the same computation in this process: identical.
    np.testing.assert_array_equal(
        score_queries(models[0], lm_loss, queries, again, checkpoints=models[1:]).positive,
        result.positive,
    )
    with pytest.raises(ValueError, match="built over 1 further checkpoint.*0 given"):
        query_gradients(models[0], lm_loss, queries, first)
    # Another directory with the same settings but no checkpoints is another index.
    alone = build_index(models[0], lm_loss, data, tmp_path / "alone", config,
                        fisher_loss=lm_fisher_loss, show_progress=False)  # fmt: skip
    assert alone.checkpoints == 0 and "checkpoints" not in alone.manifest
    assert alone.id != first.id


def test_a_killed_build_over_checkpoints_resumes_to_the_same_rows(tmp_path) -> None:
    models = [tiny_gpt2(seed=s) for s in (0, 1)]
    data = lm_batches(n=8, batch_size=2)
    config = IndexConfig(ProjectionConfig(kind="random", k_in=2, k_out=2), rows_per_block=2)
    kwargs = dict(fisher_loss=lm_fisher_loss, show_progress=False, checkpoints=models[1:])
    calls = {"n": 0}

    def dies_in_logging(model, batch):
        calls["n"] += 1
        if calls["n"] > 5:  # two members per batch: the third batch's second model
            raise KeyboardInterrupt
        return lm_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        build_index(models[0], dies_in_logging, data, tmp_path / "killed", config, **kwargs)
    assert not (tmp_path / "killed" / "manifest.json").exists()
    resumed = build_index(models[0], lm_loss, data, tmp_path / "killed", config, **kwargs)
    reference = build_index(models[0], lm_loss, data, tmp_path / "reference", config, **kwargs)
    assert resumed.id == reference.id
    np.testing.assert_array_equal(resumed.dense().numpy(), reference.dense().numpy())
    with pytest.raises(ValueError, match="checkpoint 1's layers do not match the index"):
        query_gradients(models[0], lm_loss, data[:1], resumed, [tiny_mlp()])
