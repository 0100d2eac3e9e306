"""`ledger index --plan`: what building the index of the registered shards will take."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from attribution import IndexConfig
from attribution.device import resolve_device, resolve_precision
from attribution.language import TextShards, model_info
from attribution.lm import count_train_examples, lm_loss, load_causal_lm, resolve_max_length
from attribution.plan import Plan, plan_build
from ledger.db import session_scope
from ledger.jobs import index_directory, ledger_shards


def plan_ledger_index(
    engine: Engine,
    model_dir: str,
    root: Path,
    config: IndexConfig,
    *,
    max_length: int | None,
    batch_size: int,
    checkpoint_dirs: tuple[str, ...] = (),
    device: str = "auto",
    precision: str = "float32",
) -> tuple[Plan, Path]:
    """The plan of `ledger index` with these settings (nothing is written), and the directory
    the index would go to. Further checkpoints add their layers' share (the same sizes)."""
    with session_scope(engine) as session:
        shards = ledger_shards(session)
    target = resolve_device(device)
    model, tokenizer = load_causal_lm(model_dir, resolve_precision(precision), device=target)
    max_length = resolve_max_length(model, model_dir, max_length)
    rows = count_train_examples(shards, tokenizer, max_length)
    out = index_directory(root, model_info(model_dir, checkpoint_dirs, precision), shards, config,
                          max_length, batch_size)  # fmt: skip
    data = TextShards(shards, tokenizer, max_length, batch_size)
    plan = plan_build(model, lm_loss, data, rows, config, out)
    if checkpoint_dirs:  # not loaded: they share the model's architecture
        plan.scale_for_checkpoints(1 + len(checkpoint_dirs))
    return plan, out
