"""The language-model level API: a local HF causal LM, text shards, and served outputs.

index = index_language_model("model/", shards, "index/")
result = attribute_queries("model/", "index/", read_queries("queries.jsonl"))
result.shares()   # (queries × providers), each row sums to 1 (or 0 if unattributed)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from attribution.config import LANGUAGE_MODEL_INDEX, IndexConfig, ScoreConfig
from attribution.data import Query, ShardSpec, sha256_file
from attribution.device import (
    DEFAULT_DEVICE,
    DEFAULT_PRECISION,
    DeviceSpec,
    Precision,
    resolve_device,
    resolve_precision,
)
from attribution.index import build_index
from attribution.lm import (
    config_differences,
    hash_model_weights,
    hash_tokenizer,
    lm_fisher_loss,
    lm_loss,
    load_causal_lm,
    model_config,
    query_batches,
    resolve_max_length,
    train_batches,
)
from attribution.scoring import ScoreResult, score_queries
from attribution.store import GradientIndex
from attribution.types import Batch, InputError

LOSS_DEFINITION = {
    "train": "summed next-token negative log-likelihood of each chunk",
    "query": "summed negative log-likelihood of the completion tokens given the prompt",
}


@dataclass
class TextShards:
    """Training batches of text shards; re-iterable, in a fixed order (resumable builds)."""

    shards: list[ShardSpec]
    tokenizer: object
    max_length: int
    batch_size: int

    def __iter__(self) -> Iterator[Batch]:
        return train_batches(self.shards, self.tokenizer, self.max_length, self.batch_size)


def model_info(
    model_dir: str | Path,
    checkpoint_dirs: Sequence[str | Path] = (),
    precision: Precision = DEFAULT_PRECISION,
) -> dict:
    """What the manifest records of a model: weights and tokenizer hashes, the weights' hash
    of each further checkpoint the index is built over, and the precision of its forward and
    backward passes when not float32 (indexes in float32 record none, as before the choice)."""
    resolve_precision(precision)
    info = {
        "weights_sha256": hash_model_weights(model_dir),
        "tokenizer_sha256": hash_tokenizer(model_dir),
        "config": model_config(model_dir),
        "loss": LOSS_DEFINITION,
    }
    if precision != DEFAULT_PRECISION:
        info["precision"] = precision
    for d in checkpoint_dirs:
        require_same_config(info["config"], d, f"the model {model_dir}")
    if checkpoint_dirs:
        info["checkpoints"] = [{"weights_sha256": hash_model_weights(d)} for d in checkpoint_dirs]
    return info


def require_same_config(
    expected: dict, model_dir: str | Path, against: str, found: dict | None = None
) -> None:
    """Refuse a model directory whose config.json differs from `expected` in any key both
    hold, naming the first such key; `against` says whose config `expected` is. `found`: the
    directory's `model_config`, when already read."""
    found = found if found is not None else model_config(model_dir)
    differences = config_differences(expected, found)
    if differences:
        key, was, now = differences[0]
        extra = len(differences) - 1
        more = f" (and {extra} more key{'s' if extra > 1 else ''})" if extra else ""
        raise InputError(
            str(Path(model_dir) / "config.json"),
            None,
            key,
            f"{now!r} differs from {was!r} in {against}{more}",
        )


def load_checkpoints(
    checkpoint_dirs: Sequence[str | Path],
    precision: Precision = DEFAULT_PRECISION,
    device: DeviceSpec = None,
) -> list:
    """The models of further checkpoints (weights and config; no tokenizer needed), in
    `precision`, on `device` (None: the CPU)."""
    dtype, target = resolve_precision(precision), _device_or_none(device)
    return [load_causal_lm(d, dtype, tokenizer=False, device=target)[0] for d in checkpoint_dirs]


def index_precision(index: GradientIndex) -> Precision:
    """The precision the index's model ran in (float32 unless it records another): queries
    are scored in the same."""
    return index.manifest.get("model", {}).get("precision", DEFAULT_PRECISION)


def _device_or_none(device: DeviceSpec) -> torch.device | None:
    return None if device is None else resolve_device(device)


def shards_info(shards: list[ShardSpec], max_length: int, batch_size: int) -> dict:
    """What the manifest records of the data: every shard's name, sha256 and provider."""
    return {
        "shards": [
            {"name": s.name, "provider": s.provider, "sha256": s.sha256 or sha256_file(s.path)}
            for s in shards
        ],
        "max_length": max_length,
        "batch_size": batch_size,
    }


