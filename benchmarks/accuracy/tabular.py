"""Classifier settings on scikit-learn's bundled datasets, with several widths, depths and recipes.

Each is an MLP (or, on the digits' 8 × 8 images, a small CNN) trained full-batch (so a
retrain is a deterministic function of its rows and seed) by one of two recipes:

- "converged": SGD with momentum 0.9 and weight decay, enough steps that the training loss has
  flattened (the recipe under which the project's 0.01 damping factor was reported not to hold);
- "short": plain SGD, no momentum, no weight decay, few steps (an under-trained model, far from
  a minimum of the loss, where the Fisher is a poorer stand-in for the Hessian).

Providers are contiguous blocks along the training data's first principal component, with a
share (1 − `purity`) of each provider's examples reassigned at random, so providers hold
different regions of the input space and overlap a little. Features are standardised with the
whole dataset's mean and spread (fixed per setting, identical for every retrain).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from attribution import Batch

RECIPES = {
    "converged": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3, steps=1000),
    "short": dict(optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.0, steps=60),
}
"""Training recipes by name: full-batch steps of the named optimizer."""


@dataclass(frozen=True)
class Dataset:
    """A bundled scikit-learn dataset and the split the settings use of it."""

    loader: str
    """Name of the `sklearn.datasets` function (`load_digits`, `load_breast_cancer`, ...)."""
    n_train: int
    n_queries: int


DATASETS = {
    "digits": Dataset("load_digits", 400, 100),
    "cancer": Dataset("load_breast_cancer", 400, 100),
    "wine": Dataset("load_wine", 120, 58),
}


def _mlp(seed: int, widths: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


CNN = "cnn"
"""`hidden` of the convolutional model: the digits' 8 × 8 images through two 3 × 3
convolutions of 8 channels (the second of stride 2) and a Linear head."""


def _cnn(seed: int, n_classes: int) -> nn.Module:
    """Flat 64-pixel rows → (1, 8, 8) → conv 1→8 (pad 1) → tanh → conv 8→8 (stride 2, pad 1)
    → tanh → 128 → Linear to the classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, n_classes),
    )


def _batches(x, y, providers, prefix: str, shard: str, size: int = 64) -> list[Batch]:
    out = []
    for i in range(0, len(y), size):
        n = len(y[i : i + size])
        out.append(
            Batch(
                (x[i : i + size], y[i : i + size]),
                [f"{prefix}{j}" for j in range(i, i + n)],
                providers=list(providers[i : i + size]) if providers is not None else [],
                shards=[shard] * n,
                token_counts=[1] * n,
            )
        )
    return out


def classifier_setting(
    dataset: str,
    hidden: tuple[int, ...],
    recipe: str,
    n_providers: int = 4,
    purity: float = 0.75,
    seed: int = 0,
):
    """Setting "mlp-{dataset}-{widths}-{recipe}": an MLP with tanh hidden layers of `hidden`
    widths on a bundled dataset, trained by `RECIPES[recipe]`; with `hidden` = `CNN`,
    "cnn-digits-{recipe}", the convolutional model (`_cnn`) on the digits."""
    import sklearn.datasets

    from benchmarks.accuracy.settings import (
        Setting,
        classifier_outputs,
        full_batch_fit,
        mlp_fisher_loss,
        mlp_loss,
    )

    spec = DATASETS[dataset]
    train_recipe = RECIPES[recipe]
    x_all, y_all = getattr(sklearn.datasets, spec.loader)(return_X_y=True)
    x_all = (x_all - x_all.mean(0)) / np.where(x_all.std(0) > 0, x_all.std(0), 1.0)
    order = np.random.default_rng(seed).permutation(len(y_all))
    x_all = torch.tensor(x_all[order], dtype=torch.float32)
    y_all = torch.tensor(y_all[order], dtype=torch.long)
    n, m = spec.n_train, spec.n_queries
    if n + m > len(y_all):
        raise ValueError(f"{dataset}: {n} + {m} rows asked, {len(y_all)} in the dataset")
    x, y = x_all[:n], y_all[:n]
    xq, yq = x_all[n : n + m], y_all[n : n + m]
    n_classes = int(y_all.max()) + 1
    if hidden == CNN and x.shape[1] != 64:
        raise ValueError(f"the convolutional model takes 8 × 8 images, not {dataset}")
    widths = (x.shape[1], n_classes) if hidden == CNN else (x.shape[1], *hidden, n_classes)

    def model_of(run_seed: int) -> nn.Module:
        return _cnn(run_seed, n_classes) if hidden == CNN else _mlp(run_seed, widths)

    # Providers: blocks along the first principal component, partly shuffled.
    centred = x.numpy() - x.numpy().mean(0)
    pc1 = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
    block = np.empty(n, dtype=np.int64)
    block[np.argsort(pc1, kind="stable")] = np.arange(n) * n_providers // n
    rng = np.random.default_rng(seed + 1)
    rand = rng.integers(0, n_providers, n)
    codes = np.where(rng.random(n) < purity, block, rand)
    providers = np.array([f"provider{c}" for c in codes])

    if hidden == CNN:
        name = f"cnn-{dataset}-{recipe}"
    else:
        name = f"mlp-{dataset}-{'x'.join(map(str, hidden))}-{recipe}"
    record = dict(
        dataset=dataset, n_train=n, n_queries=m, widths=list(widths), recipe=recipe,
        **train_recipe, n_providers=n_providers, purity=purity, seed=seed,
    )  # fmt: skip
    if hidden == CNN:
        record["architecture"] = "conv 1→8 3×3 pad 1, tanh, conv 8→8 3×3 stride 2 pad 1, tanh"

    def train(rows: np.ndarray, run_seed: int) -> nn.Module:
        model = model_of(run_seed)
        opt = torch.optim.SGD(
            model.parameters(), lr=train_recipe["lr"], momentum=train_recipe["momentum"],
            weight_decay=train_recipe["weight_decay"],
        )  # fmt: skip
        return full_batch_fit(model, opt, x, y, rows, train_recipe["steps"])

    def evaluate(model: nn.Module) -> np.ndarray:
        return classifier_outputs(model, xq, yq)

    return Setting(
        name=name,
        task="classification",
        providers=providers,
        train_data=_batches(x, y, providers, "train", dataset),
        query_data=_batches(xq, yq, None, "query", dataset),
        train_loss=mlp_loss,
        query_loss=mlp_loss,
        fisher_loss=mlp_fisher_loss,
        train=train,
        evaluate=evaluate,
        recipe=record,
        initial=lambda: model_of(0),
        peer_train=[(x[i], y[i]) for i in range(n)],
        peer_queries=[(xq[i], yq[i]) for i in range(m)],
        collate=None,
    )


CLASSIFIERS = {
    "cancer": ("cancer", (32,), "converged"),
    "cancer-short": ("cancer", (32,), "short"),
    "wine": ("wine", (16,), "converged"),
    "wine-short": ("wine", (16,), "short"),
    "digits-deep": ("digits", (64, 64), "converged"),
    "digits-deep-short": ("digits", (64, 64), "short"),
    "digits-cnn": ("digits", CNN, "converged"),
    "digits-cnn-short": ("digits", CNN, "short"),
}
"""`SETTINGS` keys of the classifier settings: (dataset, hidden widths, recipe)."""
