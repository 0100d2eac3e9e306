"""How much ground truth each setting gets: the full run and the `--quick` run."""

from __future__ import annotations

from dataclasses import dataclass


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
}
QUICK = {
    "mlp-digits": Plan(12, (0, 1), (0,), 4, (10, 40)),
    "gpt2-corpus": Plan(8, (0,), (0,), 2, (10,)),
    "gpt2-corpus-b": Plan(8, (0,), (0,), 2, (10,)),
    "gpt2-corpus-c": Plan(8, (0,), (0,), 2, (10,)),
}
