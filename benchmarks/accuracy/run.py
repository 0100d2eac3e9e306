"""Counterfactual accuracy of the attribution core against baselines and peer libraries.

    python -m benchmarks.accuracy.run            # full run (ground truth cached after the first)
    python -m benchmarks.accuracy.run --quick    # small run, for a check of the pipeline

Writes benchmarks/results/accuracy.json and accuracy.md (--quick: into the cache folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

from attribution.config import (
    DEFAULT_CURVATURE,
    DEFAULT_CURVATURE_EXAMPLES,
    DEFAULT_DAMPING_FACTOR,
    DEFAULT_FISHER_LABELS,
    DEFAULT_K,
    DEFAULT_LM_CURVATURE_PRIOR_EXAMPLES,
    LANGUAGE_MODEL_INDEX,
    IndexConfig,
    ProjectionConfig,
)
from attribution.projection import find_layers, layer_widths, output_head, output_head_name
from benchmarks.accuracy import methods
from benchmarks.accuracy.args import setting_names
from benchmarks.accuracy.metrics import (
    lds_per_query,
    mean_std,
    paired_difference,
    provider_agreement,
    provider_credit,
    provider_rho_per_query,
    split_half_agreement,
)
from benchmarks.accuracy.peers import PEERS, kronfluence_scores, run_peer
from benchmarks.accuracy.plan import FULL, QUICK, Plan
from benchmarks.accuracy.report import RESULTS, write_markdown
from benchmarks.accuracy.retrain import (
    CACHE_DIR,
    RetrainCache,
    lds_subsets,
    provider_removal,
    removal_outputs,
    set_threads,
    subset_losses,
)
from benchmarks.accuracy.settings import SETTINGS, Setting

log = logging.getLogger("benchmarks.accuracy")

FACTORS = (1e-3, 1e-2, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0)
KS = (4, 8, 16, 32)
PCA_KS = (4, 8, 16, 32, 64)
DEFAULT_KIND = ProjectionConfig().kind
EXACT_FULL = "exact damped Fisher (identity, full)"
EXACT_EKFAC = "exact EKFAC (identity, ekfac)"


def _lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> dict:
    return mean_std(lds_per_query(scores, masks, losses))


def _provider_variants(scores_raw, scores_rel, setting: Setting, names, rises) -> dict:
    """Provider-level agreement of the credit variants: raw/RelatIF × signed/positive."""
    out = {}
    for label, s in (("raw", scores_raw), ("relatif", scores_rel)):
        if s is None:
            continue
        for part in ("signed", "positive"):
            credit = provider_credit(s, setting.providers, names, positive=part == "positive")
            out[f"{label}-{part}"] = provider_agreement(credit, rises)
    return out


def _reliability(cache: RetrainCache, masks: np.ndarray, plan: Plan) -> dict:
    """Split-half agreement of the ground truth over its retraining seeds (cached retrains)."""
    out = {}
    seeds = list(plan.provider_seeds)
    if len(seeds) >= 2:
        half = len(seeds) // 2
        first = provider_removal(cache, seeds[:half])[1]
        second = provider_removal(cache, seeds[half:])[1]
        out["provider"] = {**split_half_agreement(first, second), "seeds": len(seeds)}
    seeds = list(plan.lds_seeds)
    if len(seeds) >= 2:
        half = len(seeds) // 2
        first = subset_losses(cache, masks, seeds[:half], quiet=True)
        second = subset_losses(cache, masks, seeds[half:], quiet=True)
        out["lds"] = {**split_half_agreement(first, second), "seeds": len(seeds)}
    return out


def _brittleness(
    cache: RetrainCache, rankings: dict[str, np.ndarray | None], plan: Plan, setting: Setting
) -> dict:
    """Remove each method's top-k examples for a query, retrain (seed 0), measure the effect.

    Classification: share of queries whose predicted class flips (queries the base model gets
    right). Language model: mean rise of the query loss. `random` removes k random rows.
    """
    base = cache.outputs(np.arange(setting.n_train), 0)
    if setting.task == "classification":
        labels = np.concatenate([b.inputs[1].numpy() for b in setting.query_data])
        queries = np.nonzero(base[1] == labels)[0][: plan.brittle_queries]
    else:
        queries = np.arange(min(plan.brittle_queries, setting.n_queries))
    out: dict = {"queries": queries.tolist(), "ks": list(plan.brittle_ks), "methods": {}}
    rng = np.random.default_rng(7)
    random_rows = {
        (q, k): rng.choice(setting.n_train, k, replace=False)
        for q in queries
        for k in plan.brittle_ks
    }
    for name, scores in rankings.items():
        per_k = {}
        for k in plan.brittle_ks:
            effects = []
            for q in queries:
                removed = random_rows[(q, k)] if scores is None else np.argsort(-scores[q])[:k]
                after = removal_outputs(cache, removed, seed=0)
                if setting.task == "classification":
                    effects.append(float(after[1, q] != base[1, q]))
                else:
                    effects.append(float(after[0, q] - base[0, q]))
            per_k[str(k)] = float(np.mean(effects))
        out["methods"][name] = per_k
        log.info("%s brittleness %s: %s", setting.name, name, per_k)
    cache.save()
    return out


def _held_out_damping(label: str, per_factor: dict[float, np.ndarray]) -> dict:
    """Damping chosen on one half of the queries, LDS reported on the other half (both ways).

    `per_factor`: damping factor → per-query raw-influence LDS of the index `label` at the
    default curvature kind (from the sweep). The defaults are picked from the same queries they
    are reported on; this checks that the pick carries over to queries it was not chosen on.
    Halves are a seeded random split.
    """
    n = len(next(iter(per_factor.values())))
    order = np.random.default_rng(0).permutation(n)
    halves = (order[: n // 2], order[n // 2 :])
    out = []
    for pick, report in (halves, halves[::-1]):
        chosen = max(FACTORS, key=lambda f: float(np.nanmean(per_factor[f][pick])))
        out.append({
            "chosen_factor": chosen,
            "lds_at_chosen": float(np.nanmean(per_factor[chosen][report])),
            "lds_at_default": float(np.nanmean(per_factor[DEFAULT_DAMPING_FACTOR][report])),
            "best_on_reported_half": max(
                float(np.nanmean(per_factor[f][report])) for f in FACTORS
            ),
        })  # fmt: skip
    return {"index": label, "curvature": DEFAULT_CURVATURE, "splits": out}


def default_config(setting: Setting) -> IndexConfig:
    """The defaults' index settings: `LANGUAGE_MODEL_INDEX` for language models, `IndexConfig`
    otherwise (they differ in the eigenvalues' labels and their shrinkage toward KFAC)."""
    return LANGUAGE_MODEL_INDEX if setting.task == "lm" else IndexConfig()


def default_index_options(setting: Setting) -> dict:
    """`methods.build` keywords that give an index the defaults' eigenvalue labels and their
    shrinkage toward KFAC (`default_config`)."""
    config = default_config(setting)
    return dict(
        curvature_labels=config.curvature_labels,
        curvature_prior_examples=config.curvature_prior_examples,
    )


def _variants(
    setting: Setting,
    workdir: Path,
    peers: list[str],
    truth: tuple,
    defaults: tuple[np.ndarray, np.ndarray],
    identity: methods.BuiltIndex,
    stored: methods.BuiltIndex,
) -> dict:
    """Variants of the defaults, paired per query against them. `stored`: the sweep's default
    index, whose eigenvalues come from the stored gradients (reused, not built again).

    The output head (models that have one): the defaults track it, even when its weight is
    tied to the input embedding, and give its vocabulary side `head_k_out` random directions
    under PCA. Measured: the head left out (when tied; for ours and for kronfluence), its
    vocabulary side by PCA, smaller sizes for it, and that side unprojected (with either
    eigenvalue labels). Every model: EKFAC eigenvalues fitted on the other labels than the
    setting's defaults (sampled-label gradients, `curvature_labels="sampled"`, as kronfluence
    fits them, for language models; the stored training-label gradients otherwise), sampled
    labels with four draws per example, and with a quarter of the examples
    (`curvature_examples`); and exact EKFAC with sampled-label eigenvalues. Language models
    also: KFAC factors from the other labels than `DEFAULT_FISHER_LABELS`, eigenvalues as the
    defaults.
    """
    masks, losses, names, rises = truth
    base = setting.base_model()
    tracked = find_layers(base, ProjectionConfig())
    head = output_head_name(base, tracked)
    head_module, tied = output_head(base)
    rows: dict[str, np.ndarray | None] = {}

    config = default_config(setting)
    labels, prior = config.curvature_labels, config.curvature_prior_examples
    other = "data" if labels == "sampled" else "sampled"
    described = {"data": "stored (training-label) gradients", "sampled": "sampled labels"}

    def library(suffix: str, curvature_labels: str = labels, curvature_draws: int = 1,
                curvature_examples: int | None = DEFAULT_CURVATURE_EXAMPLES,
                curvature_prior_examples: int = prior,
                fisher_labels: str = DEFAULT_FISHER_LABELS, **projection) -> np.ndarray:  # fmt: skip
        variant = methods.build(setting, DEFAULT_KIND, DEFAULT_K, "float32", workdir,
                                projection=projection, suffix=suffix, fisher_labels=fisher_labels,
                                curvature_labels=curvature_labels,
                                curvature_draws=curvature_draws,
                                curvature_examples=curvature_examples,
                                curvature_prior_examples=curvature_prior_examples)  # fmt: skip
        return methods.library_scores(variant, False)

    if head is not None:
        if tied:
            # Blocks only (the peers' default layers), so that the lead is checked without the
            # head: the defaults, larger and random projections, and unprojected EKFAC.
            rows["without the tied head"] = library("-no-head", tied_head=False)
            for kind, k in (("pca", 64), ("random", DEFAULT_K), ("random", 64), ("identity", 0)):
                blocks = methods.build(setting, kind, k, "float32", workdir, suffix="-no-head",
                                       projection={"tied_head": False},
                                       curvature_labels=labels, curvature_prior_examples=prior)  # fmt: skip
                what = EXACT_EKFAC if kind == "identity" else f"{kind} k = {k}"
                rows[f"without the tied head, {what}"] = methods.library_scores(blocks, False)
        rows["head's vocabulary side by PCA"] = library("-head-pca", head_projection="pca")
        vocab = layer_widths(head_module)[1]
        default_head = min(ProjectionConfig().head_k_out or DEFAULT_K, vocab)
        rows[f"head k_out = k_out ({DEFAULT_K})"] = library("-head-k", head_k_out=None)
        for size in (64, 128, 256, 512):
            if size < vocab and size != default_head:
                rows[f"head k_out = {size}"] = library(f"-head-k{size}", head_k_out=size)
        # The head's whole vocabulary side (no projection there): what the head's projection
        # gives up, alone and with sampled-label eigenvalues (kronfluence's setting).
        whole = f"head k_out = vocabulary ({vocab}, that side unprojected)"
        if default_head < vocab:
            rows[whole] = library("-head-whole", head_k_out=vocab)
        rows[f"{whole}, eigenvalues from {described[other]}"] = library(
            f"-head-whole-curv-{other}", head_k_out=vocab, curvature_labels=other
        )
    rows[f"eigenvalues from {described[other]}"] = (
        methods.library_scores(stored, False)
        if other == "data"
        else library(f"-curv-{other}", curvature_labels=other)
    )
    if labels == "sampled":
        # The KFAC factors (the EKFAC basis) from the training labels, eigenvalues as the
        # defaults: the sweep measures the factors' labels only with stored-gradient eigenvalues.
        factor_labels = "data" if DEFAULT_FISHER_LABELS == "sampled" else "sampled"
        rows[f"KFAC factors from {factor_labels} labels"] = library(
            f"-factors-{factor_labels}", fisher_labels=factor_labels
        )
    rows["eigenvalues from sampled labels, 4 draws per example"] = library(
        "-curv-sampled4", curvature_labels="sampled", curvature_draws=4
    )
    quarter = max(1, setting.n_train // 4)
    sample = f"eigenvalues from sampled labels of {quarter} of the {setting.n_train} examples"
    # Shrunk toward KFAC as the setting's defaults would (prior), and the other way.
    for m0 in (prior, DEFAULT_LM_CURVATURE_PRIOR_EXAMPLES if prior == 0 else 0):
        how = (f"shrunk toward KFAC with `curvature_prior_examples` {m0}" if m0
               else "not shrunk (`curvature_prior_examples` 0)")  # fmt: skip
        rows[f"{sample} (`curvature_examples`), {how}"] = library(
            f"-curv-sampled-quarter-prior{m0}", curvature_labels="sampled",
            curvature_examples=quarter, curvature_prior_examples=m0,
        )  # fmt: skip
    rows[f"{EXACT_EKFAC} at factor {DEFAULT_DAMPING_FACTOR:g}"] = methods.influence_scores(
        identity, DEFAULT_DAMPING_FACTOR, False, curvature_kind="ekfac"
    )
    exact_sampled = methods.build(setting, "identity", 0, "float32", workdir, curvature="ekfac",
                                  suffix="-curv-sampled1", curvature_labels="sampled",
                                  curvature_examples=None)  # fmt: skip
    rows[f"{EXACT_EKFAC} at factor {DEFAULT_DAMPING_FACTOR:g}, eigenvalues from sampled labels"] = (
        methods.library_scores(exact_sampled, False)
    )
    if head is not None and tied and "kronfluence-ekfac" in peers:
        without = tuple(n for n in tracked if n != head)
        name = "kronfluence-ekfac without the tied head"
        try:
            rows[name] = kronfluence_scores(setting, workdir, "ekfac", modules=without)
        except Exception as exc:  # noqa: BLE001 - reported like any peer failure
            log.exception("kronfluence without the tied head failed")
            rows[f"{name}: {type(exc).__name__}: {exc}"] = None
    default_lds, default_rho = defaults
    out = {"head": head, "tied": tied, "methods": {}, "blocks_only": {}}
    per_query: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, scores in rows.items():
        if scores is None:
            out["methods"][name] = None
            continue
        lds = lds_per_query(scores, masks, losses)
        rho = provider_rho_per_query(
            provider_credit(scores, setting.providers, names, positive=True), rises
        )
        per_query[name] = (lds, rho)
        out["methods"][name] = {
            "lds": mean_std(lds),
            "paired_lds": paired_difference(lds, default_lds),
            "provider_spearman": float(np.nanmean(rho)),
            "paired_provider_spearman": paired_difference(rho, default_rho),
        }
        log.info("%s variant %s: LDS %.3f", setting.name, name, np.nanmean(lds))
    # Blocks only, ours against kronfluence EKFAC on the same layers, paired per query.
    peer = per_query.get("kronfluence-ekfac without the tied head")
    if peer is not None:
        for name, (lds, rho) in per_query.items():
            if name.startswith("without the tied head"):
                out["blocks_only"][f"{name} − kronfluence-ekfac without the tied head"] = {
                    "paired_lds": paired_difference(lds, peer[0]),
                    "paired_provider_spearman": paired_difference(rho, peer[1]),
                }  # fmt: skip
    return out


def evaluate_setting(
    setting: Setting, plan: Plan, workdir: Path, peers: list[str], quick: bool
) -> dict:
    t0 = time.perf_counter()
    cache = RetrainCache(setting)
    masks = lds_subsets(setting.n_train, plan.lds_subsets)
    losses = subset_losses(cache, masks, list(plan.lds_seeds))
    names, rises, _ = provider_removal(cache, list(plan.provider_seeds))
    truth_seconds = cache.seconds
    reliability = _reliability(cache, masks, plan)
    log.info("%s: ground truth ready (%d retrains now, %.0fs)", setting.name, cache.trained,
             truth_seconds)  # fmt: skip

    ks = {"pca": (8, 16), "random": (8, 16)} if quick else {"pca": PCA_KS, "random": KS}
    # Every index is built with the library's defaults for curvature kind and damping; the
    # other curvature kind is fitted from the same rows (methods.build), and both are swept.
    builds = [methods.build(setting, "identity", 0, "float32", workdir)]
    for kind in ("pca", "random"):
        kind_ks = sorted(set(ks[kind]) | ({DEFAULT_K} if kind == DEFAULT_KIND else set()))
        builds += [methods.build(setting, kind, k, "float32", workdir) for k in kind_ks]
    builds.append(methods.build(setting, DEFAULT_KIND, DEFAULT_K, "float16", workdir))
    # The default index with KFAC factors from the training labels (empirical Fisher).
    other_labels = "data" if DEFAULT_FISHER_LABELS == "sampled" else "sampled"
    builds.append(
        methods.build(setting, DEFAULT_KIND, DEFAULT_K, "float32", workdir,
                      fisher_labels=other_labels)
    )  # fmt: skip

    sweep = []
    for b in builds:
        for curv in methods.CURVATURE_KINDS:
            for factor in FACTORS:
                raw = methods.influence_scores(b, factor, relatif=False, curvature_kind=curv)
                rel = methods.influence_scores(b, factor, relatif=True, curvature_kind=curv)
                per_query = lds_per_query(raw, masks, losses)
                sweep.append({
                    "index": b.label, "kind": b.kind, "k": b.k, "dtype": b.dtype, "dim": b.dim,
                    "curvature": curv, "storage_bytes": b.storage_bytes,
                    "log_seconds": round(b.log_seconds, 2),
                    "curvature_seconds": round(b.curvature_seconds.get(curv, 0.0), 2),
                    "damping_factor": factor, "lds": mean_std(per_query),
                    "lds_relatif": _lds(rel, masks, losses),
                })  # fmt: skip
        log.info("%s: %s swept", setting.name, b.label)

    by_label = {b.label: b for b in builds}
    identity = by_label["identity-float32"]
    defaults = default_config(setting)
    labels = defaults.curvature_labels
    stored = by_label[f"{DEFAULT_KIND}-k{DEFAULT_K}-float32"]
    # The defaults' index. The sweep's indexes fit their eigenvalues on the stored gradients
    # (so both curvature kinds come from identical rows); with sampled-label eigenvalues (the
    # language-model default) the default index is built again with them. Rows below that
    # reuse a sweep index say so (`on_stored`).
    default = stored
    on_stored = ""
    if labels != "data":
        default = methods.build(setting, DEFAULT_KIND, DEFAULT_K, "float32", workdir,
                                suffix=f"-curv-{labels}", curvature_labels=labels,
                                curvature_prior_examples=defaults.curvature_prior_examples)  # fmt: skip
        on_stored = ", eigenvalues from stored gradients"

    def best_factor(label: str, curv: str) -> float:
        rows = [r for r in sweep if r["index"] == label and r["curvature"] == curv]
        return max(rows, key=lambda r: r["lds"]["mean"])["damping_factor"]

    def pair(b, factor: float, curv: str) -> tuple[np.ndarray, np.ndarray]:
        return (
            methods.influence_scores(b, factor, False, curvature_kind=curv),
            methods.influence_scores(b, factor, True, curvature_kind=curv),
        )

    full_logra = f"logra full Fisher, {DEFAULT_KIND} k={DEFAULT_K}"  # always on stored rows
    best = {
        full_logra: best_factor(stored.label, "full"),
        EXACT_FULL: best_factor(identity.label, "full"),
        EXACT_EKFAC: best_factor(identity.label, "ekfac"),
    }
    # "logra (defaults)" is the library's own path: the default index (kind, k, curvature kind
    # and damping from attribution/config.py) scored by `score`, RelatIF from the stored
    # self-influence, with no re-damping.
    library = (methods.library_scores(default, False), methods.library_scores(default, True))
    scores = {
        "logra (defaults)": library,
        full_logra: pair(stored, best[full_logra], "full"),
        EXACT_FULL: pair(identity, best[EXACT_FULL], "full"),
        EXACT_EKFAC: pair(identity, best[EXACT_EKFAC], "ekfac"),
        "gradient dot product": (methods.grad_dot_scores(identity), None),
    }
    larger = f"{DEFAULT_KIND}-k64-float32"
    if larger in by_label and DEFAULT_K != 64:
        # The next projection size up at the default curvature and damping, for the trade-off.
        scores[f"logra k=64 ({DEFAULT_KIND}, {DEFAULT_CURVATURE}, factor "
               f"{DEFAULT_DAMPING_FACTOR:g}{on_stored})"] = pair(
            by_label[larger], DEFAULT_DAMPING_FACTOR, DEFAULT_CURVATURE)  # fmt: skip
    labels_variant = by_label[f"{DEFAULT_KIND}-k{DEFAULT_K}-float32-{other_labels}-labels"]
    if on_stored:
        scores[f"logra{on_stored}"] = pair(stored, DEFAULT_DAMPING_FACTOR, DEFAULT_CURVATURE)
    scores[f"logra, KFAC factors from {other_labels} labels{on_stored}"] = pair(
        labels_variant, DEFAULT_DAMPING_FACTOR, DEFAULT_CURVATURE
    )
    # The library's scoring path at the index's damping must agree with the re-damped one.
    redamped = pair(default, DEFAULT_DAMPING_FACTOR, DEFAULT_CURVATURE)
    agree = max(
        float(np.abs(lib - red).max() / np.abs(red).max())
        for lib, red in zip(library, redamped, strict=True)
    )
    # The default index across damping factors, on both measures the product pays on.
    per_factor: dict[float, np.ndarray] = {}
    damping_rows = []
    for f in FACTORS:
        raw_f, rel_f = pair(default, f, DEFAULT_CURVATURE)
        per_factor[f] = lds_per_query(raw_f, masks, losses)
        variants_f = _provider_variants(raw_f, rel_f, setting, names, rises)
        damping_rows.append({
            "damping_factor": f, "lds": mean_std(per_factor[f]),
            "lds_relatif": _lds(rel_f, masks, losses),
            "provider_spearman": variants_f["raw-positive"]["spearman"]["mean"],
            "provider_spearman_relatif": variants_f["relatif-positive"]["spearman"]["mean"],
        })  # fmt: skip
    held_out = _held_out_damping(default.label, per_factor)
    peer_status = {}
    for peer in peers:
        s, status = run_peer(peer, setting, workdir)
        peer_status[peer] = status
        if s is not None:
            scores[peer] = (s, None)

    methods_table = {}
    for name, (raw, rel) in scores.items():
        methods_table[name] = {
            "lds": _lds(raw, masks, losses),
            "lds_relatif": _lds(rel, masks, losses) if rel is not None else None,
            "provider": _provider_variants(raw, rel, setting, names, rises),
        }
    for name, factor in best.items():
        methods_table[name]["damping_factor"] = factor
    # Per-query LDS differences against the defaults (same queries, so paired errors).
    per_query = {name: lds_per_query(raw, masks, losses) for name, (raw, _) in scores.items()}
    paired = {
        f"{name} − logra (defaults)": paired_difference(
            per_query[name], per_query["logra (defaults)"]
        )
        for name in per_query
        if name != "logra (defaults)"
    }

    # Per-query provider Spearman (positive part of raw scores) against the defaults.
    rho = {
        name: provider_rho_per_query(
            provider_credit(raw, setting.providers, names, positive=True), rises
        )
        for name, (raw, _) in scores.items()
    }
    paired_provider = {
        f"{name} − logra (defaults)": paired_difference(rho[name], rho["logra (defaults)"])
        for name in rho
        if name != "logra (defaults)"
    }

    variants = _variants(
        setting, workdir, peers, (masks, losses, names, rises),
        (per_query["logra (defaults)"], rho["logra (defaults)"]),
        identity, stored,
    )  # fmt: skip

    rankings: dict[str, np.ndarray | None] = {
        name: scores[name][0]
        for name in ("logra (defaults)", EXACT_FULL, EXACT_EKFAC, "gradient dot product")
    }
    if "kronfluence-ekfac" in scores:
        rankings["kronfluence-ekfac"] = scores["kronfluence-ekfac"][0]
    rankings["random"] = None
    brittle = _brittleness(cache, rankings, plan, setting)

    return {
        "setting": setting.name,
        "task": setting.task,
        "recipe": setting.recipe,
        "n_train": setting.n_train,
        "n_queries": setting.n_queries,
        "providers": names,
        "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(plan).items()},
        "defaults": {
            "kind": DEFAULT_KIND,
            "k": DEFAULT_K,
            "curvature": DEFAULT_CURVATURE,
            "damping_factor": DEFAULT_DAMPING_FACTOR,
            "fisher_labels": DEFAULT_FISHER_LABELS,
            "curvature_labels": labels,
            "curvature_examples": DEFAULT_CURVATURE_EXAMPLES,
            "curvature_prior_examples": defaults.curvature_prior_examples,
            "head_k_out": ProjectionConfig().head_k_out,
            "head_projection": ProjectionConfig().head_projection,
        },
        "library_vs_redamped_max_rel_diff": agree,
        "truth_reliability": reliability,
        "held_out_damping": held_out,
        "damping_default_index": {"index": default.label, "rows": damping_rows},
        "sweep": sweep,
        "methods": methods_table,
        "paired_lds_vs_defaults": paired,
        "paired_provider_spearman_vs_defaults": paired_provider,
        "peers": peer_status,
        "variants": variants,
        "brittleness": brittle,
        "retrains_this_run": cache.trained,
        "retrain_seconds_this_run": round(cache.seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small plan, results *-quick.*")
    parser.add_argument(
        "--settings",
        type=setting_names,
        default=",".join(SETTINGS),
        help=f"comma list of {', '.join(SETTINGS)}",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip peer libraries")
    parser.add_argument(
        "--stem",
        default="accuracy",
        help="results file name without extension (default accuracy: the headline run; another "
        "stem keeps a run on further settings next to it)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("kronfluence", "logix", "LogIX", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    set_threads()
    plans = QUICK if args.quick else FULL
    workdir = CACHE_DIR / ("work-quick" if args.quick else "work")
    peers = [] if args.no_peers else list(PEERS)
    start = time.perf_counter()
    results = []
    for which in args.settings:
        setting = SETTINGS[which](workdir)
        results.append(evaluate_setting(setting, plans[setting.name], workdir, peers, args.quick))
    report = {
        "command": "python -m benchmarks.accuracy.run"
        + (" --quick" if args.quick else "")
        + (f" --settings {','.join(args.settings)}" if args.settings != list(SETTINGS) else "")
        + (f" --stem {args.stem}" if args.stem != "accuracy" else ""),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": {
            "cpus": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },  # fmt: skip
        "settings": results,
    }
    # A quick run is a pipeline check: its numbers stay out of the committed results.
    out_dir = CACHE_DIR if args.quick else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{args.stem}-quick" if args.quick else args.stem
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, out_dir / f"{stem}.md")
    log.info("done in %.0fs: %s", report["seconds"], out_dir / f"{stem}.md")
    return report


if __name__ == "__main__":
    main()
