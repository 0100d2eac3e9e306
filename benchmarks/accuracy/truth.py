"""A setting's cached ground truth, as the follow-up studies read it (run the harness first)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.accuracy.metrics import lds_per_query, provider_credit, provider_rho_per_query
from benchmarks.accuracy.plan import FULL
from benchmarks.accuracy.retrain import (
    CACHE_DIR,
    RetrainCache,
    lds_subsets,
    provider_removal,
    subset_losses,
)
from benchmarks.accuracy.settings import SETTINGS, Setting


@dataclass
class Truth:
    """One setting (built in `workdir`) with its full plan's LDS subsets, their retrained
    query losses, and the query-loss rises on removing each provider."""

    setting: Setting
    workdir: Path
    masks: np.ndarray
    losses: np.ndarray
    names: list[str]
    rises: np.ndarray

    def measure(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query: LDS of `scores`, and provider Spearman of their positive part."""
        credit = provider_credit(scores, self.setting.providers, self.names, positive=True)
        return (
            lds_per_query(scores, self.masks, self.losses),
            provider_rho_per_query(credit, self.rises),
        )


def cached_truth(name: str, quiet: bool = True) -> Truth:
    """The `SETTINGS` entry `name` and its ground truth (retrained where the cache lacks it)."""
    workdir = CACHE_DIR / "work"
    setting = SETTINGS[name](workdir)
    plan = FULL[setting.name]
    cache = RetrainCache(setting)
    masks = lds_subsets(setting.n_train, plan.lds_subsets)
    losses = subset_losses(cache, masks, list(plan.lds_seeds), quiet=quiet)
    names, rises, _ = provider_removal(cache, list(plan.provider_seeds))
    return Truth(setting, workdir, masks, losses, names, rises)
