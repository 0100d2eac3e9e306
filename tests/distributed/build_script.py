"""Builds the tiny index of tests/attribution/build_script.py in a `torchrun` job.

Usage: torchrun --standalone --nproc-per-node N -m tests.distributed.build_script OUT_DIR
           [--raise-on RANK] [--kill-on RANK]
--raise-on: that rank's training loss raises at its first logged batch.
--kill-on: that rank kills itself (SIGKILL) at its fourth logged batch, after its first blocks.
"""

from __future__ import annotations

import argparse
import os
import signal

from attribution import build_index
from attribution.distributed import process_group
from tests.attribution.build_script import CONFIG
from tests.attribution.tiny import lm_batches, lm_fisher_loss, lm_loss, tiny_gpt2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--raise-on", type=int)
    parser.add_argument("--kill-on", type=int)
    args = parser.parse_args()
    with process_group() as ranks:
        calls = 0

        def loss(model, batch):
            nonlocal calls
            calls += 1
            if ranks.rank == args.raise_on:
                raise RuntimeError(f"planted failure on rank {ranks.rank}")
            if ranks.rank == args.kill_on and calls == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return lm_loss(model, batch)

        index = build_index(
            tiny_gpt2(), loss, lm_batches(n=23, batch_size=2), args.out, CONFIG,
            fisher_loss=lm_fisher_loss, show_progress=False, model_info={"name": "tiny"},
        )  # fmt: skip
        if ranks.main:
            print(index.id)


if __name__ == "__main__":
    main()
