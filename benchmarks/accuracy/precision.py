"""What running the model in bfloat16 costs in counterfactual accuracy, against float32.

    python -m benchmarks.accuracy.precision [--setting lm] [--quick]

The setting's base model runs its forward and backward passes in each precision (weights cast
to it, as `ledger index --precision` loads them); everything else is the library's defaults
(`LANGUAGE_MODEL_INDEX`, float32 rows, float64 curvature). Queries run in the same precision.
LDS and the per-query Spearman of provider credit (positive part) against the loss rise when
each provider is removed are computed as in the harness, from the raw influence, and bfloat16
is paired per query against float32. Ground truth is the harness's (cached retrains; `--quick`
uses the quick plan's fewer retrains). Results: benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import numpy as np
import torch

from attribution import ScoreConfig, build_index, score
from attribution.scoring import query_gradients
from benchmarks.accuracy.args import setting_name
from benchmarks.accuracy.metrics import (
    lds_per_query,
    mean_std,
    paired_difference,
    provider_credit,
    provider_rho_per_query,
)
from benchmarks.accuracy.plan import FULL, QUICK
from benchmarks.accuracy.report import RESULTS
from benchmarks.accuracy.retrain import (
    CACHE_DIR,
    RetrainCache,
    lds_subsets,
    provider_removal,
    set_threads,
    subset_losses,
)
from benchmarks.accuracy.run import default_config
from benchmarks.accuracy.settings import SETTINGS

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--setting", type=setting_name, default="lm", help=f"one of {', '.join(SETTINGS)}"
    )
    parser.add_argument("--quick", action="store_true", help="the quick plan's ground truth")
    args = parser.parse_args(argv)
    set_threads()
    start = time.perf_counter()
    workdir = CACHE_DIR / ("work-quick" if args.quick else "work")
    setting = SETTINGS[args.setting](workdir)
    plan = (QUICK if args.quick else FULL)[setting.name]
    cache = RetrainCache(setting)
    masks = lds_subsets(setting.n_train, plan.lds_subsets)
    losses = subset_losses(cache, masks, list(plan.lds_seeds))
    names, rises, _ = provider_removal(cache, list(plan.provider_seeds))
    truth_seconds = time.perf_counter() - start

    per_query, rows = {}, {}
    for name, dtype in PRECISIONS.items():
        model = setting.base_model().to(dtype)
        root = workdir / setting.name / f"precision-{name}"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        index = build_index(
            model, setting.train_loss, setting.train_data, root, default_config(setting),
            fisher_loss=setting.fisher_loss, show_progress=False, device="cpu",
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        _, q = query_gradients(model, setting.query_loss, setting.query_data, index, device="cpu")
        scores = score(index, q, ScoreConfig(relatif=False, dense=True, top_k=1), device="cpu")
        dense = scores.dense.astype(np.float64)
        lds = lds_per_query(dense, masks, losses)
        credit = provider_credit(dense, setting.providers, names, positive=True)
        rho = provider_rho_per_query(credit, rises)
        per_query[name] = (lds, rho)
        rows[name] = {
            "lds": mean_std(lds),
            "provider_spearman": mean_std(rho),
            "index_seconds": round(seconds, 1),
        }
        print(f"{name:9s} LDS {np.nanmean(lds):.4f}  provider Spearman {np.nanmean(rho):.4f}  "
              f"index {seconds:.1f}s", flush=True)  # fmt: skip
    (l16, r16), (l32, r32) = per_query["bfloat16"], per_query["float32"]
    report = {
        "command": f"python -m benchmarks.accuracy.precision --setting {args.setting}"
        + (" --quick" if args.quick else ""),
        "setting": setting.name,
        "plan": {
            "lds_subsets": plan.lds_subsets,
            "lds_seeds": list(plan.lds_seeds),
            "provider_seeds": list(plan.provider_seeds),
        },  # fmt: skip
        "queries": int(setting.n_queries),
        "precisions": rows,
        "bfloat16_minus_float32": {
            "lds": paired_difference(l16, l32),
            "provider_spearman": paired_difference(r16, r32),
        },
        "ground_truth_seconds": round(truth_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    print(json.dumps(report["bfloat16_minus_float32"], indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "precision-quick" if args.quick else "precision"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
