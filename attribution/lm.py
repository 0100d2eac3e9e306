"""Hugging Face causal language models: loading, hashing, batching text, and the LM loss.

Tokenisation conventions (shared by training examples and queries, so their losses agree):

- Texts are tokenised with `add_special_tokens=False`; if the tokenizer defines a BOS token, it
  is prepended to each training text and to each query's prompt, so the first real token has a
  prediction too. (Our word-level test tokenizer has no BOS; GPT-2's BOS is `<|endoftext|>`.)
- A training text becomes consecutive, non-overlapping chunks of at most `max_length` tokens.
  Chunks of fewer than 2 tokens are dropped, even when that leaves a text with no example: they
  contain no next-token prediction, so their loss, gradient and self-influence are all zero,
  and RelatIF would divide by zero.
- Batches are right-padded; `labels` are `input_ids` with -100 at padding (and, for queries, on
  the prompt), and the loss at position t predicts `labels[t + 1]` from tokens `<= t`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from attribution.config import DEFAULT_MAX_LENGTH
from attribution.data import Query, ShardSpec, read_shard_texts, sha256_file
from attribution.types import Batch, InputError, first_line

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LM_INPUT_KEYS = ("input_ids", "attention_mask", "labels")
"""The keys of a language-model batch's `inputs` (see `batch_from_token_ids`)."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
)


ATTENTION = "sdpa"
"""The attention the models are loaded with: PyTorch's fused scaled-dot-product attention.
The per-example gradients come from hooks on the Linear layers, which see the same inputs and
output gradients whatever computes the attention between them (tests/attribution/
test_architectures.py compares the rows of eager and SDPA attention). Only the `torch.func`
reference computations of the tests need eager attention (SDPA does not support `vmap` of
its backward); they build their models with it."""


