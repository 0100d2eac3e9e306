"""How the damped inverse treats the EKFAC eigenvalues: its shape, and where they come from.

    python -m benchmarks.accuracy.eigenvalue_treatment [--settings lm,lm-b,lm-c]
                                                       [--filters 0.5,1,2,4]
                                                       [--mixes 0.25,0.5,0.75,1]

The defaults invert each layer's projected EKFAC curvature as 1/(e + λ) along eigenvalue e,
λ = damping factor × mean eigenvalue (Tikhonov damping), with eigenvalues from labels sampled
from the model (`curvature_labels="sampled"`). Two alternatives, on the same index and
queries, against the retrained ground truth of `python -m benchmarks.accuracy.run` (run that
first; it is read from the cache):

- A spectral filter instead of Tikhonov damping: (1 − exp(−e/μ))/e with μ = c·λ for each c in
  `--filters`. It is what gradient descent run for a time 1/μ from the model would do along
  e: 1/e where e ≫ μ, and a finite 1/μ where e ≪ μ, with a sharper turn between the two than
  1/(e + λ). The complement of a low-rank layer gets 1/μ.
- Eigenvalues mixed from the two sources the index can fit them on: (1 − a)·sampled + a·stored
  (the training labels' gradients) for each a in `--mixes`, then damped at the default
  factor. a = 1 is the stored-gradient eigenvalues alone (the MLP default).

Reported per setting, and pooled over the settings: LDS and provider Spearman (positive part of
the raw scores) as paired differences against the defaults. Results:
benchmarks/results/eigenvalue_treatment.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from attribution.curvature import Curvature, LayerCurvature
from benchmarks.accuracy import methods
from benchmarks.accuracy.args import number_list, setting_names
from benchmarks.accuracy.metrics import (
    paired_difference,
)
from benchmarks.accuracy.report import pooled, write_study
from benchmarks.accuracy.retrain import (
    set_threads,
)
from benchmarks.accuracy.run import DEFAULT_KIND, default_config
from benchmarks.accuracy.truth import cached_truth

Spectrum = Callable[[np.ndarray, float], np.ndarray]
"""(eigenvalues, damping λ) → the inverse's diagonal in the eigenbasis."""


def tikhonov(e: np.ndarray, damping: float) -> np.ndarray:
    return 1.0 / (np.maximum(e, 0.0) + damping)


def spectral_filter(c: float) -> Spectrum:
    """(1 − exp(−e/μ))/e with μ = c·λ; 1/μ as e → 0."""

    def diagonal(e: np.ndarray, damping: float) -> np.ndarray:
        mu = c * damping
        e = np.maximum(e, 0.0)
        small = e < 1e-12 * mu
        return np.where(small, 1.0 / mu, -np.expm1(-e / mu) / np.where(small, 1.0, e))

    return diagonal


def precondition(curvature: Curvature, g: np.ndarray, spectrum: Spectrum) -> np.ndarray:
    """Each layer's V diag(spectrum(e, λ)) Vᵀ g; a low-rank layer's complement gets
    spectrum(0, λ). With `tikhonov` this is `Curvature.precondition`."""
    out = np.empty_like(g)
    for s, layer in zip(curvature.slices, curvature.layers, strict=True):
        g_l = g[:, s.start : s.stop]
        z = layer.rotate(g_l)
        diagonal = spectrum(layer.eigvals, layer.damping)
        if layer.low_rank:
            rest = float(spectrum(np.zeros(1), layer.damping)[0])
            out[:, s.start : s.stop] = layer.unrotate(z * (diagonal - rest)) + g_l * rest
        else:
            out[:, s.start : s.stop] = layer.unrotate(z * diagonal)
    return out


def mixed(sampled: Curvature, stored: Curvature, a: float, factor: float) -> Curvature:
    """(1 − a)·sampled + a·stored eigenvalues on sampled's eigenbasis, damped at `factor`."""
    layers = []
    for x, y in zip(sampled.layers, stored.layers, strict=True):
        if not all(
            (u is None and v is None)
            or (u is not None and v is not None and u.shape == v.shape and np.allclose(u, v))
            for u, v in ((x.eigvecs, y.eigvecs), (x.q_out, y.q_out), (x.q_in, y.q_in))
        ):
            raise SystemExit("the two indexes' eigenbases differ; their eigenvalues do not mix")
        eigvals = (1.0 - a) * np.maximum(x.eigvals, 0.0) + a * np.maximum(y.eigvals, 0.0)
        layers.append(LayerCurvature(eigvals, x.eigvecs, x.damping, x.q_out, x.q_in))
    return Curvature(sampled.slices, layers).with_damping(factor)


