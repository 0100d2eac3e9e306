"""Specifications of model loading, hashing, batching and the language-model loss."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from attribution.data import Query, ShardSpec
from attribution.lm import (
    DEFAULT_MAX_LENGTH,
    IGNORE_INDEX,
    check_max_length,
    chunk_token_ids,
    count_train_examples,
    encode_query,
    hash_model_weights,
    hash_tokenizer,
    lm_loss,
    load_causal_lm,
    query_batches,
    resolve_max_length,
    train_batches,
)
from attribution.synthetic import build_word_tokenizer, tiny_gpt2_config, write_workspace_model
from attribution.types import InputError
from tests.tolerance import assert_close_f32, assert_close_f64

WORDS = "the star shines bright . a comet orbits slowly and moon glows"


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer([WORDS])


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tiny_model(tokenizer, dtype=torch.float32, seed=0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = tiny_gpt2_config(len(tokenizer), n_layer=2, n_embd=16, n_head=2, n_positions=32)
    return GPT2LMHeadModel(config).to(dtype).eval()


def query(qid: str, prompt: str, completion: str) -> Query:
    return Query(qid, datetime(2024, 7, 1, tzinfo=UTC), prompt, completion)


def test_chunks_are_consecutive_and_drop_pieces_without_a_prediction():
    assert chunk_token_ids(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]
    assert chunk_token_ids(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert chunk_token_ids([5], 4) == []
    with pytest.raises(ValueError):
        chunk_token_ids([1, 2], 1)


def test_train_batches_pad_right_and_label_padding_as_ignored(tmp_path, tokenizer):
    shard_a = tmp_path / "a.jsonl"
    shard_a.write_text(
        json.dumps({"text": "the star shines bright . a comet"})
        + "\n\n"
        + json.dumps({"text": "moon glows"})
        + "\n"
    )
    shard_b = tmp_path / "b.jsonl"
    shard_b.write_text(json.dumps({"text": "a comet orbits"}) + "\n")
    shards = [ShardSpec(str(shard_a), "astro"), ShardSpec(str(shard_b), "sky", name="B")]
    batches = list(train_batches(shards, tokenizer, max_length=4, batch_size=3))

    assert [len(b) for b in batches] == [3, 1]
    assert batches[0].example_ids == ["a.jsonl:0:0", "a.jsonl:0:1", "a.jsonl:1:0"]
    assert batches[1].example_ids == ["B:0:0"]
    assert batches[0].providers == ["astro"] * 3 and batches[1].providers == ["sky"]
    assert batches[0].shards == ["a.jsonl"] * 3 and batches[1].shards == ["B"]
    assert batches[0].token_counts == [4, 3, 2]
    assert count_train_examples(shards, tokenizer, 4) == 4

    inputs = batches[0].inputs
    pad = tokenizer.pad_token_id
    expected_ids = [
        ids_of(tokenizer, "the star shines bright"),
        ids_of(tokenizer, ". a comet") + [pad],
        ids_of(tokenizer, "moon glows") + [pad, pad],
    ]
    assert inputs["input_ids"].tolist() == expected_ids
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert torch.equal(batches[0].mask, inputs["attention_mask"])
    expected_labels = [
        row[:n] + [IGNORE_INDEX] * (4 - n) for row, n in zip(expected_ids, [4, 3, 2], strict=True)
    ]
    assert inputs["labels"].tolist() == expected_labels

    again = list(train_batches(shards, tokenizer, max_length=4, batch_size=3))
    assert [b.example_ids for b in again] == [b.example_ids for b in batches]


def test_query_labels_mask_exactly_the_prompt_and_padding(tokenizer):
    queries = [
        query("q1", "the star", "shines bright ."),  # 2 prompt + 3 completion tokens
        query("q2", "a comet orbits", "slowly"),  # 3 + 1
    ]
    (batch,) = query_batches(queries, tokenizer, max_length=16, batch_size=8)
    assert batch.example_ids == ["q1", "q2"] and batch.providers == []
    assert batch.token_counts == [5, 4]
    i = ids_of(tokenizer, "the star shines bright . a comet orbits slowly")
    pad, ign = tokenizer.pad_token_id, IGNORE_INDEX
    assert batch.inputs["input_ids"].tolist() == [i[0:5], i[5:9] + [pad]]
    assert batch.inputs["labels"].tolist() == [
        [ign, ign, i[2], i[3], i[4]],
        [ign, ign, ign, i[8], ign],
    ]
    assert batch.inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_long_queries_lose_the_left_of_the_prompt_and_keep_the_completion(tokenizer):
    ids, labels = encode_query(query("q", "the star shines bright", "a comet"), tokenizer, 4)
    assert ids == ids_of(tokenizer, "shines bright a comet")
    assert labels == [IGNORE_INDEX, IGNORE_INDEX] + ids_of(tokenizer, "a comet")


def test_completion_longer_than_max_length_keeps_its_start(tokenizer, caplog):
    with caplog.at_level("WARNING", logger="attribution.lm"):
        ids, labels = encode_query(query("q", "the", "a comet orbits slowly"), tokenizer, 3)
    assert ids == labels == ids_of(tokenizer, "a comet orbits")
    assert caplog.text.count("truncated") == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="attribution.lm"):  # a check before scoring
        quiet = encode_query(query("q", "the", "a comet orbits slowly"), tokenizer, 3, warn=False)
    assert quiet == (ids, labels) and not caplog.text


def test_bos_is_prepended_to_prompts_and_texts_and_never_scored(tmp_path):
    from transformers import PreTrainedTokenizerFast

    base = build_word_tokenizer([WORDS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<eos>",
    )
    bos = tok.bos_token_id
    ids, labels = encode_query(query("q", "", "a comet"), tok, 8)
    assert ids == [bos] + ids_of(tok, "a comet")
    assert labels == [IGNORE_INDEX] + ids_of(tok, "a comet")
    shard = tmp_path / "s.jsonl"
    shard.write_text(json.dumps({"text": "moon glows"}) + "\n")
    (batch,) = train_batches([ShardSpec(str(shard), "p")], tok, 8, 4)
    assert batch.inputs["input_ids"].tolist() == [[bos] + ids_of(tok, "moon glows")]


def manual_summed_nll(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    """Run one example alone, unpadded, and add up -log p(label) token by token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    log_probs = torch.log_softmax(logits, dim=-1)
    total = torch.zeros((), dtype=logits.dtype)
    for t in range(1, len(ids)):
        if labels[t] != IGNORE_INDEX:
            total = total - log_probs[t - 1, labels[t]]
    return total


