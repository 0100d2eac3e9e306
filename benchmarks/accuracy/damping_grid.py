"""The LDS each fixed damping factor, projection kind and size loses against a setting's best.

    python -m benchmarks.accuracy.damping_grid [--settings mlp,cancer,lm,...] [--ks 8,16,32,64]

Per setting: the ground truth of `python -m benchmarks.accuracy.run`'s full plan (LDS subsets
and provider removal, no brittleness; retrained where the cache lacks it, cached in
benchmarks/accuracy/cache), and
indexes built with the setting's default index configuration (`run.default_config`: EKFAC,
its eigenvalue labels and shrinkage) for each projection kind (pca, random) and size k, plus
the unprojected index (exact EKFAC). Every index is scored at every factor of the harness's
`FACTORS` (λ_l = factor × mean eigenvalue of each layer), raw influence, LDS per query.

Reported per setting: the LDS of the default projection at each factor and its paired
difference (± standard error over queries) against the best factor of that projection; each
projection at the default factor and at its own best factor against the defaults; and the
split-half reliability of the ground truth; and the default projection's provider Spearman
(positive part of raw scores) at each factor against its best factor. Extra columns:
`attribution.damping`'s data-driven rules (per layer λ from the index's own EKFAC eigenvalues;
measured, never used by the index), and the scores averaged over every factor of the grid
(`AVERAGED`). Across settings: the worst regret of each fixed factor and of each extra column.

Writes benchmarks/results/damping_grid.json and damping_grid.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from attribution.config import DEFAULT_CURVATURE, DEFAULT_DAMPING_FACTOR, DEFAULT_K
from attribution.curvature import Curvature, LayerCurvature
from benchmarks.accuracy import methods
from benchmarks.accuracy.args import number_list, setting_names
from benchmarks.accuracy.metrics import (
    lds_per_query,
    mean_std,
    paired_difference,
    provider_credit,
    provider_rho_per_query,
    split_half_agreement,
)
from benchmarks.accuracy.plan import FULL
from benchmarks.accuracy.report import RESULTS, write_study
from benchmarks.accuracy.retrain import (
    CACHE_DIR,
    RetrainCache,
    lds_subsets,
    provider_removal,
    set_threads,
    subset_losses,
)
from benchmarks.accuracy.run import DEFAULT_KIND, FACTORS, default_index_options
from benchmarks.accuracy.settings import SETTINGS

KINDS = ("pca", "random")
TOLERANCE = 0.02
"""LDS a fixed choice may lose against a setting's best and still count as robust (issue 27)."""


def _rules() -> dict:
    """The data-driven damping rules of `attribution.damping`, when that module exists."""
    try:
        from attribution import damping
    except ImportError:
        return {}
    return dict(getattr(damping, "RULES", {}))


def damped(curvature: Curvature, lambdas: list[float]) -> Curvature:
    """The same eigenbasis and eigenvalues, layer l damped with lambdas[l]."""
    layers = [
        LayerCurvature(c.eigvals, c.eigvecs, float(lam), c.q_out, c.q_in)
        for c, lam in zip(curvature.layers, lambdas, strict=True)
    ]
    return Curvature(curvature.slices, layers)


def mean_eigenvalue(c: LayerCurvature) -> float:
    return float(np.maximum(c.eigvals, 0.0).sum()) / c.dim


def layer_factors(curvature: Curvature, lambdas: list[float]) -> list[float]:
    """The factors λ_l / mean eigenvalue that per-layer dampings come to."""
    means = [mean_eigenvalue(c) for c in curvature.layers]
    return [lam / m if m > 0 else float("nan") for lam, m in zip(lambdas, means, strict=True)]


def ruled(curvature: Curvature, rule) -> tuple[Curvature, list[float]]:
    """The same eigenbasis and eigenvalues with λ_l = rule(eigenvalues of layer l); the factors
    λ_l / mean eigenvalue it comes to, per layer."""
    lambdas = [float(rule(np.asarray(c.eigvals, np.float64))) for c in curvature.layers]
    return damped(curvature, lambdas), layer_factors(curvature, lambdas)


AVERAGED = "average over factors"
"""Not a damping: each query's scores at every factor of the grid, each scaled to unit norm
over the training examples, summed (a damping marginalised over the grid)."""


def unit_rows(scores: np.ndarray) -> np.ndarray:
    """Each query's scores divided by their norm over the training examples (zero rows stay)."""
    norm = np.linalg.norm(scores, axis=1, keepdims=True)
    return np.divide(scores, norm, out=np.zeros_like(scores), where=norm > 0)