def measure_setting(name: str, filters: list[float], mixes: list[float]) -> dict:
    truth = cached_truth(name)
    setting, workdir = truth.setting, truth.workdir
    config = default_config(setting)
    if config.curvature_labels != "sampled":
        raise SystemExit(f"{name}: the defaults fit eigenvalues on the stored gradients already")

    def build(labels: str, prior: int) -> methods.BuiltIndex:
        return methods.build(setting, DEFAULT_KIND, config.projection.k_in, config.dtype, workdir,
                             suffix=f"-curv-{labels}", curvature_labels=labels,
                             curvature_prior_examples=prior)  # fmt: skip

    default = build("sampled", config.curvature_prior_examples)
    stored = build("data", 0)
    rows = default.index.dense().numpy().astype(np.float64)
    if not np.array_equal(rows, stored.index.dense().numpy().astype(np.float64)):
        raise SystemExit(f"{name}: the two indexes hold different rows")
    queries = np.asarray(default.query_grads, np.float64)

    def measure(curvature: Curvature, spectrum: Spectrum) -> tuple[np.ndarray, np.ndarray]:
        return truth.measure(precondition(curvature, queries, spectrum) @ rows.T)

    base_lds, base_rho = measure(default.index.curvature, tikhonov)
    out = {"setting": setting.name, "lds": float(np.nanmean(base_lds)),
           "provider_spearman": float(np.nanmean(base_rho)), "rows": [],
           "paired_lds": {}, "paired_provider": {}}  # fmt: skip
    print(f"{setting.name}: defaults LDS {out['lds']:.3f}, provider "
          f"{out['provider_spearman']:.3f}", flush=True)  # fmt: skip
    variants = [(f"filter c={c:g}", default.index.curvature, spectral_filter(c)) for c in filters]
    variants += [
        (f"mix a={a:g}", mixed(default.index.curvature, stored.index.curvature, a,
                               config.damping_factor), tikhonov)
        for a in mixes
    ]  # fmt: skip
    for label, curvature, spectrum in variants:
        lds, rho = measure(curvature, spectrum)
        row = {"variant": label, "lds": float(np.nanmean(lds)),
               "provider_spearman": float(np.nanmean(rho))}  # fmt: skip
        out["paired_lds"][label] = paired_difference(lds, base_lds)
        out["paired_provider"][label] = paired_difference(rho, base_rho)
        out["rows"].append(row)
        dl, dr = out["paired_lds"][label], out["paired_provider"][label]
        print(f"  {label}: LDS {row['lds']:.3f} ({dl['mean']:+.3f} ± {dl['se']:.3f}), provider "
              f"{row['provider_spearman']:.3f} ({dr['mean']:+.3f} ± {dr['se']:.3f})",
              flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=setting_names, default="lm,lm-b,lm-c")
    parser.add_argument("--filters", type=number_list(float, low=1e-6), default="0.5,1,2,4")
    parser.add_argument("--mixes", type=number_list(float, low=0.0), default="0.25,0.5,0.75,1")
    args = parser.parse_args(argv)
    if any(a > 1 for a in args.mixes):
        parser.error(f"--mixes: every value must be at most 1, got {args.mixes}")
    set_threads()
    command = (
        "python -m benchmarks.accuracy.eigenvalue_treatment --settings "
        f"{','.join(args.settings)} --filters {','.join(f'{c:g}' for c in args.filters)} "
        f"--mixes {','.join(f'{a:g}' for a in args.mixes)}"
    )

    def summary(settings: list[dict]) -> dict:
        out = {}
        for key in ("paired_lds", "paired_provider"):
            out[f"pooled_{key}"] = pooled(settings, key)
            for label, d in out[f"pooled_{key}"].items():
                print(f"pooled {key} {label}: {d['mean']:+.3f} ± {d['se']:.3f}", flush=True)
        return out

    return write_study(
        "eigenvalue_treatment",
        command,
        lambda: [measure_setting(n, args.filters, args.mixes) for n in args.settings],
        summary,
    )


if __name__ == "__main__":
    main()