def test_lm_loss_matches_each_example_run_alone_in_float64(tmp_path, tokenizer):
    model = tiny_model(tokenizer, dtype=torch.float64)
    queries = [
        query("q1", "the star", "shines bright ."),
        query("q2", "a", "comet"),
        query("q3", "", "moon glows slowly and"),
    ]
    (batch,) = query_batches(queries, tokenizer, 16, 8)
    with torch.no_grad():
        losses = lm_loss(model, batch)
    assert losses.dtype == torch.float64 and losses.shape == (3,)
    expected = torch.stack(
        [manual_summed_nll(model, *encode_query(q, tokenizer, 16)) for q in queries]
    )
    # float64 GPT-2 throughout: a sum over ≤ 16 tokens of a log-softmax over the vocabulary.
    n = 16 * len(tokenizer)
    assert_close_f64(losses, expected, n, what="query losses")

    shard = tmp_path / "s.jsonl"
    shard.write_text("\n".join(json.dumps({"text": t}) for t in WORDS.split(" . ")) + "\n")
    (train,) = train_batches([ShardSpec(str(shard), "p")], tokenizer, 16, 8)
    with torch.no_grad():
        train_losses = lm_loss(model, train)
    rows = [
        ids[:n]
        for ids, n in zip(train.inputs["input_ids"].tolist(), train.token_counts, strict=True)
    ]
    expected = torch.stack([manual_summed_nll(model, r, r) for r in rows])
    assert_close_f64(train_losses, expected, n, what="training losses")