def raw_scores(built: methods.BuiltIndex, curvature: Curvature) -> np.ndarray:
    """(queries, rows) raw influence of the index's rows with `curvature` in place of its own."""
    rows = built.index.dense().numpy().astype(np.float64)
    return curvature.precondition(np.asarray(built.query_grads, np.float64)) @ rows.T


def grid_setting(key: str, ks: list[int]) -> dict:
    t0 = time.perf_counter()
    workdir = CACHE_DIR / "work"
    setting = SETTINGS[key](workdir)
    plan = FULL[setting.name]
    cache = RetrainCache(setting)
    masks = lds_subsets(setting.n_train, plan.lds_subsets)
    seeds = list(plan.lds_seeds)
    losses = subset_losses(cache, masks, seeds, quiet=True)
    half = len(seeds) // 2
    reliability = split_half_agreement(
        subset_losses(cache, masks, seeds[:half], quiet=True),
        subset_losses(cache, masks, seeds[half:], quiet=True),
    )
    # Provider removal (the plan's seeds): what the product pays on, per damping factor.
    names, rises, _ = provider_removal(cache, list(plan.provider_seeds))
    half = len(plan.provider_seeds) // 2
    provider_reliability = split_half_agreement(
        provider_removal(cache, list(plan.provider_seeds[:half]))[1],
        provider_removal(cache, list(plan.provider_seeds[half:]))[1],
    )
    truth_seconds = cache.seconds
    options = default_index_options(setting)

    lds: dict[tuple[str, int, float], np.ndarray] = {}
    rho: dict[float, np.ndarray] = {}
    rules = _rules()
    rule_rows: dict[str, dict] = {}
    build_seconds = {}
    for kind in (*KINDS, "identity"):
        for k in ks if kind != "identity" else [0]:
            start = time.perf_counter()
            built = methods.build(setting, kind, k, "float32", workdir, suffix="-grid", **options)
            build_seconds[f"{kind}-{k}"] = round(time.perf_counter() - start, 2)
            averaged = 0.0
            for f in FACTORS:
                raw = methods.influence_scores(
                    built, f, relatif=False, curvature_kind=DEFAULT_CURVATURE
                )
                lds[(kind, k, f)] = lds_per_query(raw, masks, losses)
                if (kind, k) == (DEFAULT_KIND, DEFAULT_K):
                    credit = provider_credit(raw, setting.providers, names, positive=True)
                    rho[f] = provider_rho_per_query(credit, rises)
                    averaged = averaged + unit_rows(raw)
            if (kind, k) == (DEFAULT_KIND, DEFAULT_K):
                rule_rows[AVERAGED] = {
                    "per_query": lds_per_query(averaged, masks, losses), "layer_factors": None,
                }  # fmt: skip
                for name, rule in rules.items():
                    curvature, rule_factors = ruled(built.index.curvature, rule)
                    per_query = lds_per_query(raw_scores(built, curvature), masks, losses)
                    rule_rows[name] = {"per_query": per_query, "layer_factors": rule_factors}
            print(f"{setting.name} {kind} k={k}: " + " ".join(
                f"{f:g}:{np.nanmean(lds[(kind, k, f)]):.3f}" for f in FACTORS), flush=True)  # fmt: skip

    def mean(key) -> float:
        return float(np.nanmean(lds[key]))

    default = (DEFAULT_KIND, DEFAULT_K, DEFAULT_DAMPING_FACTOR)
    best_factor = max(FACTORS, key=lambda f: mean((DEFAULT_KIND, DEFAULT_K, f)))
    at_best = lds[(DEFAULT_KIND, DEFAULT_K, best_factor)]
    projected = [key for key in lds if key[0] != "identity"]
    best_config = max(projected, key=mean)
    best_provider_factor = max(FACTORS, key=lambda f: float(np.nanmean(rho[f])))
    factors = [
        {"damping_factor": f, "lds": mean_std(lds[(DEFAULT_KIND, DEFAULT_K, f)]),
         "vs_best_factor": paired_difference(lds[(DEFAULT_KIND, DEFAULT_K, f)], at_best),
         "provider_spearman": mean_std(rho[f]),
         "provider_vs_best_factor": paired_difference(rho[f], rho[best_provider_factor])}
        for f in FACTORS
    ]  # fmt: skip
    projections = []
    for kind in (*KINDS, "identity"):
        for k in ks if kind != "identity" else [0]:
            own_best = max(FACTORS, key=lambda f, kk=(kind, k): mean((*kk, f)))
            projections.append({
                "kind": kind, "k": k, "best_factor": own_best,
                "lds_at_default_factor": mean((kind, k, DEFAULT_DAMPING_FACTOR)),
                "lds_at_best_factor": mean((kind, k, own_best)),
                "at_default_factor_vs_defaults": paired_difference(
                    lds[(kind, k, DEFAULT_DAMPING_FACTOR)], lds[default]),
                "at_best_factor_vs_defaults": paired_difference(
                    lds[(kind, k, own_best)], lds[default]),
            })  # fmt: skip
    rules_out = {
        name: {"lds": mean_std(r["per_query"]),
               "vs_best_factor": paired_difference(r["per_query"], at_best),
               "vs_defaults": paired_difference(r["per_query"], lds[default]),
               "layer_factors": r["layer_factors"]}
        for name, r in rule_rows.items()
    }  # fmt: skip
    return {
        "setting": setting.name,
        "key": key,
        "task": setting.task,
        "recipe": setting.recipe,
        "n_train": setting.n_train,
        "n_queries": setting.n_queries,
        "lds_subsets": plan.lds_subsets,
        "lds_seeds": seeds,
        "truth_reliability": reliability,
        "provider_seeds": len(plan.provider_seeds),
        "provider_truth_reliability": provider_reliability,
        "best_provider_factor": best_provider_factor,
        "retrains_this_run": cache.trained,
        "retrain_seconds_this_run": round(truth_seconds, 1),
        "index": f"{DEFAULT_KIND} k={DEFAULT_K}, {DEFAULT_CURVATURE}, curvature labels "
        f"{options['curvature_labels']}, prior {options['curvature_prior_examples']}",
        "best_factor": best_factor,
        "factors": factors,
        "best_config": {
            "kind": best_config[0],
            "k": best_config[1],
            "damping_factor": best_config[2],
            "lds": mean(best_config),
        },  # fmt: skip
        "defaults_vs_best_config": paired_difference(lds[default], lds[best_config]),
        "projections": projections,
        "rules": rules_out,
        "build_seconds": build_seconds,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def summary(settings: list[dict]) -> dict:
    """Per fixed factor: the worst and mean regret across settings (default projection)."""
    out = {}
    for i, f in enumerate(FACTORS):
        regrets = [-s["factors"][i]["vs_best_factor"]["mean"] for s in settings]
        out[f"{f:g}"] = {"worst_regret": max(regrets), "mean_regret": float(np.mean(regrets)),
                         "within_tolerance": sum(r <= TOLERANCE for r in regrets),
                         "settings": len(regrets)}  # fmt: skip
    rules = sorted({name for s in settings for name in s["rules"]})
    rule_out = {}
    for name in rules:
        regrets = [
            -s["rules"][name]["vs_best_factor"]["mean"] for s in settings if name in s["rules"]
        ]
        rule_out[name] = {"worst_regret": max(regrets), "mean_regret": float(np.mean(regrets)),
                          "within_tolerance": sum(r <= TOLERANCE for r in regrets),
                          "settings": len(regrets)}  # fmt: skip
    return {"fixed_factor_regret": out, "rule_regret": rule_out}


def _pm(d: dict) -> str:
    return f"{d['mean']:+.3f} ± {d['se']:.3f}"


def write_markdown(report: dict, path: Path) -> None:
    settings = report["settings"]
    rules = sorted({name for s in settings for name in s["rules"]})
    lines = [
        "# Damping, projection kind and size across settings",
        "",
        f"`{report['command']}` ({report['seconds']:.0f} s, one thread). Raw-influence LDS; "
        f"the defaults' index ({DEFAULT_KIND} k = {DEFAULT_K}, {DEFAULT_CURVATURE}) at each "
        "damping factor, as the paired difference (mean ± standard error over queries) against "
        "the best factor of that index on the same setting (0 = the best; bold). "
        f"Default factor {DEFAULT_DAMPING_FACTOR:g}.",
        "",
        "| setting | n train / queries | truth reliability (LDS, full) | best factor | "
        + " | ".join(f"{f:g}" for f in FACTORS)
        + "".join(f" | rule `{r}`" for r in rules)
        + " |",
        "|---|---|---|---|" + "---|" * (len(FACTORS) + len(rules)),
    ]
    for s in settings:
        cells = []
        for row in s["factors"]:
            text = _pm(row["vs_best_factor"])
            cells.append(
                f"**{row['lds']['mean']:.3f}**"
                if row["damping_factor"] == s["best_factor"]
                else text
            )
        for r in rules:
            cells.append(_pm(s["rules"][r]["vs_best_factor"]) if r in s["rules"] else "–")
        lines.append(
            f"| {s['setting']} | {s['n_train']} / {s['n_queries']} | "
            f"{s['truth_reliability']['full']:.2f} | {s['best_factor']:g} | "
            + " | ".join(cells)
            + " |"
        )
    regret = report["fixed_factor_regret"]
    lines += [
        "",
        f"Worst regret across the {len(settings)} settings (LDS lost against each setting's best "
        f"factor; robust if at most {TOLERANCE}):",
        "",
        "| factor | " + " | ".join(regret) + "".join(f" | rule `{r}`" for r in rules) + " |",
        "|---|" + "---|" * (len(regret) + len(rules)),
        "| worst regret | "
        + " | ".join(f"{v['worst_regret']:.3f}" for v in regret.values())
        + "".join(f" | {report['rule_regret'][r]['worst_regret']:.3f}" for r in rules)
        + " |",
        "| mean regret | "
        + " | ".join(f"{v['mean_regret']:.3f}" for v in regret.values())
        + "".join(f" | {report['rule_regret'][r]['mean_regret']:.3f}" for r in rules)
        + " |",
        "| settings within tolerance | "
        + " | ".join(f"{v['within_tolerance']}/{v['settings']}" for v in regret.values())
        + "".join(
            f" | {report['rule_regret'][r]['within_tolerance']}/{report['rule_regret'][r]['settings']}"
            for r in rules
        )
        + " |",
        "",
        "Provider level: Spearman across providers between the credit (positive part of raw "
        "scores) and the loss rise on removing each provider, the same index at each factor, "
        "as the paired difference against that index's best factor for it (bold: the best).",
        "",
        "| setting | truth reliability (providers, full; seeds) | best factor | "
        + " | ".join(f"{f:g}" for f in FACTORS)
        + " |",
        "|---|---|---|" + "---|" * len(FACTORS),
        *[
            f"| {s['setting']} | {s['provider_truth_reliability']['full']:.2f}; "
            f"{s['provider_seeds']} | {s['best_provider_factor']:g} | "
            + " | ".join(
                f"**{row['provider_spearman']['mean']:.3f}**"
                if row["damping_factor"] == s["best_provider_factor"]
                else _pm(row["provider_vs_best_factor"])
                for row in s["factors"]
            )
            + " |"
            for s in settings
        ],
        "",
        "Projection kind and size: LDS at the default factor and at the projection's own best "
        "factor, each as the paired difference against the defaults "
        f"({DEFAULT_KIND} k = {DEFAULT_K}, factor {DEFAULT_DAMPING_FACTOR:g}); `identity` is the "
        "unprojected index (exact EKFAC).",
        "",
        "| setting | defaults' LDS | best projected configuration (LDS) | defaults − best | "
        + " | ".join(f"{p['kind']} {p['k'] or ''}".strip() for p in settings[0]["projections"])
        + " |",
        "|---|---|---|---|" + "---|" * len(settings[0]["projections"]),
    ]
    for s in settings:
        b = s["best_config"]
        default_lds = next(
            r["lds"]["mean"] for r in s["factors"] if r["damping_factor"] == DEFAULT_DAMPING_FACTOR
        )
        cells = [
            f"{_pm(p['at_default_factor_vs_defaults'])} / {_pm(p['at_best_factor_vs_defaults'])} "
            f"@{p['best_factor']:g}"
            for p in s["projections"]
        ]
        lines.append(
            f"| {s['setting']} | {default_lds:.3f} | {b['kind']} k={b['k']} @{b['damping_factor']:g} "
            f"({b['lds']:.3f}) | {_pm(s['defaults_vs_best_config'])} | " + " | ".join(cells) + " |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=setting_names, default=",".join(SETTINGS))
    parser.add_argument("--ks", type=number_list(int, low=1), default="8,16,32,64")
    args = parser.parse_args(argv)
    set_threads()
    ks = sorted(set(args.ks) | {DEFAULT_K})
    command = (
        f"python -m benchmarks.accuracy.damping_grid --settings {','.join(args.settings)} "
        f"--ks {','.join(map(str, ks))}"
    )
    report = write_study(
        "damping_grid", command, lambda: [grid_setting(k, ks) for k in args.settings], summary
    )
    write_markdown(report, RESULTS / "damping_grid.md")
    print((RESULTS / "damping_grid.md").read_text())
    return report


if __name__ == "__main__":
    main()
