"""Probability samples of served outputs, and the estimates a statement makes from them.

The design (one per sampled attribution run) is stratified, without replacement, of fixed
size in every stratum:

- Each output i of stratum h has a size x_i: 1 for a uniform design, or the value of a field
  of the outputs file (its weight or revenue) for a design with probability proportional to
  size (PPS). Stratum h gets n_h of the n outputs to attribute, in proportion to its total
  size X_h (at least 2 where it has them, for its variance).
- First-order inclusion probabilities π_i = n_h x_i / X_h. An output whose π_i would exceed 1
  is taken with certainty (π_i = 1) and the rest of n_h is spread over the others in the same
  way, until no π_i exceeds 1. An output of size 0 is never taken (π_i = 0).
- Selection is randomised systematic PPS (Hartley and Rao 1962): the stratum's outputs in a
  random order, laid end to end on [0, n_h) as intervals of length π_i, are taken where the
  points u, u + 1, ..., u + n_h - 1 fall (u uniform on [0, 1)). Each output is so taken with
  probability exactly π_i, and exactly n_h are taken. With equal sizes this is simple random
  sampling without replacement. The random order and u come from one numpy generator seeded
  with the run's seed, strata in sorted order, so anyone holding the file and the seed draws
  the same sample again.

Estimation (a statement over a sampled period): with d_i = 1/π_i, each provider's value is
the Horvitz–Thompson total Ŷ_p = Σ_s d_i y_ip of its credits, and its share is the ratio
R̂_p = Ŷ_p / Ŷ, Ŷ = Σ_s d_i y_i (y_i = the output's total credit: its weight, or 0 when
unattributed). Outputs outside the period count as zero (domain estimation). The variance of
R̂_p is that of the HT total of the linearised values z_i = (y_ip − R̂_p y_i) / Ŷ, estimated
with Hájek's approximation for fixed-size high-entropy designs, which randomised systematic
sampling is (Berger 2004):

    V̂ = Σ_h n_h' / (n_h' − 1) Σ_{i ∈ s_h, π_i < 1} c_i (z_i / π_i − B̂_h)²,
    c_i = 1 − π_i,   B̂_h = Σ c_i z_i / π_i / Σ c_i,

where n_h' counts the stratum's selections that were not certain (certain ones add no
variance). With equal π this is exactly the unbiased variance estimator of simple random
sampling without replacement. The 95% interval is R̂_p ± 1.96 √V̂.

This module is numpy only; `ledger.samples` reads and writes the ledger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist

import numpy as np

Z95 = NormalDist().inv_cdf(0.975)
"""The normal quantile of a two-sided 95% interval (1.959963...)."""

MIN_PER_STRATUM = 2
"""Selections a stratum gets at least (where it has that many outputs): a variance needs two."""


@dataclass(frozen=True)
class Draw:
    """A drawn sample: per output of the population (in file order) its stratum, inclusion
    probability and whether it was taken; per stratum its population and sample counts."""

    strata: list[str]
    """Sorted stratum labels; `stratum_of[i]` indexes into it."""
    stratum_of: np.ndarray
    """int64 (N,): each output's stratum."""
    probability: np.ndarray
    """float64 (N,): each output's inclusion probability π_i."""
    selected: np.ndarray
    """bool (N,): taken into the sample."""
    allocation: list[int]
    """n_h per stratum (certain selections included)."""

    @property
    def indices(self) -> np.ndarray:
        """Positions (in file order) of the outputs taken."""
        return np.flatnonzero(self.selected)


