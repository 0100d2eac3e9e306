"""The fixed-order sums behind data-parallel builds, without processes: the total of shares
taken by any number of ranks is bit-identical to one process's."""

from __future__ import annotations

import numpy as np

from attribution.distributed import Ranks, TreeSum, UnitSums, _refold


def _one_process(values: list) -> np.ndarray:
    sums = UnitSums([range(1 << 40)])
    for unit, v in enumerate(values):
        if v is not None:
            sums.add(unit, [v])
    return sums.finish(len(values)).total()[0]


def _ranks(values: list, world: int) -> np.ndarray:
    nodes = []
    for rank in range(world):
        share = Ranks(rank, world).share(len(values))
        sums = UnitSums([share])
        for unit in share:
            if values[unit] is not None:
                sums.add(unit, [values[unit]])
        nodes += [(i << level, level, i, v) for level, i, v in sums.finish().stack]
    return _refold([(level, i, v) for _, level, i, v in sorted(nodes, key=lambda n: n[0])])[0]


def _values(rng: np.random.Generator, units: int) -> list:
    # Magnitudes over 16 decades, so that the order of additions shows in the last bits.
    return [
        None if rng.random() < 0.2 else rng.standard_normal(4) * 10.0 ** rng.integers(-8, 8)
        for _ in range(units)
    ]


def test_shares_of_any_number_of_ranks_sum_to_the_same_bits() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = _values(rng, int(rng.integers(1, 40)))
        if all(v is None for v in values):
            continue
        one = _one_process(values)
        for world in (2, 3, 5, 8):
            np.testing.assert_array_equal(_ranks(values, world), one)


def test_per_rank_sums_added_at_the_end_would_differ() -> None:
    """What the tree avoids: each rank summing its share in order, then the ranks' totals
    added, gives other last bits for some data (so the test above can tell)."""
    rng = np.random.default_rng(1)
    differs = 0
    for _ in range(50):
        values = [v if v is not None else np.zeros(4) for v in _values(rng, 12)]
        sequential = np.sum(values, axis=0)
        per_rank = sum(np.sum(values[s.start : s.stop], axis=0) for s in
                       (Ranks(r, 3).share(12) for r in range(3)))  # fmt: skip
        differs += not np.array_equal(sequential, per_rank)
    assert differs > 0


def test_tree_merges_siblings_only() -> None:
    tree = TreeSum()
    for i in range(5):
        tree.push(0, i, [np.array([float(i)])])
    assert [(level, i) for level, i, _ in tree.stack] == [(2, 0), (0, 4)]
    assert tree.total()[0][0] == 10.0
