"""Damping chosen from the data an index holds (prototypes, measured; not used by any index).

Four candidate rules, each compared with every fixed factor by `benchmarks.accuracy.damping_rules`:
`noise_floor_damping` (a layer's spectrum alone, below), `gap_factor` (one factor for all
layers, from the measured generalisation gap), `evidence_damping` (per layer, from the
spectrum and the norm of the layer's projected weights) and `stationarity_damping` (per layer,
from the training examples' mean gradient and how far the weights moved from the start).

The index damps each layer with λ_l = damping_factor × mean eigenvalue, one factor for every
model. `noise_floor_damping` instead chooses λ from the layer's EKFAC eigenvalues alone, under a
stated model of what the damping is for:

- The eigenvalues split into signal directions and a noise floor. The noise floor is every
  eigenvalue at most `spread` × the median eigenvalue (the median is taken as the floor's level,
  which presumes at least half the directions are floor); the rest are signal.
- A query's and a training example's gradient coordinates q_j, g_j along eigenvector j are
  independent, mean zero, with second moment e_j (what an EKFAC eigenvalue is).
- The influence wanted is Σ over signal directions of q_j g_j / e_j; the floor's directions
  carry estimation noise, not signal. The damped influence Σ_j q_j g_j / (e_j + λ) then has the
  expected squared error

      E(λ) = Σ_signal λ² / (e_j + λ)²  +  Σ_floor e_j² / (e_j + λ)²

  (bias on the signal, which λ shrinks; noise from the floor, which λ suppresses), and the rule
  returns its minimiser over λ > 0.

For r signal eigenvalues s and m floor eigenvalues σ² with σ² ≪ λ ≪ s, E ≈ r λ²/s² + m σ⁴/λ²,
minimised at λ = σ √s (m / r)^(1/4): the geometric mean of the floor and the signal, moved up
as the floor outnumbers the signal. The rule is scale-equivariant (eigenvalues × c gives λ × c),
so it sees only the spectrum's shape, never its scale.
"""

from __future__ import annotations

import numpy as np

DEFAULT_SPREAD = 10.0
"""Eigenvalues up to this multiple of the median count as the noise floor."""

_GRID = 801
"""Points of each round of the log-spaced search for λ. The first round spans the positive
eigenvalues widened by 1e6 either way; each next round spans the two steps around the previous
round's best, so four rounds resolve log λ to (span / 800) / 400³, below 1e-8 for any span
under e^800."""


