"""Scoring throughput of `attribution.score` over an on-disk index vs a raw in-memory matmul.

Both sides score the same preconditioned float32 queries against the same stored rows:

- score: `attribution.score(index, query_grads)` with the default `ScoreConfig` (RelatIF,
  top-10, 256 MB budget) streaming the index's memory-mapped blocks from the page cache
  (warmed first by reading every block file once);
- matmul: `Q @ G.T` in torch float32 with every row already in memory as one array, the same
  torch thread count; no RelatIF, sums or top-k.

Throughput is train×query pairs per second; the ratio is score ÷ matmul (target ≥ 0.7). Runs
alternate (matmul, score, matmul, score, ...) and medians are reported.

    python -m benchmarks.scoring_throughput              # 100k rows × 256 queries × 4,096 dims
    python -m benchmarks.scoring_throughput --quick
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

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

NAME = "scoring_throughput"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--layer-dim", type=int, default=256, help="k_out·k_in per layer (square)")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-mb", type=int, default=None, help="ScoreConfig.memory_budget_mb")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.queries, args.layers, args.layer_dim, args.repeats = 5000, 32, 4, 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from attribution import GradientIndex, ScoreConfig, score

    spec = synthetic_index_spec(args.rows, args.layers, args.layer_dim, args.dtype)
    root = args.data_dir / f"score-{args.rows}x{args.layers * args.layer_dim}-{args.dtype}"
    write_synthetic_index(root, spec)
    index = GradientIndex.open(root)
    dim = index.dim
    warmed = warm_page_cache(index.block_files())

    rng = np.random.default_rng(123)
    query_grads = rng.standard_normal((args.queries, dim))
    config = (
        ScoreConfig() if args.budget_mb is None else ScoreConfig(memory_budget_mb=args.budget_mb)
    )

    # The matmul side: the same rows, in memory, float32; the same preconditioned queries.
    rows_in_memory = torch.from_numpy(
        np.concatenate(
            [np.asarray(np.load(p, mmap_mode="r"), np.float32) for p in index.block_files()]
        )
    )
    q32 = torch.from_numpy(
        np.ascontiguousarray(index.curvature.precondition(query_grads), np.float32)
    )

    def matmul() -> torch.Tensor:
        return q32 @ rows_in_memory.T

    def scoring():
        return score(index, query_grads, config)

    # Warm-up (and a correctness cross-check of a few scores against the matmul).
    ref = matmul()
    res = scoring()
    inv = 1.0 / np.sqrt(index.self_influence)
    relatif_ref = ref.numpy().astype(np.float64) * inv
    best = np.argmax(relatif_ref, axis=1)
    assert np.array_equal(res.top_rows[:, 0], best), "top-1 rows disagree with the matmul"
    del ref, relatif_ref
    gc.collect()

    t_mm, t_sc = [], []
    for _ in range(args.repeats):
        t, out = timed(matmul)
        del out
        t_mm.append(t)
        t, out = timed(scoring)
        del out
        t_sc.append(t)
        gc.collect()

    pairs = args.rows * args.queries
    mm_rate = pairs / np.median(t_mm)
    sc_rate = pairs / np.median(t_sc)
    ratios = [m / s for m, s in zip(t_mm, t_sc, strict=True)]
    ratio = sc_rate / mm_rate

    from attribution.scoring import rows_per_chunk

    payload = {
        "machine": machine_info(),
        "setup": {
            "rows": args.rows,
            "queries": args.queries,
            "dim": dim,
            "layers": args.layers,
            "layer_dim": args.layer_dim,
            "index_dtype": args.dtype,
            "index_bytes_on_disk": int(sum(p.stat().st_size for p in index.block_files())),
            "blocks": len(index.block_files()),
            "rows_per_block": spec["rows_per_block"],
            "score_config": {
                "relatif": config.relatif,
                "top_k": config.top_k,
                "memory_budget_mb": config.memory_budget_mb,
            },
            "rows_per_chunk": rows_per_chunk(args.queries, dim, config.memory_budget_mb),
            "page_cache": f"warmed: every block file read once before timing ({warmed:,} bytes)",
            "matmul": "torch float32 Q @ G.T, G all rows in memory, preconditioned Q",
            "repeats": args.repeats,
            "order": "interleaved matmul, score per repeat",
        },
        "score_seconds": summary(t_sc),
        "matmul_seconds": summary(t_mm),
        "score_pairs_per_s": sc_rate,
        "matmul_pairs_per_s": mm_rate,
        "ratio": ratio,
        "ratio_per_repeat": ratios,
        "target": 0.7,
        "meets_target": bool(ratio >= 0.7),
    }
    print(
        f"\nscoring {args.rows:,} rows × {args.queries} queries × {dim} dims "
        f"({args.dtype} index, page cache warm), {torch.get_num_threads()} torch threads, "
        f"medians of {args.repeats}"
    )
    print_table(
        [
            ("raw matmul (in memory)", fmt(np.median(t_mm)), fmt(mm_rate / 1e6, 1)),
            ("attribution.score (on disk)", fmt(np.median(t_sc)), fmt(sc_rate / 1e6, 1)),
            (
                "ratio score / matmul",
                "",
                fmt(ratio, 3) + ("  (≥ 0.7 ok)" if ratio >= 0.7 else "  (< 0.7)"),
            ),
        ],
        header=("", "seconds", "Mpairs/s"),
    )
    path = write_results(NAME, payload, quick=args.quick)
    print(f"written {path}")
    return payload


if __name__ == "__main__":
    main()