def index_language_model(
    model_dir: str | Path,
    shards: list[ShardSpec],
    out_dir: str | Path,
    config: IndexConfig | None = None,
    *,
    max_length: int | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
    loaded: tuple[object, object] | None = None,
    info: dict | None = None,
    checkpoint_dirs: Sequence[str | Path] = (),
    loaded_checkpoints: list | None = None,
    device: DeviceSpec = DEFAULT_DEVICE,
    precision: Precision = DEFAULT_PRECISION,
) -> GradientIndex:
    """Build (or resume) the gradient index of text shards for a local causal LM.

    `max_length` (tokens per training chunk) must not exceed the position limit the model's
    config declares (`n_positions`, `max_position_embeddings` or `n_ctx`); None gives 128, or
    that limit when it is smaller.

    `config` defaults to `LANGUAGE_MODEL_INDEX` (eigenvalues fitted on sampled-label
    gradients). `loaded` (model, tokenizer) and `info` (`model_info(model_dir)`) may be passed
    by a caller that already has them, so the model is neither loaded nor hashed twice.

    `checkpoint_dirs`: earlier checkpoints of the model's training run, indexed with it
    (`build_index(checkpoints=...)`); `loaded_checkpoints` their models, when already loaded.
    They use the model's tokenizer.

    `device`: where the model runs (`auto`, `cpu`, `cuda`, `cuda:N`; see `build_index`).
    `precision`: the dtype of the model's weights, so of its forward and backward passes
    (float32, bfloat16 or float16), recorded in the manifest; the projected gradients and the
    curvature stay float32 / float64 (see `attribution.device`).
    """
    if not shards:
        raise ValueError("no training shards to index")
    dtype, target = resolve_precision(precision), resolve_device(device)
    model, tokenizer = loaded if loaded is not None else load_causal_lm(model_dir, dtype)
    checkpoints = (
        loaded_checkpoints
        if loaded_checkpoints is not None
        else load_checkpoints(checkpoint_dirs, precision)
    )
    max_length = resolve_max_length(model, model_dir, max_length)  # before any file is written
    return build_index(
        model,
        lm_loss,
        TextShards(shards, tokenizer, max_length, batch_size),
        out_dir,
        config or LANGUAGE_MODEL_INDEX,
        fisher_loss=lm_fisher_loss,
        model_info=info if info is not None else model_info(model_dir, checkpoint_dirs, precision),
        data_info=shards_info(shards, max_length, batch_size),
        show_progress=show_progress,
        checkpoints=checkpoints,
        device=target,
    )


def check_model_matches(
    model_dir: str | Path, index: GradientIndex, checkpoint_dirs: Sequence[str | Path] = ()
) -> None:
    """Refuse a model whose weights or tokenizer differ from those the index was built with,
    and checkpoints other than the index's, in number or weights."""
    expected = index.manifest.get("model", {})
    found = model_info(model_dir)
    recorded_config = expected.get("config")  # absent from indexes built before it was recorded
    if recorded_config is not None:
        against = f"the index {index.root}"
        require_same_config(recorded_config, model_dir, against, found["config"])
        for d in checkpoint_dirs:
            require_same_config(recorded_config, d, against)
    recorded = expected.get("tokenizer_sha256")
    if recorded != found["tokenizer_sha256"] and recorded == hash_tokenizer(model_dir, legacy=True):
        found["tokenizer_sha256"] = recorded  # an index hashed the earlier way
    for key in ("weights_sha256", "tokenizer_sha256"):
        if expected.get(key) != found[key]:
            raise InputError(
                str(model_dir),
                None,
                key,
                f"does not match the index {index.root} (index {str(expected.get(key))[:12]}, "
                f"model {found[key][:12]})",
            )
    checkpoints = expected.get("checkpoints", [])
    if len(checkpoints) != len(checkpoint_dirs):
        raise InputError(
            str(model_dir),
            None,
            "checkpoints",
            f"the index {index.root} was built over {len(checkpoints)} further checkpoint(s); "
            f"{len(checkpoint_dirs)} given",
        )
    for number, (d, r) in enumerate(zip(checkpoint_dirs, checkpoints, strict=True), start=1):
        weights = hash_model_weights(d)
        if weights != r["weights_sha256"]:
            raise InputError(
                str(d),
                None,
                "weights_sha256",
                f"does not match checkpoint {number} of the index {index.root} (index "
                f"{r['weights_sha256'][:12]}, checkpoint {weights[:12]})",
            )


def attribute_queries(
    model_dir: str | Path,
    index: GradientIndex | str | Path,
    queries: list[Query],
    config: ScoreConfig | None = None,
    *,
    batch_size: int = 8,
    checkpoint_dirs: Sequence[str | Path] = (),
    device: DeviceSpec = DEFAULT_DEVICE,
) -> ScoreResult:
    """Score served outputs against the index: per-provider positive sums, shares, top-k
    (`checkpoint_dirs`: those the index was built over, in the same order). The model runs on
    `device` (see `build_index`) in the precision the index was built in (`index_precision`);
    the rows are multiplied there too (see `attribution.scoring.score`)."""
    if not isinstance(index, GradientIndex):
        index = GradientIndex.open(index)
    target = resolve_device(device)
    check_model_matches(model_dir, index, checkpoint_dirs)
    precision = index_precision(index)
    model, tokenizer = load_causal_lm(model_dir, resolve_precision(precision), device=target)
    max_length = int(index.manifest["data"].get("max_length", 128))
    batches = query_batches(queries, tokenizer, max_length, batch_size)
    checkpoints = load_checkpoints(checkpoint_dirs, precision, target)
    return score_queries(model, lm_loss, batches, index, config, checkpoints, device=target)
