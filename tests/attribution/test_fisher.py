"""Labels drawn from the model (the true Fisher's first pass), and how a build uses them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.stats
import torch

from attribution import IndexConfig, ProjectionConfig, build_index
from attribution.fisher import sample_targets, sampled_cross_entropy
from attribution.index import CurvatureSample
from attribution.lm import IGNORE_INDEX, lm_fisher_loss, lm_loss
from attribution.projection import seeded_sampling
from tests.attribution.tiny import (
    classification_fisher_loss,
    classification_loss,
    lm_batches,
    mlp_batches,
    tiny_gpt2,
    tiny_mlp,
)
from tests.tolerance import assert_close_f64, float64_tol


def test_sampled_targets_follow_the_softmax() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    torch.manual_seed(0)
    draws = sample_targets(logits.expand(20_000, -1, -1))  # (draws, 2)
    expected = torch.softmax(logits, -1).numpy()
    for row in range(2):
        freq = np.bincount(draws[:, row].numpy(), minlength=3) / draws.shape[0]
        # 20,000 draws: the standard error of each frequency is below 0.004.
        np.testing.assert_allclose(freq, expected[row], atol=0.015)


def test_sampled_cross_entropy_is_the_loss_of_the_drawn_labels() -> None:
    logits = torch.randn(6, 4, dtype=torch.float64)
    with seeded_sampling(3):
        loss = sampled_cross_entropy(logits)
    with seeded_sampling(3):
        labels = sample_targets(logits)
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="batch, classes"):
        sampled_cross_entropy(torch.randn(2, 3, 4))


def test_lm_fisher_loss_draws_only_counted_positions() -> None:
    model, batch = tiny_gpt2(), lm_batches(n=4)[0]
    with seeded_sampling(0):
        sampled = lm_fisher_loss(model, batch)
    # Positions labelled -100 stay out: an example's sampled loss is a sum over exactly the
    # positions its data loss counts, each a finite positive NLL.
    counted = (batch.inputs["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    assert sampled.shape == lm_loss(model, batch).shape == (len(batch),)
    assert torch.isfinite(sampled).all() and (sampled > 0).all()
    assert (counted > 0).all()
    # An example with no counted position has no sampled loss at all.
    labels = batch.inputs["labels"].clone()
    labels[0] = IGNORE_INDEX
    silent = dataclasses.replace(batch, inputs={**batch.inputs, "labels": labels})
    with seeded_sampling(0):
        assert lm_fisher_loss(model, silent)[0] == 0
    # Drawing again with another seed gives other labels, and so another loss.
    with seeded_sampling(1):
        other = lm_fisher_loss(model, batch)
    assert not torch.allclose(sampled, other)


def test_seeded_sampling_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    with seeded_sampling(7):
        torch.rand(100)
    torch.testing.assert_close(torch.rand(3), expected)


def test_sampled_labels_need_a_fisher_loss_and_data_labels_do_not(tmp_path) -> None:
    batches = mlp_batches(n=10)
    cfg = IndexConfig(projection=ProjectionConfig(kind="random", k_in=2, k_out=2))
    with pytest.raises(ValueError, match="fisher_loss"):
        build_index(tiny_mlp(), classification_loss, batches, tmp_path / "a", cfg,
                    show_progress=False)  # fmt: skip
    assert not (tmp_path / "a" / "build.json").exists()  # nothing recorded as started
    data = IndexConfig(projection=cfg.projection, fisher_labels="data")
    index = build_index(tiny_mlp(), classification_loss, batches, tmp_path / "b", data,
                        show_progress=False)  # fmt: skip
    assert index.rows == 10 and index.manifest["config"]["fisher_labels"] == "data"


def test_sampled_and_data_labels_give_other_curvature_but_the_same_gradients(tmp_path) -> None:
    batches = mlp_batches(n=20)
    model = tiny_mlp()
    built = {}
    for labels in ("sampled", "data"):
        cfg = IndexConfig(projection=ProjectionConfig(kind="random", k_in=3, k_out=3),
                          fisher_labels=labels)  # fmt: skip
        built[labels] = build_index(model, classification_loss, batches, tmp_path / labels, cfg,
                                    fisher_loss=classification_fisher_loss,
                                    show_progress=False)  # fmt: skip
    rows = {k: np.concatenate([a for _, a in v.blocks()]) for k, v in built.items()}
    np.testing.assert_array_equal(rows["sampled"], rows["data"])  # stored rows: data labels
    s_sampled = built["sampled"].factors()[-1].s
    s_data = built["data"].factors()[-1].s
    assert not torch.allclose(s_sampled, s_data)
    # Activations do not depend on labels: the A factors agree.
    torch.testing.assert_close(built["sampled"].factors()[0].a, built["data"].factors()[0].a)
    assert built["sampled"].id != built["data"].id


def test_pca_refuses_raw_factors_that_would_not_fit_in_memory(tmp_path, monkeypatch) -> None:
    import attribution.index as index_module

    # The two layers' raw factors take (5² + 7² + 7² + 3²) × 8 = 1,056 bytes.
    monkeypatch.setattr(index_module, "RAW_FACTOR_BYTES_LIMIT", 1000)
    cfg = IndexConfig(projection=ProjectionConfig(kind="pca", k_in=2, k_out=2))
    with pytest.raises(ValueError, match=r"widest layer is '0' \(5 → 7\)"):
        build_index(tiny_mlp(), classification_loss, mlp_batches(n=10), tmp_path, cfg,
                    fisher_loss=classification_fisher_loss, show_progress=False)  # fmt: skip
    # Random projections accumulate k × k factors only: the same limit does not apply.
    random = IndexConfig(projection=ProjectionConfig(kind="random", k_in=2, k_out=2))
    index = build_index(tiny_mlp(), classification_loss, mlp_batches(n=10), tmp_path / "r",
                        random, fisher_loss=classification_fisher_loss, show_progress=False)  # fmt: skip
    assert index.rows == 10


def test_the_memory_guard_counts_the_heads_vocabulary_side_only_under_pca(
    tmp_path, monkeypatch
) -> None:
    import attribution.index as index_module

    # Tiny GPT-2: raw factors of the 8 block layers take 2 × 2,944 values, the head's input
    # side 8² and its vocabulary side 17²: 47,616 bytes without that side, 49,928 with it.
    monkeypatch.setattr(index_module, "RAW_FACTOR_BYTES_LIMIT", 48_000)
    batches = lm_batches()
    for head, ok in (("random", True), ("pca", False)):
        cfg = IndexConfig(projection=ProjectionConfig(kind="pca", k_in=2, k_out=2,
                                                      head_projection=head))  # fmt: skip
        run = lambda cfg=cfg, head=head: build_index(  # noqa: E731
            tiny_gpt2(), lm_loss, batches, tmp_path / head, cfg, fisher_loss=lm_fisher_loss,
            show_progress=False,
        )  # fmt: skip
        if ok:
            assert run().layer_names[-1] == "lm_head"
        else:
            with pytest.raises(ValueError, match="pca projections need the raw KFAC factors"):
                run()


def test_curvature_from_sampled_labels_is_seeded_per_draw_and_keeps_the_stored_rows(
    tmp_path,
) -> None:
    batches = mlp_batches(n=20)
    model = tiny_mlp()
    built = {}
    for label, labels, draws in (("data", "data", 1), ("s1", "sampled", 1),
                                 ("s1-again", "sampled", 1), ("s3", "sampled", 3)):  # fmt: skip
        cfg = IndexConfig(projection=ProjectionConfig(kind="random", k_in=3, k_out=3),
                          curvature_labels=labels, curvature_draws=draws)  # fmt: skip
        built[label] = build_index(model, classification_loss, batches, tmp_path / label, cfg,
                                   fisher_loss=classification_fisher_loss,
                                   show_progress=False)  # fmt: skip
    rows = {k: np.concatenate([a for _, a in v.blocks()]) for k, v in built.items()}
    for k in rows:
        np.testing.assert_array_equal(rows[k], rows["data"])  # stored rows: training labels
    eig = {k: np.concatenate([c.eigvals for c in v.curvature.layers]) for k, v in built.items()}
    np.testing.assert_array_equal(eig["s1"], eig["s1-again"])  # seeded
    assert not np.allclose(eig["s1"], eig["data"])
    assert not np.allclose(eig["s1"], eig["s3"])
    assert built["s1"].manifest["config"]["curvature_labels"] == "sampled"
    assert built["s3"].manifest["config"]["curvature_draws"] == 3
    # Same eigenbasis (from the first pass) whatever the curvature labels.
    for a, b in zip(built["data"].curvature.layers, built["s3"].curvature.layers, strict=True):
        np.testing.assert_array_equal(a.q_out, b.q_out)


def test_curvature_from_sampled_labels_needs_a_fisher_loss_and_positive_draws(tmp_path) -> None:
    batches = mlp_batches(n=10)
    projection = ProjectionConfig(kind="random", k_in=2, k_out=2)
    cfg = IndexConfig(projection=projection, fisher_labels="data", curvature_labels="sampled")
    with pytest.raises(ValueError, match="curvature_labels='sampled' needs fisher_loss"):
        build_index(tiny_mlp(), classification_loss, batches, tmp_path / "a", cfg,
                    show_progress=False)  # fmt: skip
    cfg = dataclasses.replace(cfg, curvature_draws=0)
    with pytest.raises(ValueError, match="curvature_draws must be positive"):
        build_index(tiny_mlp(), classification_loss, batches, tmp_path / "b", cfg,
                    fisher_loss=classification_fisher_loss, show_progress=False)  # fmt: skip
    cfg = dataclasses.replace(cfg, curvature_draws=1, curvature_examples=0)
    with pytest.raises(ValueError, match="curvature_examples must be positive or None"):
        build_index(tiny_mlp(), classification_loss, batches, tmp_path / "c", cfg,
                    fisher_loss=classification_fisher_loss, show_progress=False)  # fmt: skip
    cfg = dataclasses.replace(cfg, curvature_examples=4, curvature_prior_examples=-1)
    with pytest.raises(ValueError, match="curvature_prior_examples must be 0 or positive"):
        build_index(tiny_mlp(), classification_loss, batches, tmp_path / "d", cfg,
                    fisher_loss=classification_fisher_loss, show_progress=False)  # fmt: skip
    assert not any((tmp_path / d).exists() for d in "abcd")


@pytest.mark.parametrize(
    "sizes, cap",
    [
        ([8] * 100, 200),  # a quarter of equal batches
        ([8] * 100, 8),  # one batch
        ([8] * 100, 3),  # less than a batch still takes one
        ([3, 16, 1, 7, 16, 16, 2, 9] * 40, 500),  # uneven batches
        ([5] * 10, 50),  # cap = total: everything
        ([5] * 10, 10**6),
        ([5] * 10, None),
    ],
)
def test_the_curvature_sample_takes_about_cap_examples_spread_over_the_data(sizes, cap) -> None:
    total = sum(sizes)
    sample = CurvatureSample(total, cap)
    taken = [sample.take(n) for n in sizes]
    kept = [n for n, t in zip(sizes, taken, strict=True) if t]
    if cap is None or cap >= total:
        assert all(taken)
        return
    assert kept, "never none"
    assert abs(sum(kept) - max(cap, kept[0])) <= max(sizes) / 2 + 1e-9
    assert sample.taken == sum(kept)
    # Spread: every tenth of the data (by position) holds about a tenth of what is kept.
    if sum(kept) >= 10 * max(sizes):
        ends = np.cumsum(sizes)
        for tenth in range(10):
            inside = (ends > total * tenth / 10) & (ends <= total * (tenth + 1) / 10)
            share = sum(n for n, t, i in zip(sizes, taken, inside, strict=True) if t and i)
            assert abs(share - sum(kept) / 10) <= 2 * max(sizes)
    # The same sizes give the same choice (resumed and repeated passes agree).
    again = CurvatureSample(total, cap)
    assert [again.take(n) for n in sizes] == taken


def test_a_capped_curvature_pass_fits_on_fewer_examples_and_is_recorded(tmp_path) -> None:
    batches = mlp_batches(n=40, batch_size=4)
    model = tiny_mlp()
    built = {}
    for label, cap in (("all", None), ("cap", 12), ("above", 1000)):
        cfg = IndexConfig(projection=ProjectionConfig(kind="random", k_in=3, k_out=3),
                          curvature_labels="sampled", curvature_examples=cap)  # fmt: skip
        built[label] = build_index(model, classification_loss, batches, tmp_path / label, cfg,
                                   fisher_loss=classification_fisher_loss,
                                   show_progress=False)  # fmt: skip
    used = {k: v.manifest["curvature_examples_used"] for k, v in built.items()}
    assert used == {"all": 40, "cap": 12, "above": 40}
    assert {k: v.rows for k, v in built.items()} == {"all": 40, "cap": 40, "above": 40}
    eig = {k: np.concatenate([c.eigvals for c in v.curvature.layers]) for k, v in built.items()}
    np.testing.assert_array_equal(eig["all"], eig["above"])
    assert not np.allclose(eig["all"], eig["cap"])
    assert built["cap"].manifest["config"]["curvature_examples"] == 12
    assert built["cap"].manifest["config"]["curvature_prior_examples"] == 0  # not a language model


def test_sampled_eigenvalues_shrink_toward_kfac_keeping_the_trace_and_the_damping() -> None:
    """`shrink_to_kfac`: (m·ê + m0·c·κ)/(m + m0) per coordinate, κ from the factors in the
    EKFAC basis, c matching the traces; m0 = 0 changes nothing; a huge m0 gives c·κ."""
    from attribution.curvature import LayerSlice, fit_curvature, kfac_bases, shrink_to_kfac
    from attribution.projection import KfacFactors

    rng = np.random.default_rng(5)
    x, d = rng.normal(size=(30, 3)), rng.normal(size=(30, 2)) * [3.0, 0.2]
    factors = [KfacFactors("l", torch.tensor(x.T @ x), torch.tensor(d.T @ d), 30)]
    rows = rng.normal(size=(7, 6)) * np.linspace(2, 0.1, 6)
    slices = [LayerSlice("l", 0, 6, (2, 3))]
    fitted = fit_curvature(lambda: [rows], slices, 0.1, "ekfac", bases=kfac_bases(factors))
    (layer,) = fitted.layers
    kappa = np.kron(np.linalg.eigvalsh(d.T @ d), np.linalg.eigvalsh(x.T @ x))  # ascending bases
    c = layer.eigvals.sum() / kappa.sum()
    (shrunk,) = shrink_to_kfac(fitted, factors, 7, 21).layers
    # float64 throughout; κ from a 6 × 6 Kronecker product rotated into the basis: 36 terms.
    expected = (7 * layer.eigvals + 21 * c * kappa) / 28
    assert_close_f64(shrunk.eigvals, expected, 36, what="shrunk eigenvalues")
    assert_close_f64(shrunk.eigvals.sum(), layer.eigvals.sum(), 36, what="trace")
    assert shrunk.damping == layer.damping
    assert shrink_to_kfac(fitted, factors, 7, 0) is fitted
    (prior,) = shrink_to_kfac(fitted, factors, 7, 10**12).layers
    # A huge m0 leaves m/(m + m0) = 7e-12 of the sample's eigenvalues: the formula, within
    # float64 precision, and c·κ within that weight.
    huge = (7 * layer.eigvals + 10**12 * c * kappa) / (7 + 10**12)
    assert_close_f64(prior.eigvals, huge, 36, what="prior eigenvalues")
    gap = 7e-12 * np.abs(layer.eigvals - c * kappa).max()
    assert np.abs(prior.eigvals - c * kappa).max() <= gap + float64_tol(huge.max(), 36)


def test_sampled_targets_match_the_softmax_on_a_large_vocabulary() -> None:
    # A language model's case: thousands of classes, most of the mass on a few, some classes
    # impossible (probability 0, from -inf logits) and never drawn.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2048, generator=gen, dtype=torch.float32) * 3
    logits[0, ::7] = -float("inf")
    expected = torch.softmax(logits.double(), -1)[0].numpy()
    torch.manual_seed(1)
    n, chunk = 100_000, 10_000
    draws = np.concatenate(
        [sample_targets(logits.expand(chunk, -1)).numpy() for _ in range(n // chunk)]
    )
    assert draws.min() >= 0 and draws.max() < 2048
    counts = np.bincount(draws, minlength=2048)
    assert counts[::7].sum() == 0
    # Every class of probability ≥ 0.01 (9 here, 87% of the mass): each frequency within 5
    # binomial standard errors of its probability; a class drawn with a probability off by
    # 10% of its own is ≥ 3 standard errors out, which the chi-square over them catches.
    top = np.nonzero(expected >= 0.01)[0]
    assert len(top) >= 5
    se = np.sqrt(expected[top] * (1 - expected[top]) / n)
    freq = counts[top] / n
    assert np.all(np.abs(freq - expected[top]) < 5 * se)
    chi2 = float((((freq - expected[top]) / se) ** 2).sum())
    assert chi2 < scipy.stats.chi2.ppf(0.999, len(top))
