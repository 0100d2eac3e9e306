"""The sampling design and its estimator (ledger.sampling), against a synthetic population whose
provider credits are known: no model, no database.

Coverage: with R repetitions the observed coverage of a 95% interval has standard error
sqrt(.95 · .05 / R) ≈ 0.49% at R = 2000, so the band 93–97% is about 4 standard errors
either side of 95%: a correct interval fails it with probability below 1e-4 per provider, while
an interval whose variance is off by a factor 1.3 (coverage about 92% or 97.5%) fails it.
Unbiasedness: the mean estimate over R repetitions is within 4 of its standard errors
(sd / sqrt(R)) of the true share; the ratio estimator's bias, O(1/n), is far below that.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ledger.sampling import (
    Z95,
    allocate_sample,
    draw_sample,
    estimate_shares,
    inclusion_probabilities,
    required_sample_size,
)

REPS = 2000
N, SAMPLE, PROVIDERS = 5000, 600, 4


def population(seed: int = 1) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Outputs with lognormal weights, served over three months whose provider mix differs;
    credits split each output's weight by a Dirichlet draw; 5% unattributed (no credit)."""
    rng = np.random.default_rng(seed)
    month = rng.integers(0, 3, N)
    weight = np.exp(rng.normal(0.0, 0.7, N))
    alpha = np.array([[4, 2, 1, 0.5], [1, 3, 2, 0.5], [0.5, 1, 3, 1]])[month]
    split = np.array([rng.dirichlet(a) for a in alpha])
    credits = split * weight[:, None]
    credits[rng.random(N) < 0.05] = 0.0
    return credits, weight, [f"2024-{7 + m:02d}" for m in month]


DESIGNS = {
    "uniform": lambda w, months: (np.ones_like(w), ["all"] * len(w)),
    "weighted": lambda w, months: (w, ["all"] * len(w)),
    "stratified": lambda w, months: (w, months),
}


@pytest.mark.parametrize("design", sorted(DESIGNS))
def test_95_percent_intervals_cover_the_true_share_and_the_estimate_is_unbiased(
    design: str,
) -> None:
    credits, weight, months = population()
    truth = credits.sum(axis=0) / credits.sum()  # the population's shares, summed directly
    sizes, strata = DESIGNS[design](weight, months)
    covered = np.zeros(PROVIDERS)
    shares = np.empty((REPS, PROVIDERS))
    for rep in range(REPS):
        drawn = draw_sample(sizes, strata, SAMPLE, seed=rep)
        taken = drawn.indices
        assert len(taken) == SAMPLE
        est = estimate_shares(credits[taken], drawn.probability[taken], drawn.stratum_of[taken])
        covered += np.abs(est.share - truth) <= est.half_width
        shares[rep] = est.share
    coverage = covered / REPS
    assert np.all((coverage >= 0.93) & (coverage <= 0.97)), coverage
    standard_error = shares.std(axis=0, ddof=1) / math.sqrt(REPS)
    assert np.all(np.abs(shares.mean(axis=0) - truth) <= 4 * standard_error)


def test_each_output_is_drawn_with_its_inclusion_probability() -> None:
    """Empirical inclusion frequencies over many seeds match π_i within 4.5 binomial standard
    errors, certainty outputs are always taken and outputs of size 0 never."""
    rng = np.random.default_rng(3)
    sizes = np.exp(rng.normal(0, 1.0, 60))
    sizes[:2] = [40.0, 25.0]  # certainty selections
    sizes[2] = 0.0
    strata = ["a"] * 30 + ["b"] * 30
    draws = 4000
    hits = np.zeros(60)
    for seed in range(draws):
        drawn = draw_sample(sizes, strata, 12, seed)
        hits += drawn.selected
    pi = drawn.probability
    assert pi[0] == pi[1] == 1.0 and pi[2] == 0.0 and hits[2] == 0 and hits[0] == draws
    se = np.sqrt(pi * (1 - pi) / draws)
    assert np.all(np.abs(hits / draws - pi) <= 4.5 * se + 1e-12)
    for h in (0, 1):  # Σ π_i in a stratum is its allocation
        assert math.isclose(pi[drawn.stratum_of == h].sum(), drawn.allocation[h], rel_tol=1e-12)


def test_the_same_seed_draws_the_same_sample_and_another_seed_another() -> None:
    sizes = np.arange(1.0, 201.0)
    a = draw_sample(sizes, ["x"] * 200, 20, seed=7)
    b = draw_sample(sizes, ["x"] * 200, 20, seed=7)
    c = draw_sample(sizes, ["x"] * 200, 20, seed=8)
    assert np.array_equal(a.selected, b.selected) and not np.array_equal(a.selected, c.selected)


def test_probabilities_are_capped_at_one_and_sum_to_the_sample_size() -> None:
    pi = inclusion_probabilities(np.array([100.0, 1, 1, 1, 1, 1, 0]), 3)
    assert pi[0] == 1.0 and pi[6] == 0.0
    assert np.allclose(pi[1:6], 2 / 5) and math.isclose(pi.sum(), 3)


def test_allocation_is_proportional_with_two_per_stratum() -> None:
    alloc = allocate_sample(10, [80.0, 15.0, 5.0], [100, 100, 100])
    assert sum(alloc) == 10 and min(alloc) >= 2 and alloc[0] > alloc[1] >= alloc[2]
    assert allocate_sample(5, [1.0, 1.0], [1, 100]) == [1, 4]  # a stratum of one output
    with pytest.raises(ValueError, match="too small"):
        allocate_sample(3, [1.0, 1.0], [10, 10])


def test_uniform_design_variance_is_the_textbook_simple_random_sampling_formula() -> None:
    """With equal π = n/N the variance is N²(1 − f)/n · s²_z / Ŷ² written out by hand."""
    rng = np.random.default_rng(5)
    y = rng.random((40, 3))
    pi = np.full(40, 40 / 400)
    est = estimate_shares(y, pi, np.zeros(40, dtype=int))
    total = y.sum() * 10
    r = y.sum(axis=0) * 10 / total
    z = (y - r[None, :] * y.sum(axis=1)[:, None]) / total
    by_hand = 400**2 * (1 - 0.1) / 40 * z.var(axis=0, ddof=1)
    assert np.allclose(est.variance, by_hand, rtol=1e-12)
    assert np.allclose(est.half_width, Z95 * np.sqrt(by_hand), rtol=1e-12)


def test_required_sample_size_reaches_the_asked_precision_in_simulation() -> None:
    """The planned n, drawn uniformly, gives a 95% half-width on the largest share close to
    the one asked for (within 15%: the plan is a first-order approximation)."""
    credits, weight, _ = population(2)
    ones = np.ones(N)
    n, p = required_sample_size(credits, ones, ones, 0.02, N)
    assert p == int(np.argmax(credits.sum(axis=0)))
    widths = []
    for seed in range(200):
        drawn = draw_sample(ones, ["all"] * N, n, seed)
        taken = drawn.indices
        widths.append(
            estimate_shares(credits[taken], drawn.probability[taken], np.zeros(n, int)).half_width[
                p
            ]
        )
    assert 0.85 * 0.02 <= float(np.mean(widths)) <= 1.15 * 0.02
