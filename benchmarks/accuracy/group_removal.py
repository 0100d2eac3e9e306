"""Whether a provider's credit should account for the curvature its own data removes.

    python -m benchmarks.accuracy.group_removal [--settings lm,lm-b,lm-c] [--shares 0.5,1]

First-order influence predicts the removal of provider p's rows S_p as the sum of their
scores, qᵀ H⁻¹ Σ_{i∈S_p} g_i, with H the damped curvature of all the data. A Newton step for
the group uses the curvature that remains without it, H − H_p. Two ways of doing that from an
index are measured here against the retrained provider removals of
`python -m benchmarks.accuracy.run` (run that first; its ground truth is read from the cache):

- Woodbury within the provider: with H_p = (1/n) Σ_{i∈S_p} g_i g_iᵀ, the group's score is
  sᵀ (I − K/n)⁻¹ 1, where s are the provider's per-example scores and K = G_p H⁻¹ G_pᵀ its
  train-train kernel. That is only a valid downdate when every eigenvalue of K/n is below 1;
  the largest is reported.
- Share downdate in the EKFAC eigenbasis: each eigenvalue e_j becomes e_j (1 − a·w_pj), w_pj
  the provider's share of the stored gradients' energy along direction j, for each a in
  `--shares`. Credit is then the positive part of the per-example scores, as the ledger pays.

Reported: provider Spearman (positive part) as a paired difference against the defaults'
credit. Results: benchmarks/results/group_removal.json.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.accuracy import methods
from benchmarks.accuracy.args import number_list, setting_names
from benchmarks.accuracy.metrics import paired_difference, provider_credit, provider_rho_per_query
from benchmarks.accuracy.plan import FULL
from benchmarks.accuracy.report import write_study
from benchmarks.accuracy.retrain import CACHE_DIR, RetrainCache, provider_removal, set_threads
from benchmarks.accuracy.run import default_config, default_index_options
from benchmarks.accuracy.settings import SETTINGS


def measure_setting(name: str, shares: list[float]) -> dict:
    workdir = CACHE_DIR / "work"
    setting = SETTINGS[name](workdir)
    names, rises, _ = provider_removal(
        RetrainCache(setting), list(FULL[setting.name].provider_seeds)
    )
    config = default_config(setting)
    built = methods.build(setting, "pca", config.projection.k_in, config.dtype, workdir,
                          suffix="-group", **default_index_options(setting))  # fmt: skip
    curvature = built.index.curvature
    if any(layer.low_rank for layer in curvature.layers):
        raise SystemExit(f"{name}: a low-rank layer; the share downdate needs a full eigenbasis")
    rows = built.index.dense().numpy().astype(np.float64)
    queries = np.asarray(built.query_grads, np.float64)
    n = rows.shape[0]
    rotated = [
        (layer.rotate(rows[:, s.start : s.stop]), layer.rotate(queries[:, s.start : s.stop]), layer)
        for s, layer in zip(curvature.slices, curvature.layers, strict=True)
    ]
    scores = sum((zq * layer.inverse_diagonal()) @ zg.T for zg, zq, layer in rotated)
    base = provider_rho_per_query(provider_credit(scores, setting.providers, names, True), rises)
    out = {"setting": setting.name, "provider_spearman": float(np.nanmean(base)), "rows": []}

    preconditioned = curvature.precondition(rows)
    largest = max(
        float(np.linalg.eigvalsh(rows[m] @ preconditioned[m].T / n).max())
        for m in (setting.providers == p for p in names)
    )
    out["woodbury_largest_eigenvalue"] = largest
    print(f"{setting.name}: provider Spearman {out['provider_spearman']:.3f}; largest eigenvalue "
          f"of K/n over providers {largest:.1f} (a downdate needs it below 1)", flush=True)  # fmt: skip

    for share in shares:
        columns = []
        for p in names:
            mine = setting.providers == p
            s_p = 0.0
            for zg, zq, layer in rotated:
                energy = (zg**2).sum(axis=0)
                w = (zg[mine] ** 2).sum(axis=0) / np.maximum(energy, np.finfo(float).tiny)
                e = np.maximum(layer.eigvals, 0.0) * (1.0 - share * w)
                s_p = s_p + (zq / (e + layer.damping)) @ zg[mine].T
            columns.append(np.maximum(s_p, 0.0).sum(axis=1))
        rho = provider_rho_per_query(np.stack(columns, axis=1), rises)
        row = {"share": share, "provider_spearman": float(np.nanmean(rho)),
               "paired": paired_difference(rho, base)}  # fmt: skip
        out["rows"].append(row)
        print(
            f"  share {share:g}: provider Spearman {row['provider_spearman']:.3f} "
            f"({row['paired']['mean']:+.3f} ± {row['paired']['se']:.3f})",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=setting_names, default="lm,lm-b,lm-c")
    parser.add_argument("--shares", type=number_list(float, low=0.0), default="0.5,1")
    args = parser.parse_args(argv)
    set_threads()
    command = (
        "python -m benchmarks.accuracy.group_removal --settings "
        f"{','.join(args.settings)} --shares {','.join(f'{x:g}' for x in args.shares)}"
    )
    return write_study(
        "group_removal", command, lambda: [measure_setting(n, args.shares) for n in args.settings]
    )


if __name__ == "__main__":
    main()
