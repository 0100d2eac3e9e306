"""The spectrum-based damping rule (attribution/damping.py) on synthetic spectra."""

from __future__ import annotations

import numpy as np
import pytest

from attribution.damping import (
    effective_dimension,
    evidence_damping,
    expected_error,
    gap_factor,
    noise_floor_damping,
    stationarity_damping,
)

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


def test_gap_factor_on_flat_spectra_has_its_closed_form() -> None:
    """Equal eigenvalues: γ(f) = Σ_l d_l / (1 + f), so f = Σ d_l / (n × gap) − 1, whatever each
    layer's scale (the factor is relative to each layer's mean eigenvalue)."""
    layers = [np.full(64, 3.0), np.full(16, 2e-5)]
    n, gap = 400, 0.02
    f = gap_factor(layers, n, gap)
    assert f == pytest.approx(80 / (n * gap) - 1, rel=1e-9)
    rescaled = [layers[0] * 1e4, layers[1]]
    assert gap_factor(rescaled, n, gap) == pytest.approx(f, rel=1e-9)
    # The predicted gap at the factor found is the measured one.
    assert effective_dimension(layers, f) / n == pytest.approx(gap, rel=1e-9)
    # No gap (an under-trained model): trust no curvature; a gap no damping can reach: the least.
    assert gap_factor(layers, n, 0.0) == 1e6 and gap_factor(layers, n, -0.1) == 1e6
    assert gap_factor(layers, n, 1.0) == 1e-6


def test_gap_factor_matches_a_dense_search_on_a_spread_spectrum() -> None:
    rng = np.random.default_rng(1)
    layers = [10 ** rng.uniform(-4, 1, 300), 10 ** rng.uniform(-7, -2, 50)]
    n, gap = 500, 0.05
    f = gap_factor(layers, n, gap)
    grid = np.logspace(-6, 6, 200_001)
    gammas = np.array([effective_dimension(layers, g) for g in grid[::100]])
    coarse = grid[::100][np.argmin(np.abs(gammas - n * gap))]
    # The grid's spacing is 10^(12/2000) ≈ 1.4% per step; the rule is the exact root.
    assert abs(np.log(f / coarse)) <= np.log(10) * 12 / 2000


def test_evidence_damping_maximises_the_laplace_evidence() -> None:
    """Against the log evidence of the Gaussian prior N(0, α⁻¹ I) evaluated on a dense grid of α
    (up to constants: d/2 log α − 1/2 Σ log(n e_j + α) − α ‖w‖² / 2), independently of the
    rule's fixed point; λ = α / n."""
    rng = np.random.default_rng(2)
    e = 10 ** rng.uniform(-6, -2, 200)
    n, w2 = 400, 35.0
    lam = evidence_damping(e, w2, n)
    alphas = np.logspace(-8, 8, 320_001)
    # Evaluated in chunks (320,001 × 200 at once would be 0.5 GB).
    best, best_val = None, -np.inf
    for chunk in np.array_split(alphas, 64):
        val = (
            0.5 * e.size * np.log(chunk)
            - 0.5 * np.log(n * e[None, :] + chunk[:, None]).sum(1)
            - 0.5 * chunk * w2
        )
        i = int(np.argmax(val))
        if val[i] > best_val:
            best, best_val = chunk[i], val[i]
    # The grid's spacing is 10^(16/320000): the rule is within one step of the grid's best.
    assert abs(np.log(lam * n / best)) <= np.log(10) * 16 / 320_000 * 1.01
    # Flat spectrum: λ (e + λ) = d e / (n ‖w‖²), solved in closed form.
    flat = np.full(50, 1e-3)
    closed = (-1e-3 + np.sqrt(1e-6 + 4 * 50 * 1e-3 / (n * w2))) / 2
    assert evidence_damping(flat, w2, n) == pytest.approx(closed, rel=1e-9)
    # Larger weights mean a looser prior, so less damping.
    assert evidence_damping(e, 4 * w2, n) < lam


# Float64 arithmetic on O(1) values over at most a few hundred steps: rounding stays near 1e-13
# relative; 1e-9 leaves room for any CPU and still fails on a 1e-6 relative error.
STATIONARY_RTOL = 1e-9


