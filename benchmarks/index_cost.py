"""The cost of a whole `ledger index` against one epoch of training, same model, same chunks.

Model: a randomly initialised GPT-2 (transformers `GPT2LMHeadModel`, dropout 0) of 6 layers ×
512 wide, 8 heads, vocabulary 8,192 (a word-level tokenizer built here), saved as a workspace
model. Corpus: `--chunks` rows (default 20,000) of Zipf-distributed words, each exactly one
chunk of `--seq` (128) tokens, in four provider shards.

- one training epoch: the model as `ledger` loads it, in train mode, over the batches of the
  same chunks (`attribution.lm.train_batches`, 8 per batch, tokenised as the index reads
  them): forward + backward + `torch.optim.AdamW` step. It runs in two halves, before and
  after the index build, so that load from elsewhere hits both sides alike;
- the index build: `ledger -v index --model MODEL --max-length 128` as a user runs it, default
  settings, in its own process: wall time of the whole command (start-up, model loading, shard
  checks and the ledger's bookkeeping included), and each pass's time from its log lines.

The ratio is index throughput ÷ training throughput = epoch seconds ÷ index seconds (target
≥ 1.0: indexing a corpus costs less than one epoch of training on it). The logging pass alone
is reported beside it.

    python -m benchmarks.index_cost                 # 20,000 chunks, about an hour on 2 cores
    python -m benchmarks.index_cost --chunks 4000   # shorter; fixed costs weigh more
    python -m benchmarks.index_cost --quick         # tiny smoke run of the pipeline
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.common import fmt, machine_info, print_table, write_results

NAME = "index_cost"
PROVIDERS = ("north-wire", "lakeside-books", "open-forum", "field-notes")
PASS_LINE = re.compile(r"(?P<name>[^\n]+?) took (?P<seconds>[0-9.]+) s$")


def make_workspace(root: Path, args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The model directory and one shard per provider, every row one chunk of `args.seq`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from attribution.synthetic import build_word_tokenizer, write_jsonl, write_workspace_model

    words = [f"w{i}" for i in range(args.vocab - 3)]  # + <unk>, <pad>, <eos>
    tokenizer = build_word_tokenizer([" ".join(words)])
    assert len(tokenizer) == args.vocab, len(tokenizer)
    per_row = args.seq - (1 if tokenizer.bos_token_id is not None else 0)
    rng = np.random.default_rng(args.seed)
    weights = 1.0 / (np.arange(len(words)) + 10.0)
    draws = rng.choice(len(words), size=(args.chunks, per_row), p=weights / weights.sum())
    shards = []
    for p, provider in enumerate(PROVIDERS):
        rows = draws[p :: len(PROVIDERS)]
        path = root / "shards" / f"{provider}-000.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(({"text": " ".join(words[i] for i in row)} for row in rows), path)
        shards.append(path)
    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=args.vocab, n_positions=args.seq, n_embd=args.width, n_layer=args.layers,
        n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=2, eos_token_id=2,
    )  # fmt: skip
    model_dir = Path(write_workspace_model(GPT2LMHeadModel(config), tokenizer, root / "model"))
    return model_dir, shards


def ledger(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LEDGER_DATABASE_URL": f"sqlite:///{root / 'ledger.db'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "ledger", *args], cwd=root, env=env, text=True, capture_output=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"ledger {' '.join(args)} failed:\n{proc.stderr}")
    return proc


class Epoch:
    """One epoch of training over the chunks, run in parts; seconds and tokens per part."""

    def __init__(self, model_dir: Path, shards: list[Path], args: argparse.Namespace) -> None:
        from attribution.data import ShardSpec
        from attribution.lm import load_causal_lm, train_batches

        self.model, tokenizer = load_causal_lm(model_dir)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        specs = [ShardSpec(str(p), p.name.rsplit("-", 1)[0]) for p in shards]
        self.batches = train_batches(specs, tokenizer, args.seq, args.batch)
        self.total = -(-args.chunks // args.batch)
        self.done = 0
        self.seconds = 0.0
        self.tokens = 0

    def run(self, n: int) -> None:
        from attribution.lm import lm_loss

        start = time.perf_counter()
        for _ in range(n):
            batch = next(self.batches)
            tokens = int(batch.inputs["attention_mask"].sum())
            loss = lm_loss(self.model, batch).sum() / tokens
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.tokens += tokens
            self.done += 1
        self.seconds += time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--chunks", type=int, default=20_000, help="training chunks (rows)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the workspace here")
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.chunks, args.layers, args.width, args.heads, args.vocab = 96, 2, 64, 2, 512
        args.seq = 32
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the index command's process

    root = args.workdir or Path(tempfile.mkdtemp(prefix="ledger-bench-index-cost-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(f"writing {args.chunks:,} chunks of {args.seq} tokens and the model in {root}")
        model_dir, shards = make_workspace(root, args)
        ledger(root, "init")
        ledger(root, "providers", "add", *PROVIDERS)
        for path, provider in zip(shards, PROVIDERS, strict=True):
            ledger(root, "shards", "add", str(path), "--provider", provider)

        epoch = Epoch(model_dir, shards, args)
        first_half = epoch.total // 2
        print(f"training, first half of the epoch ({first_half:,} batches)")
        epoch.run(first_half)

        print("ledger index (default settings)")
        start = time.perf_counter()
        proc = ledger(root, "-v", "index", "--model", str(model_dir),
                      "--max-length", str(args.seq), "--batch-size", str(args.batch))  # fmt: skip
        index_seconds = time.perf_counter() - start
        passes = {}
        for line in proc.stderr.splitlines():
            found = PASS_LINE.search(line.strip())
            if found:
                name = found["name"].split(" - ")[-1].split(": ")[-1].strip()
                passes[name] = passes.get(name, 0.0) + float(found["seconds"])

        print(f"training, second half ({epoch.total - first_half:,} batches)")
        epoch.run(epoch.total - first_half)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    tokens = epoch.tokens
    ratio = epoch.seconds / index_seconds
    logging_seconds = passes.get("logging")
    other = index_seconds - sum(passes.values())
    shares = {name: s / index_seconds for name, s in passes.items()}
    payload = {
        "machine": machine_info(),
        "setup": {
            "model": "GPT2LMHeadModel, random init, dropout 0, float32, as `ledger` loads it",
            "layers": args.layers,
            "width": args.width,
            "heads": args.heads,
            "vocab": args.vocab,
            "chunks": args.chunks,
            "seq": args.seq,
            "batch": args.batch,
            "tokens": tokens,
            "train_step": "lm_loss sum / tokens, backward, AdamW(lr=1e-4) step, zero_grad",
            "index_command": "ledger -v index --model MODEL --max-length SEQ --batch-size BATCH",
            "torch_threads": torch.get_num_threads(),
        },
        "epoch_seconds": epoch.seconds,
        "epoch_tokens_per_s": tokens / epoch.seconds,
        "index_seconds": index_seconds,
        "index_tokens_per_s": tokens / index_seconds,
        "pass_seconds": passes,
        "pass_share_of_index": shares,
        "other_seconds": other,
        "ratio_index_over_epoch": ratio,
        "ratio_logging_over_epoch": epoch.seconds / logging_seconds if logging_seconds else None,
        "target": 1.0,
        "meets_target": bool(ratio >= 1.0),
    }
    print(
        f"\nGPT-2 {args.layers}×{args.width}, vocabulary {args.vocab:,}, {args.chunks:,} chunks "
        f"× {args.seq} tokens ({tokens:,} tokens), batch {args.batch}, "
        f"{torch.get_num_threads()} torch threads"
    )
    rows = [
        ("one training epoch", f"{epoch.seconds:.0f} s", fmt(tokens / epoch.seconds, 0), "", ""),
        ("ledger index, whole command", f"{index_seconds:.0f} s",
         fmt(tokens / index_seconds, 0), "1.000", fmt(ratio)),
    ]  # fmt: skip
    for name, s in passes.items():
        rows.append((f"  {name}", f"{s:.1f} s", "", fmt(shares[name]),
                     fmt(epoch.seconds / s) if name == "logging" else ""))  # fmt: skip
    rows.append(("  other (start-up, loading, checks)", f"{other:.1f} s", "",
                 fmt(other / index_seconds), ""))  # fmt: skip
    print_table(rows, header=("", "seconds", "tokens/s", "share of index", "÷ epoch"))
    print(f"index throughput ÷ training throughput: {ratio:.3f} (target ≥ 1.0)")
    path = write_results(NAME, payload, quick=args.quick)
    print(f"written {path}")
    return payload


if __name__ == "__main__":
    main()
