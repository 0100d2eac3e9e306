"""Builds the tiny index of tests/attribution/build_script.py in a `torchrun` job.

Usage: torchrun --standalone --nproc-per-node N -m tests.distributed.build_script OUT_DIR
           [--kill-on RANK]
--kill-on: that rank kills itself (SIGKILL) at a logged batch once the first block of its share
is complete (waiting for its writer up to a minute), so the kill lands between its blocks.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from attribution import build_index
from attribution.distributed import blocks_of, process_group
from attribution.store import block_paths
from tests.attribution.build_script import CONFIG
from tests.attribution.tiny import lm_batches, lm_fisher_loss, lm_loss, tiny_gpt2

EXAMPLES = 23


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-on", type=int)
    args = parser.parse_args()
    with process_group() as ranks:
        calls = 0

        def loss(model, batch):
            nonlocal calls
            calls += 1
            if ranks.rank == args.kill_on and calls > 2:
                first = ranks.share(blocks_of(EXAMPLES, CONFIG.rows_per_block))[0]
                deadline = time.monotonic() + 60
                while not block_paths(Path(args.out), first)[1].exists():
                    if time.monotonic() > deadline:
                        raise RuntimeError("the first block was never written")
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
            return lm_loss(model, batch)

        index = build_index(
            tiny_gpt2(), loss, lm_batches(n=EXAMPLES, batch_size=2), args.out, CONFIG,
            fisher_loss=lm_fisher_loss, show_progress=False, model_info={"name": "tiny"},
        )  # fmt: skip
        if ranks.main:
            print(index.id)


if __name__ == "__main__":
    main()