def test_stationarity_damping_recovers_the_proximal_strength_exactly() -> None:
    """Weights that minimise ½ (w − w*)ᵀ H (w − w*) + (δ/2) ‖w − w_0‖², H anisotropic: their
    mean gradient H (w − w*) is −δ (w − w_0) exactly, so the rule returns δ."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(12, 12))
    h = a @ a.T / 12 + 0.01 * np.eye(12)
    w_star, w0 = rng.normal(size=12), rng.normal(size=12)
    for delta in (1e-3, 0.37, 25.0):
        w = np.linalg.solve(h + delta * np.eye(12), h @ w_star + delta * w0)
        got = stationarity_damping(h @ (w - w_star), w - w0)
        assert got == pytest.approx(delta, rel=STATIONARY_RTOL)
        # A gradient off by 1e-6 of itself moves the answer by as much: the tolerance sees it.
        off = stationarity_damping(h @ (w - w_star) * (1 + 1e-6), w - w0)
        assert off != pytest.approx(delta, rel=STATIONARY_RTOL)


def _heavy_ball(h: np.ndarray, w_star, w0, c, lrs, momentum: float) -> np.ndarray:
    """Gradient descent with heavy-ball momentum on ½ (w − w*)ᵀ H (w − w*) + cᵀ w."""
    w, v = w0.copy(), np.zeros_like(w0)
    for lr in lrs:
        v = momentum * v + h @ (w - w_star) + c
        w = w - lr * v
    return w


def test_stationarity_damping_is_the_response_of_stopped_gradient_descent() -> None:
    """Momentum and a decaying learning rate, stopped early on an isotropic quadratic (h I):
    the damped inverse with the rule's λ is the trained weights' exact response to a constant
    change c of the gradient, found here by training again with c added; the rule never sees
    the learning rates, the number of steps or the momentum."""
    rng = np.random.default_rng(4)
    dim, curv = 20, 0.8
    h = curv * np.eye(dim)
    w_star, w0, c = rng.normal(size=dim), rng.normal(size=dim), rng.normal(size=dim)
    lrs = 0.05 / (1 + 0.02 * np.arange(40))
    w = _heavy_ball(h, w_star, w0, np.zeros(dim), lrs, momentum=0.5)
    left = np.linalg.norm(w - w_star) / np.linalg.norm(w0 - w_star)
    assert 0.05 < left < 0.95  # stopped well short of the optimum, well past the start
    lam = stationarity_damping(h @ (w - w_star), w - w0)
    response = _heavy_ball(h, w_star, w0, c, lrs, momentum=0.5) - w
    np.testing.assert_allclose(response, -c / (curv + lam), rtol=STATIONARY_RTOL)


def test_stationarity_damping_weights_each_direction_by_its_displacement() -> None:
    """Plain gradient descent, T steps of rate η, on an anisotropic quadratic: direction j keeps
    p_j = (1 − η h_j)^T of its distance, so it alone would ask for λ_j = h_j p_j / (1 − p_j)
    (closed form); the rule is their mean weighted by the squared displacement."""
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    curv = 10 ** rng.uniform(-1.5, 0.5, 16)
    h = q @ np.diag(curv) @ q.T
    w_star, w0 = rng.normal(size=16), rng.normal(size=16)
    lr, steps = 0.1, 30
    w = _heavy_ball(h, w_star, w0, np.zeros(16), [lr] * steps, momentum=0.0)
    p = (1 - lr * curv) ** steps
    per_direction = curv * p / (1 - p)
    moved = q.T @ (w - w0)
    expected = float((moved**2 * per_direction).sum() / (moved**2).sum())
    lam = stationarity_damping(h @ (w - w_star), w - w0)
    assert lam == pytest.approx(expected, rel=STATIONARY_RTOL)
    assert per_direction.min() < lam < per_direction.max()


def test_stationarity_damping_degenerate_inputs() -> None:
    with pytest.raises(ValueError, match="did not move"):
        stationarity_damping(np.ones(4), np.zeros(4))
    with pytest.raises(ValueError, match="4 values, displacement 3"):
        stationarity_damping(np.ones(4), np.ones(3))
    # A gradient along the motion (still descending away from the start): nothing to read.
    assert stationarity_damping(np.ones(4), np.ones(4)) == 0.0