def test_lm_loss_is_differentiable_per_example(tokenizer):
    model = tiny_model(tokenizer)
    (batch,) = query_batches([query("q", "the star", "shines")], tokenizer, 8, 1)
    lm_loss(model, batch).sum().backward()
    assert model.lm_head.weight.grad is not None


def test_saved_workspace_model_round_trips_with_identical_logits(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    write_workspace_model(model, tokenizer, tmp_path / "m")
    loaded, loaded_tok = load_causal_lm(tmp_path / "m")
    assert not loaded.training
    assert loaded.config._attn_implementation == "sdpa"  # attribution.lm.ATTENTION
    text = "the star shines bright . a comet"
    assert ids_of(loaded_tok, text) == ids_of(tokenizer, text)
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([ids_of(tokenizer, text)])
    with torch.no_grad():
        expected, logits = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    # The same weights through SDPA instead of eager attention: float32 rounding of sums over
    # the tokens and the width, at the logits' magnitude (a wrong weight is far off).
    assert_close_f32(logits, expected, ids.shape[1] * model.config.n_embd, what="logits")

    loaded64, _ = load_causal_lm(tmp_path / "m", dtype=torch.float64)
    assert next(loaded64.parameters()).dtype == torch.float64


def test_weight_hash_changes_when_one_weight_changes(tmp_path, tokenizer):
    directory = tmp_path / "m"
    write_workspace_model(tiny_model(tokenizer), tokenizer, directory)
    before_weights, before_tok = hash_model_weights(directory), hash_tokenizer(directory)
    assert hash_model_weights(directory) == before_weights

    weights_file = directory / "model.safetensors"
    tensors = load_file(weights_file)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, weights_file, metadata={"format": "pt"})
    assert hash_model_weights(directory) != before_weights
    assert hash_tokenizer(directory) == before_tok


