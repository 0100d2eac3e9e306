"""Data-parallel scaling on one machine: an index build and an attribution pass as `torchrun`
jobs of 1 and 2 processes (Gloo on the CPU; NCCL where each process has a GPU).

Model: a randomly initialised GPT-2 (4 layers × 256 wide, 4 heads, vocabulary 4,096, float32,
eager attention); training data: 128 random sequences of 128 tokens in batches of 8, index
blocks of 16 rows (8 blocks, shared out by the ranks). The build is `attribution.build_index`
at the language-model defaults (`LANGUAGE_MODEL_INDEX`: PCA projections k = 32 per side, the
tied head's vocabulary side 1,024 random directions, EKFAC eigenvalues from sampled labels),
i.e. all three passes: first pass (KFAC factors, reduced across ranks), logging, curvature
pass, then self-influence and the manifest. The attribution pass scores 64 outputs (random
sequences, batches of 16) against the index, the ranks taking shares of the outputs (as
`ledger attribute` does).

Every process runs one thread (OMP_NUM_THREADS=1), so 2 processes use the 2 cores one process
with one thread leaves idle; `--threads-baseline` adds one process with as many threads as
cores, what a user gets without torchrun. Throughput is training tokens (outputs for the
attribution pass) per second of the job's own time (from the process group's start to the
result on the main rank: torchrun's start-up of a few seconds is left out and reported);
efficiency = throughput with N processes / (N × throughput with 1 process, one thread). Each
configuration runs `--repeats` times; medians are reported. The index ids of the 1- and
2-process jobs are checked equal (every field of the manifest but its id and code version).

    python -m benchmarks.scale_out
    python -m benchmarks.scale_out --quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import fmt, machine_info, median, print_table, write_results

NAME = "scale_out"
ROOT = Path(__file__).resolve().parent.parent


def _model(args: argparse.Namespace):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab, n_positions=args.seq, n_embd=args.width, n_layer=args.layers,
        n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager",
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def _batches(n: int, args: argparse.Namespace, seed: int, prompt: int = 0) -> list:
    import torch

    from attribution import Batch

    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, args.batch):
        size = min(args.batch, n - start)
        ids = torch.randint(0, args.vocab, (size, args.seq), generator=g)
        labels = ids.clone()
        labels[:, :prompt] = -100
        out.append(
            Batch(
                {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                [f"ex{start + j}" for j in range(size)],
                providers=[f"p{(start + j) % 4}" for j in range(size)],
                shards=["synthetic"] * size,
                token_counts=[args.seq] * size,
            )
        )
    return out


def worker(args: argparse.Namespace) -> None:
    """One rank of a job: build the index, then score this rank's share of the outputs."""
    from dataclasses import replace

    from attribution import LANGUAGE_MODEL_INDEX, build_index
    from attribution.distributed import barrier, process_group
    from attribution.lm import lm_fisher_loss, lm_loss
    from attribution.scoring import score_queries
    from ledger.torchrun import Job

    model = _model(args)
    data = _batches(args.examples, args, seed=1)
    outputs = _batches(args.outputs, replace_batch(args), seed=2, prompt=args.seq // 2)
    config = replace(LANGUAGE_MODEL_INDEX, rows_per_block=args.rows_per_block)
    with process_group() as ranks:
        barrier()
        start = time.perf_counter()
        index = build_index(
            model, lm_loss, data, args.worker, config, fisher_loss=lm_fisher_loss,
            show_progress=False, model_info={"benchmark": NAME},
        )  # fmt: skip
        built = time.perf_counter()
        mine = Job().share(outputs, 1)  # whole batches of 16 outputs
        if mine:
            score_queries(model, lm_loss, mine, index)
        barrier()
        scored = time.perf_counter()
        if ranks.main:
            content = {k: v for k, v in index.manifest.items() if k not in ("id", "code_version")}
            digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
            print(json.dumps({"index": index.id, "content": digest, "build_s": built - start,
                              "attribute_s": scored - built, "rows": index.rows,
                              "dim": index.dim}))  # fmt: skip


def replace_batch(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "batch": 16})


