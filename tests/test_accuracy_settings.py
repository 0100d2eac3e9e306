"""The accuracy harness's classifier settings on scikit-learn's bundled datasets (a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attribution.config import ProjectionConfig
from attribution.projection import find_layers
from benchmarks.accuracy.plan import FULL, QUICK
from benchmarks.accuracy.settings import SETTINGS
from benchmarks.accuracy.tabular import CLASSIFIERS, CNN, DATASETS, RECIPES, classifier_setting


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("key", list(CLASSIFIERS))
def test_every_classifier_setting_has_a_plan_and_its_split(key: str) -> None:
    setting = SETTINGS[key](None)
    dataset, hidden, recipe = CLASSIFIERS[key]
    spec = DATASETS[dataset]
    assert setting.name in FULL and setting.name in QUICK
    assert (setting.n_train, setting.n_queries) == (spec.n_train, spec.n_queries)
    assert sum(len(b) for b in setting.train_data) == spec.n_train
    # Every provider holds examples, and the query rows are not training rows.
    assert len(set(setting.providers)) == 4
    x = torch.cat([b.inputs[0] for b in setting.train_data])
    xq = torch.cat([b.inputs[0] for b in setting.query_data])
    assert not (x[:, None, :] == xq[None, :, :]).all(-1).any()
    if hidden == CNN:  # its Conv2d layers are what the index tracks, with the head
        convs = [m for m in setting.initial().modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 2 and setting.name.startswith("cnn-")
        assert len(find_layers(setting.initial(), ProjectionConfig())) == 3
    else:
        assert setting.recipe["widths"][1:-1] == list(hidden)
    assert setting.recipe["steps"] == RECIPES[recipe]["steps"]


def test_a_retrain_is_a_function_of_its_rows_and_seed(one_thread) -> None:
    setting = classifier_setting("wine", (16,), "short")
    rows = np.arange(0, setting.n_train, 2)
    a, b = setting.train(rows, 3), setting.train(rows[::-1].copy(), 3)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    c = setting.train(rows, 4)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_the_short_recipe_stops_short_of_the_converged_one(one_thread) -> None:
    """The two recipes differ as named: the converged run's training loss is far lower."""
    losses = {}
    for recipe in ("short", "converged"):
        setting = classifier_setting("wine", (16,), recipe)
        model = setting.train(np.arange(setting.n_train), 0)
        x = torch.cat([b.inputs[0] for b in setting.train_data])
        y = torch.cat([b.inputs[1] for b in setting.train_data])
        with torch.no_grad():
            losses[recipe] = nn.functional.cross_entropy(model(x), y).item()
    assert losses["converged"] < losses["short"] / 10


def test_the_further_language_models_differ_from_the_first_as_named(tmp_path, one_thread) -> None:
    """lm-short is the first corpus's recipe trained a quarter as long (its training loss is
    higher); lm-wide has blocks wide enough that k = 32 keeps a third or less of each side."""
    from attribution.config import DEFAULT_K
    from attribution.projection import layer_widths

    first = SETTINGS["lm"](tmp_path)
    short = SETTINGS["lm-short"](tmp_path)
    wide = SETTINGS["lm-wide"](tmp_path)
    for setting in (short, wide):
        assert setting.name in FULL and setting.name in QUICK
        assert setting.task == "lm" and setting.n_train == first.n_train
    assert {k: v for k, v in short.recipe.items() if k not in ("epochs", "queries_sha")} == {
        k: v for k, v in first.recipe.items() if k not in ("epochs", "queries_sha")
    }
    assert short.recipe["epochs"] * 4 == first.recipe["epochs"]

    def train_loss(setting) -> float:
        model = setting.base_model()
        with torch.no_grad():
            return float(
                torch.cat([setting.train_loss(model, b) for b in setting.train_data]).mean()
            )

    assert train_loss(short) > 1.2 * train_loss(first)
    blocks = [
        layer_widths(m)
        for name, m in wide.base_model().named_modules()
        if ".h." in name and layer_widths(m) is not None
    ]
    assert len(blocks) == 4 * wide.recipe["n_layer"]
    assert all(min(widths) >= 3 * DEFAULT_K for widths in blocks)


def test_initial_weights_are_those_the_base_run_starts_from(tmp_path, one_thread, monkeypatch):
    """`Setting.initial` is the model the base run's first step sees: a classifier's training
    stopped before any step, and a language model trained for zero epochs, equal it."""
    from benchmarks.accuracy import settings
    from benchmarks.accuracy.settings import lm_setting

    monkeypatch.setattr(settings, "full_batch_fit", lambda model, *a, **k: model.eval())
    setting = classifier_setting("wine", (16,), "short")
    for p, q in zip(setting.base_model().parameters(), setting.initial().parameters(), strict=True):
        assert torch.equal(p, q)
    untrained = lm_setting(tmp_path / "data", name="lm-untrained", epochs=0)
    pairs = zip(untrained.base_model().parameters(), untrained.initial().parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)
    # And a trained model has moved away from it.
    monkeypatch.undo()
    trained = classifier_setting("wine", (16,), "short")
    moved = [
        not torch.equal(p, q)
        for p, q in zip(
            trained.base_model().parameters(), trained.initial().parameters(), strict=True
        )
    ]
    assert all(moved)
