"""Damping chosen per index from the data it holds, against each setting's best fixed factor.

    python -m benchmarks.accuracy.damping_rules [--settings mlp,cancer,lm,...]
        [--curvature-labels data|sampled]

Per setting: the ground truth of `python -m benchmarks.accuracy.run`'s full plan (LDS subsets;
retrained where the cache lacks it), and the defaults' index (`run.default_config`, PCA k = 32,
EKFAC) scored at every factor of the harness's `FACTORS` and with the damping each rule of
`attribution.damping` chooses:

- `noise-floor`: per layer, from the shape of its EKFAC spectrum alone;
- `evidence`: per layer, MacKay's evidence-maximising prior precision for the layer's projected
  weights P_out W P_inᵀ, over the number of training examples;
- `evidence, prior at the initial weights`: the same with the prior centred on the weights the
  training run started from (‖P_out (W − W_0) P_inᵀ‖²), which an index sees only when it is
  given that checkpoint;
- `stationarity`: per layer, the proximal pull toward the initial weights under which the
  trained weights are stationary (the mean of the index's rows, ḡ, against the projected
  displacement P_out (W − W_0) P_inᵀ; `stationarity_damping`), floored at the default factor's
  λ; also only with the initial checkpoint;
- `generalisation gap`: one factor for every layer, whose predicted mean leave-one-out loss rise
  γ(f) / n equals the measured mean query loss minus mean training loss. Only where the queries
  are held-out examples of the training task (the classifiers); a language model's queries are
  prompts and completions, whose loss is not comparable with a training chunk's.

Reported: raw-influence LDS of each rule as a paired difference (± standard error over queries)
against the setting's best fixed factor, and the factor each rule comes to per layer
(λ_l / mean eigenvalue). Target (issue 27): within 0.02 of the best on every setting.

`--curvature-labels` fits every setting's EKFAC eigenvalues on those labels instead of its
defaults' (`run.default_config`: data labels for classifiers, sampled for language models);
the results then go to damping_rules-<labels>.json / .md.

Writes benchmarks/results/damping_rules.json and damping_rules.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from attribution.config import DEFAULT_CURVATURE, DEFAULT_DAMPING_FACTOR, DEFAULT_K
from attribution.damping import (
    evidence_damping,
    gap_factor,
    noise_floor_damping,
    stationarity_damping,
)
from attribution.projection import weight_matrix
from benchmarks.accuracy import methods
from benchmarks.accuracy.args import setting_names
from benchmarks.accuracy.damping_grid import damped, layer_factors, mean_eigenvalue, raw_scores
from benchmarks.accuracy.metrics import lds_per_query, mean_std, paired_difference
from benchmarks.accuracy.report import RESULTS, write_study
from benchmarks.accuracy.retrain import set_threads
from benchmarks.accuracy.run import DEFAULT_KIND, FACTORS, default_index_options
from benchmarks.accuracy.settings import SETTINGS
from benchmarks.accuracy.truth import cached_truth

TOLERANCE = 0.02
"""LDS a rule may lose against a setting's best fixed factor (issue 27)."""

AT_START = "evidence, prior at the initial weights"
STATIONARY = "stationarity"
RULE_NAMES = ("noise-floor", "evidence", AT_START, STATIONARY, "generalisation gap")


def projected_weights(
    model: torch.nn.Module, built: methods.BuiltIndex, start: torch.nn.Module | None = None
) -> list[np.ndarray]:
    """P_out (W − W_start) P_inᵀ of every tracked layer, flattened as the index's rows are, in
    the index's layer order (W_start = 0 without `start`)."""
    modules = dict(model.named_modules())
    starts = dict(start.named_modules()) if start is not None else {}
    projectors = {p.name: p for p in built.index.projectors()}
    out = []
    for s in built.index.curvature.slices:
        module, p = modules[s.name], projectors[s.name]
        w = weight_matrix(module).detach().double()
        if start is not None:
            w = w - weight_matrix(starts[s.name]).detach().double()
        out.append((p.p_out.double() @ w @ p.p_in.double().T).reshape(-1).numpy())
    return out


