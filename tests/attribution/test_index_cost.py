"""What bounds the cost of an index build on a large corpus: the first pass on a sample spread
over the data (`IndexConfig.factor_examples`), and the head's gradient contracted over the
tokens before its vocabulary side is projected (`contract_first`)."""

from __future__ import annotations

import numpy as np
import pytest

from attribution import IndexConfig, ProjectionConfig, build_index
from attribution.config import DEFAULT_FACTOR_EXAMPLES
from attribution.projection import contract_first, find_layers, kfac_factors
from attribution.store import FACTORS_FILE, load_factors
from tests.attribution.tiny import (
    classification_fisher_loss,
    classification_loss,
    lm_batches,
    lm_fisher_loss,
    lm_loss,
    mlp_batches,
    tiny_gpt2,
    tiny_mlp,
)
from tests.tolerance import assert_close_f64


def _batch_factors(model, loss, batches, config):
    """Each batch's raw KFAC factors alone, with the labels the whole pass would draw for it
    (batch b under seed + b), from the unsampled first pass run on that batch only."""
    layers = find_layers(model, config.projection)
    out = []
    for number, batch in enumerate(batches):
        fs = kfac_factors(model, loss, [batch], layers, seed=config.projection.seed + number)
        out.append({f.name: (f.a, f.s) for f in fs})
    return out


@pytest.mark.parametrize("cap", [7, 12, 20])
def test_the_first_pass_sums_the_factors_of_a_sample_spread_over_the_data(tmp_path, cap) -> None:
    # 40 examples in 8 batches of 5; identity projections keep the raw factors in the index.
    model, batches = tiny_mlp(), mlp_batches(n=40, batch_size=5)
    config = IndexConfig(projection=ProjectionConfig(kind="identity"), factor_examples=cap)
    index = build_index(model, classification_loss, batches, tmp_path / "i", config,
                        fisher_loss=classification_fisher_loss, show_progress=False)  # fmt: skip
    names = [layer["name"] for layer in index.build["layers"]]
    saved = load_factors(tmp_path / "i" / FACTORS_FILE, names)
    per_batch = _batch_factors(model, classification_fisher_loss, batches, config)
    # The saved factors are the sum over a subset of whole batches: find it, batch by batch,
    # from the input factor of the first layer (each batch's is distinct).
    a0 = saved[0].a.numpy()
    candidates = [per_batch[b][names[0]][0].numpy() for b in range(len(batches))]
    taken = []
    for subset in range(1, 1 << len(batches)):
        chosen = [b for b in range(len(batches)) if subset >> b & 1]
        if np.allclose(sum(candidates[b] for b in chosen), a0, rtol=1e-12, atol=1e-12):
            taken.append(chosen)
    assert len(taken) == 1, taken
    chosen = taken[0]
    # About `cap` examples (within one batch), never the first batches alone: a sample of
    # half the data takes every other batch, to the end of the data.
    assert abs(5 * len(chosen) - cap) <= 5 and chosen != list(range(len(chosen)))
    if cap == 20:
        assert chosen == [0, 2, 4, 6]
    assert saved[0].examples == 5 * len(chosen) == index.manifest["factor_examples_used"]
    for f in saved:
        a = sum(per_batch[b][f.name][0] for b in chosen)
        s = sum(per_batch[b][f.name][1] for b in chosen)
        assert_close_f64(f.a, a, 5 * len(chosen))
        assert_close_f64(f.s, s, 5 * len(chosen))
    assert index.manifest["rows"] == 40 and index.manifest["config"]["factor_examples"] == cap


def test_without_a_cap_the_first_pass_sees_every_example(tmp_path) -> None:
    model, batches = tiny_gpt2(), lm_batches(n=9, batch_size=2)
    config = IndexConfig(projection=ProjectionConfig(kind="random", k_in=3, k_out=2),
                         factor_examples=None)  # fmt: skip
    index = build_index(model, lm_loss, batches, tmp_path / "i", config,
                        fisher_loss=lm_fisher_loss, show_progress=False)  # fmt: skip
    assert index.manifest["factor_examples_used"] == 9
    # An index written before the setting existed read as one whose first pass saw it all.
    old = index.manifest["config"] | {}
    old.pop("factor_examples")
    assert IndexConfig.from_dict(old).factor_examples is None
    assert IndexConfig().factor_examples == DEFAULT_FACTOR_EXAMPLES


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_a_bad_factor_sample_size_is_refused_before_any_work(tmp_path, bad) -> None:
    config = IndexConfig(factor_examples=bad)
    with pytest.raises(ValueError, match="factor_examples must be positive or None"):
        build_index(tiny_mlp(), classification_loss, mlp_batches(), tmp_path / "i", config,
                    fisher_loss=classification_fisher_loss, show_progress=False)  # fmt: skip
    assert not (tmp_path / "i").exists()


def test_the_head_is_contracted_over_tokens_first_and_narrow_layers_are_not() -> None:
    # GPT-2 6 × 512 with an 8,192-token vocabulary, 128 tokens per example: the head's
    # vocabulary side at 1,024 rows costs 128·8192·1024 projected first, against
    # 128·8192·32 + 8192·1024·32 contracted first.
    assert contract_first(tokens=128, n_out=8192, k_in=32, k_out=1024)
    assert not contract_first(tokens=128, n_out=2048, k_in=32, k_out=32)
    # One token per example (a classifier): nothing to contract over.
    assert not contract_first(tokens=1, n_out=8192, k_in=32, k_out=1024)
    # A head as wide as its kept rows (a tiny vocabulary kept whole) over more tokens than
    # k_in is contracted first too: the tiny GPT-2 of the brute-force tests in
    # test_core_math takes this path, so their comparison with full gradients covers it.
    assert contract_first(tokens=16, n_out=17, k_in=3, k_out=17)