def _job(args: argparse.Namespace, nproc: int, threads: int, scratch: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=scratch))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path,
           "LEDGER_QUIET": "1"}  # fmt: skip
    sizes = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
             ("examples", "outputs", "layers", "width", "vocab", "seq", "batch", "rows-per-block")]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "benchmarks.scale_out", "--worker", str(out),
           *sizes]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"job of {nproc} processes failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small smoke run (not saved as results)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--threads-baseline", action="store_true")
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--outputs", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rows-per-block", type=int, default=16)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.examples, args.outputs, args.layers, args.width = 48, 32, 2, 64
        args.vocab, args.seq, args.rows_per_block, args.repeats = 512, 32, 8, 1
    cores = os.cpu_count() or 1
    configs = [("1 process × 1 thread", 1, 1), ("2 processes × 1 thread", 2, 1)]
    if args.threads_baseline:
        configs.append((f"1 process × {cores} threads", 1, cores))
    machine = machine_info()
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory(prefix="ledger-bench-scale-") as scratch:
        for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
            for name, nproc, threads in configs:
                runs[name].append(_job(args, nproc, threads, Path(scratch)))
    tokens = args.examples * args.seq
    results = {}
    for name, nproc, threads in configs:
        build = median(r["build_s"] for r in runs[name])
        attribute = median(r["attribute_s"] for r in runs[name])
        results[name] = {
            "processes": nproc,
            "threads_per_process": threads,
            "build_s": build,
            "attribute_s": attribute,
            "startup_s": median(r["wall_s"] - r["build_s"] - r["attribute_s"] for r in runs[name]),
            "build_tokens_per_s": tokens / build,
            "attribute_outputs_per_s": args.outputs / attribute,
            "index": runs[name][0]["index"],
            "content": runs[name][0]["content"],
            "runs": runs[name],
        }
    base = results[configs[0][0]]
    for r in results.values():
        r["build_efficiency"] = r["build_tokens_per_s"] / (
            r["processes"] * base["build_tokens_per_s"]
        )
        r["attribute_efficiency"] = r["attribute_outputs_per_s"] / (
            r["processes"] * base["attribute_outputs_per_s"]
        )
    # The manifest but its id and code version (a hash of the source files, which may change
    # between the runs of a benchmark on a shared working tree).
    same = results[configs[0][0]]["content"] == results[configs[1][0]]["content"]
    print_table(
        [
            (name, fmt(r["build_s"], 1), fmt(r["build_tokens_per_s"], 0),
             fmt(r["build_efficiency"], 2), fmt(r["attribute_s"], 1),
             fmt(r["attribute_outputs_per_s"], 1), fmt(r["attribute_efficiency"], 2))
            for name, r in results.items()
        ],
        ("job", "build s", "tokens/s", "eff.", "attribute s", "outputs/s", "eff."),
    )  # fmt: skip
    print(f"index of 1 and 2 processes identical: {same}")
    payload = {
        "machine": machine,
        "setup": {
            "model": "GPT2LMHeadModel, random init, eager attention, float32",
            "layers": args.layers,
            "width": args.width,
            "vocab": args.vocab,
            "seq": args.seq,
            "examples": args.examples,
            "batch": args.batch,
            "rows_per_block": args.rows_per_block,
            "outputs": args.outputs,
            "index_config": "LANGUAGE_MODEL_INDEX",
            "rows": base["runs"][0]["rows"],
            "index_dim": base["runs"][0]["dim"],
            "repeats": args.repeats,
        },  # fmt: skip
        "results": results,
        "index_identical_1_and_2_processes": same,
    }
    path = write_results(NAME, payload, quick=args.quick)
    print(f"results: {path}")
    if not same:
        raise SystemExit("the index of 2 processes differs from that of 1")


if __name__ == "__main__":
    main()
