"""Peak memory of scoring an index of N rows vs 10·N rows (it should barely grow).

Two synthetic indexes in the real on-disk format (see `benchmarks.common`), same width, N and
10·N rows. Each scoring run happens in a fresh subprocess that imports the package, opens the
index, draws the query gradients and calls `attribution.score` with the default `ScoreConfig`
(256 MB budget); it reports `resource.getrusage(RUSAGE_SELF).ru_maxrss` (peak resident set,
which includes touched pages of the memory-mapped block files while they are mapped) and its
RSS just before scoring. Runs alternate (N, 10·N, N, 10·N, ...); the growth is
peak(10·N) / peak(N) - 1 of the medians (target < 10%).

    python -m benchmarks.scoring_memory              # 100k vs 1M rows × 1,024 dims, float32
    python -m benchmarks.scoring_memory --quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    DEFAULT_DATA_DIR,
    ROOT,
    dir_bytes,
    fmt,
    free_disk_bytes,
    machine_info,
    median,
    print_table,
    synthetic_index_spec,
    write_results,
    write_synthetic_index,
)

NAME = "scoring_memory"


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def child(index_dir: str, queries: int, budget_mb: int | None) -> None:
    """One scoring run; prints a JSON line with the peak RSS (KiB) and timings."""
    import numpy as np

    from attribution import GradientIndex, ScoreConfig, score

    index = GradientIndex.open(index_dir)
    query_grads = np.random.default_rng(7).standard_normal((queries, index.dim))
    config = ScoreConfig() if budget_mb is None else ScoreConfig(memory_budget_mb=budget_mb)
    before_kb = _rss_kb()
    peak_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = score(index, query_grads, config)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "rows": index.rows,
                "dim": index.dim,
                "queries": queries,
                "rss_before_score_kb": before_kb,
                "peak_before_score_kb": peak_before_kb,
                "peak_kb": peak_kb,
                "seconds": seconds,
                "providers": len(result.providers),
            }
        )
    )


def run_child(index_dir: Path, queries: int, budget_mb: int | None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scoring_memory", "--child", str(index_dir)]
    cmd += ["--queries", str(queries)]
    if budget_mb is not None:
        cmd += ["--budget-mb", str(budget_mb)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="N (the larger index has 10·N)")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--layer-dim", type=int, default=256, help="k_out·k_in per layer (square)")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-mb", type=int, default=None, help="ScoreConfig.memory_budget_mb")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.queries, args.budget_mb)
        return None
    if args.quick:
        args.rows, args.queries, args.layers, args.layer_dim, args.repeats = 2000, 16, 2, 64, 1

    dim = args.layers * args.layer_dim
    itemsize = 2 if args.dtype == "float16" else 4
    sizes = [args.rows, args.rows * args.factor]
    need = sum(sizes) * dim * itemsize
    free = free_disk_bytes(args.data_dir)
    print(f"disk: {free / 1e9:.1f} GB free at {args.data_dir}, indexes need {need / 1e9:.1f} GB")
    if need > 0.8 * free:
        raise SystemExit("not enough free disk for the two indexes; use --data-dir or fewer rows")

    roots = {}
    for n in sizes:
        spec = synthetic_index_spec(n, args.layers, args.layer_dim, args.dtype)
        roots[n] = write_synthetic_index(
            args.data_dir / f"memory-{n}x{dim}-{args.dtype}", spec, verbose=True
        )

    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    for _ in range(args.repeats):
        for n in sizes:
            runs[n].append(run_child(roots[n], args.queries, args.budget_mb))

    peak = {n: median(r["peak_kb"] for r in runs[n]) for n in sizes}
    before = {n: median(r["rss_before_score_kb"] for r in runs[n]) for n in sizes}
    growth = peak[sizes[1]] / peak[sizes[0]] - 1.0
    payload = {
        "machine": machine_info(),
        "setup": {
            "rows": sizes,
            "dim": dim,
            "layers": args.layers,
            "layer_dim": args.layer_dim,
            "index_dtype": args.dtype,
            "queries": args.queries,
            "memory_budget_mb": args.budget_mb or 256,
            "index_bytes_on_disk": {str(n): dir_bytes(roots[n]) for n in sizes},
            "measure": "ru_maxrss of a fresh subprocess per scoring run (KiB on Linux)",
            "repeats": args.repeats,
            "order": "alternating N, 10N",
        },
        "runs": {str(n): runs[n] for n in sizes},
        "peak_rss_mb": {str(n): peak[n] / 1024 for n in sizes},
        "rss_before_score_mb": {str(n): before[n] / 1024 for n in sizes},
        "score_seconds": {str(n): median(r["seconds"] for r in runs[n]) for n in sizes},
        "growth": growth,
        "target": 0.10,
        "meets_target": bool(growth < 0.10),
    }
    print(
        f"\nscoring {args.queries} queries × {dim} dims ({args.dtype} index), peak RSS of a "
        f"fresh process, medians of {args.repeats}"
    )
    print_table(
        [
            (
                f"{n:,} rows",
                fmt(before[n] / 1024, 1),
                fmt(peak[n] / 1024, 1),
                fmt(median(r["seconds"] for r in runs[n]), 2),
            )
            for n in sizes
        ]
        + [("growth", "", f"{growth * 100:+.1f}%" + ("  (< 10% ok)" if growth < 0.1 else ""), "")],
        header=("", "RSS before score (MB)", "peak RSS (MB)", "score s"),
    )
    path = write_results(NAME, payload, quick=args.quick)
    print(f"written {path}")
    return payload


if __name__ == "__main__":
    main()
