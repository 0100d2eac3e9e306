"""The core's numbers against independent computations (see tests/attribution/reference.py)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from attribution import Batch, IndexConfig, ProjectionConfig, ScoreConfig, build_index, score
from attribution import curvature as curvature_module
from attribution.curvature import LayerSlice, fit_curvature
from attribution.index import CurvatureSample, make_projectors
from attribution.projection import (
    find_layers,
    layer_specs,
    layer_widths,
    projected_gradients,
    random_projectors,
    weight_matrix,
)
from attribution.scoring import query_gradients
from tests.attribution.reference import (
    damped_fisher_scores,
    full_gradients,
    kfac_factors_reference,
    project,
    score_scale,
)
from tests.attribution.tiny import (
    classification_fisher_loss,
    classification_loss,
    cnn_batches,
    lm_batches,
    lm_fisher_loss,
    lm_loss,
    mlp_batches,
    tiny_cnn,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
    tiny_neox,
    tiny_opt,
    tiny_qwen2,
)
from tests.tolerance import (
    EPS32,
    EPS64,
    assert_close,
    assert_close_f32,
    assert_close_f64,
)

CASES = {
    "mlp": (tiny_mlp, classification_loss, mlp_batches),
    "cnn": (tiny_cnn, classification_loss, cnn_batches),
    "gpt2": (tiny_gpt2, lm_loss, lm_batches),
    "opt": (tiny_opt, lm_loss, lm_batches),
    "llama": (tiny_llama, lm_loss, lm_batches),
    "neox": (tiny_neox, lm_loss, lm_batches),
    "qwen2": (tiny_qwen2, lm_loss, lm_batches),
}
FISHER = {classification_loss: classification_fisher_loss, lm_loss: lm_fisher_loss}
# The precision a model's gradients are computed in: transformers' eager attention of OPT,
# Llama, GPT-NeoX and Qwen2 takes its softmax in float32 even in a float64 model; the MLP and
# GPT-2 stay in float64 throughout.
MODEL_EPS = {"mlp": EPS64, "cnn": EPS64, "gpt2": EPS64, "opt": EPS32, "llama": EPS32, "neox": EPS32,
             "qwen2": EPS32}  # fmt: skip


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _tokens(batch: Batch) -> int:
    """An example's most tokens: its sequence's, or an image's pixels (at least as many as the
    output positions of a convolution over it that pads to keep its size), else 1."""
    if batch.mask is not None:
        return int(batch.mask.sum(1).max())
    x = batch.inputs[0] if isinstance(batch.inputs, tuple) else None
    return int(x.shape[2] * x.shape[3]) if isinstance(x, torch.Tensor) and x.dim() == 4 else 1


def gradient_reduction(batches, projectors) -> int:
    """Terms behind one projected-gradient entry: Σ over an example's tokens of products over
    a layer's widths (the longest sequence, or the most output positions, times the widest
    side)."""
    tokens = max(_tokens(b) for b in batches)
    return tokens * max(max(p.p_in.shape[1], p.p_out.shape[1]) for p in projectors)


def layer_scale(expected: np.ndarray, layers) -> np.ndarray:
    """Per column, the largest |entry| of its layer's block: rounding inside the backward pass
    reaches every projected entry of a layer at that layer's magnitude."""
    scale = np.zeros(expected.shape[1])
    for layer in layers:
        a, b = layer["start"], layer["stop"]
        scale[a:b] = np.abs(expected[:, a:b]).max()
    return scale


def assert_scores_close(actual, expected, index, q, relatif: bool, what: str = "scores") -> None:
    """float32 scores: a dot product over the index's D dimensions of float32 rows and a
    float32-rounded preconditioned query, against the same in float64."""
    scale = score_scale(index, q, relatif)
    assert_close_f32(actual, expected, index.dim, scale=scale, what=what)


def assert_self_influence_close(index, expected: np.ndarray, curvature_from=None) -> None:
    """float64 on both sides, from the same stored rows: a solve with (F + λI), whose condition
    number is at most 1 + d/factor (λ = factor·trace(F)/d ≥ factor·λ_max/d), bounds the error
    relative to the largest value; d is the widest layer. `curvature_from` (reduction length,
    eps): the curvature was fitted from gradients the model computed in that precision, whose
    relative rounding moves g(F + λI)⁻¹g by at most as much relative (no condition number)."""
    d = max(s.dim for s in index.curvature.slices)
    factor = index.manifest["config"]["damping_factor"]
    if curvature_from is not None and curvature_from[1] > EPS64:
        n, eps = curvature_from  # the float64 solve's share is far below this rounding's
        assert_close(index.self_influence, expected, n, scale=np.abs(expected), eps=eps,
                     what="self-influence")  # fmt: skip
        return
    scale = (1 + d / factor) * np.abs(expected).max()
    assert_close_f64(index.self_influence, expected, d, scale=scale, what="self-influence")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["random", "pca"])
