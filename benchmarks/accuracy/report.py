"""Markdown tables of an accuracy run (the JSON holds every number; this is the summary)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

RATIONALE = Path(__file__).parent / "rationale.md"
RESULTS = Path(__file__).resolve().parents[1] / "results"


def write_study(
    stem: str,
    command: str,
    run: Callable[[], list[dict]],
    summary: Callable[[list[dict]], dict] | None = None,
) -> dict:
    """Run a study over settings and save {command, settings, seconds} as results/{stem}.json,
    with the keys `summary` makes of the settings' results when given."""
    start = time.perf_counter()
    report = {"command": command, "settings": run()}
    if summary is not None:
        report.update(summary(report["settings"]))
    report["seconds"] = round(time.perf_counter() - start, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _ms(d: dict | None) -> str:
    if not d:
        return "–"
    return f"{d['mean']:.3f} ± {d['std']:.3f}"


def _headline(s: dict) -> list[str]:
    lines = [
        "| method | LDS (raw) | LDS (RelatIF) | provider Spearman (raw / RelatIF, positive part) "
        "| provider top-1 (raw / RelatIF, positive part) |",
        "|---|---|---|---|---|",
    ]
    for name, m in s["methods"].items():
        p = m["provider"]
        rho = " / ".join(
            f"{p[v]['spearman']['mean']:.3f}" if v in p else "–"
            for v in ("raw-positive", "relatif-positive")
        )
        top = " / ".join(
            f"{p[v]['top1']:.2f}" if v in p else "–" for v in ("raw-positive", "relatif-positive")
        )
        label = name
        if "damping_factor" in m:
            label += f", best factor {m['damping_factor']:g}"
        lines.append(f"| {label} | {_ms(m['lds'])} | {_ms(m['lds_relatif'])} | {rho} | {top} |")
    return lines


def _row_label(r: dict) -> str:
    return f"{r['index']} {r.get('curvature', 'full')}"


def _sweep(s: dict) -> list[str]:
    factors = sorted({r["damping_factor"] for r in s["sweep"]})
    head = "| index, curvature | dim | storage (KiB) | logging (s) | " + " | ".join(
        f"LDS @ {f:g}" for f in factors
    )
    lines = [head + " |", "|---|---|---|---|" + "---|" * len(factors)]
    rows: dict[str, dict] = {}
    for r in s["sweep"]:
        rows.setdefault(_row_label(r), {"r": r, "lds": {}})["lds"][r["damping_factor"]] = r["lds"]
    for label, v in rows.items():
        r = v["r"]
        best = max(v["lds"].values(), key=lambda d: d["mean"])["mean"]
        cells = []
        for f in factors:
            m = v["lds"][f]["mean"]
            cells.append(f"**{m:.3f}**" if m == best else f"{m:.3f}")
        lines.append(
            f"| {label} | {r['dim']} | {r['storage_bytes'] / 1024:.0f} | {r['log_seconds']:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _relatif_sweep(s: dict) -> list[str]:
    factors = sorted({r["damping_factor"] for r in s["sweep"]})
    lines = ["| index, curvature | " + " | ".join(f"RelatIF LDS @ {f:g}" for f in factors)
             + " |", "|---|" + "---|" * len(factors)]  # fmt: skip
    rows: dict[str, dict] = {}
    for r in s["sweep"]:
        rows.setdefault(_row_label(r), {})[r["damping_factor"]] = r["lds_relatif"]["mean"]
    for label, v in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{v[f]:.3f}" for f in factors) + " |")
    return lines


def _providers(s: dict) -> list[str]:
    variants = ("raw-signed", "raw-positive", "relatif-signed", "relatif-positive")
    lines = ["| method | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for name, m in s["methods"].items():
        p = m["provider"]
        cells = [
            f"{p[v]['spearman']['mean']:.3f} ± {p[v]['spearman']['std']:.2f}, top-1 "
            f"{p[v]['top1']:.2f}"
            if v in p
            else "–"
            for v in variants
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _brittle(s: dict) -> list[str]:
    b = s["brittleness"]
    what = "share of predictions flipped" if s["task"] == "classification" else "mean loss rise"
    lines = [f"{what}, {len(b['queries'])} queries, retrained without the top-k examples:", "",
             "| method | " + " | ".join(f"k={k}" for k in b["ks"]) + " |",
             "|---|" + "---|" * len(b["ks"])]  # fmt: skip
    for name, per_k in b["methods"].items():
        lines.append(f"| {name} | " + " | ".join(f"{per_k[str(k)]:.3f}" for k in b["ks"]) + " |")
    return lines


def _variants(s: dict) -> list[str]:
    t = s.get("variants")
    if not t:
        return []
    d = s["defaults"]
    lines = ["", "### Variants of the defaults", ""]
    if t["head"]:
        tied = " (its weight is tied to the input embedding)" if t["tied"] else ""
        lines += [f"The defaults track the output head `{t['head']}`{tied}; its vocabulary side "
                  f"keeps {d.get('head_k_out')} random orthonormal directions (a vocabulary no larger "
                  "is kept whole).", ""]  # fmt: skip
    lines += ["Each row changes one thing; differences are paired per query against the "
              "defaults (raw scores, default damping factor).", "",
              "| variant | LDS (raw) | ΔLDS vs defaults | provider Spearman (raw, positive part) "
              "| Δ provider Spearman |", "|---|---|---|---|---|"]  # fmt: skip
    for name, m in t["methods"].items():
        if m is None:
            lines.append(f"| {name} | – | – | – | – |")
            continue
        pl, pp = m["paired_lds"], m["paired_provider_spearman"]
        lines.append(f"| {name} | {_ms(m['lds'])} | {_paired(pl)} | "
                     f"{m['provider_spearman']:.3f} | {_paired(pp)} |")  # fmt: skip
    if t.get("blocks_only"):
        lines += ["", "Blocks only (the output head left out), each against kronfluence EKFAC on "
                  "the same layers, paired per query:", "",
                  "| comparison | ΔLDS | Δ provider Spearman |", "|---|---|---|"]  # fmt: skip
        for name, m in t["blocks_only"].items():
            lines.append(f"| {name} | {_paired(m['paired_lds'])} | "
                         f"{_paired(m['paired_provider_spearman'])} |")  # fmt: skip
    return lines


def _paired(diff: dict) -> str:
    return f"{diff['mean']:+.3f} ± {diff['se']:.3f}"


def _paired_table(diffs: dict | None, what: str, column: str) -> list[str]:
    """Per-query differences against the defaults, one row per comparison (empty: none)."""
    if not diffs:
        return []
    lines = ["", f"{what} difference per query against the defaults (mean ± paired standard "
             "error over queries):", "", f"| comparison | {column} |", "|---|---|"]  # fmt: skip
    return lines + [f"| {label} | {_paired(diff)} |" for label, diff in diffs.items()]


def pooled(settings: list[dict], key: str) -> dict[str, dict]:
    """Paired differences against the defaults pooled over `settings` (independent query
    sets): the query-weighted mean, and its standard error √(Σ (n_i/N)² se_i²). Only the
    comparisons every setting has."""
    out = {}
    for name in settings[0].get(key, {}) if settings else ():
        parts = [s.get(key, {}).get(name) for s in settings]
        if any(p is None for p in parts):
            continue
        n = sum(p["n"] for p in parts)
        mean = sum(p["mean"] * p["n"] for p in parts) / n
        se = sum((p["n"] / n) ** 2 * p["se"] ** 2 for p in parts) ** 0.5
        out[name] = {"mean": mean, "se": se, "n": n}
    return out


def _reliability(s: dict) -> list[str]:
    rel = s.get("truth_reliability") or {}
    parts = []
    for key, what in (("provider", "the loss rises on removing each provider"),
                      ("lds", "the subsets' query losses")):  # fmt: skip
        if key in rel:
            r = rel[key]
            parts.append(
                f"{what}, Spearman {r['half']:.3f} between halves of the "
                f"{r['seeds']} seeds (Spearman–Brown {r['full']:.3f} for all of them)"
            )
    if not parts:
        return []
    return ["", "Ground-truth reliability, per query: " + "; ".join(parts) + ". No method can "
            "be expected to agree with the retrained truth much better than the truth agrees "
            "with itself."]  # fmt: skip


def _pooled_section(report: dict) -> list[str]:
    lm = [s for s in report["settings"] if s.get("task") == "lm"]
    if len(lm) < 2:
        return []
    names = ", ".join(s["setting"] for s in lm)
    n = sum(s["n_queries"] for s in lm)
    out = ["", "## Language models pooled", "",
           f"The paired differences of {names} together ({n} queries): each setting's mean "
           "weighted by its queries, standard error from the settings' errors. A peer that "
           "leads one corpus by less than its error and trails another is level here, not "
           "the best of several noisy draws."]  # fmt: skip
    out += _paired_table(pooled(lm, "paired_lds_vs_defaults"), "Raw-influence LDS", "ΔLDS")
    out += _paired_table(pooled(lm, "paired_provider_spearman_vs_defaults"),
                         "Provider Spearman (positive part of raw scores)",
                         "Δ provider Spearman")  # fmt: skip
    return out


def write_markdown(report: dict, path: Path) -> None:
    out = ["# Counterfactual accuracy of the attribution core", "",
           f"Command: `{report['command']}` — {report['seconds']:.0f} s on "
           f"{report['machine']['cpus']} thread(s), torch {report['machine']['torch']}.", "",
           "LDS: Spearman, across random half-subsets, between summed scores and the retrained "
           "models' negative query loss (mean ± std over queries). Provider: per query, "
           "Spearman across providers between credit and the loss rise when the provider is "
           "removed; top-1 = the most-credited provider is the one whose removal hurts most.",
           ""]  # fmt: skip
    for s in report["settings"]:
        d = s["defaults"]
        out += [f"## {s['setting']} ({s['n_train']} training examples, {s['n_queries']} queries, "
                f"{len(s['providers'])} providers)", "",
                f"Plan: {s['plan']}. Defaults under test: kind `{d['kind']}`, k={d['k']}, "
                f"curvature `{d.get('curvature', 'full')}`, KFAC-factor labels "
                f"`{d.get('fisher_labels', 'data')}`, eigenvalue labels "
                f"`{d.get('curvature_labels', 'data')}` (at most "
                f"{d.get('curvature_examples')} examples; a smaller sample shrunk toward KFAC "
                f"with {d.get('curvature_prior_examples', 0)} prior examples), damping factor "
                f"{d['damping_factor']:g}, "
                f"output head's vocabulary side {d.get('head_projection', 'pca')} with k_out "
                f"{d.get('head_k_out')}. Setting took {s['seconds']:.0f} s "
                f"({s['retrains_this_run']} retrains this run).", "", "### Headline", ""]  # fmt: skip
        out += _headline(s)
        out += _reliability(s)
        out += _paired_table(s.get("paired_lds_vs_defaults"),
                             "Raw-influence LDS", "ΔLDS")  # fmt: skip
        out += _paired_table(s.get("paired_provider_spearman_vs_defaults"),
                             "Provider Spearman (positive part of raw scores)",
                             "Δ provider Spearman")  # fmt: skip
        out += ["", "### Projection size, curvature kind, damping, storage (raw-influence LDS)",
                "", "Each index is built once (logging time includes its own curvature, "
                f"`{d.get('curvature', 'full')}`); the other kind is fitted from the same "
                "stored rows. Bold: the best factor of the row.", ""]  # fmt: skip
        out += _sweep(s)
        if s.get("held_out_damping"):
            out += ["", "### Damping chosen on held-out queries", "",
                    f"Index `{s['held_out_damping']['index']}`, curvature "
                    f"`{s['held_out_damping']['curvature']}`: the damping factor is picked on "
                    "one random half of the queries and LDS is reported on the other half.", "",
                    "| picked on | factor picked | LDS there (other half) | at the default "
                    f"{d['damping_factor']:g} | best factor of that half |",
                    "|---|---|---|---|---|"]  # fmt: skip
            for i, split in enumerate(s["held_out_damping"]["splits"]):
                out.append(f"| half {'AB'[i]} | {split['chosen_factor']:g} | "
                           f"{split['lds_at_chosen']:.3f} | {split['lds_at_default']:.3f} | "
                           f"{split['best_on_reported_half']:.3f} |")  # fmt: skip
        if s.get("damping_default_index"):
            damping = s["damping_default_index"]
            out += ["", "### The defaults' index across damping factors", "",
                    f"Index `{damping['index']}`, curvature `{d.get('curvature', 'full')}`: "
                    "example-level LDS and provider Spearman (positive part), raw and RelatIF.",
                    "", "| damping factor | LDS (raw / RelatIF) | provider Spearman "
                    "(raw / RelatIF) |", "|---|---|---|"]  # fmt: skip
            for r in damping["rows"]:
                mark = "**" if r["damping_factor"] == d["damping_factor"] else ""
                out.append(f"| {mark}{r['damping_factor']:g}{mark} | {r['lds']['mean']:.3f} / "
                           f"{r['lds_relatif']['mean']:.3f} | {r['provider_spearman']:.3f} / "
                           f"{r['provider_spearman_relatif']:.3f} |")  # fmt: skip
        out += ["", "### Same sweep, RelatIF scores", ""]
        out += _relatif_sweep(s)
        out += ["", "### Provider credit variants (Spearman ± std, top-1)", ""]
        out += _providers(s)
        out += ["", "### Brittleness", ""]
        out += _brittle(s)
        out += ["", "### Peers", ""]
        for name, st in s["peers"].items():
            detail = st.get("error", "")
            out.append(
                f"- {name}: {st['status']} ({st['seconds']:.1f} s){' — ' + detail if detail else ''}"
            )
        out += [f"- library scoring path (default index, `score`) vs re-damped scores at the "
                f"default factor and curvature kind, max relative difference (raw and RelatIF): "
                f"{s['library_vs_redamped_max_rel_diff']:.1e}"]  # fmt: skip
        out += _variants(s) + [""]
    out += _pooled_section(report)
    if RATIONALE.exists():
        out += ["", RATIONALE.read_text().strip(), ""]
    path.write_text("\n".join(out) + "\n")