def mean_losses(setting, model: torch.nn.Module) -> tuple[float, float]:
    """Mean training loss and mean query loss of the setting's base model `model`."""
    with torch.no_grad():
        train = torch.cat([setting.train_loss(model, b) for b in setting.train_data])
    return float(train.double().mean()), float(np.mean(setting.evaluate(model)[0]))


def rules_setting(key: str, labels: str | None = None) -> dict:
    truth = cached_truth(key)
    setting, workdir, masks, losses = truth.setting, truth.workdir, truth.masks, truth.losses
    options = default_index_options(setting)
    labels = options["curvature_labels"] = labels or options["curvature_labels"]
    built = methods.build(
        setting, DEFAULT_KIND, DEFAULT_K, "float32", workdir, suffix=f"-rules-{labels}", **options
    )
    lds = {
        f: lds_per_query(
            methods.influence_scores(built, f, relatif=False, curvature_kind=DEFAULT_CURVATURE),
            masks,
            losses,
        )
        for f in FACTORS
    }
    best = max(FACTORS, key=lambda f: float(np.nanmean(lds[f])))
    curvature = built.index.curvature
    n = setting.n_train
    means = [mean_eigenvalue(c) for c in curvature.layers]
    base = setting.base_model()

    lambdas: dict[str, list[float] | str] = {
        "noise-floor": [noise_floor_damping(c.eigvals) for c in curvature.layers],
        "evidence": [
            evidence_damping(c.eigvals, float(w @ w), n)
            for c, w in zip(curvature.layers, projected_weights(base, built), strict=True)
        ],
    }
    if setting.initial is None:
        lambdas[AT_START] = lambdas[STATIONARY] = "not applicable: no initial weights"
    else:
        moved = projected_weights(base, built, setting.initial())
        lambdas[AT_START] = [
            evidence_damping(c.eigvals, float(d @ d), n)
            for c, d in zip(curvature.layers, moved, strict=True)
        ]
        index_rows = built.index.dense().numpy().astype(np.float64)
        lambdas[STATIONARY] = [
            max(
                stationarity_damping(index_rows[:, s.start : s.stop].mean(0), d),
                DEFAULT_DAMPING_FACTOR * m,
            )
            for s, d, m in zip(curvature.slices, moved, means, strict=True)
        ]
    train_loss, query_loss = mean_losses(setting, base)
    if setting.task == "lm":
        lambdas["generalisation gap"] = "not applicable: the queries are not held-out examples"
    else:
        f = gap_factor([c.eigvals for c in curvature.layers], n, query_loss - train_loss)
        lambdas["generalisation gap"] = [f * m for m in means]

    rows = {}
    for name in RULE_NAMES:
        lam = lambdas[name]
        if isinstance(lam, str):
            rows[name] = {"not_applicable": lam}
            continue
        per_query = lds_per_query(raw_scores(built, damped(curvature, lam)), masks, losses)
        rows[name] = {
            "lds": mean_std(per_query),
            "vs_best_factor": paired_difference(per_query, lds[best]),
            "layer_factors": layer_factors(curvature, lam),
            "layer_lambdas": [float(x) for x in lam],
        }
    print(f"{setting.name}: best factor {best:g} ({np.nanmean(lds[best]):.3f}); " + "; ".join(
        f"{k} {v['vs_best_factor']['mean']:+.3f}" for k, v in rows.items() if "lds" in v
    ), flush=True)  # fmt: skip
    return {
        "setting": setting.name,
        "key": key,
        "curvature_labels": labels,
        "mean_eigenvalues": means,
        "n_train": n,
        "mean_train_loss": train_loss,
        "mean_query_loss": query_loss,
        "best_factor": best,
        "lds_at_best_factor": mean_std(lds[best]),
        "rules": rows,
    }


