"""The accuracy harness's core functions on tiny cases (no cache, a few seconds)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from scipy import stats

from attribution.curvature import Curvature, LayerCurvature, LayerSlice
from benchmarks.accuracy import checkpoints, eigenvalue_treatment, methods, run
from benchmarks.accuracy.args import number_list, number_lists, setting_names
from benchmarks.accuracy.metrics import (
    lds_per_query,
    provider_agreement,
    provider_credit,
    rankdata,
    spearman,
    split_half_agreement,
)
from benchmarks.accuracy.retrain import RetrainCache, lds_subsets, subset_losses
from benchmarks.accuracy.settings import lm_setting, mlp_setting
from tests.attribution.reference import score_scale
from tests.tolerance import assert_close_f32, assert_close_f64


def test_spearman_and_ranks_match_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 6, 30).astype(float)  # many ties
        b = a + rng.normal(size=30)
        # Ranks of ties are averages of small integers: float64 exact up to 30 terms.
        assert_close_f64(rankdata(a), stats.rankdata(a), 30)
        # A correlation (|r| ≤ 1) of 30 pairs in float64.
        assert_close_f64(spearman(a, b), stats.spearmanr(a, b).statistic, 30, scale=1)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_lds_is_one_for_an_exactly_additive_model_and_signs_follow_the_loss() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(4, 40))
    masks = lds_subsets(40, 25)
    # A training example with a positive score lowers the query's loss: loss = -Σ scores.
    losses = -(masks.astype(float) @ scores.T) + 3.0
    # Rank correlations over 25 subsets of sums over 40 examples, in float64.
    assert_close_f64(lds_per_query(scores, masks, losses), 1.0, 25 * 40, scale=1)
    assert_close_f64(lds_per_query(-scores, masks, losses), -1.0, 25 * 40, scale=1)


def test_provider_agreement_of_perfect_and_reversed_credit() -> None:
    providers = np.array(["a", "b", "c", "a", "b", "c"])
    scores = np.array([[3.0, 2.0, 1.0, 3.0, 2.0, -5.0]])
    credit = provider_credit(scores, providers, ["a", "b", "c"], positive=True)
    assert_close_f64(credit, [[6.0, 4.0, 1.0]], 6)  # float64 sums of six small scores
    rises = np.array([[0.9], [0.5], [0.1]])
    good = provider_agreement(credit, rises)
    # Rank correlations of 3 providers, in float64.
    assert_close_f64(good["spearman"]["mean"], 1.0, 3, scale=1)
    assert good["top1"] == 1.0
    bad = provider_agreement(-credit, rises)
    assert_close_f64(bad["spearman"]["mean"], -1.0, 3, scale=1)
    assert bad["top1"] == 0.0


def test_split_half_agreement_is_the_mean_per_query_spearman_stepped_up() -> None:
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(6, 40))  # 6 providers, 40 queries
    first = truth + rng.normal(scale=0.8, size=truth.shape)
    second = truth + rng.normal(scale=0.8, size=truth.shape)
    got = split_half_agreement(first, second)
    expected = np.mean([stats.spearmanr(first[:, q], second[:, q]).statistic for q in range(40)])
    # Means over 40 queries of correlations over 6 providers (|r| ≤ 1), in float64.
    assert_close_f64(got["half"], expected, 6 * 40, scale=1)
    assert_close_f64(got["full"], 2 * expected / (1 + expected), 6 * 40, scale=1)
    assert 0.2 < got["half"] < got["full"] < 1.0
    same = split_half_agreement(truth, 2 * truth + 1)
    assert_close_f64([same["half"], same["full"]], [1.0, 1.0], 6 * 40, scale=1)


@pytest.fixture
def one_thread():
    """Tiny models train fastest, and reproducibly, on one thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_exact_influence_predicts_retraining_on_a_tiny_mlp(tmp_path, one_thread) -> None:
    """End to end on retrained models: the exact damped-Fisher scores rank subsets well, and
    retraining is deterministic."""
    setting = mlp_setting(n_train=80, n_queries=6, hidden=8, steps=150)
    cache = RetrainCache(setting, root=None)
    rows = np.arange(0, 80, 2)
    np.testing.assert_array_equal(cache.outputs(rows, 0), setting.evaluate(setting.train(rows, 0)))
    masks = lds_subsets(setting.n_train, 16)
    losses = subset_losses(cache, masks, [0])
    built = methods.build(setting, "identity", 0, "float32", tmp_path)
    exact = lds_per_query(methods.influence_scores(built, 1.0, relatif=False), masks, losses)
    shuffled = lds_per_query(np.random.default_rng(0).normal(size=(6, 80)), masks, losses)
    assert np.nanmean(exact) > 0.4
    assert np.nanmean(exact) > np.nanmean(shuffled) + 0.3