def load_causal_lm(
    model_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    device: torch.device | None = None,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer from a local directory, in eval mode, with its
    weights in `dtype` (the precision of its forward and backward passes) and on `device`
    (None: the CPU).

    Attention is `ATTENTION` (SDPA); nothing is downloaded. A tokenizer without a pad token
    gets its EOS token as pad. `tokenizer=False` loads the model only (a checkpoint directory
    need not hold a tokenizer) and gives None.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress is shown by our own bars only

    model_dir = str(model_dir)
    if not os.path.isdir(model_dir):
        raise InputError(model_dir, None, None, "model directory not found")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise InputError(
            model_dir, None, None, "no config.json: not a Hugging Face model directory"
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a failure is reported below, in one line
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation=ATTENTION, dtype=dtype, local_files_only=True
        )
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True) if tokenizer else None
    except Exception as exc:  # noqa: BLE001 - every loader failure is a problem of the directory
        # (bad JSON, truncated or mismatched weights, missing files), reported in one line.
        detail = first_line(exc)
        if "ignore_mismatched_sizes" in detail or "size mismatch" in str(exc):
            detail = "the weights' shapes do not match config.json"
        raise InputError(
            model_dir, None, None, f"cannot load model or tokenizer: {type(exc).__name__}: {detail}"
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if tok is not None and tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    rows = embedding_rows(model)
    if tok is not None and rows is not None and (tok.pad_token_id or 0) >= rows:
        # A pad token added to the tokenizer without resizing the model's embeddings: padded
        # positions are masked, so any token the model has pads as well (EOS, else id 0).
        eos = tok.eos_token_id
        tok.pad_token = tok.eos_token if eos is not None and eos < rows else None
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok


def embedding_rows(model: nn.Module) -> int | None:
    """How many token ids the model's input embedding takes (None when it has none)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embedding, "num_embeddings", None)


POSITION_LIMIT_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")
"""Config fields in which Hugging Face models declare how many token positions they take."""


def position_limit(model: nn.Module) -> tuple[str, int] | None:
    """`(config field, tokens)`: the fewest positions the model's config declares, if any."""
    config = getattr(model, "config", None)
    declared = config.to_dict() if hasattr(config, "to_dict") else {}
    limits = [
        (declared[name], name)
        for name in POSITION_LIMIT_FIELDS
        if isinstance(declared.get(name), int) and declared[name] > 0
    ]
    if not limits:
        return None
    tokens, name = min(limits)
    return name, tokens


def resolve_max_length(
    model: nn.Module, model_dir: str | os.PathLike[str], max_length: int | None
) -> int:
    """Tokens per training chunk: `max_length`, refused beyond the model's position limit
    (`check_max_length`); None gives `DEFAULT_MAX_LENGTH`, or the limit when that is smaller."""
    if max_length is None:
        limit = position_limit(model)
        return DEFAULT_MAX_LENGTH if limit is None else min(DEFAULT_MAX_LENGTH, limit[1])
    check_max_length(model, model_dir, max_length)
    return max_length


def check_max_length(model: nn.Module, model_dir: str | os.PathLike[str], max_length: int) -> None:
    """Refuse chunks longer than the model's position limit: the forward pass would index past
    its position embeddings (an `IndexError` deep in the model)."""
    limit = position_limit(model)
    if limit is not None and max_length > limit[1]:
        name, tokens = limit
        raise InputError(
            os.path.join(str(model_dir), "config.json"),
            None,
            name,
            f"the model takes at most {tokens} tokens, so the max length must be at most "
            f"{tokens} (got {max_length})",
        )


def _hash_named_files(paths: Iterable[Path]) -> str:
    # Hash "name\0sha256\n" lines so names and contents both count, unambiguously.
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def hash_model_weights(model_dir: str | os.PathLike[str]) -> str:
    """Hex sha256 over the directory's `*.safetensors` files (sorted names and their bytes)."""
    if not Path(model_dir).is_dir():
        raise InputError(str(model_dir), None, None, "model directory not found")
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise InputError(
            str(model_dir),
            None,
            None,
            "no *.safetensors weight files (the ledger hashes weights in that format; convert "
            "with `model.save_pretrained(DIR, safe_serialization=True)`)",
        )
    return _hash_named_files(files)


# Keys of a loaded model config about where and how it was saved or runs, not what it computes.
_CONFIG_RUNTIME_KEYS = ("transformers_version", "torch_dtype", "dtype", "use_cache")


def model_config(model_dir: str | os.PathLike[str]) -> dict:
    """The model's architecture as the installed transformers reads it from config.json:
    `AutoConfig(...).to_dict()` in JSON form, without private keys (`_name_or_path`, ...) and
    `_CONFIG_RUNTIME_KEYS`. Compared key by key (`config_differences`), so keys a newer
    transformers adds do not make the same model differ."""
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InputError(
            str(path), None, None, "no config.json: not a Hugging Face model directory"
        )
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True).to_dict()
    except Exception as exc:  # noqa: BLE001 - any failure to read it is a problem of the file
        raise InputError(str(path), None, None, f"cannot read: {first_line(exc)}") from exc
    kept = {
        k: v for k, v in config.items() if not k.startswith("_") and k not in _CONFIG_RUNTIME_KEYS
    }
    return json.loads(json.dumps(kept, sort_keys=True, default=str))


def config_differences(recorded: dict, found: dict) -> list[tuple[str, object, object]]:
    """(key, recorded value, found value) of every key both configs hold with other values."""
    return [(k, recorded[k], found[k]) for k in sorted(recorded.keys() & found.keys())
            if recorded[k] != found[k]]  # fmt: skip


# Keys transformers writes into tokenizer_config.json about how it was loaded, not what it is.
_LOAD_ONLY_KEYS = ("local_files_only", "is_local", "name_or_path", "_commit_hash", "cache_dir")


# A special token written out in full with these attributes is the same token as its bare
# string (transformers writes either form, depending on its version).
_PLAIN_SPECIAL_TOKEN = {"lstrip": False, "rstrip": False, "single_word": False, "normalized": False}


def _plain_special_tokens(value: object) -> object:
    """`{"content": "<eos>", "lstrip": false, ...}` → `"<eos>"` when every other attribute is
    the plain default; lists of tokens element by element; anything else unchanged."""
    if isinstance(value, list):
        return [_plain_special_tokens(v) for v in value]
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        rest = {k: v for k, v in value.items() if k not in ("content", "special")}
        if all(_PLAIN_SPECIAL_TOKEN.get(k, object()) == v for k, v in rest.items()):
            return value["content"]
    return value


