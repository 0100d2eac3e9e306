"""The attribution core on a GPU: throughput, memory, and agreement with a CPU build.

    python -m benchmarks.gpu            # on the first GPU torch sees
    python -m benchmarks.gpu --quick    # small models, for a check of the script

Exits with status 2 and a message when torch sees no GPU. Measures, in bfloat16 with SDPA
attention, sequence 1,024 (random token ids, every token real):

- training step (forward, backward with weight gradients, AdamW step, train mode) and the
  logging pass (`attribution.index._log_gradients` with the language-model defaults: PCA
  projections from a first pass, k = 32 per side, the head's vocabulary side 1,024 random
  directions; rows copied through pinned buffers and written by the writer thread), tokens/s
  and their ratio (target ≥ 1.0), and the peak device memory of each, for GPT-2 small
  (124M) and a randomly initialised Llama-style model of about 1.1B parameters (2,048 wide,
  16 layers, grouped-query attention, untied head, vocabulary 32,000);
- scoring ÷ the device's own matmul of the same shapes (100k rows × 4,096 dims × 256 queries,
  float32 rows streamed from a memory-mapped index on disk, target ≥ 0.7);
- agreement: a tiny GPT-2 in float32 indexed and scored on the GPU and on the CPU; the stored
  rows must agree to 1e-4 of each layer's largest entry and every provider share to 1e-4
  (float32 kernels that sum in other orders differ by about 1e-6); the script exits with
  status 1 when they do not.

Results: benchmarks/results/gpu.json, with the card's name.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.common import machine_info, synthetic_index_spec, write_results

NAME = "gpu"
ROW_TOLERANCE = 1e-4
"""Stored rows, GPU against CPU: |difference| ≤ this × the layer's largest |entry|."""
SHARE_TOLERANCE = 1e-4
"""Provider shares, GPU against CPU: |difference| ≤ this."""


def gpt2_small():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def llama_1b():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1024,
        tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def tiny_gpt2(quick_width: int = 64, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=512, n_positions=128, n_embd=quick_width, n_layer=layers,
                        n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def token_batches(vocab: int, batch: int, seq: int, count: int, seed: int = 0) -> list:
    from attribution.lm import batch_from_token_ids

    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(count):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).tolist()
        out.append(batch_from_token_ids(
            ids, example_ids=[f"b{b}-{i}" for i in range(batch)],
            providers=[f"provider-{i % 4}" for i in range(batch)],
        ))  # fmt: skip
    return out


def synchronized(device: torch.device, fn) -> float:
    """Seconds of `fn()`, the device's queued work included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda d: None)
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def throughput(name: str, model, batch: int, seq: int, count: int, device, scratch: Path) -> dict:
    """Training step and logging pass of one model, tokens/s and peak memory."""
    from attribution.config import LANGUAGE_MODEL_INDEX
    from attribution.index import _log_gradients, make_projectors

    # Random projections: the logging pass costs the same as under PCA (the same k), and PCA's
    # raw factors of a 1B model (up to 8,192 × 8,192 per side and layer) exceed the first
    # pass's 16 GiB limit; the first pass is reported for one batch.
    from attribution.lm import lm_fisher_loss, lm_loss
    from attribution.projection import Tracked

    vocab = model.config.vocab_size
    batches = token_batches(vocab, batch, seq, count)
    tokens = batch * seq * count
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    config = dataclasses.replace(
        LANGUAGE_MODEL_INDEX,
        projection=dataclasses.replace(LANGUAGE_MODEL_INDEX.projection, kind="random"),
    )

    t_first = synchronized(device, lambda: make_projectors(
        model, lm_loss, batches[:1], config, fisher_loss=lm_fisher_loss, show_progress=False,
    ))  # fmt: skip
    layers, projectors, _ = make_projectors(
        model, lm_loss, batches[:1], config, fisher_loss=lm_fisher_loss, show_progress=False
    )
    members = [Tracked(model, layers, projectors).on_model_device()]

    def log_all() -> None:
        root = scratch / f"{name}-log"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        _log_gradients(members, lm_loss, batches, root, config, False)

    log_all()  # warm-up
    reset_peak(device)
    t_log = synchronized(device, log_all)
    peak_log = peak(device)

    train_model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-5)

    def train_all() -> None:
        for b in batches:
            inputs = {k: v.to(device) for k, v in b.inputs.items()}
            loss = lm_loss(train_model, type(b)(inputs, b.example_ids)).sum() / (batch * seq)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    train_all()  # warm-up (and the optimizer's state)
    reset_peak(device)
    t_train = synchronized(device, train_all)
    peak_train = peak(device)
    params = sum(p.numel() for p in model.parameters())
    row = {
        "model": name,
        "parameters": params,
        "batch": batch,
        "seq": seq,
        "train_tokens_per_s": round(tokens / t_train, 1),
        "log_tokens_per_s": round(tokens / t_log, 1),
        "log_over_train": round(t_train / t_log, 3),
        "peak_train_gib": round(peak_train / 2**30, 2),
        "peak_log_gib": round(peak_log / 2**30, 2),
        "first_pass_one_batch_s": round(t_first, 2),
    }
    print(f"{name}: {params / 1e6:.0f}M parameters, training {row['train_tokens_per_s']:,.0f} "
          f"tokens/s, logging {row['log_tokens_per_s']:,.0f} tokens/s, ratio "
          f"{row['log_over_train']:.2f}; peak {row['peak_train_gib']} / {row['peak_log_gib']} "
          "GiB", flush=True)  # fmt: skip
    model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def scoring(rows: int, queries: int, device, scratch: Path) -> dict:
    """`score` on the device against the device's matmul of the same shapes."""
    from attribution import ScoreConfig, score
    from attribution.store import GradientIndex
    from benchmarks.common import write_synthetic_index

    spec = synthetic_index_spec(rows, 16, 256, "float32")
    root = write_synthetic_index(scratch / "score-index", spec, verbose=False)
    index = GradientIndex.open(root)
    q = np.random.default_rng(0).standard_normal((queries, index.dim))
    config = ScoreConfig(top_k=10, memory_budget_mb=1024)
    score(index, q, config, device=device)  # warm-up: page cache and kernels
    t_score = min(synchronized(device, lambda: score(index, q, config, device=device))
                  for _ in range(3))  # fmt: skip
    g = torch.from_numpy(index.dense().numpy()).to(device)
    qt = torch.from_numpy(q.astype(np.float32)).to(device).T.contiguous()
    torch.mm(g, qt)
    t_mm = min(synchronized(device, lambda: torch.mm(g, qt)) for _ in range(3))
    pairs = rows * queries
    row = {
        "rows": rows,
        "dims": index.dim,
        "queries": queries,
        "score_pairs_per_s": round(pairs / t_score / 1e6, 1),
        "matmul_pairs_per_s": round(pairs / t_mm / 1e6, 1),
        "score_over_matmul": round(t_mm / t_score, 3),
    }
    print(f"scoring {row['score_pairs_per_s']} M pairs/s, matmul {row['matmul_pairs_per_s']} "
          f"M pairs/s: ratio {row['score_over_matmul']:.2f}", flush=True)  # fmt: skip
    return row