def test_both_curvature_kinds_on_one_index_and_library_path_agrees(tmp_path, one_thread) -> None:
    """An index carries its own curvature kind and the other one, fitted from the same rows;
    the library's scoring at the index's damping equals the re-damped path."""
    setting = mlp_setting(n_train=40, n_queries=3, hidden=8, steps=50)
    built = methods.build(setting, "pca", 4, "float32", tmp_path)
    assert set(built.curvatures) == set(methods.CURVATURE_KINDS)
    config = built.index.config
    assert built.curvatures[config.curvature] is built.index.curvature
    factor = config.damping_factor
    for relatif in (False, True):
        lib = methods.library_scores(built, relatif=relatif)
        red = methods.influence_scores(built, factor, relatif=relatif)
        # Two float32 scorings (one re-damped): float32 precision of the scores' terms, twice.
        scale = 2 * score_scale(built.index, built.query_grads, relatif)
        assert_close_f32(lib, red, built.index.dim, scale=scale)
    ekfac = methods.influence_scores(built, 1.0, False, curvature_kind="ekfac")
    full = methods.influence_scores(built, 1.0, False, curvature_kind="full")
    assert ekfac.shape == full.shape == (3, 40)
    assert not np.allclose(ekfac, full)


def test_zipf_topics_draw_words_with_frequency_inverse_to_rank() -> None:
    """The large-vocabulary corpus's topics: distinct words per provider and slot, disjoint
    across providers, drawn (uniform choice from the tuple) with frequency ∝ 1 / rank."""
    from benchmarks.accuracy.settings import zipf_topics

    topics = zipf_topics(["a", "b"], nouns=50, verbs=10, adjectives=10, seed=3)
    nouns = topics["a"].nouns
    distinct = list(dict.fromkeys(nouns))
    assert len(distinct) == 50
    assert not set(distinct) & set(topics["b"].nouns)
    counts = np.array([nouns.count(w) for w in distinct])
    np.testing.assert_array_equal(counts, np.ceil(50 / np.arange(1, 51)))
    assert zipf_topics(["a", "b"], 50, 10, 10, seed=3) == topics


def test_head_projection_study_builds_the_projections_it_names() -> None:
    """`head_projections`: each named P has the stated form (k rows over the vocabulary)."""
    from benchmarks.accuracy.head_projections import projections

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 12)) * np.linspace(3, 0.1, 12)
    s = x.T @ x
    ps = projections(s, 6)
    np.testing.assert_array_equal(ps["whole vocabulary (no projection)"], np.eye(12))
    assert all(p.shape == (6, 12) for n, p in ps.items() if n.startswith(("Gaussian", "count")))
    orthonormal = ps["orthonormal random rows (the library's `random`)"]
    # float64 rows of squared norm 12/6, products over 12 entries.
    assert_close_f64(orthonormal @ orthonormal.T, np.eye(6) * 12 / 6, 12, scale=2)
    sketch = ps["count sketch (seed 0)"]
    assert ((sketch != 0).sum(0) == 1).all() and set(np.unique(sketch)) <= {-1.0, 0.0, 1.0}
    pca = ps["PCA (top eigenvectors of S)"]
    assert_close_f64(pca @ pca.T, np.eye(6), 12, scale=1)  # float64 unit rows over 12 entries
    top = np.linalg.eigh(s)[0][::-1][:6]
    # Rayleigh quotients over 12 × 12 terms, at the largest eigenvalue's magnitude.
    assert_close_f64(np.diag(pca @ s @ pca.T), top, 144, scale=top.max())
    mixed = next(p for n, p in ps.items() if n.startswith("top 3 tokens"))
    frequent = np.argsort(-np.diag(s))[:3]
    np.testing.assert_array_equal(mixed[:3][:, frequent], np.eye(3))
    # Whitened rows R (S + λI)^(-1/2), λ = the mean eigenvalue: R (S+λI)^(-1/2) (S+λI)
    # (S+λI)^(-1/2) Rᵀ = R Rᵀ, whatever way the inverse square root was computed.
    whitened = ps["Gaussian rows, whitened by S (damping 1 × mean)"]
    gaussian = ps["Gaussian rows"]
    damped = s + np.trace(s) / 12 * np.eye(12)
    # float64, over 12 × 12 terms, through an inverse square root of condition ≤ 1 + 12.
    scale = 13 * np.abs(gaussian) @ np.abs(gaussian).T
    assert_close_f64(whitened @ damped @ whitened.T, gaussian @ gaussian.T, 144, scale=scale)