def _canonical_json_hash(path: Path, special_tokens: bool) -> str:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(str(path), None, None, f"malformed JSON: {exc}") from exc
    if isinstance(config, dict):
        for key in _LOAD_ONLY_KEYS:
            config.pop(key, None)
        if special_tokens:
            config = {k: _plain_special_tokens(v) for k, v in config.items()}
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def hash_tokenizer(model_dir: str | os.PathLike[str], legacy: bool = False) -> str:
    """Hex sha256 over the tokenizer files present (`TOKENIZER_FILES`, sorted by name).

    `tokenizer_config.json` and `special_tokens_map.json` are hashed in canonical JSON form,
    the first without the keys transformers adds when re-saving a loaded tokenizer
    (`local_files_only`, `is_local`, ...), the second with plain special tokens as bare strings
    (`"<eos>"`, however written), so saving a loaded tokenizer again, with this or another
    version of transformers, keeps its hash; every other file is hashed byte for byte.
    `legacy`: the hash of indexes built before special tokens were canonicalised
    (`special_tokens_map.json` byte for byte).
    """
    files = sorted(p for name in TOKENIZER_FILES if (p := Path(model_dir) / name).is_file())
    if not files:
        raise InputError(str(model_dir), None, None, "no tokenizer files")
    canonical = ("tokenizer_config.json",) + (() if legacy else ("special_tokens_map.json",))
    digest = hashlib.sha256()
    for path in files:
        if path.name in canonical:
            file_hash = _canonical_json_hash(path, path.name == "special_tokens_map.json")
        else:
            file_hash = sha256_file(path)
        digest.update(f"{path.name}\0{file_hash}\n".encode())
    return digest.hexdigest()


def chunk_token_ids(ids: list[int], max_length: int) -> list[list[int]]:
    """Split `ids` into consecutive non-overlapping chunks of at most `max_length` tokens.

    Chunks shorter than 2 tokens are dropped (see the module docstring), so a 1-token text or
    a 1-token remainder yields nothing.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [chunk for chunk in chunks if len(chunk) >= 2]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None else []


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else 0


def _collate(
    rows: list[tuple[list[int], list[int]]],
    pad_id: int,
    example_ids: list[str],
    providers: list[str],
    shards: list[str],
) -> Batch:
    """Right-pad `(input_ids, labels)` rows into one `Batch`."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return Batch(
        inputs={"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels},
        example_ids=example_ids,
        providers=providers,
        shards=shards,
        token_counts=[len(ids) for ids, _ in rows],
        mask=attention_mask,
    )


def batch_from_token_ids(
    sequences: Sequence[Sequence[int]],
    pad_id: int | None = 0,
    *,
    example_ids: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    shards: Sequence[str] | None = None,
    labels: Sequence[Sequence[int]] | None = None,
    first_id: int = 0,
) -> Batch:
    """A `Batch` of pre-tokenised sequences, as `lm_loss` and `lm_fisher_loss` take it.

    `inputs` is the dict `{"input_ids", "attention_mask", "labels"}` of (B, T) long tensors,
    right-padded with `pad_id` (None: 0; padding is masked); `labels` are the sequences
    themselves (the training loss: every token after the first is predicted), or the given
    per-sequence `labels`, of the same lengths, with -100 (`IGNORE_INDEX`) on tokens that are
    not scored (a query's prompt). Padding is always -100.

    `example_ids`: one unique id per sequence (an index refuses a repeated id); without them
    the ids are `str(first_id)`, `str(first_id + 1)`, ..., so batches of one corpus need
    `first_id` set to the number of sequences before them. `providers` and `shards`: one per
    sequence, stored with each row of an index (empty when not given). `token_counts` are the
    sequences' lengths.
    """
    sequences = [list(ids) for ids in sequences]
    n = len(sequences)
    if labels is None:
        label_rows = sequences
    else:
        label_rows = [list(row) for row in labels]
        if len(label_rows) != n:
            raise ValueError(f"{len(label_rows)} label rows for {n} sequences")
        for i, (ids, labs) in enumerate(zip(sequences, label_rows, strict=True)):
            if len(labs) != len(ids):
                raise ValueError(
                    f"sequence {i} has {len(ids)} tokens but {len(labs)} labels (one per token, "
                    f"{IGNORE_INDEX} where not scored)"
                )
    for name, values in (("example_ids", example_ids), ("providers", providers),
                         ("shards", shards)):  # fmt: skip
        if values is not None and len(values) != n:
            raise ValueError(f"{len(values)} {name} for {n} sequences")
    if any(len(ids) == 0 for ids in sequences):
        raise ValueError("a sequence has no tokens")
    ids = [str(i) for i in range(first_id, first_id + n)] if example_ids is None else example_ids
    return _collate(
        list(zip(sequences, label_rows, strict=True)),
        0 if pad_id is None else pad_id,
        example_ids=[str(i) for i in ids],
        providers=list(providers or []),
        shards=list(shards or []),
    )


