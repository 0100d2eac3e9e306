"""Builds a small index in its own process (the kill-and-resume test SIGKILLs it).

Usage: python -m tests.attribution.build_script OUT_DIR [SLEEP_SECONDS [DTYPE]]
(DTYPE: the model's, float64 by default; float32 as trained models are.)
"""

from __future__ import annotations

import sys
import time

import torch

from attribution import IndexConfig, ProjectionConfig, build_index
from tests.attribution.tiny import lm_batches, lm_fisher_loss, lm_loss, tiny_gpt2

# The first pass runs on a sample of 8 of the 23 examples, so that a build resumed after a
# kill, or split over ranks, must draw the same sample.
CONFIG = IndexConfig(
    projection=ProjectionConfig(kind="pca", k_in=4, k_out=3), rows_per_block=3, factor_examples=8
)


class SlowBatches:
    """Re-iterable batches that take a while each, so a kill lands mid-build."""

    def __init__(self, delay: float) -> None:
        self.batches = lm_batches(n=23, batch_size=2)
        self.delay = delay

    def __iter__(self):
        for b in self.batches:
            time.sleep(self.delay)
            yield b


def build(out_dir: str, delay: float = 0.0, dtype: str = "float64"):
    return build_index(
        tiny_gpt2(dtype=getattr(torch, dtype)),
        lm_loss,
        SlowBatches(delay),
        out_dir,
        CONFIG,
        fisher_loss=lm_fisher_loss,
        show_progress=False,
        model_info={"name": "tiny"},
    )


if __name__ == "__main__":
    build(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0, *sys.argv[3:4])
