"""Ways to project the output head's vocabulary side, compared on one unprojected index.

    python -m benchmarks.accuracy.head_projections [--setting lm-c] [--k 128,1024]

Needs a full run of `python -m benchmarks.accuracy.run` first: it reads that run's cached
ground truth and its unprojected (identity) index of the setting. Every other layer stays
unprojected; the head's gradient rows G_i (vocabulary × input) become P G_i for each P below,
the head's KFAC factor on that side becomes P S Pᵀ, and EKFAC (eigenvalues from the stored
gradients, damping factor 0.01) is fitted on the result with the core's `fit_curvature`. LDS
is computed as in the harness. Results: benchmarks/results/head_projections.json.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from attribution.config import DEFAULT_DAMPING_FACTOR
from attribution.curvature import LayerSlice, fit_curvature, kfac_bases
from attribution.projection import random_rows
from attribution.scoring import query_gradients
from attribution.store import GradientIndex
from benchmarks.accuracy.args import number_list, setting_name
from benchmarks.accuracy.metrics import lds_per_query
from benchmarks.accuracy.plan import FULL
from benchmarks.accuracy.report import RESULTS
from benchmarks.accuracy.retrain import (
    CACHE_DIR,
    RetrainCache,
    lds_subsets,
    set_threads,
    subset_losses,
)
from benchmarks.accuracy.settings import SETTINGS


def projections(s: np.ndarray, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """(k, V) vocabulary-side projections, from the head's raw factor S (V × V)."""
    vocab = s.shape[0]
    rng = np.random.default_rng(seed)
    gaussian = rng.normal(size=(k, vocab)) / np.sqrt(k)
    diag = np.diag(s)
    eigvals, eigvecs = np.linalg.eigh((s + s.T) / 2)
    eigvals = np.maximum(eigvals, 0.0)
    out = {"whole vocabulary (no projection)": np.eye(vocab), "Gaussian rows": gaussian}
    # What the library's `random` kind gives that side: the draw's rows orthonormalised.
    generator = torch.Generator().manual_seed(seed)
    out["orthonormal random rows (the library's `random`)"] = random_rows(
        k, vocab, generator
    ).numpy()
    for factor in (0.01, 0.1, 1.0):
        out[f"Gaussian rows, whitened by diag(S) (damping {factor:g} × mean)"] = gaussian / np.sqrt(
            diag + factor * diag.mean()
        )
        inv_sqrt = (eigvecs / np.sqrt(eigvals + factor * eigvals.mean())) @ eigvecs.T
        out[f"Gaussian rows, whitened by S (damping {factor:g} × mean)"] = gaussian @ inv_sqrt
    for sketch_seed in (0, 1):
        r = np.random.default_rng(sketch_seed)
        p = np.zeros((k, vocab))
        p[r.integers(0, k, vocab), np.arange(vocab)] = r.choice([-1.0, 1.0], vocab)
        out[f"count sketch (seed {sketch_seed})"] = p
    order = np.argsort(-diag)
    half = k // 2
    p = np.zeros((k, vocab))
    p[np.arange(half), order[:half]] = 1.0
    rest = order[half:]
    p[half + rng.integers(0, k - half, len(rest)), rest] = rng.choice([-1.0, 1.0], len(rest))
    out[f"top {half} tokens by diag(S) exact, the rest count-sketched"] = p
    out["PCA (top eigenvectors of S)"] = eigvecs[:, ::-1][:, :k].T
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--setting", type=setting_name, default="lm-c", help=f"one of {', '.join(SETTINGS)}"
    )
    parser.add_argument(
        "--k",
        type=number_list(int, low=1),
        default="128,1024",
        help="directions kept on that side (a comma list)",
    )
    args = parser.parse_args(argv)
    set_threads()
    start = time.perf_counter()
    workdir = CACHE_DIR / "work"
    setting = SETTINGS[args.setting](workdir)
    root = workdir / setting.name / "identity-float32"
    if not (root / "manifest.json").exists():
        raise SystemExit(f"{root}: no index; run `python -m benchmarks.accuracy.run` first")
    plan = FULL[setting.name]
    masks = lds_subsets(setting.n_train, plan.lds_subsets)
    losses = subset_losses(RetrainCache(setting), masks, list(plan.lds_seeds))
    index = GradientIndex.open(root)
    _, queries = query_gradients(
        setting.base_model(), setting.query_loss, setting.query_data, index
    )
    train = index.dense().numpy().astype(np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    factors = index.factors()
    head = index.curvature.slices[-1]
    vocab, k_in = head.shape
    raw_s = next(f for f in factors if f.name == head.name).s.numpy()
    bases = kfac_bases(factors)  # every layer's; the head's output side is replaced per P

    def lds(p: np.ndarray) -> float:
        def project(g: np.ndarray) -> np.ndarray:
            h = g[:, head.start : head.stop].reshape(len(g), vocab, k_in)
            return np.concatenate(
                [g[:, : head.start], np.einsum("kv,nvi->nki", p, h).reshape(len(g), -1)], 1
            )

        rows, q = project(train), project(queries)
        slices = [*index.curvature.slices[:-1]]
        slices.append(LayerSlice(head.name, head.start, head.start + p.shape[0] * k_in,
                                 (p.shape[0], k_in)))  # fmt: skip
        projected = {**bases, head.name: (np.linalg.eigh(p @ raw_s @ p.T)[1], bases[head.name][1])}
        curvature = fit_curvature(
            lambda: [rows], slices, DEFAULT_DAMPING_FACTOR, "ekfac", bases=projected
        )
        return float(np.nanmean(lds_per_query(curvature.precondition(q) @ rows.T, masks, losses)))

    rows = []
    whole = None
    for k in sorted({min(x, vocab) for x in args.k}):
        for name, p in projections(raw_s, k).items():
            if name.startswith("whole"):
                if whole is not None:
                    continue  # the same at every k
                whole = name
            rows.append({"projection": name, "k": int(p.shape[0]), "lds": round(lds(p), 4)})
            print(f"{rows[-1]['lds']:.3f}  k={rows[-1]['k']:5d}  {name}", flush=True)
    report = {
        "command": f"python -m benchmarks.accuracy.head_projections --setting {args.setting} "
        f"--k {','.join(map(str, args.k))}",
        "setting": setting.name,
        "vocabulary": int(vocab),
        "damping_factor": DEFAULT_DAMPING_FACTOR,
        "eigenvalues": "stored gradients",
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "head_projections.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