def test_logra_gradient_equals_full_gradient_projected_afterwards(case: str, kind: str) -> None:
    make_model, loss_fn, make_batches = CASES[case]
    model, batches = make_model(), make_batches()
    config = IndexConfig(projection=ProjectionConfig(kind=kind, k_in=3, k_out=2, seed=7))
    layers, projectors, _ = make_projectors(
        model, loss_fn, batches, config, fisher_loss=FISHER[loss_fn], show_progress=False
    )
    logra = torch.cat(
        [projected_gradients(model, loss_fn, b, layers, projectors) for b in batches]
    ).numpy()
    reference = project(full_gradients(model, loss_fn, batches, list(layers)), projectors)
    assert logra.shape == reference.shape
    # Entry by entry (a mix-up of examples fails too), in the model's precision.
    layers, start = [], 0
    for p in projectors:
        layers.append({"start": start, "stop": start + p.dim})
        start += p.dim
    assert_close(logra, reference, gradient_reduction(batches, projectors),
                 scale=layer_scale(reference, layers), eps=MODEL_EPS[case],
                 what="LoGra gradients")  # fmt: skip


def test_conv2d_layers_are_tracked_when_their_patches_can_be_cut_out() -> None:
    """An ungrouped, zero-padded Conv2d is a layer of (C·kh·kw) → C_out; one whose patches
    `unfold` cannot reproduce is left untracked (and counts against the tracked share)."""
    nn = torch.nn
    assert layer_widths(nn.Conv2d(3, 5, (2, 4))) == (3 * 2 * 4, 5)
    assert layer_widths(nn.Conv2d(3, 5, 3, padding="same")) == (27, 5)
    assert layer_widths(nn.Conv2d(3, 5, 3, padding="valid")) == (27, 5)
    assert layer_widths(nn.Conv2d(3, 5, 2, padding="same")) is None  # split unevenly
    assert layer_widths(nn.Conv2d(4, 6, 3, groups=2)) is None
    assert layer_widths(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect")) is None
    model = tiny_cnn()
    assert list(find_layers(model, ProjectionConfig())) == ["0", "2", "5"]
    # The weight as the (n_out, n_in) matrix the gradient rows project, for every kind.
    for module in (
        *find_layers(model, ProjectionConfig()).values(),
        tiny_gpt2().transformer.h[0].attn.c_attn,
    ):
        n_in, n_out = layer_widths(module)
        assert weight_matrix(module).shape == (n_out, n_in)
    conv = model[2]
    assert torch.equal(weight_matrix(conv)[1], conv.weight[1].flatten())


def test_conv1d_layers_of_gpt2_are_tracked_and_the_tied_head_unless_told_not_to() -> None:
    model = tiny_gpt2()
    layers = find_layers(model, ProjectionConfig())
    assert sum(".attn.c_attn" in n for n in layers) == 2
    assert list(layers)[-1] == "lm_head" and len(layers) == 9
    assert model.lm_head.weight is model.transformer.wte.weight
    without = find_layers(model, ProjectionConfig(tied_head=False))
    assert "lm_head" not in without and len(without) == 8
    # Explicit module patterns decide on their own.
    assert list(find_layers(model, ProjectionConfig(tied_head=False, modules=("lm_head",)))) == [
        "lm_head"
    ]


def test_pca_projects_the_heads_vocabulary_side_randomly_unless_told_otherwise() -> None:
    model, batches = tiny_gpt2(), lm_batches()
    layers = find_layers(model, ProjectionConfig())
    specs = {s.name: s for s in layer_specs(layers, "lm_head")}

    def projectors(kind: str = "pca", **kw) -> dict:
        config = IndexConfig(projection=ProjectionConfig(kind=kind, k_in=3, k_out=2, **kw))
        _, projs, _ = make_projectors(
            model, lm_loss, batches, config, fisher_loss=lm_fisher_loss, show_progress=False
        )
        return {p.name: p for p in projs}

    default, pca = projectors(), projectors(head_projection="pca")
    seeded = random_projectors([specs["lm_head"]], ProjectionConfig(k_in=3, k_out=2))[0]
    assert torch.equal(default["lm_head"].p_out, seeded.p_out)
    assert not torch.allclose(pca["lm_head"].p_out, seeded.p_out)
    # The head's input side and every other layer are PCA in both: the same computation.
    assert torch.equal(default["lm_head"].p_in, pca["lm_head"].p_in)
    for name in specs:
        if name != "lm_head":
            assert torch.equal(default[name].p_out, pca[name].p_out)
            assert default[name].p_out.shape[0] == 2
    # The vocabulary side keeps head_k_out directions (capped at the 17-token vocabulary):
    # all of them, so that side is kept whole.
    assert torch.equal(default["lm_head"].p_out, torch.eye(17))
    for kind in ("pca", "random"):
        assert projectors(kind, head_k_out=5)["lm_head"].p_out.shape == (5, 17)
        assert projectors(kind, head_k_out=None)["lm_head"].p_out.shape == (2, 17)
        per_layer = (("lm_head", 3, 4),)  # an explicit entry wins
        assert projectors(kind, per_layer=per_layer)["lm_head"].p_out.shape == (4, 17)


@pytest.mark.parametrize("curvature", ["ekfac", "full"])
def test_random_sides_are_orthonormal_rows_and_a_side_as_wide_as_k_is_kept_whole(
    tmp_path, curvature: str
) -> None:
    """k ≥ width on every side: the scores are the unprojected ones (a square Gaussian would
    damp λ·(PᵀP)⁻¹ instead of λ·I and differ). Narrower sides get orthonormal random rows."""
    model, batches = tiny_gpt2(), lm_batches()

    def scores(kind: str, k: int) -> tuple[np.ndarray, object, np.ndarray]:
        projection = ProjectionConfig(kind=kind, k_in=k, k_out=k, head_k_out=None)
        config = IndexConfig(projection, curvature=curvature, damping_factor=1.0,
                             fisher_labels="data")  # fmt: skip
        index = build_index(model, lm_loss, batches, tmp_path / f"{kind}{k}", config,
                            show_progress=False)  # fmt: skip
        _, q = query_gradients(model, lm_loss, batches[:1], index)
        return score(index, q, ScoreConfig(dense=True, top_k=1)).dense, index, q

    wide, _, _ = scores("random", 1000)
    identity, index, q = scores("identity", 0)
    assert_scores_close(wide, identity, index, q, relatif=True)
    specs = layer_specs(find_layers(model, ProjectionConfig()), "lm_head")
    narrow = random_projectors(
        specs, ProjectionConfig(kind="random", k_in=12, k_out=12, head_k_out=None)
    )
    for spec, p in zip(specs, narrow, strict=True):
        for side, n in ((p.p_in, spec.n_in), (p.p_out, spec.n_out)):
            if n <= 12:
                assert torch.equal(side, torch.eye(n))
            else:  # orthonormal rows scaled by sqrt(n/k): E‖Pg‖² = ‖g‖², damping isotropic
                assert side.shape == (12, n)
                gram = side.double() @ side.double().T
                # float32 entries of rows of squared norm n/12, summed over n in float64.
                assert_close_f32(gram, torch.eye(12, dtype=gram.dtype) * n / 12, n,
                                 scale=n / 12, what="Gram matrix")  # fmt: skip


class _RoutedTokens(torch.nn.Module):
    """A layer that sees only some of the batch's tokens, gathered (as experts of a mixture)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(17, 4, dtype=torch.float64)
        self.expert = torch.nn.Linear(4, 4, dtype=torch.float64)
        self.head = torch.nn.Linear(4, 17, dtype=torch.float64)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        routed = input_ids % 2 == 0
        out = h.clone()
        out[routed] = self.expert(h[routed])
        return type("Out", (), {"logits": self.head(out)})()


def test_a_layer_whose_tokens_cannot_be_split_per_example_is_refused_by_name() -> None:
    model, batches = _RoutedTokens(), lm_batches()
    config = IndexConfig(projection=ProjectionConfig(kind="random"))
    with pytest.raises(ValueError, match=r"layer 'expert' sees a tensor of shape \(\d+, 4\)"):
        make_projectors(
            model, lm_loss, batches, config, fisher_loss=lm_fisher_loss, show_progress=False
        )
    # Without that layer the same model is indexed.
    config = IndexConfig(projection=ProjectionConfig(kind="random", modules=("head",)))
    layers, projectors, _ = make_projectors(
        model, lm_loss, batches, config, fisher_loss=lm_fisher_loss, show_progress=False
    )
    assert projected_gradients(model, lm_loss, batches[0], layers, projectors).shape[0] == 4


def test_logging_computes_no_weight_gradient() -> None:
    model, batches = tiny_gpt2(), lm_batches()
    layers, projectors, _ = make_projectors(
        model,
        lm_loss,
        batches,
        IndexConfig(projection=ProjectionConfig(kind="random")),
        fisher_loss=lm_fisher_loss,
        show_progress=False,
    )
    projected_gradients(model, lm_loss, batches[0], layers, projectors)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


def _slices(index) -> list[LayerSlice]:
    return index.curvature.slices


@pytest.mark.parametrize("case", ["mlp", "cnn", "gpt2"])
@pytest.mark.parametrize("kind", ["identity", "pca"])
@pytest.mark.parametrize("form", ["dense", "wide"])
def test_full_dimension_scores_equal_explicit_damped_fisher_formula(
    tmp_path, monkeypatch, case, kind, form
) -> None:
    """With P = I (or an orthogonal full-rank PCA basis), LoGra is the exact block-diagonal
    damped-Fisher influence on full gradients. A layer with more dimensions than examples is
    fitted from its rows' SVD, the complement of their span damped by λ alone; `wide`: such a
    layer counts as too wide for a d × d matrix, so its rows are kept on that path instead."""
    make_model, loss_fn, make_batches = CASES[case]
    model, batches = make_model(), make_batches()
    n_train = sum(len(b) for b in batches)
    if form == "wide":  # a d × d matrix over n × n floats counts as too wide
        monkeypatch.setattr(curvature_module, "FULL_DENSE_MAX_BYTES", n_train * n_train * 8)
    queries = make_batches(n=5, seed=11)
    config = IndexConfig(
        projection=ProjectionConfig(kind=kind, k_in=10_000, k_out=10_000, head_projection="pca"),
        curvature="full",
        damping_factor=0.3,
        rows_per_block=4,
    )
    index = build_index(
        model, loss_fn, batches, tmp_path, config, fisher_loss=FISHER[loss_fn], show_progress=False
    )
    _, q = query_gradients(model, loss_fn, queries, index)
    result = score(index, q, ScoreConfig(relatif=False, dense=True, top_k=3))

    names = index.layer_names
    full_train = full_gradients(model, loss_fn, batches, names)
    full_query = full_gradients(model, loss_fn, queries, names)
    flat = lambda full: np.concatenate(  # noqa: E731
        [full[n].reshape(full[n].shape[0], -1) for n in names], axis=1
    )
    slices, start = [], 0
    for n in names:
        d = full_train[n][0].size
        slices.append(LayerSlice(n, start, start + d))
        start += d
    expected, expected_self = damped_fisher_scores(flat(full_train), flat(full_query), slices, 0.3)
    # The index holds the full gradients rounded to float32 (P = I or orthogonal) and scores
    # them in float32: float32 precision of the scores' terms; the self-influence is a float64
    # solve of those rounded rows, off by their rounding summed over a layer's d dimensions.
    assert_scores_close(result.dense, expected, index, q, relatif=False)
    assert_close_f32(index.self_influence, expected_self, max(s.dim for s in slices),
                     what="self-influence")  # fmt: skip
    # Layers wider than the examples are many hold the rank-n Fisher from the rows' SVD.
    low_rank = [c.low_rank for c in index.curvature.layers]
    assert low_rank == [s.dim > n_train for s in index.curvature.slices]


def test_a_full_fisher_too_wide_for_a_matrix_or_its_rows_is_refused_by_name(monkeypatch) -> None:
    """A layer too wide for a d × d matrix is fitted from its rows only while they are fewer
    than its dimensions and fit the pass budget; otherwise one line says why and what to use."""
    rows = np.random.default_rng(0).normal(size=(12, 10))
    slices = [LayerSlice("narrow", 0, 4), LayerSlice("wide", 4, 10)]
    monkeypatch.setattr(curvature_module, "FULL_DENSE_MAX_BYTES", 4 * 4 * 8)
    with pytest.raises(ValueError, match=r"layer 'wide': a full Fisher of 6 dimensions .*"
                       r"not fewer than its dimensions.*'ekfac'"):  # fmt: skip
        fit_curvature(lambda: [rows[:6], rows[6:]], slices, 0.1, "full")
    fitted = fit_curvature(lambda: [rows[:3], rows[3:5]], slices, 0.1, "full")
    assert [c.low_rank for c in fitted.layers] == [False, True]
    with pytest.raises(ValueError, match=r"layer 'wide'.* rows of 5 or more examples need over"):
        fit_curvature(lambda: [rows[:3], rows[3:5]], slices, 0.1, "full", budget_bytes=200)


def test_a_low_rank_full_fisher_damps_the_rest_of_the_space_by_lambda(monkeypatch) -> None:
    """Vectors outside the span of the fitted rows (another model's rows, or the curvature fitted
    on a sample) are preconditioned as by the explicit (F + λI)⁻¹: the complement gets 1 / λ."""
    rng = np.random.default_rng(1)
    rows, other = rng.normal(size=(5, 16)), rng.normal(size=(3, 16))
    slices = [LayerSlice("a", 0, 6), LayerSlice("b", 6, 16)]
    monkeypatch.setattr(curvature_module, "FULL_DENSE_MAX_BYTES", 0)
    fitted = fit_curvature(lambda: [rows[:2], rows[2:]], slices, 0.2, "full")
    assert all(c.low_rank for c in fitted.layers)
    expected, expected_self = np.zeros_like(other), np.zeros(len(other))
    for s in slices:
        g, x = rows[:, s.start : s.stop], other[:, s.start : s.stop]
        fisher = g.T @ g / len(g)
        damped = fisher + 0.2 * np.trace(fisher) / s.dim * np.eye(s.dim)
        expected[:, s.start : s.stop] = np.linalg.solve(damped, x.T).T
        expected_self += np.einsum("nd,dn->n", x, np.linalg.solve(damped, x.T))
    # float64 throughout: a solve of condition at most 1 + d/factor (d = 10, factor 0.2).
    assert_close_f64(fitted.precondition(other), expected, 10,
                     scale=51 * np.abs(expected).max())  # fmt: skip
    assert_close_f64(fitted.self_influence(other), expected_self, 10,
                     scale=51 * np.abs(expected_self).max())  # fmt: skip


def test_self_influence_relatif_and_provider_sums_equal_dense_numpy(tmp_path) -> None:
    model, batches = tiny_gpt2(), lm_batches(n=14)
    queries = lm_batches(n=6, seed=5)
    config = IndexConfig(
        projection=ProjectionConfig(kind="random", k_in=4, k_out=3),
        curvature="full",
        damping_factor=0.05,
        rows_per_block=5,
    )
    index = build_index(
        model, lm_loss, batches, tmp_path, config, fisher_loss=FISHER[lm_loss], show_progress=False
    )
    _, q = query_gradients(model, lm_loss, queries, index)
    result = score(index, q, ScoreConfig(relatif=True, dense=True, top_k=4))

    g = np.concatenate([np.asarray(a, dtype=np.float64) for _, a in index.blocks()])
    raw, self_inf = damped_fisher_scores(g, q, _slices(index), 0.05)
    assert_self_influence_close(index, self_inf)
    rel = raw / np.sqrt(self_inf)[None, :]
    assert_scores_close(result.dense, rel, index, q, relatif=True)
    check_provider_sums(result, index, q, rel)
    for qi in range(rel.shape[0]):
        expected_top = np.argsort(-rel[qi], kind="stable")[:4]
        np.testing.assert_array_equal(np.sort(result.top_rows[qi]), np.sort(expected_top))
    top = np.take_along_axis(rel, result.top_rows, axis=1)
    scale = np.take_along_axis(score_scale(index, q, True), result.top_rows, axis=1)
    assert_close_f32(result.top_scores, top, index.dim, scale=scale, what="top scores")
    shares = result.shares()
    # Shares are float64 quotients of the provider sums: a sum over the providers.
    assert_close_f64(shares.sum(1)[~result.unattributed()], 1.0, len(result.providers), scale=1)
    # The comparisons catch a real error: one provider's sums 1e-3 off (relative) fail.
    bad = dataclasses.replace(result, positive=result.positive.copy(),
                              signed=result.signed.copy())  # fmt: skip
    bad.positive[:, 0] *= 1 + 1e-3
    with pytest.raises(AssertionError, match="positive sums"):
        check_provider_sums(bad, index, q, rel)
    bad = dataclasses.replace(result, signed=result.signed.copy())
    bad.signed[:, 1] *= 1 + 1e-3
    with pytest.raises(AssertionError, match="signed sums"):
        check_provider_sums(bad, index, q, rel)


def check_provider_sums(result, index, q: np.ndarray, rel: np.ndarray) -> None:
    """Per provider, the float32 scores of its rows summed: each score is off by its terms'
    rounding (over the D dimensions) and the sum adds its own (over the rows), so the scale is
    the sum of the rows' term magnitudes."""
    providers = index.metadata["provider"].to_numpy()
    assert result.providers == sorted(set(providers))
    scale = score_scale(index, q, relatif=True)
    for p, name in enumerate(result.providers):
        cols = providers == name
        n = index.dim + int(cols.sum())
        s = scale[:, cols].sum(1)
        assert_close_f32(result.positive[:, p], np.maximum(rel[:, cols], 0).sum(1), n, scale=s,
                         what=f"positive sums of {name}")  # fmt: skip
        assert_close_f32(result.signed[:, p], rel[:, cols].sum(1), n, scale=s,
                         what=f"signed sums of {name}")  # fmt: skip


def test_scores_do_not_depend_on_block_or_memory_budget(tmp_path) -> None:
    model, batches = tiny_mlp(), mlp_batches(n=40)
    cfg = IndexConfig(projection=ProjectionConfig(kind="random", k_in=3, k_out=3), rows_per_block=7)
    index = build_index(
        model,
        classification_loss,
        batches,
        tmp_path,
        cfg,
        fisher_loss=FISHER[classification_loss],
        show_progress=False,
    )
    _, q = query_gradients(model, classification_loss, batches[:2], index)
    big = score(index, q, ScoreConfig(dense=True))
    tiny = score(index, q, ScoreConfig(dense=True, memory_budget_mb=0))  # one row per chunk
    # Float32 products of other shapes round differently: agree to float32 precision of their
    # terms (twice: each side has its own rounding).
    scale = score_scale(index, q, relatif=True)
    assert_close_f32(tiny.dense, big.dense, index.dim, scale=2 * scale)
    providers = index.metadata["provider"].to_numpy()
    for p, name in enumerate(big.providers):
        cols = providers == name
        assert_close_f32(tiny.positive[:, p], big.positive[:, p], index.dim + int(cols.sum()),
                         scale=2 * scale[:, cols].sum(1))  # fmt: skip
    np.testing.assert_array_equal(tiny.top_rows, big.top_rows)


def test_float16_storage_changes_scores_by_less_than_one_percent(tmp_path) -> None:
    model, batches = tiny_gpt2(dtype=torch.float32), lm_batches(n=16)
    queries = lm_batches(n=6, seed=9)
    results = {}
    for dtype in ("float32", "float16"):
        cfg = IndexConfig(projection=ProjectionConfig(kind="random", k_in=4, k_out=4), dtype=dtype)
        index = build_index(
            model,
            lm_loss,
            batches,
            tmp_path / dtype,
            cfg,
            fisher_loss=FISHER[lm_loss],
            show_progress=False,
        )
        assert next(index.blocks())[1].dtype == np.dtype(dtype)
        _, q = query_gradients(model, lm_loss, queries, index)
        results[dtype] = score(index, q, ScoreConfig(dense=True)).dense
    # Not a rounding bound but the documented claim: float16 rows round each entry by up to
    # 2**-11 (5e-4) relative, and the scores (norm-wise) move by less than 1%.
    assert rel_err(results["float16"], results["float32"]) < 1e-2


def ekfac_reference(
    train,
    queries,
    layers,
    projectors,
    factors,
    factor: float,
    curv_rows=None,
    prior=None,
    perturb=None,
):
    """EKFAC built explicitly: V = Q_out ⊗ Q_in, the eigenvectors of the projected KFAC factors
    P_out S P_outᵀ and P_in A P_inᵀ; eigenvalues the second moments of Vᵀ g over `curv_rows`
    (default: the training rows); F = V diag(d) Vᵀ, then a dense solve. `prior` (m, m0):
    d shrunk toward κ = diag(Vᵀ (S ⊗ A) Vᵀ) of the dense Kronecker product, scaled to d's
    trace: (m·d + m0·c·κ) / (m + m0). `perturb` {"layer", "factor", "weight"}: that layer's
    eigenvalue of the largest weight in the scores or the self-influence multiplied by the
    factor (a deliberate error).
    (scores (Q, N), self-influence (N,))."""
    curv_rows = train if curv_rows is None else curv_rows
    scores = np.zeros((queries.shape[0], train.shape[0]))
    self_inf = np.zeros(train.shape[0])
    for layer, proj in zip(layers, projectors, strict=True):
        a, b = layer["start"], layer["stop"]
        g, q = train[:, a:b], queries[:, a:b]
        raw_a, raw_s = factors[proj.name]
        p_in, p_out = proj.p_in.double().numpy(), proj.p_out.double().numpy()
        q_in = np.linalg.eigh(p_in @ raw_a @ p_in.T)[1]
        q_out = np.linalg.eigh(p_out @ raw_s @ p_out.T)[1]
        v = np.kron(q_out, q_in)
        d = ((curv_rows[:, a:b] @ v) ** 2).mean(axis=0)
        if prior is not None:
            m, m0 = prior
            kron = np.kron(p_out @ raw_s @ p_out.T, p_in @ raw_a @ p_in.T)
            kappa = np.diag(v.T @ kron @ v)
            d = (m * d + m0 * d.sum() / kappa.sum() * kappa) / (m + m0)
        lam = factor * d.mean()
        if perturb is not None and perturb["layer"] == layer["name"]:
            # The eigenvalue whose change moves the scores (or self-influence) most: weight
            # Σ|q·v_i||g·v_i|·d_i/(d_i+λ)² (or the largest (g·v_i)²·d_i/(d_i+λ)² relative).
            gv = g @ v
            if perturb["weight"] == "scores":
                weight = np.abs(q @ v).sum(0) * np.abs(gv).sum(0) * d / (d + lam) ** 2
            else:
                share = gv**2 / (d + lam) / (gv**2 / (d + lam)).sum(1, keepdims=True)
                weight = share.max(0) * d / (d + lam)
            d = d.copy()
            d[np.argmax(weight)] *= perturb["factor"]
        damped = v @ np.diag(d) @ v.T + lam * np.eye(len(d))
        scores += q @ np.linalg.solve(damped, g.T)
        self_inf += np.einsum("nd,dn->n", g, np.linalg.solve(damped, g.T))
    return scores, self_inf


def shifted_label_loss(loss_fn):
    """A deterministic stand-in for a Fisher loss: every counted label moved by one class, so
    its output gradients differ from the training loss's (and can be recomputed alone)."""

    def loss(model, batch: Batch) -> torch.Tensor:
        if isinstance(batch.inputs, dict):
            labels = batch.inputs["labels"]
            moved = torch.where(labels >= 0, (labels + 1) % 17, labels)
            inputs = {**batch.inputs, "labels": moved}
        else:
            x, y = batch.inputs
            inputs = (x, (y + 1) % 3)
        return loss_fn(model, dataclasses.replace(batch, inputs=inputs))

    return loss


@pytest.mark.parametrize("labels", ["sampled", "data"])
@pytest.mark.parametrize("kind", ["random", "pca"])
@pytest.mark.parametrize("case", ["mlp", "cnn", "gpt2"])
def test_ekfac_scores_equal_an_explicitly_built_ekfac_matrix(tmp_path, case, kind, labels) -> None:
    """The EKFAC basis comes from token-level KFAC factors of the first pass: of the Fisher
    loss with `fisher_labels="sampled"`, of the training loss with "data"."""
    make_model, loss_fn, make_batches = CASES[case]
    model, batches = make_model(), make_batches()
    queries = make_batches(n=5, seed=13)
    fisher = shifted_label_loss(loss_fn)
    config = IndexConfig(projection=ProjectionConfig(kind=kind, k_in=3, k_out=2),
                         curvature="ekfac", damping_factor=0.2, rows_per_block=6,
                         fisher_labels=labels)  # fmt: skip
    index = build_index(
        model, loss_fn, batches, tmp_path, config, fisher_loss=fisher, show_progress=False
    )
    _, q = query_gradients(model, loss_fn, queries, index)
    result = score(index, q, ScoreConfig(relatif=False, dense=True))
    g = np.concatenate([np.asarray(a, dtype=np.float64) for _, a in index.blocks()])
    first_pass = fisher if labels == "sampled" else loss_fn
    factors = kfac_factors_reference(model, first_pass, batches, index.layer_names)
    expected, expected_self = ekfac_reference(
        g, q, index.build["layers"], index.projectors(), factors, 0.2
    )
    assert_scores_close(result.dense, expected, index, q, relatif=False)
    assert_self_influence_close(index, expected_self)
    if kind == "pca":  # PCA directions are the top eigenvectors of the same raw factors
        for proj in index.projectors():
            for p, raw, k in ((proj.p_in, factors[proj.name][0], 3),
                              (proj.p_out, factors[proj.name][1], 2)):  # fmt: skip
                if p is proj.p_out and proj.name == "lm_head":
                    continue  # the vocabulary side is random (checked on its own)
                top = np.linalg.eigh(raw)[1][:, ::-1][:, :k].T
                overlap = np.abs(p.double().numpy() @ top.T)
                # float32-stored unit rows against float64 eigenvectors, over n entries.
                assert_close_f32(overlap, np.eye(k), raw.shape[0], scale=1, what="overlap")


@pytest.mark.parametrize("cap", [None, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_ekfac_eigenvalues_from_the_fisher_loss_equal_an_explicit_matrix(
    tmp_path, case, cap
) -> None:
    """With curvature_labels="sampled", the eigenvalues are the second moments of the Fisher
    loss's projected gradients (recomputed here one example at a time) over the batches the
    `curvature_examples` cap keeps, averaged over draws, and, when the cap keeps fewer
    examples than the index holds, shrunk toward the KFAC eigenvalues with
    `curvature_prior_examples`; the stored and scored rows stay the training loss's, all of
    them."""
    make_model, loss_fn, make_batches = CASES[case]
    model, batches = make_model(), make_batches()
    queries = make_batches(n=5, seed=13)
    fisher = shifted_label_loss(loss_fn)  # deterministic: every draw gives the same rows
    config = IndexConfig(projection=ProjectionConfig(kind="pca", k_in=3, k_out=2),
                         damping_factor=0.2, rows_per_block=6, curvature_labels="sampled",
                         curvature_draws=2, curvature_examples=cap,
                         curvature_prior_examples=64)  # fmt: skip
    index = build_index(
        model, loss_fn, batches, tmp_path, config, fisher_loss=fisher, show_progress=False
    )
    _, q = query_gradients(model, loss_fn, queries, index)
    result = score(index, q, ScoreConfig(relatif=False, dense=True))
    g = np.concatenate([np.asarray(a, dtype=np.float64) for _, a in index.blocks()])
    names = index.layer_names
    full = full_gradients(model, loss_fn, batches, names)
    check_stored_rows(g, full, index, batches, index.projectors())
    if cap is None:  # the comparison catches one projection row 1e-3 off, on any layer
        for i in range(len(index.layer_names)):
            for side in ("p_in", "p_out"):
                projectors = index.projectors()
                off = getattr(projectors[i], side).clone()
                off[0] *= 1 + 1e-3
                setattr(projectors[i], side, off)
                with pytest.raises(AssertionError, match="stored rows"):
                    check_stored_rows(g, full, index, batches, projectors)
    n = sum(len(b) for b in batches)
    sample = CurvatureSample(n, cap)
    kept = [b for b in batches if sample.take(len(b))]
    assert (len(kept) < len(batches)) == (cap is not None)
    assert index.manifest["curvature_examples_used"] == sum(len(b) for b in kept)
    curv_rows = project(full_gradients(model, fisher, kept, names), index.projectors())
    factors = kfac_factors_reference(model, fisher, batches, names)
    layers, projectors = index.build["layers"], index.projectors()
    prior = (index.manifest["curvature_examples_used"], 64) if cap is not None else None
    expected, expected_self = ekfac_reference(
        g, q, layers, projectors, factors, 0.2, curv_rows=curv_rows, prior=prior
    )
    assert_scores_close(result.dense, expected, index, q, relatif=False)
    # The eigenvalues are second moments of the Fisher loss's gradients, in the model's precision.
    fitted_from = (gradient_reduction(batches, projectors), MODEL_EPS[case])
    assert_self_influence_close(index, expected_self, fitted_from)
    # The comparisons catch one eigenvalue 1e-3 off (relative): the scores on any layer, the
    # self-influence on the eigenvalue that weighs most in it (of all layers).
    wrong_selfs = []
    for layer in layers:
        off = {"layer": layer["name"], "factor": 1 + 1e-3, "weight": "scores"}
        wrong, _ = ekfac_reference(g, q, layers, projectors, factors, 0.2,
                                   curv_rows=curv_rows, prior=prior, perturb=off)  # fmt: skip
        with pytest.raises(AssertionError, match="scores"):
            assert_scores_close(result.dense, wrong, index, q, relatif=False)
        off["weight"] = "self-influence"
        wrong_selfs.append(ekfac_reference(g, q, layers, projectors, factors, 0.2,
                                           curv_rows=curv_rows, prior=prior, perturb=off)[1])  # fmt: skip
    moved = [np.abs(w / expected_self - 1).max() for w in wrong_selfs]
    with pytest.raises(AssertionError, match="self-influence"):
        assert_self_influence_close(index, wrong_selfs[int(np.argmax(moved))], fitted_from)
    if cap is not None:  # the shrinkage is there: the sample's eigenvalues alone differ
        alone, _ = ekfac_reference(g, q, layers, projectors, factors, 0.2, curv_rows=curv_rows)
        with pytest.raises(AssertionError, match="scores"):
            assert_scores_close(result.dense, alone, index, q, relatif=False)
    # ... and not those of the stored rows.
    stored, _ = ekfac_reference(g, q, index.build["layers"], index.projectors(), factors, 0.2)
    with pytest.raises(AssertionError, match="scores"):
        assert_scores_close(result.dense, stored, index, q, relatif=False)


def check_stored_rows(g: np.ndarray, full: dict, index, batches, projectors) -> None:
    """Stored float32 rows against the full gradients projected afterwards (float64): the
    storage rounds each entry, and a model with float32 attention adds rounding over the
    tokens and widths of a layer, at that layer's magnitude."""
    expected = project(full, projectors)
    assert_close_f32(g, expected, gradient_reduction(batches, projectors),
                     scale=layer_scale(expected, index.build["layers"]),
                     what="stored rows")  # fmt: skip


@pytest.mark.parametrize("layout", ["runs", "interleaved", "one provider"])
def test_provider_sums_of_a_chunk_equal_a_dense_sum(layout) -> None:
    from attribution.scoring import _add_provider_sums

    rng = np.random.default_rng(3)
    rows, n_q, n_p = 3000, 7, 5
    st = rng.standard_normal((rows, n_q)).astype(np.float32)
    codes = {
        "runs": np.repeat(np.arange(n_p), rows // n_p),
        "interleaved": rng.integers(0, n_p, rows),
        "one provider": np.full(rows, 2),
    }[layout].astype(np.uint8)
    before = st.copy()
    signed, positive = np.ones((n_q, n_p)), np.ones((n_q, n_p))  # sums are added
    _add_provider_sums(st, codes, signed, positive)
    np.testing.assert_array_equal(st, before)
    for p in range(n_p):
        mine = st[codes == p].astype(np.float64)
        # float32 sums over the provider's rows (numpy's pairwise or index_add_): float32
        # precision of the summed magnitudes, the 1 already there included.
        scale = 1 + np.abs(mine).sum(0)
        assert_close_f32(signed[:, p], 1 + mine.sum(0), len(mine), scale=scale)
        assert_close_f32(positive[:, p], 1 + np.maximum(mine, 0).sum(0), len(mine), scale=scale)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"k_in": 0}, "projection k_in must be a positive integer, got 0"),
        ({"k_out": -2}, "projection k_out must be a positive integer, got -2"),
        ({"head_k_out": 0}, "projection head_k_out must be a positive integer, got 0"),
        ({"per_layer": (("h.*", 4, 0),)}, "projection per_layer 'h.*' k_out must be a positive"),
        ({"k_in": 2.5}, "projection k_in must be a positive integer, got 2.5"),
        ({"kind": "gaussian"}, "unknown projection kind 'gaussian'"),
        ({"head_projection": "sketch"}, "unknown head_projection 'sketch'"),
    ],
)
def test_a_projection_size_or_kind_that_cannot_work_is_refused_in_one_line(
    settings: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ProjectionConfig(**settings)
    # The identity keeps every width: its sizes are not used.
    if "k_in" in settings or "k_out" in settings:
        assert ProjectionConfig(kind="identity", **settings).kind == "identity"