def test_pooled_differences_weight_each_setting_by_its_queries() -> None:
    """`report.pooled`: the mean of all queries' differences, the stratified standard error,
    and only the comparisons every setting has."""
    from benchmarks.accuracy.report import pooled

    rng = np.random.default_rng(3)
    a, b = rng.normal(0.1, 0.3, 40), rng.normal(-0.05, 0.2, 100)

    def summary(d: np.ndarray) -> dict:
        return {"mean": d.mean(), "se": d.std(ddof=1) / np.sqrt(len(d)), "n": len(d)}

    settings = [
        {"paired": {"peer − ours": summary(a), "only here − ours": summary(a)}},
        {"paired": {"peer − ours": summary(b)}},
    ]
    out = pooled(settings, "paired")
    assert list(out) == ["peer − ours"] and out["peer − ours"]["n"] == 140
    both = np.concatenate([a, b])  # float64 means over 140 values
    assert_close_f64(out["peer − ours"]["mean"], both.mean(), 140, scale=np.abs(both).max())
    se_a, se_b = a.std(ddof=1) / np.sqrt(40), b.std(ddof=1) / np.sqrt(100)
    expected = np.sqrt((40 / 140) ** 2 * se_a**2 + (100 / 140) ** 2 * se_b**2)
    assert_close_f64(out["peer − ours"]["se"], expected, 140, scale=np.abs(both).max())