def summary(settings: list[dict]) -> dict:
    out = {}
    for name in RULE_NAMES:
        regrets = [
            -s["rules"][name]["vs_best_factor"]["mean"]
            for s in settings
            if "lds" in s["rules"][name]
        ]
        out[name] = {
            "worst_regret": max(regrets) if regrets else None,
            "mean_regret": float(np.mean(regrets)) if regrets else None,
            "within_tolerance": sum(r <= TOLERANCE for r in regrets),
            "settings": len(regrets),
        }
    return {"rule_regret": out}


def _factors(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def write_markdown(report: dict, path: Path, labels: str | None = None) -> None:
    which = f"eigenvalues on {labels} labels" if labels else "eigenvalue labels as its defaults"
    lines = [
        "# Damping chosen from the index's own data",
        "",
        f"`{report['command']}` ({report['seconds']:.0f} s, one thread). Raw-influence LDS of "
        f"the defaults' index ({DEFAULT_KIND} k = {DEFAULT_K}, {DEFAULT_CURVATURE}, {which}) "
        "with each "
        "rule's damping, as the paired difference (± standard error over queries) against the "
        "same index at the setting's best fixed factor; below it, the factor λ_l / mean "
        "eigenvalue each rule comes to, per layer.",
        "",
        "| setting | best factor (LDS) | " + " | ".join(RULE_NAMES) + " |",
        "|---|---|" + "---|" * len(RULE_NAMES),
    ]
    for s in report["settings"]:
        cells = []
        for name in RULE_NAMES:
            r = s["rules"][name]
            if "lds" not in r:
                cells.append("n/a")
                continue
            d = r["vs_best_factor"]
            cells.append(f"{d['mean']:+.3f} ± {d['se']:.3f}<br>({_factors(r['layer_factors'])})")
        lines.append(
            f"| {s['setting']} | {s['best_factor']:g} ({s['lds_at_best_factor']['mean']:.3f}) | "
            + " | ".join(cells)
            + " |"
        )
    regret = report["rule_regret"]
    lines += [
        "",
        "| | " + " | ".join(RULE_NAMES) + " |",
        "|---|" + "---|" * len(RULE_NAMES),
        "| worst regret | "
        + " | ".join(
            "–" if regret[n]["worst_regret"] is None else f"{regret[n]['worst_regret']:.3f}"
            for n in RULE_NAMES
        )
        + " |",
        "| mean regret | "
        + " | ".join(
            "–" if regret[n]["mean_regret"] is None else f"{regret[n]['mean_regret']:.3f}"
            for n in RULE_NAMES
        )
        + " |",
        f"| within {TOLERANCE} of the best | "
        + " | ".join(f"{regret[n]['within_tolerance']}/{regret[n]['settings']}" for n in RULE_NAMES)
        + " |",
    ]
    reasons = sorted({
        r["not_applicable"] for s in report["settings"] for r in s["rules"].values()
        if "not_applicable" in r
    })  # fmt: skip
    lines += ["", *(f"n/a: {reason}." for reason in reasons)] if reasons else []
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=setting_names, default=",".join(SETTINGS))
    parser.add_argument("--curvature-labels", choices=("data", "sampled"), default=None)
    args = parser.parse_args(argv)
    set_threads()
    labels = args.curvature_labels
    command = f"python -m benchmarks.accuracy.damping_rules --settings {','.join(args.settings)}"
    stem = "damping_rules"
    if labels:
        command += f" --curvature-labels {labels}"
        stem += f"-{labels}"
    report = write_study(
        stem, command, lambda: [rules_setting(k, labels) for k in args.settings], summary
    )
    write_markdown(report, RESULTS / f"{stem}.md", labels)
    print((RESULTS / f"{stem}.md").read_text())
    return report


if __name__ == "__main__":
    main()
