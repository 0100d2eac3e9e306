"""How strongly to shrink EKFAC eigenvalues fitted on a sample toward KFAC (`curvature_prior_examples`).

    python -m benchmarks.accuracy.prior_sweep [--settings lm,lm-b,lm-c] [--m0 1,4,16,32,64,128,256]

Reads the cached ground truth of `python -m benchmarks.accuracy.run` (run that first) and
builds, per setting, the language-model default index (pca k=32, sampled-label eigenvalues)
twice: with every example in the eigenvalue pass, and with a quarter of them
(`curvature_examples`), both unshrunk. Each is then shrunk with the core's `shrink_to_kfac` for
every m0 (and m0 → ∞: the KFAC eigenvalues alone, rescaled), and scored at the default damping.
Reported: LDS and provider Spearman (positive part of raw scores), each as a paired difference
against the unshrunk index on all examples. Results: benchmarks/results/prior_sweep.json.
"""

from __future__ import annotations

import argparse

import numpy as np

from attribution.curvature import shrink_to_kfac
from benchmarks.accuracy import methods
from benchmarks.accuracy.args import number_list, setting_names
from benchmarks.accuracy.metrics import (
    paired_difference,
)
from benchmarks.accuracy.report import write_study
from benchmarks.accuracy.retrain import (
    set_threads,
)
from benchmarks.accuracy.truth import cached_truth

KFAC_ALONE = 10**12
"""m0 large enough that the sample's eigenvalues no longer count: KFAC's, rescaled."""


def sweep_setting(name: str, m0s: list[int]) -> dict:
    truth = cached_truth(name, quiet=False)
    setting, workdir = truth.setting, truth.workdir
    quarter = max(1, setting.n_train // 4)

    def build(label: str, examples: int | None) -> methods.BuiltIndex:
        return methods.build(setting, "pca", 32, "float32", workdir, suffix=f"-prior-{label}",
                             curvature_labels="sampled", curvature_examples=examples,
                             curvature_prior_examples=0)  # fmt: skip

    def measure(built: methods.BuiltIndex, curvature) -> tuple[np.ndarray, np.ndarray]:
        rows = built.index.dense().numpy().astype(np.float64)
        return truth.measure(
            curvature.precondition(np.asarray(built.query_grads, np.float64)) @ rows.T
        )

    samples = {"all": (build("all", None), setting.n_train),
               "quarter": (build("quarter", quarter), quarter)}  # fmt: skip
    base_lds, base_rho = measure(samples["all"][0], samples["all"][0].index.curvature)
    out = {"setting": setting.name, "n_train": setting.n_train, "quarter": quarter, "rows": []}
    for sample, (built, m) in samples.items():
        for m0 in [0, *m0s, KFAC_ALONE]:
            curvature = shrink_to_kfac(built.index.curvature, built.index.factors(), m, m0)
            lds, rho = measure(built, curvature)
            row = {"sample": sample, "m0": "KFAC alone" if m0 == KFAC_ALONE else m0,
                   "lds": float(np.nanmean(lds)), "provider_spearman": float(np.nanmean(rho)),
                   "paired_lds": paired_difference(lds, base_lds),
                   "paired_provider_spearman": paired_difference(rho, base_rho)}  # fmt: skip
            out["rows"].append(row)
            print(f"{setting.name} {sample:8s} m0={row['m0']!s:>10}: LDS {row['lds']:.3f} "
                  f"({row['paired_lds']['mean']:+.3f} ± {row['paired_lds']['se']:.3f}), "
                  f"provider {row['provider_spearman']:.3f} "
                  f"({row['paired_provider_spearman']['mean']:+.3f} ± "
                  f"{row['paired_provider_spearman']['se']:.3f})", flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=setting_names, default="lm,lm-b,lm-c")
    parser.add_argument("--m0", type=number_list(int, low=1), default="1,4,16,32,64,128,256")
    args = parser.parse_args(argv)
    set_threads()
    command = (
        "python -m benchmarks.accuracy.prior_sweep --settings "
        f"{','.join(args.settings)} --m0 {','.join(map(str, args.m0))}"
    )
    return write_study(
        "prior_sweep", command, lambda: [sweep_setting(n, args.m0) for n in args.settings]
    )


if __name__ == "__main__":
    main()
