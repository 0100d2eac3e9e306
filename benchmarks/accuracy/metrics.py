"""Accuracy metrics: Spearman correlation, LDS, brittleness summaries, provider-level agreement.

Sign convention: scores are positive when a training example makes the query MORE likely (lowers
its loss), so predictions are correlated with the NEGATIVE loss of the retrained models.
"""

from __future__ import annotations

import numpy as np


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-d array, ties given their average rank (as scipy's default)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # Boundaries of runs of equal values; each run gets the mean of its positions.
    starts = np.r_[0, np.nonzero(np.diff(sorted_x))[0] + 1]
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-d arrays; nan when either is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def lds_per_query(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Linear datamodeling score of every query.

    scores (n_queries, n_train); masks (m, n_train) subset membership; losses (m, n_queries) the
    retrained models' query losses (averaged over seeds). Per query: Spearman across the m
    subsets between the summed scores of each subset's members and the negative loss.
    """
    predicted = masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64).T  # (m, n_q)
    return np.array([spearman(predicted[:, q], -losses[:, q]) for q in range(losses.shape[1])])


def mean_std(values: np.ndarray) -> dict:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()) if v.size else float("nan"),
            "std": float(v.std()) if v.size else float("nan"), "n": int(v.size)}  # fmt: skip


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean per-query difference a − b (queries where either is NaN left out) with its paired
    standard error."""
    d = (a - b)[~np.isnan(a - b)]
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))), "n": len(d)}


def provider_credit(scores: np.ndarray, providers: np.ndarray, names: list[str], positive: bool):
    """(n_queries, n_providers) Σ over each provider's rows of the scores (or their positive
    part), as `ScoreResult.signed` / `ScoreResult.positive` compute them."""
    s = np.maximum(scores, 0.0) if positive else scores
    return np.stack([s[:, providers == p].sum(axis=1) for p in names], axis=1)


def provider_agreement(credit: np.ndarray, rises: np.ndarray) -> dict:
    """Agreement of predicted provider credit with the measured loss rise on removal.

    credit (n_queries, n_providers); rises (n_providers, n_queries). Per query: Spearman across
    providers; top-1 hit when the most-credited provider is the one whose removal hurts most.
    """
    rho = provider_rho_per_query(credit, rises)
    hits = credit.argmax(axis=1) == rises.argmax(axis=0)
    return {"spearman": mean_std(rho), "top1": float(hits.mean())}


def provider_rho_per_query(credit: np.ndarray, rises: np.ndarray) -> np.ndarray:
    """(n_queries,) Spearman across providers between credit and the loss rise on removal."""
    return np.array([spearman(credit[q], rises[:, q]) for q in range(credit.shape[0])])


def split_half_agreement(first: np.ndarray, second: np.ndarray) -> dict:
    """How well ground truth from one half of the retraining seeds predicts the other half.

    first, second: (n_items, n_queries) outcomes (loss rises per provider, or losses per
    subset) averaged over disjoint halves of the seeds. Per query, Spearman across items; the
    mean over queries, and its Spearman-Brown step-up 2r/(1+r): the reliability expected of
    the full set of seeds. Scores that agree with the full-seed truth much less than this are
    limited by the method; near it, by the noise of retraining.
    """
    rho = np.array([spearman(first[:, q], second[:, q]) for q in range(first.shape[1])])
    r = float(np.nanmean(rho))
    return {"half": r, "full": 2 * r / (1 + r) if r > -1 else float("nan")}