def agreement(device, scratch: Path) -> dict:
    """A tiny float32 model indexed and scored on the GPU and on the CPU."""
    from attribution import IndexConfig, ProjectionConfig, build_index, score_queries
    from attribution.lm import lm_fisher_loss, lm_loss

    torch.manual_seed(0)
    base = tiny_gpt2().float().eval()
    batches = token_batches(512, 8, 64, 6, seed=1)
    queries = token_batches(512, 4, 32, 2, seed=2)
    # Training labels throughout: labels drawn from the model come from the device's own
    # random generator, so a GPU and a CPU draw different (equally valid) ones.
    config = IndexConfig(projection=ProjectionConfig(kind="random", k_in=8, k_out=8),
                         fisher_labels="data", curvature_labels="data",
                         rows_per_block=16)  # fmt: skip
    built = {}
    for where in ("cpu", device):
        model = copy.deepcopy(base)
        root = scratch / f"agree-{torch.device(where).type}"
        index = build_index(model, lm_loss, batches, root, config, fisher_loss=lm_fisher_loss,
                            show_progress=False, device=where)  # fmt: skip
        result = score_queries(model, lm_loss, queries, index, device=where)
        built[torch.device(where).type] = (index.dense().numpy().astype(np.float64), result)
    (rows_cpu, res_cpu), (rows_gpu, res_gpu) = built["cpu"], built[device.type]
    worst_row = 0.0
    for layer in index.build["layers"]:
        a, b = layer["start"], layer["stop"]
        scale = np.abs(rows_cpu[:, a:b]).max() or 1.0
        worst_row = max(worst_row, float(np.abs(rows_gpu[:, a:b] - rows_cpu[:, a:b]).max() / scale))
    worst_share = float(np.abs(res_gpu.shares() - res_cpu.shares()).max())
    ok = worst_row <= ROW_TOLERANCE and worst_share <= SHARE_TOLERANCE
    print(f"GPU against CPU: rows within {worst_row:.2e} of each layer's largest entry "
          f"(tolerance {ROW_TOLERANCE:g}), shares within {worst_share:.2e} (tolerance "
          f"{SHARE_TOLERANCE:g}): {'ok' if ok else 'DIFFERENT'}", flush=True)  # fmt: skip
    return {"row_difference": worst_row, "share_difference": worst_share, "ok": ok,
            "row_tolerance": ROW_TOLERANCE, "share_tolerance": SHARE_TOLERANCE}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models, for a check of the script")
    ap.add_argument("--device", default="cuda",
                    help="cuda (default), cuda:N; cpu runs the script's code without a GPU "
                    "(its figures are then CPU figures and nothing is written)")  # fmt: skip
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.gpu: torch sees no CUDA GPU here; run it on a machine with one",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {card}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="ledger-bench-gpu-"))
    try:
        check = agreement(device, scratch)
        if args.quick:
            models = [throughput("tiny GPT-2", tiny_gpt2(256, 4), 4, 128, 3, device, scratch)]
            score_row = scoring(20_000, 64, device, scratch)
        else:
            models = [
                throughput("GPT-2 small", gpt2_small(), 8, 1024, 4, device, scratch),
                throughput("Llama-style 1.1B", llama_1b(), 4, 1024, 4, device, scratch),
            ]
            score_row = scoring(100_000, 256, device, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    payload = {
        "command": "python -m benchmarks.gpu" + (" --quick" if args.quick else ""),
        "device": card,
        "torch": torch.__version__,
        "machine": machine_info(),
        "precision": "bfloat16",
        "attention": "sdpa",
        "throughput": models,
        "scoring": score_row,
        "gpu_against_cpu": check,
    }
    if device.type == "cuda":
        write_results(NAME, payload, quick=args.quick)
    if not check["ok"]:
        raise SystemExit(1)
    return payload


if __name__ == "__main__":
    main()
