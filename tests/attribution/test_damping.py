"""The spectrum-based damping rule (attribution/damping.py) on synthetic spectra."""

from __future__ import annotations

import numpy as np
import pytest

from attribution.damping import expected_error, noise_floor_damping

RESOLUTION = 1e-8
"""Relative resolution of the rule's search for λ (see `_GRID`)."""


def two_level(r: int, s: float, m: int, sigma2: float) -> np.ndarray:
    return np.r_[np.full(r, s), np.full(m, sigma2)]


def exact_two_level_optimum(r: int, s: float, m: int, sigma2: float) -> float:
    """The root of dE/dλ = 0 for r eigenvalues s and m eigenvalues σ² (s ≫ σ²), from its
    stationarity condition r s λ (σ² + λ)³ = m σ⁴ (s + λ)³ rewritten as the fixed point
    λ = σ √s (m / r)^(1/4) ((1 + λ/s) / (1 + σ²/λ))^(3/4), iterated to convergence."""
    lam0 = np.sqrt(sigma2 * s) * (m / r) ** 0.25
    lam = lam0
    for _ in range(100):
        lam = lam0 * ((1 + lam / s) / (1 + sigma2 / lam)) ** 0.75
    return float(lam)


@pytest.mark.parametrize(("r", "m"), [(4, 60), (10, 990), (1, 15)])
def test_two_level_spectrum_gets_its_analytic_optimum(r: int, m: int) -> None:
    s, sigma2 = 1e8, 1.0
    lam = noise_floor_damping(two_level(r, s, m, sigma2))
    exact = exact_two_level_optimum(r, s, m, sigma2)
    assert abs(lam / exact - 1) < 10 * RESOLUTION
    # The closed form σ √s (m/r)^(1/4) is off only by the factor ((1+λ/s)/(1+σ²/λ))^(3/4),
    # within (3/4)(λ/s + σ²/λ) of 1 to first order (×1.1 for the second-order terms).
    closed = np.sqrt(sigma2 * s) * (m / r) ** 0.25
    assert abs(lam / closed - 1) <= 1.1 * 0.75 * (lam / s + sigma2 / lam)
    # And the separation matters: a floor twice as populous moves λ up by 2^(1/4).
    assert noise_floor_damping(two_level(r, s, 2 * m, sigma2)) / lam == pytest.approx(
        2**0.25, rel=0.75 * (lam / s + sigma2 / lam) * 3
    )


def test_the_rule_minimises_the_expected_error_on_a_spread_spectrum() -> None:
    """On a spectrum with many levels, no λ of an independent dense grid does better."""
    rng = np.random.default_rng(0)
    e = np.r_[10 ** rng.uniform(2, 6, 30), 10 ** rng.uniform(-1, 0.5, 200)]
    lam = noise_floor_damping(e)
    signal = e > 10 * np.median(e)
    grid = np.geomspace(1e-4, 1e9, 20_001)
    errors = expected_error(e, signal, grid)
    at_rule = expected_error(e, signal, np.array([lam]))[0]
    # E is smooth in log λ: the grid's best is at most a step (ratio 1.0015) from the optimum,
    # so the rule's error is at most the grid's, up to float64 rounding of a 230-term sum.
    assert at_rule <= errors.min() * (1 + 1e-12)
    assert abs(np.log(lam / grid[np.argmin(errors)])) <= np.log(grid[1] / grid[0])


def test_the_rule_sees_the_spectrum_shape_not_its_scale_or_order() -> None:
    rng = np.random.default_rng(1)
    e = np.r_[10 ** rng.uniform(1, 4, 20), 10 ** rng.uniform(-2, 0, 100)]
    lam = noise_floor_damping(e)
    for scale in (1e-9, 1e-3, 1e5):
        assert noise_floor_damping(scale * e) / (scale * lam) == pytest.approx(1, abs=1e-6)
    assert noise_floor_damping(rng.permutation(e)) == pytest.approx(lam, rel=1e-12)


def test_degenerate_spectra() -> None:
    assert noise_floor_damping(np.zeros(16)) == 1.0
    assert noise_floor_damping(np.array([])) == 1.0
    # A flat spectrum has no signal direction: damping dominates everything.
    assert noise_floor_damping(np.full(8, 3.0)) == 3.0e6
    # Negative rounding noise counts as zero, not as a direction of negative curvature.
    e = two_level(4, 1e8, 60, 1.0)
    assert noise_floor_damping(np.r_[e, -1e-9]) == pytest.approx(
        noise_floor_damping(np.r_[e, 0.0]), rel=1e-12
    )
