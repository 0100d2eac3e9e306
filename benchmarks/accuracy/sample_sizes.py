"""What the bounded first pass (`factor_examples`) and curvature pass (`curvature_examples`)
cost in accuracy, measured where the bounds bite.

    python -m benchmarks.accuracy.sample_sizes [--settings mlp,lm,lm-b,lm-c] [--fractions 8,4]

The harness's settings hold a few hundred training examples, fewer than either default bound
(1,024 and 4,096 examples), so the defaults' own scores there come from passes over every
example. Here each setting's defaults are built again with the first pass on 1/f of the
examples (f in `--fractions`), with the language models' sampled-label curvature pass on 1/f
(shrunk toward KFAC as the defaults do), and with both. A 240-example setting at 1/8 keeps 30
examples: fewer tokens per layer width than a 1,024-example sample of 128-token chunks gives
the 512- to 2,048-wide layers of a 6 × 512 GPT-2, so this is a harsher test than the default
at scale. Reported per variant: LDS and provider Spearman (positive part of raw scores) as
paired differences (mean ± standard error over queries) against the defaults on every
example. One more row checks the defaults themselves: the same index with its labels drawn by
`torch.multinomial`, the sampler the library used before it inverted the cumulative
distribution (both draw exactly from the softmax; only the draws differ). Reads the cached
ground truth of `python -m benchmarks.accuracy.run`. Results:
benchmarks/results/sample_sizes.json.
"""

from __future__ import annotations

import argparse
from unittest import mock

import numpy as np
import torch

from benchmarks.accuracy import methods
from benchmarks.accuracy.args import number_list, setting_names
from benchmarks.accuracy.metrics import paired_difference
from benchmarks.accuracy.report import write_study
from benchmarks.accuracy.retrain import set_threads
from benchmarks.accuracy.run import default_config
from benchmarks.accuracy.truth import cached_truth


def multinomial_targets(logits: torch.Tensor) -> torch.Tensor:
    """The library's former sampler: `torch.multinomial` over the softmax."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    probs = torch.softmax(
        flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32), -1
    )
    return torch.multinomial(probs, 1).view(logits.shape[:-1])


def study_setting(name: str, fractions: list[int]) -> dict:
    truth = cached_truth(name, quiet=False)
    setting, workdir = truth.setting, truth.workdir
    defaults = default_config(setting)
    lm = defaults.curvature_labels == "sampled"
    n = setting.n_train

    def measure(suffix: str, **options) -> tuple[np.ndarray, np.ndarray]:
        config = {
            "curvature_labels": defaults.curvature_labels,
            "curvature_examples": defaults.curvature_examples,
            "curvature_prior_examples": defaults.curvature_prior_examples,
            "factor_examples": defaults.factor_examples,
            **options,
        }
        built = methods.build(setting, "pca", 32, "float32", workdir,
                              suffix=f"-samples-{suffix}", **config)  # fmt: skip
        return truth.measure(methods.library_scores(built, False))

    base_lds, base_rho = measure("all", factor_examples=None, curvature_examples=None)
    out = {"setting": setting.name, "n_train": n, "language_model": lm, "rows": []}

    def row(label: str, lds: np.ndarray, rho: np.ndarray) -> None:
        r = {"variant": label, "lds": float(np.nanmean(lds)),
             "provider_spearman": float(np.nanmean(rho)),
             "paired_lds": paired_difference(lds, base_lds),
             "paired_provider_spearman": paired_difference(rho, base_rho)}  # fmt: skip
        out["rows"].append(r)
        print(f"{setting.name} {label:45s} LDS {r['lds']:.3f} ({r['paired_lds']['mean']:+.3f} ± "
              f"{r['paired_lds']['se']:.3f}), provider {r['provider_spearman']:.3f} "
              f"({r['paired_provider_spearman']['mean']:+.3f} ± "
              f"{r['paired_provider_spearman']['se']:.3f})", flush=True)  # fmt: skip

    row("every example in every pass", base_lds, base_rho)
    with mock.patch("attribution.fisher.sample_targets", multinomial_targets):
        lds, rho = measure("multinomial", factor_examples=None, curvature_examples=None)
    row("labels drawn by torch.multinomial", lds, rho)
    for f in fractions:
        m = max(1, n // f)
        lds, rho = measure(f"factors-{f}", factor_examples=m, curvature_examples=None)
        row(f"first pass on {m} of {n} examples", lds, rho)
        if lm:
            lds, rho = measure(f"curvature-{f}", factor_examples=None, curvature_examples=m)
            row(f"curvature pass on {m} of {n} examples", lds, rho)
            lds, rho = measure(f"both-{f}", factor_examples=m, curvature_examples=m)
            row(f"both passes on {m} of {n} examples", lds, rho)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=setting_names, default="mlp,lm,lm-b,lm-c")
    parser.add_argument("--fractions", type=number_list(int, low=2), default="8,4")
    args = parser.parse_args(argv)
    set_threads()
    command = (
        "python -m benchmarks.accuracy.sample_sizes --settings "
        f"{','.join(args.settings)} --fractions {','.join(map(str, args.fractions))}"
    )
    return write_study(
        "sample_sizes", command, lambda: [study_setting(n, args.fractions) for n in args.settings]
    )


if __name__ == "__main__":
    main()
