"""Influence summed over training checkpoints, against influence at the final model alone.

    python -m benchmarks.accuracy.checkpoints [--settings lm,lm-b,lm-c]
                                              [--epochs 3,6,9/6/1,2,3,4,5,6,7,8,9,10,11]
                                              [--peers kronfluence-ekfac,...]

The ground truth retrains from scratch, so what it measures is the whole training run, not a
small step away from the final model. This study replays each language model's own training
run (all rows, seed 0: the base model's run), keeps the model after each epoch named in
`--epochs` and the final one, and at every one of those checkpoints builds the defaults' index
with the library (`build_index`, then `score`) and runs each peer in `--peers`. `--epochs`
holds one or more sets of earlier epochs separated by "/"; a method's score for a set is the
plain sum of its scores over those checkpoints and the final model (TracIn's sum over
checkpoints, with the curvature of each), so one run says how many checkpoints the sum needs.
The library computes the first set's sum in one index (`build_index(model, ...,
checkpoints=earlier)`); the study checks that its scores agree. Reported: LDS and provider
Spearman (positive part) of every method at the final model alone, at each checkpoint alone
and summed over each set, and paired differences against our sum over the first set. Reads
the ground truth of `python -m benchmarks.accuracy.run` from the cache (run that first).
Results: benchmarks/results/checkpoints.json.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.accuracy import methods
from benchmarks.accuracy.args import choice_list, number_lists, setting_names
from benchmarks.accuracy.metrics import (
    paired_difference,
)
from benchmarks.accuracy.peers import PEERS, run_peer
from benchmarks.accuracy.report import write_study
from benchmarks.accuracy.retrain import (
    set_threads,
)
from benchmarks.accuracy.run import DEFAULT_KIND, default_config, default_index_options
from benchmarks.accuracy.truth import cached_truth

OURS = "logra (defaults)"


def study_setting(name: str, epoch_sets: list[list[int]], peers: list[str]) -> dict:
    truth = cached_truth(name)
    setting, workdir = truth.setting, truth.workdir
    if setting.snapshots is None:
        raise SystemExit(f"{name}: this setting cannot replay its training run")
    config = default_config(setting)
    final = setting.base_model()
    try:
        snapshots = setting.snapshots(tuple(sorted({e for ep in epoch_sets for e in ep})))
    except ValueError as error:
        raise SystemExit(f"{name}: --epochs: {error}") from None
    last = max(snapshots)
    sets = [sorted({*epochs, last}) for epochs in epoch_sets]
    replay_gap = float(np.abs(setting.evaluate(snapshots[last]) - setting.evaluate(final)).max())
    if replay_gap > 0:
        raise SystemExit(f"{name}: the replayed run ends {replay_gap:g} away from the base model")

    scores: dict[str, dict[int, np.ndarray]] = {OURS: {}, **{p: {} for p in peers}}
    status = {}
    try:
        for epoch, model in sorted(snapshots.items()):
            setting.base = model
            built = methods.build(
                setting, DEFAULT_KIND, config.projection.k_in, config.dtype, workdir,
                suffix=f"-epoch{epoch}", **default_index_options(setting),
            )  # fmt: skip
            scores[OURS][epoch] = methods.library_scores(built, relatif=False)
            for peer in peers:
                s, st = run_peer(peer, setting, workdir)
                status[f"{peer} @ epoch {epoch}"] = st
                if s is not None:
                    scores[peer][epoch] = s
            print(f"{setting.name}: epoch {epoch} scored", flush=True)
    finally:
        setting.base = final

    # The first set's sum from the library in one index: the final model with that set's
    # earlier checkpoints (`build_index(checkpoints=...)`), scored by `score`.
    earlier = tuple(snapshots[epoch] for epoch in sets[0] if epoch != last)
    one_index = methods.build(
        setting, DEFAULT_KIND, config.projection.k_in, config.dtype, workdir,
        suffix="-checkpoints", checkpoints=earlier, **default_index_options(setting),
    )  # fmt: skip
    library = methods.library_scores(one_index, relatif=False)
    summed = sum(scores[OURS][epoch] for epoch in sets[0])
    agreement = float(np.abs(library - summed).max() / np.abs(summed).max())
    print(f"{setting.name}: one index over the checkpoints vs the summed scores, max relative "
          f"difference {agreement:.1e}", flush=True)  # fmt: skip

    per_query: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    rows = []
    for method, by_epoch in scores.items():
        if len(by_epoch) != len(snapshots):
            continue  # a peer failed at some checkpoint: see status
        per_query[method, "final model"] = truth.measure(by_epoch[last])
        for epochs in sets:
            per_query[method, f"summed over epochs {epochs}"] = truth.measure(
                sum(by_epoch[e] for e in epochs)
            )
        for epoch, s in sorted(by_epoch.items()):
            lds, rho = truth.measure(s)
            rows.append({"method": method, "epoch": epoch, "lds": float(np.nanmean(lds)),
                         "provider_spearman": float(np.nanmean(rho))})  # fmt: skip
    # Every row against ours summed over the first set; a peer's also against ours on the
    # same models.
    reference = (OURS, f"summed over epochs {sets[0]}")
    methods_out = {}
    for (method, what), (lds, rho) in per_query.items():
        label = f"{method}, {what}"
        out = methods_out[label] = {"lds": float(np.nanmean(lds)),
                                    "provider_spearman": float(np.nanmean(rho))}  # fmt: skip
        line = f"  {label}: LDS {out['lds']:.3f}, provider {out['provider_spearman']:.3f}"
        against = {"ours_summed": reference, "ours_same_models": (OURS, what)}
        for versus, key in against.items():
            if key == (method, what):
                continue
            dl = out[f"paired_lds_vs_{versus}"] = paired_difference(lds, per_query[key][0])
            dr = out[f"paired_provider_vs_{versus}"] = paired_difference(rho, per_query[key][1])
            line += (f" (minus {key[0]}, {key[1]}: {dl['mean']:+.3f} ± {dl['se']:.3f} LDS, "
                     f"{dr['mean']:+.3f} ± {dr['se']:.3f} provider)")  # fmt: skip
        print(line, flush=True)
    return {"setting": setting.name, "epoch_sets": sets, "methods": methods_out,
            "per_checkpoint": rows, "peers": status,
            "one_index_vs_summed_max_rel_diff": agreement}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=setting_names, default="lm,lm-b,lm-c")
    parser.add_argument(
        "--epochs", type=number_lists(int, low=1), default="3,6,9/6/1,2,3,4,5,6,7,8,9,10,11"
    )
    parser.add_argument("--peers", type=choice_list(PEERS, "peers"), default="kronfluence-ekfac")
    args = parser.parse_args(argv)
    set_threads()
    command = (
        "python -m benchmarks.accuracy.checkpoints --settings "
        f"{','.join(args.settings)} --epochs "
        f"{'/'.join(','.join(map(str, epochs)) for epochs in args.epochs)} "
        f"--peers {','.join(args.peers)}"
    )
    return write_study(
        "checkpoints",
        command,
        lambda: [study_setting(n, args.epochs, args.peers) for n in args.settings],
    )


if __name__ == "__main__":
    main()
