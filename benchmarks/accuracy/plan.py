"""How much ground truth each setting gets: the full run and the `--quick` run."""

from __future__ import annotations

from dataclasses import dataclass

CLASSIFIER_NAMES = (
    "cancer-32-converged", "cancer-32-short", "wine-16-converged", "wine-16-short",
    "digits-64x64-converged", "digits-64x64-short",
)  # fmt: skip
"""The classifier settings of benchmarks/accuracy/tabular.py, without their "mlp-" prefix: 64
half-data subsets × 4 seeds and 8 provider-removal seeds each (about 300 retrains of under a
second on one thread)."""


@dataclass(frozen=True)
class Plan:
    """Sizes of the counterfactual experiments of one setting."""

    lds_subsets: int
    lds_seeds: tuple[int, ...]
    provider_seeds: tuple[int, ...]
    brittle_queries: int
    brittle_ks: tuple[int, ...]


FULL = {
    "mlp-digits": Plan(100, (0, 1, 2, 3), tuple(range(8)), 16, (10, 20, 40)),
    "gpt2-corpus": Plan(64, (0, 1, 2, 3), tuple(range(32)), 5, (5, 20)),
    "gpt2-corpus-b": Plan(64, (0, 1, 2, 3), tuple(range(32)), 5, (5, 20)),
    "gpt2-corpus-c": Plan(64, (0, 1, 2, 3), tuple(range(32)), 5, (5, 20)),
    "gpt2-corpus-short": Plan(64, (0, 1, 2, 3), tuple(range(32)), 5, (5, 20)),
    "gpt2-corpus-wide": Plan(64, (0, 1, 2, 3), tuple(range(16)), 5, (5, 20)),
    **{
        f"mlp-{name}": Plan(64, (0, 1, 2, 3), tuple(range(8)), 8, (10, 20))
        for name in CLASSIFIER_NAMES
    },
    **{
        f"cnn-digits-{recipe}": Plan(64, (0, 1, 2, 3), tuple(range(8)), 8, (10, 20))
        for recipe in ("converged", "short")
    },
}
QUICK = {
    "mlp-digits": Plan(12, (0, 1), (0,), 4, (10, 40)),
    "gpt2-corpus": Plan(8, (0,), (0,), 2, (10,)),
    "gpt2-corpus-b": Plan(8, (0,), (0,), 2, (10,)),
    "gpt2-corpus-c": Plan(8, (0,), (0,), 2, (10,)),
    "gpt2-corpus-short": Plan(8, (0,), (0,), 2, (10,)),
    "gpt2-corpus-wide": Plan(8, (0,), (0,), 2, (10,)),
    **{f"mlp-{name}": Plan(8, (0, 1), (0,), 2, (10,)) for name in CLASSIFIER_NAMES},
    **{f"cnn-digits-{r}": Plan(8, (0, 1), (0,), 2, (10,)) for r in ("converged", "short")},
}
