"""A model in bfloat16 (its forward and backward passes) against the same weights in float32:
the index keeps float32 rows and float64 curvature, and its rows differ from the float32
model's by bfloat16 rounding only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution import IndexConfig, ProjectionConfig, build_index
from attribution.scoring import query_gradients
from tests.attribution.architectures import tiny_causal_lm
from tests.attribution.test_architectures import query_batches_of
from tests.attribution.test_core_math import layer_scale
from tests.attribution.tiny import lm_batches, lm_fisher_loss, lm_loss
from tests.tolerance import assert_close

EPS_BF16 = float(torch.finfo(torch.bfloat16).eps)  # 2**-7: an 8-bit significand


def bf16_rows_close(actual, expected, projectors, layers, what) -> None:
    """The projections and the sum over tokens are float32 (`attribution.device`): bfloat16
    enters through each token's activations and output gradients, computed from bfloat16
    weights and rounded to bfloat16, each off by bfloat16 rounding of sums over a layer's
    width. The random-walk bound of tests/tolerance.py with bfloat16's epsilon over the
    widest side, at the layer's magnitude."""
    width = max(max(p.p_in.shape[1], p.p_out.shape[1]) for p in projectors)
    assert_close(actual, expected, width, scale=layer_scale(expected, layers), eps=EPS_BF16,
                 what=what)  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bfloat16_rows_equal_float32_rows_to_bfloat16_precision(tmp_path, arch: str) -> None:
    batches, queries = lm_batches(n=8), query_batches_of(4, seed=13)
    config = IndexConfig(
        projection=ProjectionConfig(kind="random", k_in=3, k_out=2, head_k_out=None, seed=7),
        fisher_labels="data", curvature_labels="data", rows_per_block=3,
    )  # fmt: skip
    built = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = tiny_causal_lm(arch, tied=False, attention="sdpa", dtype=dtype)
        index = build_index(model, lm_loss, batches, tmp_path / name, config, show_progress=False)
        _, q = query_gradients(model, lm_loss, queries, index)
        built[name] = (index, q)
    (i32, q32), (i16, q16) = built["float32"], built["bfloat16"]
    rows32, rows16 = i32.dense().numpy(), i16.dense().numpy()
    assert rows16.dtype == np.float32 and i16.curvature.layers[0].eigvals.dtype == np.float64
    assert q16.dtype == np.float64  # query gradients handed to scoring in float64
    layers, projectors = i32.build["layers"], i32.projectors()
    bf16_rows_close(rows16, rows32, projectors, layers, "bfloat16 rows")
    bf16_rows_close(q16, q32, projectors, layers, "bfloat16 query gradients")
    # bfloat16 changed something (the comparison is not of one computation with itself) ...
    assert not np.array_equal(rows16, rows32)
    # ... and a wrong row does not pass: one layer's rows scaled by 1.5.
    wrong = rows32.copy()
    wrong[:, layers[0]["start"] : layers[0]["stop"]] *= 1.5
    with pytest.raises(AssertionError, match="bfloat16 rows"):
        bf16_rows_close(rows16, wrong, projectors, layers, "bfloat16 rows")


def test_a_bfloat16_model_builds_a_pca_index_with_float32_projections(tmp_path) -> None:
    """The first pass takes the factors of bfloat16 activations in float32 products summed in
    float64; PCA directions and the stored rows come out float32 and finite."""
    model = tiny_causal_lm("qwen2", tied=True, attention="sdpa", dtype=torch.bfloat16)
    config = IndexConfig(projection=ProjectionConfig(kind="pca", k_in=3, k_out=2),
                         rows_per_block=4)  # fmt: skip
    index = build_index(model, lm_loss, lm_batches(n=8), tmp_path, config,
                        fisher_loss=lm_fisher_loss, show_progress=False)  # fmt: skip
    assert all(p.p_in.dtype == torch.float32 for p in index.projectors())
    assert all(f.a.dtype == torch.float64 for f in index.factors())
    rows = index.dense().numpy()
    assert rows.dtype == np.float32 and np.isfinite(rows).all() and np.abs(rows).max() > 0
    assert np.isfinite(index.self_influence).all()