def token_batches(
    sequences: Sequence[Sequence[int]],
    example_ids: Sequence[str],
    providers: Sequence[str] | None = None,
    *,
    batch_size: int = 8,
    pad_id: int | None = 0,
    shards: Sequence[str] | None = None,
) -> list[Batch]:
    """Pre-tokenised training sequences with their ids (and providers, shards) as a list of
    `batch_from_token_ids` batches of at most `batch_size`, in the given order: the
    re-iterable data `build_index` takes. Long texts should be cut to the model's context first
    (`chunk_token_ids`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(sequences)
    for name, values in (("example_ids", example_ids), ("providers", providers),
                         ("shards", shards)):  # fmt: skip
        if values is not None and len(values) != n:
            raise ValueError(f"{len(values)} {name} for {n} sequences")
    return [
        batch_from_token_ids(
            sequences[a : a + batch_size],
            pad_id,
            example_ids=example_ids[a : a + batch_size],
            providers=None if providers is None else providers[a : a + batch_size],
            shards=None if shards is None else shards[a : a + batch_size],
        )
        for a in range(0, n, batch_size)
    ]


def iter_train_examples(
    shards: list[ShardSpec], tokenizer, max_length: int
) -> Iterator[tuple[str, ShardSpec, list[int]]]:
    """Yield `(example_id, shard, token_ids)` for every training chunk, in a fixed order.

    Order: shards as given, rows in file order, chunks in text order. Example ids are
    `f"{shard.name}:{row}:{chunk}"` with 0-based row and chunk.
    """
    bos = _bos(tokenizer)
    for shard in shards:
        for row, text in read_shard_texts(shard.path):
            for c, chunk in enumerate(chunk_token_ids(bos + _encode(tokenizer, text), max_length)):
                yield f"{shard.name}:{row}:{c}", shard, chunk


def count_train_examples(shards: list[ShardSpec], tokenizer, max_length: int) -> int:
    """Number of examples `train_batches` yields (tokenises every text once)."""
    return sum(1 for _ in iter_train_examples(shards, tokenizer, max_length))


def train_batches(
    shards: list[ShardSpec], tokenizer, max_length: int, batch_size: int
) -> Iterator[Batch]:
    """Batches of training chunks, in the deterministic order of `iter_train_examples`.

    Every batch but the last has `batch_size` examples; labels are the input ids with -100 at
    padding, so the loss is each chunk's summed next-token negative log-likelihood.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pad_id = _pad_id(tokenizer)
    pending: list[tuple[str, ShardSpec, list[int]]] = []

    def flush() -> Batch:
        batch = _collate(
            [(ids, ids) for _, _, ids in pending],
            pad_id,
            example_ids=[eid for eid, _, _ in pending],
            providers=[shard.provider for _, shard, _ in pending],
            shards=[shard.name for _, shard, _ in pending],
        )
        pending.clear()
        return batch

    for example in iter_train_examples(shards, tokenizer, max_length):
        pending.append(example)
        if len(pending) == batch_size:
            yield flush()
    if pending:
        yield flush()


