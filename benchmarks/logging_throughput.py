"""Logging throughput of the gradient index build vs a plain training step, same model and batches.

Model: a randomly initialised GPT-2 (transformers `GPT2LMHeadModel`, eager attention, dropout 0)
of 6 layers × 512 wide, 8 heads, vocabulary 8,192, float32; batches of 8 sequences × 128
tokens of random token ids (every token real). The loss is `attribution.lm.lm_loss`.

- training step: forward + backward (weight gradients) + `torch.optim.AdamW` step, in train
  mode, on a copy of the model;
- logging pass: what `attribution.build_index` runs per batch with the default `IndexConfig`
  (PCA projections, k = 32 per side, every Conv1D layer and the tied output head, whose
  vocabulary side keeps 1,024 random directions):
  `attribution.index._log_gradients` over the same batches into a fresh index directory,
  i.e. `projected_gradients` (forward + backward with frozen parameters, projected hooks,
  per-example Kronecker products), conversion to the storage dtype, and the block writes;
  measured with float32 storage (the default) and float16 storage;
- reported separately: the first pass (`make_projectors`: raw activation and output-gradient
  KFAC factors in float64, output gradients from labels sampled from the model (the default
  `fisher_labels="sampled"`), then the PCA eigendecompositions), the language-model
  default's curvature pass (`sampled_curvature_rows` with `LANGUAGE_MODEL_INDEX`: projected
  gradients of labels drawn from the model, over at most `curvature_examples` examples, here
  all of them) and the index finalisation (curvature fit, self-influence, metadata, manifest).

Throughput is tokens per second (batch × sequence length per batch); the ratio is logging ÷
training (target ≥ 1.0). Steps alternate batch by batch (train, log float32, log float16),
so load from other processes hits all three alike; medians of the per-batch times are reported.
Each logged batch is its own `_log_gradients` call (one small block write per batch, which
slightly favours training).

    python -m benchmarks.logging_throughput
    python -m benchmarks.logging_throughput --quick
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.common import (
    fmt,
    machine_info,
    print_table,
    summary,
    timed,
    write_results,
)

NAME = "logging_throughput"


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.seq,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config).float()
    model.eval()
    return model


def make_batches(args: argparse.Namespace) -> list:
    from attribution.lm import batch_from_token_ids

    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for b in range(args.batches):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).tolist()
        batch = batch_from_token_ids(ids)
        batch.example_ids = [f"b{b}-{i}" for i in range(args.batch)]
        batch.providers = [f"provider-{i % 4}" for i in range(args.batch)]
        batch.shards = ["bench"] * args.batch
        batches.append(batch)
    return batches


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4, help="distinct batches")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.heads, args.seq, args.vocab = 2, 64, 2, 32, 512
        args.batch, args.batches, args.repeats = 4, 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from attribution.config import LANGUAGE_MODEL_INDEX, IndexConfig
    from attribution.index import (
        _finalise,
        _layout,
        _log_gradients,
        fixed_output_projections,
        make_projectors,
        sampled_curvature_rows,
    )
    from attribution.lm import lm_fisher_loss, lm_loss
    from attribution.manifest import write_json
    from attribution.projection import (
        Tracked,
        kfac_factors,
        layer_specs,
        output_head_name,
        projected_gradients,
    )
    from attribution.store import (
        BUILD_FILE,
        FACTORS_FILE,
        PROJECTIONS_FILE,
        save_factors,
        save_projectors,
    )

    model = make_model(args)
    batches = make_batches(args)
    tokens = args.batch * args.seq * args.batches
    configs = {"float32": IndexConfig(), "float16": IndexConfig(dtype="float16")}
    default = IndexConfig()

    # KFAC-factor first pass (default config: sampled labels, PCA), timed once: the whole of
    # `make_projectors`, and the part of it that is the per-batch pass (without the one-time
    # eigendecompositions of the PCA projections).
    t_pca, (layers, projectors, factors) = timed(
        lambda: make_projectors(
            model, lm_loss, batches, default, fisher_loss=lm_fisher_loss, show_progress=False
        )
    )
    members = [Tracked(model, layers, projectors)]
    specs = layer_specs(layers, output_head_name(model, layers))
    fixed_out = fixed_output_projections(specs, default.projection)
    t_factor_pass, _ = timed(
        lambda: kfac_factors(
            model, lm_fisher_loss, batches, layers, None, seed=0, fixed_out=fixed_out
        )
    )

    # The language-model default's curvature pass (labels drawn from the model), timed once
    # over every batch; a corpus above `curvature_examples` runs it on that many examples only.
    examples = args.batch * args.batches
    t_curvature_pass, _ = timed(
        lambda: sum(
            1
            for _ in sampled_curvature_rows(
                members, lm_fisher_loss, batches, LANGUAGE_MODEL_INDEX, examples
            )
        )
    )

    train_model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4)

    def train_step(batch) -> None:
        loss = lm_loss(train_model, batch).sum() / (args.batch * args.seq)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    scratch = Path(tempfile.mkdtemp(prefix="ledger-bench-logging-"))

    def log_step(batch, dtype: str) -> None:
        root = scratch / f"log-{dtype}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        _log_gradients(members, lm_loss, [batch], root, configs[dtype], False)

    try:
        # Warm-up: one step of each kind.
        train_step(batches[0])
        projected_gradients(model, lm_loss, batches[0], layers, projectors)

        # Interleaved per batch, so that load from other processes hits all three alike.
        times: dict[str, list[float]] = {"train": [], "log_float32": [], "log_float16": []}
        for _ in range(args.repeats):
            for batch in batches:
                times["train"].append(timed(lambda b=batch: train_step(b))[0])
                times["log_float32"].append(timed(lambda b=batch: log_step(b, "float32"))[0])
                times["log_float16"].append(timed(lambda b=batch: log_step(b, "float16"))[0])

        # Index finalisation (curvature, self-influence, metadata, manifest) of every batch
        # logged with float32 storage.
        root = scratch / "log-float32"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        _log_gradients(members, lm_loss, batches, root, default, False)
        save_projectors(root / PROJECTIONS_FILE, projectors)
        save_factors(root / FACTORS_FILE, factors)
        layout = _layout(projectors)
        fingerprint = {"config": default.to_dict(), "model": {"benchmark": True}, "data": {}}
        build = {
            "fingerprint": fingerprint,
            "layers": layout,
            "dim": layout[-1]["stop"],
            "config": default.to_dict(),
        }
        write_json(root / BUILD_FILE, build)
        t_final, index = timed(lambda: _finalise(root, build, default, fingerprint))
        dim, rows = index.dim, index.rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    batch_tokens = args.batch * args.seq
    rate = {k: batch_tokens / float(np.median(v)) for k, v in times.items()}
    ratio32 = rate["log_float32"] / rate["train"]
    ratio16 = rate["log_float16"] / rate["train"]
    per_repeat32 = [t / lg for t, lg in zip(times["train"], times["log_float32"], strict=True)]
    per_repeat16 = [t / lg for t, lg in zip(times["train"], times["log_float16"], strict=True)]
    n_params = sum(p.numel() for p in model.parameters())

    payload = {
        "machine": machine_info(),
        "setup": {
            "model": "GPT2LMHeadModel, random init, eager attention, dropout 0, float32",
            "layers": args.layers,
            "width": args.width,
            "heads": args.heads,
            "vocab": args.vocab,
            "parameters": n_params,
            "seq": args.seq,
            "batch": args.batch,
            "batches": args.batches,
            "tokens_per_batch": args.batch * args.seq,
            "repeats": args.repeats,
            "index_config": default.to_dict(),
            "tracked_layers": len(layers),
            "index_dim": dim,
            "rows": rows,
            "train_step": "lm_loss sum / tokens, backward, AdamW(lr=1e-4) step, zero_grad",
            "logging_pass": "attribution.index._log_gradients (projected_gradients + block writes)",
            "order": "per repeat and batch: train step, log float32, log float16 (one block "
            "write per batch, so the logging figures include 8-row block writes)",
        },
        "seconds_per_batch": {k: summary(v) for k, v in times.items()},
        "tokens_per_s": rate,
        "ratio_log_float32_over_train": ratio32,
        "ratio_log_float16_over_train": ratio16,
        "ratio_per_batch": {"float32": per_repeat32, "float16": per_repeat16},
        "ratio_median_per_batch": {
            "float32": float(np.median(per_repeat32)),
            "float16": float(np.median(per_repeat16)),
        },
        "first_pass": {
            "seconds": t_pca,
            "tokens_per_s": tokens / t_pca,
            "factor_pass_seconds": t_factor_pass,
            "factor_pass_tokens_per_s": tokens / t_factor_pass,
            "ratio_factor_pass_over_train": tokens / t_factor_pass / rate["train"],
            "eigendecomposition_seconds": t_pca - t_factor_pass,
        },
        "curvature_pass": {
            "seconds": t_curvature_pass,
            "examples": examples,
            "tokens_per_s": tokens / t_curvature_pass,
            "ratio_over_train": tokens / t_curvature_pass / rate["train"],
            "curvature_examples_cap": LANGUAGE_MODEL_INDEX.curvature_examples,
        },
        "finalise": {"seconds": t_final},
        "target": 1.0,
        "meets_target": bool(ratio32 >= 1.0),
    }
    print(
        f"\nGPT-2 {args.layers}×{args.width} ({n_params / 1e6:.1f}M parameters), "
        f"batch {args.batch} × {args.seq} tokens, {args.batches} batches × {args.repeats} repeats, "
        f"{torch.get_num_threads()} torch threads, medians per batch"
    )
    print_table(
        [
            ("training step (fwd+bwd+AdamW)", fmt(rate["train"], 0), "1.000"),
            ("logging pass, float32 storage", fmt(rate["log_float32"], 0), fmt(ratio32)),
            ("logging pass, float16 storage", fmt(rate["log_float16"], 0), fmt(ratio16)),
            (
                "first pass, per batch (KFAC factors)",
                fmt(tokens / t_factor_pass, 0),
                fmt(tokens / t_factor_pass / rate["train"]),
            ),
            ("first pass, PCA eigendecompositions", f"{t_pca - t_factor_pass:.2f} s", ""),
            (
                "LM curvature pass (sampled labels)",
                fmt(tokens / t_curvature_pass, 0),
                fmt(tokens / t_curvature_pass / rate["train"]),
            ),
            ("finalise (curvature, manifest)", f"{t_final:.2f} s", ""),
        ],
        header=("", "tokens/s", "÷ training"),
    )
    path = write_results(NAME, payload, quick=args.quick)
    print(f"written {path}")
    return payload


if __name__ == "__main__":
    main()
