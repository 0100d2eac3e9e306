"""Ground truth by retraining: query losses of models trained on subsets, cached on disk.

Every retrain is keyed by (setting fingerprint, the sorted training rows, seed), so a rerun of
the harness, or a second experiment that needs the same model, trains nothing. The cache lives
in `benchmarks/accuracy/cache/` (gitignored).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.accuracy.settings import Setting

log = logging.getLogger(__name__)

CACHE_DIR = Path(__file__).parent / "cache"


class RetrainCache:
    """(rows, seed) → the retrained model's (2, n_queries) outputs: losses, predictions."""

    def __init__(self, setting: Setting, root: Path | None = CACHE_DIR) -> None:
        self.setting = setting
        self.path = (
            None if root is None else Path(root) / f"{setting.name}-{setting.fingerprint}.npz"
        )
        self.entries: dict[str, np.ndarray] = {}
        if self.path is not None and self.path.exists():
            with np.load(self.path) as data:
                self.entries = {k: data[k] for k in data.files}
        self.trained = 0
        self.seconds = 0.0
        self._dirty = 0

    def key(self, rows: np.ndarray, seed: int) -> str:
        h = hashlib.sha256(np.sort(np.asarray(rows, dtype=np.int64)).tobytes())
        h.update(f"seed={seed}".encode())
        return h.hexdigest()[:24]

    def outputs(self, rows: np.ndarray, seed: int) -> np.ndarray:
        """(2, n_queries) of the model trained on `rows` with `seed` (trained if not cached)."""
        k = self.key(rows, seed)
        if k not in self.entries:
            start = time.perf_counter()
            model = self.setting.train(np.asarray(rows), seed)
            self.entries[k] = self.setting.evaluate(model)
            self.seconds += time.perf_counter() - start
            self.trained += 1
            self._dirty += 1
            if self._dirty >= 10:
                self.save()
        return self.entries[k]

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, **self.entries)
        tmp.replace(self.path)
        self._dirty = 0


def lds_subsets(n_train: int, m: int, seed: int = 1234) -> np.ndarray:
    """(m, n_train) boolean masks of random halves of the training set."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n_train), dtype=bool)
    for j in range(m):
        masks[j, rng.choice(n_train, n_train // 2, replace=False)] = True
    return masks


def subset_losses(
    cache: RetrainCache, masks: np.ndarray, seeds: list[int], quiet: bool = False
) -> np.ndarray:
    """(m, n_queries): each subset's query losses, averaged over seeds."""
    out = np.zeros((masks.shape[0], cache.setting.n_queries))
    for j, mask in enumerate(masks):
        rows = np.nonzero(mask)[0]
        out[j] = np.mean([cache.outputs(rows, s)[0] for s in seeds], axis=0)
        if not quiet:
            log.info("%s: subset %d/%d", cache.setting.name, j + 1, masks.shape[0])
    cache.save()
    return out


def provider_removal(
    cache: RetrainCache, seeds: list[int]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(providers, (n_providers, n_queries) loss increase when each is removed, full losses).

    Increase = mean over seeds of loss(without p) − loss(all data), same seed for both.
    """
    providers = sorted(set(cache.setting.providers))
    all_rows = np.arange(cache.setting.n_train)
    full = np.mean([cache.outputs(all_rows, s)[0] for s in seeds], axis=0)
    rises = np.zeros((len(providers), cache.setting.n_queries))
    for p, name in enumerate(providers):
        rows = np.nonzero(cache.setting.providers != name)[0]
        rises[p] = np.mean([cache.outputs(rows, s)[0] for s in seeds], axis=0) - full
    cache.save()
    return providers, rises, full


def removal_outputs(cache: RetrainCache, removed: np.ndarray, seed: int = 0) -> np.ndarray:
    """(2, n_queries) after retraining without the `removed` rows."""
    keep = np.setdiff1d(np.arange(cache.setting.n_train), removed)
    return cache.outputs(keep, seed)


def set_threads() -> None:
    """One thread: tiny models are overhead-bound, and results stay reproducible."""
    torch.set_num_threads(1)
