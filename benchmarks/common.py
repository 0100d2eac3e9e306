"""Shared helpers of the speed benchmarks: timing, machine info, results, a synthetic index.

The benchmarks are scripts, not tests. Each prints a short table and writes
`benchmarks/results/<name>.json`. Run them from the repository root, e.g.
`python -m benchmarks.scoring_throughput`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # allow `python benchmarks/x.py` as well as `python -m`
    sys.path.insert(0, str(ROOT))

DEFAULT_DATA_DIR = Path(os.environ.get("LEDGER_BENCH_DATA", "/tmp/ledger-bench"))


# ----------------------------------------------------------------------------- timing


def now() -> float:
    return time.perf_counter()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def summary(xs: list[float]) -> dict:
    """Median, min, max and every sample of a list of measurements."""
    return {
        "median": median(xs),
        "min": float(min(xs)),
        "max": float(max(xs)),
        "samples": [float(x) for x in xs],
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return None


# ----------------------------------------------------------------------------- results


def machine_info() -> dict:
    import torch

    info = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "memory_gb": _memory_gb(),
        "load_average_at_start": load_average(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:  # pragma: no cover
        pass
    return None


def write_results(name: str, payload: dict, *, quick: bool = False) -> Path:
    """Write `benchmarks/results/<name>.json`; quick smoke runs go to the scratch data directory
    (`<data dir>/results/<name>.quick.json`) so they never overwrite the committed figures."""
    out = DEFAULT_DATA_DIR / "results" if quick else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{name}.quick.json" if quick else f"{name}.json")
    body = {"benchmark": name, "quick": quick, "command": " ".join(sys.argv), **payload}
    path.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")
    return path


def print_table(rows: list[tuple], header: tuple | None = None) -> None:
    """A plain aligned text table."""
    table = [tuple(str(c) for c in r) for r in ([header] if header else []) + rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for j, r in enumerate(table):
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if header and j == 0:
            print("  ".join("-" * w for w in widths))


def fmt(x: float, digits: int = 3) -> str:
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:,.{digits}f}"
    return f"{x:.{digits}e}"


# ----------------------------------------------------------------------------- page cache


def warm_page_cache(paths: Iterable[Path], chunk: int = 16 << 20) -> int:
    """Read every file once so later reads come from the page cache; returns bytes read."""
    total = 0
    buf = bytearray(chunk)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def free_disk_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


# ----------------------------------------------------------------------------- synthetic index


def synthetic_index_spec(
    rows: int,
    layers: int,
    layer_dim: int,
    dtype: str,
    *,
    rows_per_block: int = 1024,
    providers: int = 8,
    seed: int = 0,
) -> dict:
    return {
        "rows": rows,
        "layers": layers,
        "layer_dim": layer_dim,
        "dtype": dtype,
        "rows_per_block": rows_per_block,
        "providers": providers,
        "seed": seed,
        "format": 1,
    }


def write_synthetic_index(root: Path, spec: dict, *, verbose: bool = True) -> Path:
    """An index directory in the real on-disk format, with synthetic gradient rows.

    Blocks are written with `attribution.store.write_block` (gradients .npy + meta parquet);
    the curvature, self-influence, metadata.parquet, build.json and manifest.json come from the
    index builder's own finalisation step (`attribution.index._finalise`): the Fisher of every
    layer is fitted on all rows with `attribution.curvature.fit_curvature`, exactly as a real
    build does. Rows are Gaussian with a decaying per-column scale (a non-trivial Fisher
    spectrum) and a log-normal per-row scale (varied gradient norms).

    Reused when `root` holds a complete index written from the same `spec`.
    """
    import polars as pl
    import torch

    from attribution.config import IndexConfig, ProjectionConfig
    from attribution.index import _finalise, _layout
    from attribution.manifest import write_json
    from attribution.projection import KfacFactors, LayerProjector
    from attribution.store import (
        BUILD_FILE,
        FACTORS_FILE,
        MANIFEST_FILE,
        PROJECTIONS_FILE,
        save_factors,
        save_projectors,
        write_block,
    )

    root = Path(root)
    stamp = root / "synthetic-spec.json"
    if (root / MANIFEST_FILE).exists() and stamp.exists():
        if json.loads(stamp.read_text()) == spec:
            return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)

    k = int(round(spec["layer_dim"] ** 0.5))
    if k * k != spec["layer_dim"]:
        raise ValueError("layer_dim must be a square (k_out × k_in with k_out = k_in)")
    n_in = n_out = 4 * k
    config = IndexConfig(
        projection=ProjectionConfig(kind="random", k_in=k, k_out=k, seed=spec["seed"]),
        dtype=spec["dtype"],
        rows_per_block=spec["rows_per_block"],
    )
    gen = torch.Generator().manual_seed(spec["seed"])
    projectors = [
        LayerProjector(
            f"layer{i}",
            torch.randn(k, n_in, generator=gen) / k**0.5,
            torch.randn(k, n_out, generator=gen) / k**0.5,
        )
        for i in range(spec["layers"])
    ]
    save_projectors(root / PROJECTIONS_FILE, projectors)
    # Gradients here are drawn independently per coordinate: their KFAC factors are diagonal.
    eye = torch.eye(k, dtype=torch.float64)
    save_factors(
        root / FACTORS_FILE, [KfacFactors(p.name, eye, eye, spec["rows"]) for p in projectors]
    )
    layout = _layout(projectors)
    fingerprint = {
        "config": config.to_dict(),
        "model": {"synthetic": True},
        "data": {"synthetic": spec},
    }
    build = {
        "fingerprint": fingerprint,
        "layers": layout,
        "dim": layout[-1]["stop"],
        "config": config.to_dict(),
    }
    write_json(root / BUILD_FILE, build)

    dim = build["dim"]
    rng = np.random.default_rng(spec["seed"])
    col_scale = (1.0 / np.sqrt(1.0 + np.arange(dim) % spec["layer_dim"])).astype(np.float32)
    providers = [f"provider-{p:02d}" for p in range(spec["providers"])]
    dtype = np.dtype(spec["dtype"])
    t0 = time.perf_counter()
    rows, rpb = spec["rows"], spec["rows_per_block"]
    for number, start in enumerate(range(0, rows, rpb)):
        n = min(rpb, rows - start)
        g = rng.standard_normal((n, dim), dtype=np.float32)
        g *= col_scale
        g *= rng.lognormal(0.0, 0.5, size=(n, 1)).astype(np.float32)
        ids = np.arange(start, start + n)
        meta = pl.DataFrame(
            {
                "example_id": [f"ex{i}" for i in ids],
                "shard": [f"shard-{i // 100_000:03d}" for i in ids],
                "provider": [providers[i % len(providers)] for i in ids],
                "token_count": np.full(n, 128, dtype=np.int64),
            }
        )
        write_block(root, number, g.astype(dtype, copy=False), meta)
        if verbose and number % 100 == 0:
            print(f"  synthetic index: {start + n:,}/{rows:,} rows", file=sys.stderr, flush=True)
    t_blocks = time.perf_counter() - t0
    t0 = time.perf_counter()
    _finalise(root, build, config, fingerprint)
    t_final = time.perf_counter() - t0
    if verbose:
        print(
            f"  synthetic index written in {t_blocks:.1f}s, finalised in {t_final:.1f}s",
            file=sys.stderr,
        )
    stamp.write_text(json.dumps(spec))
    return root


def index_block_files(root: Path) -> list[Path]:
    from attribution.store import GradientIndex

    return GradientIndex.open(root).block_files()