def expected_error(eigvals: np.ndarray, signal: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """E(λ) of the module's model for each λ in `lam`; `signal` marks the signal directions."""
    e = np.asarray(eigvals, dtype=np.float64)[None, :]
    lam = np.asarray(lam, dtype=np.float64)[:, None]
    bias = np.where(signal[None, :], (lam / (e + lam)) ** 2, 0.0)
    noise = np.where(signal[None, :], 0.0, (e / (e + lam)) ** 2)
    return (bias + noise).sum(axis=1)


def noise_floor_damping(eigvals: np.ndarray, spread: float = DEFAULT_SPREAD) -> float:
    """λ for one layer from its eigenvalues (negative ones, rounding, count as zero).

    A layer whose eigenvalues are all zero gets 1.0, as `Curvature.with_damping` gives it. A
    layer with no signal direction (a flat spectrum) gets its largest eigenvalue × 1e6: the
    damping then dominates every direction, so scores are gradient dot products over λ.
    """
    e = np.maximum(np.asarray(eigvals, dtype=np.float64).ravel(), 0.0)
    if e.size == 0 or e.max() <= 0:
        return 1.0
    floor = float(np.median(e))
    signal = e > spread * floor
    if not signal.any():
        return float(e.max()) * 1e6
    positive = e[e > 0]
    low, high = np.log(positive.min()) - np.log(1e6), np.log(e.max()) + np.log(1e6)
    for _ in range(4):
        grid = np.linspace(low, high, _GRID)
        best = int(np.argmin(expected_error(e, signal, np.exp(grid))))
        low, high = grid[max(best - 1, 0)], grid[min(best + 1, _GRID - 1)]
    return float(np.exp(grid[best]))


def effective_dimension(layers: list[np.ndarray], factor: float) -> float:
    """γ(f) = Σ_l Σ_j e_lj / (e_lj + f × mean_j e_lj): the directions the damped inverse still
    resolves, summed over layers, when every layer is damped with the same factor f."""
    total = 0.0
    for eigvals in layers:
        e = np.maximum(np.asarray(eigvals, np.float64).ravel(), 0.0)
        mean = e.sum() / e.size if e.size else 0.0
        if mean > 0:
            total += float((e / (e + factor * mean)).sum())
    return total


def gap_factor(layers: list[np.ndarray], n: int, gap: float, low=1e-6, high=1e6) -> float:
    """The damping factor whose predicted generalisation gap equals the measured one.

    Removing training example i from a mean loss over n examples raises its own loss by about
    g_iᵀ (F + λ)⁻¹ g_i / n; averaged over the examples that is γ(f) / n, since the mean of
    (Vᵀ g)_j² is e_j (`effective_dimension`). A held-out example behaves like a removed one, so
    the mean held-out loss minus the mean training loss estimates the same quantity
    (Takeuchi's information criterion, read backwards): f solves γ(f) = n × gap. γ falls from
    the layers' dimension to 0 as f grows, so the root is unique; a gap at or below 0 returns
    `high` (no curvature is trusted), one above γ(low) / n returns `low`.
    """
    target = n * gap
    if target <= effective_dimension(layers, high):
        return float(high)
    if target >= effective_dimension(layers, low):
        return float(low)
    lo, hi = np.log(low), np.log(high)
    for _ in range(200):  # bisection on log f: γ is decreasing in f
        mid = 0.5 * (lo + hi)
        if effective_dimension(layers, float(np.exp(mid))) > target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def evidence_damping(eigvals: np.ndarray, weight_sq: float, n: int) -> float:
    """λ of one layer that maximises the Laplace evidence of a Gaussian prior on its weights.

    With likelihood curvature n F (F = V diag(e) Vᵀ, the mean over n examples) and a prior
    N(0, α⁻¹ I) on the layer's (projected) weights w, MacKay's fixed point is
    α = γ / ‖w‖², γ = Σ_j n e_j / (n e_j + α); the index's damping is λ = α / n, so
    λ = Σ_j e_j / (e_j + λ) / (n ‖w‖²). The right side falls as λ grows and the left rises,
    so the fixed point is unique; it is found by bisection on log λ.
    """
    e = np.maximum(np.asarray(eigvals, np.float64).ravel(), 0.0)
    if weight_sq <= 0 or e.max(initial=0.0) <= 0:
        return 1.0

    def excess(lam: float) -> float:
        return lam - float((e / (e + lam)).sum()) / (n * weight_sq)

    lo, hi = np.log(e.max()) - 60.0, np.log(e.size / (n * weight_sq)) + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if excess(float(np.exp(mid))) < 0:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def stationarity_damping(mean_grad: np.ndarray, moved: np.ndarray) -> float:
    """λ of one layer for which the trained weights are stationary under a proximal pull to
    the weights training started from: the least-squares δ in ḡ ≈ −δ (w_T − w_0).

    `mean_grad` is ḡ, the mean over the training examples of their (projected) gradients at
    the trained weights w_T; `moved` is w_T − w_0, projected the same way. The damped inverse
    (F + λ I)⁻¹ is the exact response of the minimiser of L(w) + (λ/2) ‖w − w_0‖² to a change
    of the data, and that minimiser satisfies ḡ = −λ (w_T − w_0). Training stopped before
    convergence looks like it: gradient descent from w_0 (any steps, learning rates or heavy-
    ball momentum) on a quadratic with curvature h leaves the fraction p = p(h) of the distance
    to the optimum, so ḡ_j = −h p / (1 − p) · (w_T − w_0)_j, and the response of w_T to a
    constant change c of the gradient is −(1 − p) / h · c = −c / (h + h p / (1 − p)): the damped
    inverse with λ = h p / (1 − p). Weight decay in the recipe adds its own pull toward 0,
    which this reads as a proximal one. Directions the weights did not move in carry no
    information, so the fit weights each by its squared displacement.

    Returns 0.0 where the fit is negative (the gradient points along the motion: no pull back
    to measure); a caller floors it. Raises ValueError when the weights did not move.
    """
    g = np.asarray(mean_grad, np.float64).ravel()
    d = np.asarray(moved, np.float64).ravel()
    if g.shape != d.shape:
        raise ValueError(f"mean gradient has {g.size} values, displacement {d.size}")
    dd = float(d @ d)
    if not dd > 0:
        raise ValueError("the weights did not move from the start: no damping to read")
    return max(-float(g @ d) / dd, 0.0)


RULES = {"noise-floor": noise_floor_damping}
"""Damping rules by name, for the accuracy harness's comparison (benchmarks.accuracy.damping_grid)."""