def test_tokenizer_hash_survives_resaving_and_changes_with_the_vocabulary(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    write_workspace_model(model, tokenizer, tmp_path / "a")
    loaded, loaded_tok = load_causal_lm(tmp_path / "a")
    write_workspace_model(loaded, loaded_tok, tmp_path / "b")
    assert hash_tokenizer(tmp_path / "a") == hash_tokenizer(tmp_path / "b")
    assert hash_model_weights(tmp_path / "a") == hash_model_weights(tmp_path / "b")

    other = build_word_tokenizer([WORDS + " nebula"])
    write_workspace_model(model, other, tmp_path / "c")
    assert hash_tokenizer(tmp_path / "c") != hash_tokenizer(tmp_path / "a")


def test_tokenizer_hash_reads_special_tokens_in_either_form_and_still_sees_changes(
    tmp_path, tokenizer
):
    """transformers writes plain special tokens as bare strings or as full dicts depending on
    its version; both are the same tokenizer. A real change of attribute or content is not."""
    write_workspace_model(tiny_model(tokenizer), tokenizer, tmp_path / "m")
    path = tmp_path / "m" / "special_tokens_map.json"  # as transformers 4.x writes it
    plain = {"eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    path.write_text(json.dumps(plain, indent=2))
    before = hash_tokenizer(tmp_path / "m")

    def full(content, **attrs):
        token = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False}  # fmt: skip
        return {**token, **attrs}

    path.write_text(json.dumps({k: full(v) for k, v in plain.items()}, indent=4))
    assert hash_tokenizer(tmp_path / "m") == before
    assert hash_tokenizer(tmp_path / "m", legacy=True) != before  # the bytes did change
    key = sorted(plain)[0]
    for changed in (full(plain[key], lstrip=True), full(plain[key] + "x")):
        path.write_text(json.dumps({**plain, key: changed}))
        assert hash_tokenizer(tmp_path / "m") != before


def test_an_index_with_the_earlier_tokenizer_hash_still_matches_its_model(tmp_path, tokenizer):
    from types import SimpleNamespace

    from attribution.language import check_model_matches

    directory = tmp_path / "m"
    write_workspace_model(tiny_model(tokenizer), tokenizer, directory)
    path = directory / "special_tokens_map.json"  # as transformers 4.x writes it
    path.write_text(json.dumps({"eos_token": "<eos>"}, indent=2))  # not canonical: hashes differ
    legacy, current = hash_tokenizer(directory, legacy=True), hash_tokenizer(directory)
    assert legacy != current
    weights = hash_model_weights(directory)
    for recorded in (legacy, current):
        manifest = {"model": {"weights_sha256": weights, "tokenizer_sha256": recorded}}
        check_model_matches(directory, SimpleNamespace(manifest=manifest, root="idx"))
    manifest = {"model": {"weights_sha256": weights, "tokenizer_sha256": "0" * 64}}
    with pytest.raises(InputError, match="tokenizer_sha256"):
        check_model_matches(directory, SimpleNamespace(manifest=manifest, root="idx"))


def test_hashes_and_loading_fail_clearly_without_files(tmp_path):
    with pytest.raises(InputError, match="no \\*.safetensors") as err:
        hash_model_weights(tmp_path)
    assert "safe_serialization=True" in err.value.message  # how to convert a .bin checkpoint
    with pytest.raises(InputError, match="model directory not found"):
        hash_model_weights(tmp_path / "missing")
    with pytest.raises(InputError, match="no tokenizer files"):
        hash_tokenizer(tmp_path)
    with pytest.raises(InputError, match="model directory not found"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(InputError, match="no config.json"):
        load_causal_lm(tmp_path)


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    from transformers import PreTrainedTokenizerFast

    base = build_word_tokenizer([WORDS])
    no_pad = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, unk_token="<unk>", eos_token="<eos>"
    )
    write_workspace_model(tiny_model(base), no_pad, tmp_path / "m")
    _, loaded_tok = load_causal_lm(tmp_path / "m")
    assert loaded_tok.pad_token == "<eos>"


def test_max_length_beyond_the_models_positions_is_refused(tokenizer):
    model = tiny_model(tokenizer)  # n_positions=32
    check_max_length(model, "model", 32)
    with pytest.raises(InputError) as err:
        check_max_length(model, "model", 33)
    assert (err.value.path, err.value.line, err.value.field) == ("model/config.json", None,
                                                                  "n_positions")  # fmt: skip
    assert "at most 32 tokens" in err.value.message and "33" in err.value.message
    from transformers import PretrainedConfig

    class Other(torch.nn.Module):  # a model that names its limit max_position_embeddings
        config = PretrainedConfig(max_position_embeddings=16)

    with pytest.raises(InputError, match="at most 16 tokens") as err:
        check_max_length(Other(), "other", 17)
    assert err.value.field == "max_position_embeddings"
    check_max_length(torch.nn.Linear(2, 2), "plain", 10_000)  # no config: nothing to check


def test_max_length_defaults_to_128_or_the_models_positions_when_fewer(tokenizer):
    from transformers import PretrainedConfig

    model = tiny_model(tokenizer)  # n_positions=32
    assert resolve_max_length(model, "model", None) == 32
    assert resolve_max_length(model, "model", 20) == 20
    with pytest.raises(InputError, match="at most 32 tokens"):
        resolve_max_length(model, "model", 33)

    class Long(torch.nn.Module):
        config = PretrainedConfig(max_position_embeddings=4096)

    assert resolve_max_length(Long(), "long", None) == DEFAULT_MAX_LENGTH == 128
    assert resolve_max_length(torch.nn.Linear(2, 2), "plain", None) == 128


def test_outputs_are_scored_within_the_models_positions(tokenizer):
    from types import SimpleNamespace

    from ledger.jobs import query_max_length

    model = tiny_model(tokenizer)  # n_positions=32
    index = lambda data: SimpleNamespace(manifest={"data": data})  # noqa: E731
    assert query_max_length(index({"max_length": 24}), model) == 24
    # An index that records more (built before the limit was checked), or nothing (128).
    assert query_max_length(index({"max_length": 64}), model) == 32
    assert query_max_length(index({}), model) == 32
    assert query_max_length(index({"max_length": 64}), torch.nn.Linear(2, 2)) == 64


def test_a_model_whose_config_differs_from_the_index_is_refused(tmp_path, tokenizer):
    import shutil
    from types import SimpleNamespace

    from attribution.language import check_model_matches, model_info

    directory = tmp_path / "m"
    write_workspace_model(tiny_model(tokenizer), tokenizer, directory)
    info = model_info(directory)
    config = json.loads((directory / "config.json").read_text())
    assert info["config"]["n_embd"] == config["n_embd"]
    assert not any(k.startswith("_") or k == "transformers_version" for k in info["config"])
    index = SimpleNamespace(manifest={"model": info}, root="idx")
    check_model_matches(directory, index)

    # Re-saved, with keys a newer transformers might add, it is the same model.
    resaved = tmp_path / "resaved"
    shutil.copytree(directory, resaved)
    path = resaved / "config.json"
    path.write_text(json.dumps({**config, "transformers_version": "99.0", "new_key": 1}))
    check_model_matches(resaved, index)

    # The same weights and tokenizer under another architecture are refused, naming the field.
    other = tmp_path / "other"
    shutil.copytree(directory, other)
    (other / "config.json").write_text(
        json.dumps({**config, "activation_function": "relu", "layer_norm_epsilon": 0.5})
    )
    with pytest.raises(InputError) as err:
        check_model_matches(other, index)
    assert err.value.path == str(other / "config.json")
    assert err.value.field == "activation_function"
    assert "'relu' differs from" in err.value.message and "1 more key)" in err.value.message
    # ... and so is a checkpoint that is not of the same architecture as the model.
    with pytest.raises(InputError, match="activation_function"):
        model_info(directory, [other])
    with pytest.raises(InputError, match="activation_function"):
        check_model_matches(directory, index, [other])

    # An index recorded before configs were: weights and tokenizer only, as before.
    legacy = {k: v for k, v in info.items() if k != "config"}
    check_model_matches(other, SimpleNamespace(manifest={"model": legacy}, root="idx"))


def test_a_tokenizer_beyond_the_models_embedding(tmp_path):
    """A pad token added to the tokenizer without resizing the embeddings pads with a token the
    model has (padding is masked: the losses are those of the unpadded texts); any other id
    beyond the embedding is refused in one line."""
    words = build_word_tokenizer([WORDS])
    directory = tmp_path / "m"
    write_workspace_model(tiny_model(words), words, directory)
    rows = tiny_model(words).get_input_embeddings().num_embeddings
    padded = build_word_tokenizer([WORDS])
    padded.add_special_tokens({"pad_token": "[PAD]"})
    assert padded.pad_token_id >= rows
    padded.save_pretrained(directory)
    model, tok = load_causal_lm(directory)
    assert tok.pad_token_id is not None and tok.pad_token_id < rows
    texts = ["the star shines bright . a comet orbits", "the moon glows"]
    shard = tmp_path / "s.jsonl"
    shard.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = ShardSpec(str(shard), "p", "s", None)
    (batch,) = list(train_batches([spec], tok, 32, batch_size=2))
    assert bool((batch.inputs["attention_mask"] == 0).any())  # the short text is padded
    alone = [lm_loss(model, b) for b in train_batches([spec], tok, 32, batch_size=1)]
    # float32 model, padded against alone: sums over ≤ 32 tokens of a softmax over the rows.
    assert_close_f32(lm_loss(model, batch).detach(), torch.cat(alone).detach(), 32 * rows)

    (beyond,) = list(train_batches([spec], tok, 32, batch_size=2))
    beyond.inputs["input_ids"][0, 1] = rows  # a token the model does not have
    with pytest.raises(InputError, match=f"token id {rows}, but the model's embedding has {rows}"):
        lm_loss(model, beyond)