def allocate_sample(n: int, totals: Sequence[float], counts: Sequence[int]) -> list[int]:
    """n_h per stratum: proportional to the stratum's total size `totals[h]` by largest
    remainder, at least min(2, count) each, never more than its `counts[h]` outputs of positive
    size. Raises ValueError when n is smaller than the minimum or larger than the population."""
    floor = [min(MIN_PER_STRATUM, c) for c in counts]
    if n < sum(floor):
        raise ValueError(
            f"a sample of {n} is too small for {len(counts)} strata "
            f"(each needs up to {MIN_PER_STRATUM}): at least {sum(floor)}"
        )
    if n > sum(counts):
        raise ValueError(f"a sample of {n} is larger than the {sum(counts)} outputs to draw from")
    alloc = list(floor)
    open_ = [h for h in range(len(counts)) if alloc[h] < counts[h]]
    left = n - sum(alloc)
    while left > 0:
        # Exact fractions, so the allocation does not depend on float rounding.
        weight = {h: Fraction(totals[h]) for h in open_}
        whole = sum(weight.values())
        quota = {h: left * weight[h] / whole for h in open_}
        extra = {h: min(int(quota[h]), counts[h] - alloc[h]) for h in open_}
        given = sum(extra.values())
        if given < left:
            order = sorted(open_, key=lambda h: (-(quota[h] - int(quota[h])), h))
            for h in order:
                if given == left:
                    break
                if alloc[h] + extra[h] < counts[h]:
                    extra[h] += 1
                    given += 1
        for h in open_:
            alloc[h] += extra[h]
        left -= given
        open_ = [h for h in open_ if alloc[h] < counts[h]]
    return alloc


def inclusion_probabilities(sizes: np.ndarray, n: int) -> np.ndarray:
    """π_i = n x_i / X with certainty selections (π_i = 1) where that would exceed 1.

    `sizes` (N,) non-negative; n ≤ number of positive sizes. Σ π_i = n."""
    pi = np.zeros(len(sizes), dtype=np.float64)
    certain = np.zeros(len(sizes), dtype=bool)
    positive = sizes > 0
    while True:
        rest = positive & ~certain
        m = n - int(certain.sum())
        total = math.fsum(sizes[rest].tolist())
        pi[rest] = m * sizes[rest] / total if m > 0 else 0.0
        over = rest & (pi >= 1.0)
        if not over.any():
            break
        certain |= over
    pi[certain] = 1.0
    return pi


