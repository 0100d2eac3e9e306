"""Each architecture people train, built tiny in code, against brute force: the index's stored
rows and the queries' gradients equal full per-example gradients (torch.func, each example
alone and unpadded) projected afterwards, and the scores equal the explicit damped-Fisher
formula on them; with the head tied to the input embedding and without."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution import IndexConfig, ProjectionConfig, ScoreConfig, build_index, score
from attribution.index import make_projectors
from attribution.projection import find_layers, layer_specs, projected_gradients, random_projectors
from attribution.scoring import query_gradients
from tests.attribution.architectures import ARCHITECTURES, MIXTURES, tiny_causal_lm
from tests.attribution.reference import damped_fisher_scores, full_gradients, project
from tests.attribution.test_core_math import (
    assert_scores_close,
    gradient_reduction,
    layer_scale,
)
from tests.attribution.tiny import lm_batches, lm_fisher_loss, lm_loss
from tests.tolerance import EPS32, assert_close

DAMPING = 0.2


def query_batches_of(n: int, seed: int):
    """Queries: the first two tokens are the prompt (labels -100), the rest the completion."""
    batches = lm_batches(n=n, seed=seed)
    for b in batches:
        b.inputs["labels"][:, :2] = -100
    return batches


def assert_rows_match(actual, expected, batches, projectors, layers, what) -> None:
    """float64 models whose attention softmax transformers may take in float32 (Llama, Qwen2,
    GPT-NeoX, ... do), stored or returned in float32: float32 rounding summed over an example's
    tokens and a layer's widest side, at the layer's magnitude."""
    assert actual.shape == expected.shape, what
    assert_close(actual, expected, gradient_reduction(batches, projectors),
                 scale=layer_scale(expected, layers), eps=EPS32, what=what)  # fmt: skip


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_rows_queries_and_scores_equal_brute_force(tmp_path, arch: str, tied: bool) -> None:
    model = tiny_causal_lm(arch, tied)
    batches, queries = lm_batches(n=8), query_batches_of(4, seed=13)
    config = IndexConfig(
        projection=ProjectionConfig(kind="random", k_in=3, k_out=2, head_k_out=None, seed=7),
        curvature="full", fisher_labels="data", curvature_labels="data",
        damping_factor=DAMPING, rows_per_block=3,
    )  # fmt: skip
    index = build_index(model, lm_loss, batches, tmp_path, config, show_progress=False)
    names, projectors = index.layer_names, index.projectors()
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    assert head_name in names  # tied or not, the head is tracked
    assert len(names) == sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear)) or (
        arch == "gpt2"  # GPT-2's attention and MLP are Conv1D layers
    )
    layers = index.build["layers"]

    g = np.concatenate([np.asarray(a, dtype=np.float64) for _, a in index.blocks()])
    expected_rows = project(full_gradients(model, lm_loss, batches, names), projectors)
    assert_rows_match(g, expected_rows, batches, projectors, layers, "stored rows")

    _, q = query_gradients(model, lm_loss, queries, index)
    expected_q = project(full_gradients(model, lm_loss, queries, names), projectors)
    assert_rows_match(q, expected_q, queries, projectors, layers, "query gradients")

    result = score(index, q, ScoreConfig(relatif=True, dense=True))
    raw, self_inf = damped_fisher_scores(g, q, index.curvature.slices, DAMPING)
    assert_scores_close(result.dense, raw / np.sqrt(self_inf)[None, :], index, q, relatif=True)

    # The comparison catches a real error: one layer's rows 1e-3 off.
    wrong = expected_rows.copy()
    wrong[:, layers[-1]["start"] : layers[-1]["stop"]] *= 1 + 1e-3
    with pytest.raises(AssertionError, match="stored rows"):
        assert_rows_match(g, wrong, batches, projectors, layers, "stored rows")


@pytest.mark.parametrize("arch", list(MIXTURES))
def test_mixtures_of_experts_are_refused_naming_the_untracked_share(arch: str) -> None:
    """Routed experts see only the tokens sent to them (and under transformers 5 are not Linear
    layers at all): their weights are not tracked, and an index that would leave most of the
    model's parameters out is refused in one line, naming that share."""
    model = tiny_causal_lm(arch, tied=False, dtype=torch.float32)
    config = IndexConfig(projection=ProjectionConfig(kind="random", k_in=3, k_out=2))
    with pytest.raises(ValueError, match=r"^the tracked layers hold \d+% of the model's") as err:
        make_projectors(model, lm_loss, lm_batches(), config, fisher_loss=lm_fisher_loss,
                        show_progress=False)  # fmt: skip
    assert "\n" not in str(err.value) and "experts" in str(err.value)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_sdpa_attention_gives_the_rows_of_eager_attention(arch: str) -> None:
    """`load_causal_lm` loads models with SDPA: the hooks see the same Linear inputs and
    output gradients as under eager attention, to float rounding."""
    eager = tiny_causal_lm(arch, tied=False, attention="eager")
    sdpa = tiny_causal_lm(arch, tied=False, attention="sdpa")
    batches = lm_batches(n=6)
    config = ProjectionConfig(kind="random", k_in=3, k_out=2, head_k_out=None, seed=3)
    rows = []
    for model in (eager, sdpa):
        layers = find_layers(model, config)
        projectors = random_projectors(layer_specs(layers), config)
        rows.append(torch.cat(
            [projected_gradients(model, lm_loss, b, layers, projectors) for b in batches]
        ).numpy())  # fmt: skip
    start, spans = 0, []
    for p in projectors:
        spans.append({"start": start, "stop": start + p.dim})
        start += p.dim
    assert_rows_match(rows[1], rows[0], batches, projectors, spans, "SDPA rows")
