"""Several random projections of one size, their scores summed, against one larger projection.

    python -m benchmarks.accuracy.seed_ensemble [--settings lm-wide] [--seeds 4]

Per setting, on the ground truth of `python -m benchmarks.accuracy.run`'s full plan (cached),
with the setting's default index configuration (`run.default_config`) at the default damping
factor, every layer tracked and then the blocks only (the tied output head left out): raw-
influence LDS and provider Spearman (positive part of the raw scores) of PCA k = 32 (the defaults' projection), random k = 32 with seed 0, the sum of
the first 2 and of all `--seeds` random k = 32 indexes' scores (seeds 0, 1, …; the same storage
as one index of k = 32 × √seeds per side), the same with each index's scores scaled to unit
norm per query first, and one random k = 64 index; each paired over queries (± standard
error) against PCA k = 32.

Writes benchmarks/results/seed_ensemble.json and seed_ensemble.md.
"""

from __future__ import annotations

import argparse

import numpy as np

from attribution.config import DEFAULT_CURVATURE, DEFAULT_DAMPING_FACTOR, DEFAULT_K
from benchmarks.accuracy import methods
from benchmarks.accuracy.args import setting_names
from benchmarks.accuracy.damping_grid import unit_rows
from benchmarks.accuracy.metrics import (
    lds_per_query,
    mean_std,
    paired_difference,
    provider_credit,
    provider_rho_per_query,
)
from benchmarks.accuracy.report import RESULTS, write_study
from benchmarks.accuracy.retrain import set_threads
from benchmarks.accuracy.run import default_index_options
from benchmarks.accuracy.truth import cached_truth


def _scores(truth, kind: str, k: int, seed: int, blocks_only: bool) -> np.ndarray:
    built = methods.build(
        truth.setting, kind, k, "float32", truth.workdir,
        suffix=f"-seed{seed}" + ("-blocks" if blocks_only else ""),
        projection={"seed": seed, "tied_head": not blocks_only},
        **default_index_options(truth.setting),
    )  # fmt: skip
    return methods.influence_scores(
        built, DEFAULT_DAMPING_FACTOR, relatif=False, curvature_kind=DEFAULT_CURVATURE
    )


def ensemble_setting(key: str, seeds: int) -> dict:
    truth = cached_truth(key)
    masks, losses = truth.masks, truth.losses

    def providers(scores: np.ndarray) -> np.ndarray:
        credit = provider_credit(scores, truth.setting.providers, truth.names, positive=True)
        return provider_rho_per_query(credit, truth.rises)

    out = {"setting": truth.setting.name, "key": key, "seeds": seeds, "layers": {}}
    for blocks_only in (False, True):
        pca = _scores(truth, "pca", DEFAULT_K, 0, blocks_only)
        base, base_providers = lds_per_query(pca, masks, losses), providers(pca)
        randoms = [_scores(truth, "random", DEFAULT_K, s, blocks_only) for s in range(seeds)]
        variants = {
            f"random k = {DEFAULT_K}, seed 0": randoms[0],
            f"random k = {DEFAULT_K}, 2 seeds summed": randoms[0] + randoms[1],
            f"random k = {DEFAULT_K}, {seeds} seeds summed": sum(randoms),
            f"random k = {DEFAULT_K}, {seeds} seeds, unit rows summed": sum(
                unit_rows(r) for r in randoms
            ),
            f"random k = {2 * DEFAULT_K}": _scores(truth, "random", 2 * DEFAULT_K, 0, blocks_only),
        }
        rows = {
            f"pca k = {DEFAULT_K}": {
                "lds": mean_std(base),
                "provider_spearman": mean_std(base_providers),
            }
        }
        for name, scores in variants.items():
            per_query, per_query_providers = lds_per_query(scores, masks, losses), providers(scores)
            rows[name] = {
                "lds": mean_std(per_query),
                "vs_pca": paired_difference(per_query, base),
                "provider_spearman": mean_std(per_query_providers),
                "provider_vs_pca": paired_difference(per_query_providers, base_providers),
            }
        which = "blocks only" if blocks_only else "every layer"
        out["layers"][which] = rows
        print(f"{truth.setting.name}, {which}: " + "; ".join(
            f"{n} {r['lds']['mean']:.3f}" for n, r in rows.items()
        ), flush=True)  # fmt: skip
    return out


def write_markdown(report: dict) -> None:
    lines = [
        "# Random projections of several seeds against one larger projection",
        "",
        f"`{report['command']}` ({report['seconds']:.0f} s, one thread). Raw-influence LDS at "
        f"factor {DEFAULT_DAMPING_FACTOR:g} and provider Spearman (positive part of the raw "
        f"scores); each variant paired against PCA k = {DEFAULT_K} (mean ± standard error over "
        "queries).",
    ]
    for s in report["settings"]:
        for which, rows in s["layers"].items():
            lines += [
                "",
                f"## {s['setting']}, {which}",
                "",
                "| projection | LDS | − PCA | provider Spearman | − PCA |",
                "|---|---|---|---|---|",
            ]
            for name, r in rows.items():
                cells = [
                    "–" if d is None else f"{d['mean']:+.3f} ± {d['se']:.3f}"
                    for d in (r.get("vs_pca"), r.get("provider_vs_pca"))
                ]
                lines.append(
                    f"| {name} | {r['lds']['mean']:.3f} | {cells[0]} | "
                    f"{r['provider_spearman']['mean']:.3f} | {cells[1]} |"
                )
    (RESULTS / "seed_ensemble.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=setting_names, default="lm-wide")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2")
    set_threads()
    command = (
        f"python -m benchmarks.accuracy.seed_ensemble --settings {','.join(args.settings)} "
        f"--seeds {args.seeds}"
    )
    report = write_study(
        "seed_ensemble", command, lambda: [ensemble_setting(k, args.seeds) for k in args.settings]
    )
    write_markdown(report)
    print((RESULTS / "seed_ensemble.md").read_text())
    return report


if __name__ == "__main__":
    main()