def systematic(pi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Randomised systematic selection (bool (N,)) with inclusion probabilities `pi` (Σ π an
    integer): a random order, then points u + k on the cumulated probabilities."""
    chosen = np.zeros(len(pi), dtype=bool)
    certain = pi >= 1.0
    chosen[certain] = True
    rest = np.flatnonzero((pi > 0) & ~certain)
    order = rng.permutation(rest)
    u = rng.random()
    m = round(float(pi[rest].sum()))
    if m == 0 or len(order) == 0:
        return chosen
    cum = np.cumsum(pi[order])
    cum *= m / cum[-1]  # Σπ is m up to rounding; end the line exactly at m
    before = np.concatenate(([0.0], cum[:-1]))
    hit = np.floor(cum - u) > np.floor(before - u)
    chosen[order[hit]] = True
    return chosen


def draw_sample(sizes: np.ndarray, strata_labels: Sequence[str], n: int, seed: int) -> Draw:
    """Draw the stratified randomised systematic PPS sample of n outputs (module docstring).

    `sizes` (N,) float64 ≥ 0 (all ones: uniform); `strata_labels` (N,) one label per output."""
    sizes = np.asarray(sizes, dtype=np.float64)
    found, inverse = np.unique(np.asarray(strata_labels, dtype=str), return_inverse=True)
    labels = [str(label) for label in found]  # sorted by code point, as `sorted` sorts str
    stratum_of = inverse.astype(np.int64).reshape(-1)
    members = [np.flatnonzero(stratum_of == h) for h in range(len(labels))]
    totals = [math.fsum(sizes[idx].tolist()) for idx in members]
    counts = [int((sizes[idx] > 0).sum()) for idx in members]
    allocation = allocate_sample(n, totals, counts)
    rng = np.random.default_rng(seed)
    probability = np.zeros(len(sizes), dtype=np.float64)
    selected = np.zeros(len(sizes), dtype=bool)
    for h, idx in enumerate(members):
        pi = inclusion_probabilities(sizes[idx], allocation[h])
        probability[idx] = pi
        selected[idx] = systematic(pi, rng)
    return Draw(labels, stratum_of, probability, selected, allocation)


@dataclass(frozen=True)
class Estimate:
    """Per provider (columns of the credits given): HT value, ratio share and its 95% interval."""

    value: np.ndarray
    """Ŷ_p = Σ_s y_ip / π_i."""
    share: np.ndarray
    """R̂_p = Ŷ_p / Ŷ."""
    variance: np.ndarray
    """V̂(R̂_p)."""
    total: float
    """Ŷ."""
    outputs: float
    """Σ_s 1/π_i over the domain: the estimated number of outputs."""

    @property
    def half_width(self) -> np.ndarray:
        """Half-width of the 95% interval: 1.96 √V̂."""
        return Z95 * np.sqrt(self.variance)


def estimate_shares(
    credits: np.ndarray,
    probability: np.ndarray,
    stratum: np.ndarray,
    in_domain: np.ndarray | None = None,
) -> Estimate:
    """Estimate provider shares from a sample (module docstring).

    credits (n, P) float64: y_ip, the sampled outputs' credits per provider (a row of zeros for
    an unattributed output); probability (n,): π_i > 0; stratum (n,) int: the design stratum
    (strata of different designs must have different codes); in_domain (n,) bool: the output
    belongs to the period (others count as zero). Sums are `math.fsum` over sorted input, so the
    estimate does not depend on the order of the rows."""
    credits = np.asarray(credits, dtype=np.float64)
    probability = np.asarray(probability, dtype=np.float64)
    stratum = np.asarray(stratum)
    if in_domain is not None:
        credits = credits * np.asarray(in_domain, dtype=bool)[:, None]
    d = 1.0 / probability
    weighted = credits * d[:, None]
    value = np.array([_fsum(weighted[:, p]) for p in range(credits.shape[1])])
    y = credits.sum(axis=1)
    total = _fsum(y * d)
    share = value / total if total > 0 else np.zeros_like(value)
    z = (credits - share[None, :] * y[:, None]) / (total if total > 0 else 1.0)
    variance = np.zeros(credits.shape[1])
    random_part = probability < 1.0
    for h in np.unique(stratum[random_part]):
        rows = random_part & (stratum == h)
        k = int(rows.sum())
        if k < 2:
            continue  # one uncertain selection in a stratum: no within-stratum variance seen
        c = 1.0 - probability[rows]
        e = z[rows] / probability[rows][:, None]
        b = (c[:, None] * e).sum(axis=0) / c.sum()
        variance += k / (k - 1) * (c[:, None] * (e - b[None, :]) ** 2).sum(axis=0)
    domain = np.ones(len(d), bool) if in_domain is None else np.asarray(in_domain, bool)
    return Estimate(value, share, variance, total, _fsum(d[domain]))


def _fsum(values: np.ndarray) -> float:
    return math.fsum(np.sort(np.asarray(values, dtype=np.float64)).tolist())


def required_sample_size(
    credits: np.ndarray,
    sizes: np.ndarray,
    pilot_probability: np.ndarray,
    half_width: float,
    population: float,
) -> tuple[int, int]:
    """Outputs to attribute for a 95% half-width `half_width` on the share of the provider with
    the largest estimated share, from a pilot.

    For a PPS design with p_i = x_i / X (uniform: x_i = 1), V(R̂) ≈ (1/n) Σ z_i² / p_i − (fpc)
    with z_i = (y_ip − R y_i) / Y; the pilot estimates A = Σ_U z_i² / p_i by HT (its own
    inclusion probabilities, 1 for a pilot attributed in full). Then n₀ = (1.96² A) / h², and
    n = n₀ / (1 + n₀ / N) (finite population). Returns (n, column of the provider).
    credits (m, P), sizes (m,) the planned design's size measure, pilot_probability (m,)."""
    credits = np.asarray(credits, dtype=np.float64)
    d = 1.0 / np.asarray(pilot_probability, dtype=np.float64)
    est = estimate_shares(credits, pilot_probability, np.zeros(len(d), dtype=np.int64))
    p = int(np.argmax(est.share))
    y = credits.sum(axis=1)
    z = (credits[:, p] - est.share[p] * y) / est.total
    sizes = np.asarray(sizes, dtype=np.float64)
    size_total = _fsum(sizes * d)
    # Outputs of size 0 are never drawn; they carry no credit when the size is the weight.
    keep = sizes > 0
    a = _fsum(z[keep] ** 2 * size_total / sizes[keep] * d[keep])
    n0 = Z95**2 * a / half_width**2
    n = n0 / (1.0 + n0 / population) if population > 0 else n0
    return max(MIN_PER_STRATUM, math.ceil(n)), p