def test_script_arguments_are_parsed_and_bad_ones_refused_in_one_line(capsys) -> None:
    assert setting_names("lm, lm-c") == ["lm", "lm-c"]
    assert number_list(int, low=1)("1,4,64") == [1, 4, 64]
    assert number_list(float, low=0.0)("0.5,1") == [0.5, 1.0]
    assert number_lists(int, low=1)("3,6,9/6") == [[3, 6, 9], [6]]
    for argv, message in (
        (["--settings", "lm,bogus"], "unknown settings ['bogus']; choose from mlp, lm, lm-b, lm-c"),
        (["--settings", ""], "unknown settings ['']"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(argparse.ArgumentTypeError, match="comma list of ints, got '4,x'"):
        number_list(int)("4,x")
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1, got '0,2'"):
        number_list(int, low=1)("0,2")
    with pytest.raises(SystemExit) as exit_info:
        checkpoints.main(["--epochs", "3,6/0"])
    assert exit_info.value.code == 2
    assert "at least 1, got '0'" in capsys.readouterr().err


def test_a_language_model_replays_its_training_run_with_snapshots(tmp_path, one_thread) -> None:
    """The checkpoint study's snapshots come from the base model's own run: the last one is the
    base model, bit for bit, and the earlier ones are earlier states of it."""
    setting = lm_setting(tmp_path, name="tiny", docs_per_provider=3, queries_per_provider=1,
                         epochs=3, n_embd=8)  # fmt: skip
    snapshots = setting.snapshots((1, 2))
    assert sorted(snapshots) == [1, 2, 3]
    base = setting.evaluate(setting.base_model())
    np.testing.assert_array_equal(setting.evaluate(snapshots[3]), base)
    first = setting.evaluate(snapshots[1])
    assert not np.allclose(first[0], base[0])
    # The final model fits the training data better than after one epoch.
    with torch.no_grad():
        train_loss = [
            float(sum(setting.train_loss(m, b).sum() for b in setting.train_data))
            for m in (snapshots[1], snapshots[3])
        ]
    assert train_loss[1] < train_loss[0]
    with pytest.raises(ValueError, match=r"epochs \[4\] outside the recipe's 1..3"):
        setting.snapshots((4,))


def _toy_curvature(rng: np.random.Generator) -> Curvature:
    """A Kronecker-factored layer (2 × 3) and a low-rank dense one (5, rank 2)."""
    q_out = np.linalg.qr(rng.normal(size=(2, 2)))[0]
    q_in = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    vecs = np.linalg.qr(rng.normal(size=(5, 2)))[0]
    layers = [
        LayerCurvature(rng.uniform(0.0, 3.0, 6), None, 0.3, q_out, q_in),
        LayerCurvature(np.array([2.0, 0.5]), vecs, 0.2),
    ]
    return Curvature([LayerSlice("a", 0, 6, (2, 3)), LayerSlice("b", 6, 11)], layers)


def _explicit(layer: LayerCurvature, diagonal: np.ndarray, rest: float) -> np.ndarray:
    """The layer's preconditioner as a matrix: V diag(diagonal) Vᵀ + rest·(I − V Vᵀ)."""
    v = np.kron(layer.q_out, layer.q_in) if layer.eigvecs is None else layer.eigvecs
    return v @ np.diag(diagonal) @ v.T + rest * (np.eye(v.shape[0]) - v @ v.T)


def test_eigenvalue_treatments_match_explicit_matrices() -> None:
    rng = np.random.default_rng(0)
    curvature = _toy_curvature(rng)
    g = rng.normal(size=(4, 11))
    # float64 solves over 11 dimensions, at most 1/λ times the gradients' magnitude.
    expected = curvature.precondition(g)
    assert_close_f64(
        eigenvalue_treatment.precondition(curvature, g, eigenvalue_treatment.tikhonov),
        expected, 11 * 11,
    )  # fmt: skip
    c = 2.0
    got = eigenvalue_treatment.precondition(curvature, g, eigenvalue_treatment.spectral_filter(c))
    for s, layer in zip(curvature.slices, curvature.layers, strict=True):
        mu = c * layer.damping
        diagonal = np.array([(1 - np.exp(-e / mu)) / e for e in layer.eigvals])
        want = g[:, s.start : s.stop] @ _explicit(layer, diagonal, 1.0 / mu)
        assert_close_f64(got[:, s.start : s.stop], want, 11 * 11)  # float64 products, d ≤ 11
    # The filter is 1/e far above μ and 1/μ far below it.
    e = np.array([0.0, 1e-9, 1e3])
    # 1 − exp(−x) over x: 1 to float64 precision for x ≤ 1e-9 (the next term is x/2 ≈ 5e-10).
    got = eigenvalue_treatment.spectral_filter(1.0)(e, 1.0)
    assert_close_f64(got, [1.0, 1.0 - 5e-10, 1e-3], 4, scale=1)

    other = _toy_curvature(np.random.default_rng(0))
    for layer in other.layers:
        layer.eigvals = layer.eigvals * 3.0 + 1.0
    a, factor = 0.25, 0.1
    mix = eigenvalue_treatment.mixed(curvature, other, a, factor)
    for x, y, m in zip(curvature.layers, other.layers, mix.layers, strict=True):
        eigvals = 0.75 * x.eigvals + 0.25 * y.eigvals
        assert_close_f64(m.eigvals, eigvals, 2)  # float64: one weighted sum of two
        # zeros of a low rank count; a float64 sum over the layer's dimensions
        assert_close_f64(m.damping, factor * eigvals.sum() / x.dim, x.dim)
    different = _toy_curvature(np.random.default_rng(1))
    with pytest.raises(SystemExit, match="eigenbases differ"):
        eigenvalue_treatment.mixed(curvature, different, a, factor)


def test_grid_table_joins_runs_and_grid_and_counts_the_target(tmp_path) -> None:
    """The one-table summary reads saved results only: regret from the damping grid, methods
    and peers from the newest accuracy run holding the setting, blocks-only where present."""
    import json

    from benchmarks.accuracy import grid_table

    def d(mean: float) -> dict:
        return {"mean": mean, "se": 0.01, "n": 10}

    def grid_entry(name: str, regret: float) -> dict:
        return {
            "setting": name,
            "best_config": {"kind": "pca", "k": 64, "damping_factor": 1.0, "lds": 0.5},
            "factors": [{"damping_factor": 0.01, "lds": d(0.5 - regret)}],
            "defaults_vs_best_config": d(-regret),
        }

    def run_entry(name: str, peer: float) -> dict:
        diffs = {f"{m} − {grid_table.DEFAULTS}": d(peer) for m in grid_table.METHODS}
        return {
            "setting": name,
            "methods": {grid_table.DEFAULTS: {"lds": d(0.4)}},
            "paired_lds_vs_defaults": diffs,
            "paired_provider_spearman_vs_defaults": diffs,
            "variants": {"blocks_only": {grid_table.BLOCKS: {"paired_lds": d(-0.2)}}},
        }

    (tmp_path / "damping_grid.json").write_text(
        json.dumps({"settings": [grid_entry("a", 0.01), grid_entry("b", 0.05)]})
    )
    (tmp_path / "accuracy.json").write_text(
        json.dumps({"command": "old", "settings": [run_entry("a", +0.1), run_entry("b", -0.1)]})
    )
    (tmp_path / "accuracy-classifiers.json").write_text(
        json.dumps({"command": "new", "settings": [run_entry("a", -0.1)]})
    )
    report = grid_table.build(tmp_path)
    a, b = report["settings"]
    assert a["accuracy_run"] == "new" and b["accuracy_run"] == "old"  # the newest run wins
    assert report["worst_regret"] == pytest.approx(0.05)
    assert report["within_tolerance"] == 1  # 0.01 is within 0.02, 0.05 is not
    assert a["ahead_of_peers"] and b["ahead_of_peers"]
    assert report["ahead_of_every_peer"] == 2
    assert a["blocks_only_vs_kronfluence_ekfac"]["paired_lds"]["mean"] == -0.2
    grid_table.write_markdown(report, tmp_path / "grid.md")
    text = (tmp_path / "grid.md").read_text()
    assert "| a | 0.490 | pca k=64 @1 (0.500) | 0.010 ± 0.010 |" in text
    assert "Regret at most 0.02 on 1 of 2 settings (worst 0.050)" in text


def test_projected_weights_lie_as_the_index_rows_do(tmp_path, one_thread) -> None:
    """The damping rules compare the mean of an index's rows (the mean projected gradient) with
    `projected_weights` (the projected weights or their change): both must be laid out alike.
    Independent check: the mean training gradient by autograd, put into a copy of the model in
    place of its weights, comes out of `projected_weights` as the mean of the index's rows."""
    import copy
    from types import SimpleNamespace

    from attribution import IndexConfig, ProjectionConfig, build_index
    from benchmarks.accuracy.damping_rules import projected_weights
    from tests.attribution.tiny import classification_loss, mlp_batches, tiny_mlp
    from tests.tolerance import assert_close_f32

    model, batches = tiny_mlp(), mlp_batches()
    config = IndexConfig(
        projection=ProjectionConfig(kind="random", k_in=3, k_out=2, seed=7),
        fisher_labels="data", curvature_labels="data",
    )  # fmt: skip
    index = build_index(model, classification_loss, batches, tmp_path, config, show_progress=False)
    built = SimpleNamespace(index=index)
    rows = index.dense().numpy().astype(np.float64)

    model.zero_grad()
    n = sum(len(b.inputs[1]) for b in batches)
    sum(classification_loss(model, b).sum() for b in batches).div(n).backward()
    as_gradient = copy.deepcopy(model)
    with torch.no_grad():
        for m, g in zip(as_gradient.modules(), model.modules(), strict=True):
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(g.weight.grad)
    expected = projected_weights(as_gradient, built)
    for s, e in zip(index.curvature.slices, expected, strict=True):
        mean = rows[:, s.start : s.stop].mean(0)
        # Rows are stored in float32: each value off by a rounding of its own, n of them summed.
        scale = np.abs(rows[:, s.start : s.stop]).mean(0)
        assert_close_f32(mean, e, n, scale=scale, what=s.name)
    # A change since a start is the difference of the two projections.
    start = tiny_mlp(seed=1)
    pairs = zip(projected_weights(model, built), projected_weights(start, built), strict=True)
    for (w, w0), d in zip(pairs, projected_weights(model, built, start), strict=True):
        np.testing.assert_allclose(d, w - w0, rtol=1e-12, atol=1e-12)
