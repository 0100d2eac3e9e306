"""Outputs attributed per second, end to end, split between the three stages of
`ledger attribute`: query gradients, scoring against the index, and writes to the ledger.

Each stage is timed with the library calls the attribute job makes, on one batch of outputs
(256, the job's default `--batch-size`):

- query gradients: `attribution.scoring.query_gradients` (a forward and backward pass per
  output with the index's LoGra projectors, batches of 16) with a GPT-2 of 4 layers × 256
  wide built in code, on an index of it (`LANGUAGE_MODEL_INDEX`, the default) over a small
  corpus. Its cost depends on the model and not on the index's rows.
- scoring: `attribution.score` (RelatIF, positive part, provider sums, top-10) of those many
  query gradients against synthetic indexes (`benchmarks.common.write_synthetic_index`, the
  real on-disk format) of 10k, 100k and 1M rows × 4,096 dims (16 layers × 256), float16,
  page cache warm.
- ledger writes: `ledger.jobs.query_results` (credits w·share per provider and the top
  examples with their metadata) and `ledger.recording.record_results` in one transaction on a
  fresh SQLite ledger, as `ledger attribute` writes each batch.

End to end, outputs/s = batch / (the three medians' sum); the time of n outputs is n / that.

    python -m benchmarks.attribute_throughput            # 10k, 100k and 1M rows
    python -m benchmarks.attribute_throughput --quick    # 2k rows, small, for a smoke test
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import (
    DEFAULT_DATA_DIR,
    fmt,
    machine_info,
    print_table,
    summary,
    synthetic_index_spec,
    timed,
    warm_page_cache,
    write_results,
    write_synthetic_index,
)

NAME = "attribute_throughput"
SAMPLE = 10_000  # outputs the docs' figure is stated for


def _model_index(root: Path, n_layer: int, n_embd: int, quick: bool):
    """A GPT-2 built in code, saved, and an index of it over a small corpus."""
    from transformers import GPT2LMHeadModel

    from attribution.language import index_language_model
    from attribution.synthetic import (
        TOPICS,
        build_word_tokenizer,
        make_corpus,
        tiny_gpt2_config,
        write_shards,
        write_workspace_model,
    )

    topics = dict(zip(["a", "b", "c"], list(TOPICS)[:3], strict=True))
    corpus = make_corpus({p: TOPICS[t] for p, t in topics.items()}, 6 if quick else 12, seed=1)
    texts = [t for docs in corpus.values() for t in docs]
    tokenizer = build_word_tokenizer(texts)
    config = tiny_gpt2_config(len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=4,
                              n_positions=128)  # fmt: skip
    import torch

    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    write_workspace_model(model, tokenizer, root / "model")
    shards = write_shards(corpus, root / "shards")
    index = index_language_model(root / "model", shards, root / "index", show_progress=False)
    return model, tokenizer, index, texts


def _outputs(texts: list[str], n: int):
    """n served outputs: a few words of a corpus text as prompt, the next ones as completion."""
    from attribution.data import Query

    rng = np.random.default_rng(2)
    start = datetime(2024, 7, 1, tzinfo=UTC)
    out = []
    for i in range(n):
        words = texts[int(rng.integers(len(texts)))].split()
        cut = int(rng.integers(3, 7))
        out.append(
            Query(
                f"out-{i}",
                start + timedelta(minutes=i),
                " ".join(words[:cut]),
                " ".join(words[cut : cut + 12]) or "end",
            )  # fmt: skip
        )
    return out


def _ledger(root: Path, index, name: str):
    """A fresh SQLite ledger with the synthetic index's providers and a started run."""
    from ledger.db import make_engine, session_scope, upgrade
    from ledger.recording import start_run
    from ledger.registry import add_shard, register_index

    engine = make_engine(f"sqlite:///{root / (name + '.db')}")
    upgrade(engine)
    providers = sorted(set(index.metadata_columns(["provider"])["provider"].to_list()))
    with session_scope(engine) as session:
        for p in providers:
            add_shard(session, f"/data/{p}.jsonl", hashlib.sha256(p.encode()).hexdigest(), p, 1)
        register_index(session, index.id, str(index.root), index.manifest)
        run_id = "f" * 64
        start_run(session, run_id, index.id, {"benchmark": NAME})
    return engine, run_id


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--batch", type=int, default=256, help="outputs per batch (--batch-size)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--layer-dim", type=int, default=256, help="k_out·k_in per layer (square)")
    ap.add_argument("--model-layers", type=int, default=4)
    ap.add_argument("--model-width", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.batch, args.layers, args.layer_dim = [2000], 32, 4, 64
        args.model_layers, args.model_width, args.repeats = 2, 64, 1

    import torch

    from attribution import GradientIndex, ScoreConfig, score
    from attribution.lm import lm_loss, query_batches
    from attribution.scoring import query_gradients
    from ledger.db import session_scope
    from ledger.jobs import query_results
    from ledger.recording import record_results

    config = ScoreConfig()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="attribute-throughput-", dir=args.data_dir))
    model, tokenizer, model_index, texts = _model_index(
        work, args.model_layers, args.model_width, args.quick
    )
    outputs = _outputs(texts, args.batch)
    params = sum(p.numel() for p in model.parameters())

    def gradients():
        batches = query_batches(outputs, tokenizer, 128, batch_size=16)
        return query_gradients(model, lm_loss, batches, model_index)

    gradients()  # warm-up
    t_grad = [timed(gradients)[0] for _ in range(args.repeats)]

    results = []
    for rows in args.rows:
        spec = synthetic_index_spec(rows, args.layers, args.layer_dim, "float16")
        root = args.data_dir / f"score-{rows}x{args.layers * args.layer_dim}-float16"
        write_synthetic_index(root, spec)
        index = GradientIndex.open(root)
        warm_page_cache(index.block_files())
        grads = np.random.default_rng(3).standard_normal((args.batch, index.dim))
        result = score(index, grads, config)  # warm-up
        t_score = []
        for _ in range(args.repeats):
            t, result = timed(lambda index=index, grads=grads: score(index, grads, config))
            t_score.append(t)
        t_write = []
        for r in range(args.repeats):
            engine, run_id = _ledger(work, index, f"ledger-{rows}-{r}")

            def write(engine=engine, run_id=run_id, index=index, result=result):
                rows_ = query_results(index, outputs, result)
                with session_scope(engine) as session:
                    return record_results(session, run_id, rows_)

            t, written = timed(write)
            assert written == args.batch
            t_write.append(t)
            engine.dispose()
        g, s, w = (float(np.median(t)) for t in (t_grad, t_score, t_write))
        per_second = args.batch / (g + s + w)
        results.append(
            {
                "rows": rows,
                "dim": index.dim,
                "index_bytes_on_disk": int(sum(p.stat().st_size for p in index.block_files())),
                "query_gradients_seconds": summary(t_grad),
                "scoring_seconds": summary(t_score),
                "ledger_writes_seconds": summary(t_write),
                "split": {
                    "query_gradients": g / (g + s + w),
                    "scoring": s / (g + s + w),
                    "ledger_writes": w / (g + s + w),
                },  # fmt: skip
                "outputs_per_second": per_second,
                f"seconds_for_{SAMPLE}_outputs": SAMPLE / per_second,
            }
        )
        del index, result
        gc.collect()

    payload = {
        "machine": machine_info(),
        "setup": {
            "batch": args.batch,
            "model": f"GPT-2, {args.model_layers} layers × {args.model_width} wide, "
            f"{params:,} parameters, built in code (random weights), CPU",
            "model_index": {"dim": model_index.dim, "config": "LANGUAGE_MODEL_INDEX (default)"},
            "synthetic_index": f"{args.layers} layers × {args.layer_dim} dims, float16, "
            "page cache warm",
            "score_config": {"relatif": config.relatif, "top_k": config.top_k},
            "ledger": "SQLite, one transaction per batch (record_results)",
            "torch_threads": torch.get_num_threads(),
            "repeats": args.repeats,
        },
        "results": results,
    }
    print(
        f"\nattributing {args.batch} outputs per batch, {torch.get_num_threads()} torch threads, "
        f"medians of {args.repeats}; query gradients with a {params:,}-parameter GPT-2"
    )
    print_table(
        [
            (
                f"{r['rows']:,}",
                fmt(r["query_gradients_seconds"]["median"]),
                fmt(r["scoring_seconds"]["median"]),
                fmt(r["ledger_writes_seconds"]["median"]),
                fmt(r["outputs_per_second"], 3),
                fmt(r[f"seconds_for_{SAMPLE}_outputs"] / 60, 3),
            )
            for r in results
        ],
        header=(
            "index rows",
            "gradients s",
            "scoring s",
            "writes s",
            "outputs/s",
            f"min for {SAMPLE:,}",
        ),  # fmt: skip
    )
    path = write_results(NAME, payload, quick=args.quick)
    print(f"written {path}")
    return payload


if __name__ == "__main__":
    main()
