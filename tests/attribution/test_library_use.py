"""The attribution core used as a library: safe by default, with the command line's defaults."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import attribution
from attribution import (
    LANGUAGE_MODEL_INDEX,
    IndexConfig,
    IndexMismatchError,
    ProjectionConfig,
    ScoreConfig,
    build_index,
    default_index_config,
    score_queries,
)
from attribution.lm import IGNORE_INDEX, batch_from_token_ids, lm_fisher_loss, lm_loss
from attribution.scoring import query_gradients
from tests.attribution.tiny import (
    classification_fisher_loss,
    classification_loss,
    lm_batches,
    mlp_batches,
    tiny_gpt2,
    tiny_mlp,
)
from tests.tolerance import assert_close

SMALL = IndexConfig(projection=ProjectionConfig(kind="random", k_in=2, k_out=2))


def _build(model, batches, root, config=SMALL, **kw):
    return build_index(
        model,
        classification_loss,
        batches,
        root,
        config,
        fisher_loss=classification_fisher_loss,
        show_progress=False,
        **kw,
    )


# 1. A directory that holds an index is reused only for the same weights and data.


def test_a_second_build_with_other_weights_and_data_is_refused(tmp_path) -> None:
    first = _build(tiny_mlp(seed=0), mlp_batches(seed=1), tmp_path)
    with pytest.raises(IndexMismatchError, match="weights.*training data"):
        _build(tiny_mlp(seed=3), mlp_batches(seed=4), tmp_path)
    assert GradientIndexRows(tmp_path) == first.rows  # nothing was changed


def GradientIndexRows(root) -> int:
    return attribution.GradientIndex.open(root).rows


def test_other_weights_alone_or_other_data_alone_are_refused(tmp_path) -> None:
    _build(tiny_mlp(seed=0), mlp_batches(seed=1), tmp_path)
    with pytest.raises(IndexMismatchError, match="model's weights") as weights:
        _build(tiny_mlp(seed=3), mlp_batches(seed=1), tmp_path)
    assert "the training data" not in str(weights.value)
    with pytest.raises(IndexMismatchError, match="training data") as data:
        _build(tiny_mlp(seed=0), mlp_batches(seed=4), tmp_path)
    assert "model's weights" not in str(data.value)
    other_ids = mlp_batches(seed=1)
    other_ids[0].example_ids = [f"x{i}" for i in range(len(other_ids[0]))]
    with pytest.raises(IndexMismatchError, match="training data"):
        _build(tiny_mlp(seed=0), other_ids, tmp_path)
    other_provider = mlp_batches(seed=1)
    other_provider[-1].providers = ["delta"] * len(other_provider[-1])
    with pytest.raises(IndexMismatchError, match="training data"):
        _build(tiny_mlp(seed=0), other_provider, tmp_path)


def test_the_same_weights_and_data_reopen_the_index_and_it_records_them(tmp_path) -> None:
    model = tiny_mlp(seed=0)
    first = _build(model, mlp_batches(seed=1), tmp_path)
    again = _build(tiny_mlp(seed=0), mlp_batches(seed=1), tmp_path)
    assert again.id == first.id
    contents = json.loads((tmp_path / "manifest.json").read_text())["contents"]
    assert contents["examples"] == 24 and len(contents["data_sha256"]) == 64
    assert contents["weights_sha256"] == [attribution.fingerprint.weights_sha256(model)]


def test_a_build_stopped_midway_resumes_only_with_the_same_data(tmp_path) -> None:
    class Failing(list):
        """Batches whose third one fails while gradients are logged (the third pass, after
        counting the examples and the first pass on a sample of them)."""

        passes = 0

        def __iter__(self):
            self.passes += 1
            for number, batch in enumerate(super().__iter__()):
                if self.passes == 3 and number == 2:
                    raise KeyboardInterrupt
                yield batch

    config = IndexConfig(
        projection=ProjectionConfig(kind="random", k_in=2, k_out=2), rows_per_block=5
    )
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_mlp(), Failing(mlp_batches(seed=1)), tmp_path, config)
    assert (tmp_path / "build.json").exists() and not (tmp_path / "manifest.json").exists()
    with pytest.raises(IndexMismatchError, match="training data"):
        _build(tiny_mlp(), mlp_batches(seed=4), tmp_path, config)
    resumed = _build(tiny_mlp(), mlp_batches(seed=1), tmp_path, config)
    fresh = _build(tiny_mlp(), mlp_batches(seed=1), tmp_path / "fresh", config)
    assert resumed.rows == 24 and resumed.id == fresh.id


def test_data_that_changes_between_passes_is_refused(tmp_path) -> None:
    class Shuffled(list):
        passes = 0

        def __iter__(self):
            self.passes += 1
            return list.__iter__(self if self.passes % 2 else self[::-1])  # flips each time

    with pytest.raises(ValueError, match="same batches in the same order"):
        _build(tiny_mlp(), Shuffled(mlp_batches()), tmp_path)


# 2. A language model gets the command line's defaults.


def test_a_language_model_object_gets_the_command_lines_defaults(tmp_path) -> None:
    assert attribution.LANGUAGE_MODEL_INDEX is LANGUAGE_MODEL_INDEX
    assert default_index_config(tiny_gpt2()) == LANGUAGE_MODEL_INDEX
    assert default_index_config(tiny_mlp()) == IndexConfig()
    from ledger.cli import index_cmd

    cli_defaults = {p.name: p.default for p in index_cmd.params}
    assert LANGUAGE_MODEL_INDEX.curvature_labels == cli_defaults["curvature_labels"]
    assert LANGUAGE_MODEL_INDEX.curvature_prior_examples == cli_defaults["curvature_prior_examples"]
    assert LANGUAGE_MODEL_INDEX.curvature_examples == cli_defaults["curvature_examples"]
    index = build_index(
        tiny_gpt2(), lm_loss, lm_batches(), tmp_path, fisher_loss=lm_fisher_loss,
        show_progress=False,
    )  # fmt: skip
    assert index.config == LANGUAGE_MODEL_INDEX


# 3. Pre-tokenised text, batched with ids and providers; the loss names the keys it needs.


def test_batch_from_token_ids_takes_ids_providers_and_prompt_labels() -> None:
    batch = batch_from_token_ids(
        [[5, 6, 7], [8, 9]],
        pad_id=0,
        example_ids=["a", "b"],
        providers=["north", "south"],
        shards=["s", "s"],
    )
    assert batch.example_ids == ["a", "b"] and batch.providers == ["north", "south"]
    assert batch.inputs["labels"].tolist() == [[5, 6, 7], [8, 9, IGNORE_INDEX]]
    assert batch.inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    numbered = batch_from_token_ids([[1, 2], [3, 4]], first_id=10)
    assert numbered.example_ids == ["10", "11"]
    query = batch_from_token_ids([[1, 2, 3]], labels=[[IGNORE_INDEX, 2, 3]], example_ids=["q"])
    assert query.inputs["labels"].tolist() == [[IGNORE_INDEX, 2, 3]]
    with pytest.raises(ValueError, match="1 providers for 2 sequences"):
        batch_from_token_ids([[1, 2], [3, 4]], providers=["x"])
    with pytest.raises(ValueError, match="2 labels"):
        batch_from_token_ids([[1, 2, 3]], labels=[[1, 2]])


def test_token_batches_number_examples_across_batches(tmp_path) -> None:
    sequences = [[1 + (i % 15), 2, 3 + (i % 7)] for i in range(10)]
    batches = attribution.token_batches(
        sequences, [f"t{i}" for i in range(10)], ["a", "b"] * 5, batch_size=4
    )
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sum((b.example_ids for b in batches), []) == [f"t{i}" for i in range(10)]
    index = build_index(
        tiny_gpt2(), lm_loss, batches, tmp_path, fisher_loss=lm_fisher_loss, show_progress=False
    )
    assert index.metadata["example_id"].to_list() == [f"t{i}" for i in range(10)]
    assert index.metadata["provider"].to_list() == ["a", "b"] * 5


def test_lm_loss_on_a_plain_tensor_names_the_keys_it_needs() -> None:
    plain = attribution.Batch(torch.tensor([[1, 2, 3]]), ["x"])
    with pytest.raises(TypeError, match="'input_ids', 'attention_mask' and 'labels'"):
        lm_loss(tiny_gpt2(), plain)
    partial = attribution.Batch({"input_ids": torch.tensor([[1, 2, 3]])}, ["x"])
    with pytest.raises(TypeError, match="without 'attention_mask', 'labels'"):
        lm_loss(tiny_gpt2(), partial)


# 4. Repeated example ids are refused.


def test_a_repeated_example_id_is_refused_naming_it_and_both_positions(tmp_path) -> None:
    batches = mlp_batches(n=20, batch_size=5)
    batches[2].example_ids = [f"ex{j}" for j in range(5)]  # positions 10..14 repeat 0..4
    out = tmp_path / "index"
    with pytest.raises(ValueError, match=r"'ex0' appears twice.*positions 0 and 10"):
        _build(tiny_mlp(), batches, out)
    assert not out.exists()  # refused before anything was written


def test_batches_numbered_from_zero_each_are_refused(tmp_path) -> None:
    batches = [batch_from_token_ids([[1, 2, 3], [4, 5, 6]]) for _ in range(2)]
    with pytest.raises(ValueError, match=r"'0' appears twice.*positions 0 and 2"):
        build_index(
            tiny_gpt2(), lm_loss, batches, tmp_path / "i", fisher_loss=lm_fisher_loss,
            show_progress=False,
        )  # fmt: skip


# 5. The dense scores and the raw influence.


def test_dense_holds_relatif_scores_and_influence_the_raw_ones(tmp_path) -> None:
    index = _build(tiny_mlp(), mlp_batches(), tmp_path)
    queries = mlp_batches(n=3, batch_size=3, seed=7)
    result = score_queries(tiny_mlp(), classification_loss, queries, index, ScoreConfig(dense=True))
    raw = score_queries(
        tiny_mlp(), classification_loss, queries, index, ScoreConfig(dense=True, relatif=False)
    )
    ids, grads = query_gradients(tiny_mlp(), classification_loss, queries, index)
    rows = np.concatenate([np.load(f).astype(np.float64) for f in index.block_files()])
    exact = index.curvature.precondition(grads) @ rows.T  # float64 reference
    scale = np.abs(index.curvature.precondition(grads)) @ np.abs(rows).T
    # float32 product of D terms per score, inputs rounded to float32 once
    assert_close(result.influence, exact, index.dim + 2, scale=scale, what="raw influence")
    assert_close(raw.dense, exact, index.dim + 2, scale=scale, what="dense without RelatIF")
    relatif = exact / np.sqrt(index.self_influence)[None, :]
    # one more float32 rounding for the division by sqrt(self-influence)
    assert_close(
        result.dense, relatif, index.dim + 3,
        scale=scale / np.sqrt(index.self_influence)[None, :], what="RelatIF dense",
    )  # fmt: skip
    assert score_queries(tiny_mlp(), classification_loss, queries, index).influence is None


# 6. Module patterns that leave out a tied head say so.


def test_module_patterns_that_leave_out_the_tied_head_say_so(tmp_path, caplog) -> None:
    model = tiny_gpt2()
    patterns = ("transformer.h.*.mlp.*",)
    with caplog.at_level(logging.WARNING, logger="attribution.index"):
        index = build_index(
            model, lm_loss, lm_batches(), tmp_path / "a",
            IndexConfig(projection=ProjectionConfig(kind="random", k_in=2, k_out=2,
                                                    modules=patterns)),
            fisher_loss=lm_fisher_loss, show_progress=False,
        )  # fmt: skip
    assert "lm_head" not in index.layer_names
    warned = [r.getMessage() for r in caplog.records if "lm_head" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "tied_head=False" in warned[0]
    caplog.clear()
    for projection in (
        ProjectionConfig(kind="random", k_in=2, k_out=2, modules=patterns, tied_head=False),
        ProjectionConfig(kind="random", k_in=2, k_out=2, modules=(*patterns, "lm_head")),
    ):
        with caplog.at_level(logging.WARNING, logger="attribution.index"):
            build_index(
                model, lm_loss, lm_batches(), tmp_path / str(projection.tied_head),
                IndexConfig(projection=projection), fisher_loss=lm_fisher_loss,
                show_progress=False,
            )  # fmt: skip
        assert not [r for r in caplog.records if "lm_head" in r.getMessage()]


# 7. The query loss: summed (default) or mean per scored token.


def test_mean_query_loss_divides_each_querys_gradient_by_its_scored_tokens(tmp_path) -> None:
    model = tiny_gpt2()
    index = build_index(
        model, lm_loss, lm_batches(), tmp_path, SMALL, fisher_loss=lm_fisher_loss,
        show_progress=False,
    )  # fmt: skip
    prompt = [IGNORE_INDEX] * 2
    queries = [
        batch_from_token_ids(
            [[1, 2, 3, 4, 5, 6, 7], [4, 5, 6]],
            labels=[prompt + [3, 4, 5, 6, 7], prompt + [6]],
            example_ids=["long", "short"],
        )
    ]
    assert ScoreConfig().query_loss == "sum"
    _, summed = query_gradients(model, lm_loss, queries, index)
    _, mean = query_gradients(model, lm_loss, queries, index, query_loss="mean")
    counts = np.array([[5.0], [1.0]])  # completion tokens scored (the first label never is)
    # the same float64 gradient, divided once more
    assert_close(mean, summed / counts, 2, scale=np.abs(summed / counts).max())
    a = score_queries(model, lm_loss, queries, index, ScoreConfig())
    b = score_queries(model, lm_loss, queries, index, ScoreConfig(query_loss="mean"))
    # shares do not move: each query's scores are scaled by one factor (float32 sums)
    assert_close(b.shares(), a.shares(), index.rows, scale=1.0)
    assert_close(b.top_scores, a.top_scores / counts, index.dim + 2,
                 scale=np.abs(a.top_scores / counts))  # fmt: skip
    with pytest.raises(ValueError, match="unknown query_loss 'median'"):
        ScoreConfig(query_loss="median")


def test_the_query_loss_is_recorded_in_an_attribution_runs_manifest(tmp_path) -> None:
    from ledger.cli import attribute
    from ledger.jobs import run_manifest

    index = _build(tiny_mlp(), mlp_batches(), tmp_path / "index")
    queries = tmp_path / "queries.jsonl"
    queries.write_text("{}\n")
    summed = run_manifest(index, str(queries), ScoreConfig())
    mean = run_manifest(index, str(queries), ScoreConfig(query_loss="mean"))
    assert (summed["score"]["query_loss"], mean["score"]["query_loss"]) == ("sum", "mean")
    assert summed["id"] != mean["id"]
    assert ScoreConfig(**mean["score"]).query_loss == "mean"  # what `ledger verify` re-reads
    option = next(p for p in attribute.params if p.name == "query_loss")
    assert option.default == "sum" and list(option.type.choices) == ["sum", "mean"]