def encode_query(
    query: Query, tokenizer, max_length: int, warn: bool = True
) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)` for one query: labels are -100 on the prompt (and BOS).

    Prompt and completion are tokenised separately so the boundary is exact. Too long: the
    prompt is cut from the left; a completion longer than `max_length` keeps its first
    `max_length` tokens (with a warning unless `warn` is false: a check before scoring).
    """
    prompt = _bos(tokenizer) + _encode(tokenizer, query.prompt)
    completion = _encode(tokenizer, query.completion)
    if not completion:
        raise InputError("<queries>", None, "completion", f"query {query.id!r} has no tokens")
    if len(completion) > max_length:
        if warn:
            logger.warning(
                "query %s: completion of %d tokens truncated to %d",
                query.id,
                len(completion),
                max_length,
            )
        completion = completion[:max_length]
    prompt = prompt[len(prompt) - min(len(prompt), max_length - len(completion)) :]
    if not prompt and warn:
        logger.warning(
            "query %s: no prompt context, the first completion token is not scored", query.id
        )
    ids = prompt + completion
    labels = [IGNORE_INDEX] * len(prompt) + completion
    return ids, labels


def query_batches(
    queries: list[Query], tokenizer, max_length: int, batch_size: int
) -> Iterator[Batch]:
    """Batches of queries in the given order; the loss is the completion's negative
    log-likelihood given the prompt. `example_ids` are the query ids; `providers` is empty."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pad_id = _pad_id(tokenizer)
    for start in range(0, len(queries), batch_size):
        group = queries[start : start + batch_size]
        rows = [encode_query(q, tokenizer, max_length) for q in group]
        yield _collate(rows, pad_id, [q.id for q in group], providers=[], shards=[])


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-example summed token negative log-likelihood, shape (B,).

    `batch.inputs` is a dict of (B, T) long tensors `input_ids`, `attention_mask` and `labels`
    (the input ids with -100 where a token is not scored: padding, a query's prompt), as
    `batch_from_token_ids` builds it; anything else is refused naming these keys.

    `logits[:, :-1]` predict `labels[:, 1:]`; positions labelled -100 (padding, prompts) do
    not count. Computed in the model's dtype when it is float32 or float64, else in float32.
    """
    return _token_nll(model, batch, sample=False)


def lm_fisher_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """`lm_loss` with every counted target token drawn from the model's own next-token
    distribution (the true Fisher's labels); positions labelled -100 still do not count."""
    return _token_nll(model, batch, sample=True)


def _token_nll(model: nn.Module, batch: Batch, sample: bool) -> torch.Tensor:
    from attribution.fisher import sample_targets

    inputs = batch.inputs
    missing = [k for k in LM_INPUT_KEYS if k not in inputs] if isinstance(inputs, Mapping) else None
    if missing is None or missing:
        found = (
            f"a {type(inputs).__name__}"
            if missing is None
            else f"a mapping without {', '.join(repr(k) for k in missing)}"
        )
        raise TypeError(
            "lm_loss and lm_fisher_loss take batches whose inputs are a dict of (B, T) long "
            "tensors 'input_ids', 'attention_mask' and 'labels' (input ids with -100 where not "
            f"scored: padding, prompts); got {found}. Build them with "
            "attribution.lm.batch_from_token_ids or token_batches"
        )
    rows = embedding_rows(model)
    if rows is not None and inputs["input_ids"].numel() and int(inputs["input_ids"].max()) >= rows:
        raise InputError(
            str(getattr(model.config, "_name_or_path", "") or "the model"),
            None,
            "vocab_size",
            f"the tokenizer gives token id {int(inputs['input_ids'].max())}, but the model's "
            f"embedding has {rows} rows: they do not match (resize the embeddings with "
            "model.resize_token_embeddings(len(tokenizer)) and save the model again)",
        )
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    shifted_logits = logits[:, :-1, :]
    targets = inputs["labels"][:, 1:].to(logits.device)
    if sample:
        targets = torch.where(targets != IGNORE_INDEX, sample_targets(shifted_logits), targets)
    token_nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    return token_nll.sum(dim=1)
