"""A damping chosen from a layer's own curvature spectrum (a prototype; not used by any index).

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


RULES = {"noise-floor": noise_floor_damping}
"""Damping rules by name, for the accuracy harness's comparison (benchmarks.accuracy.damping_grid)."""
