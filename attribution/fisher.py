"""Losses with labels drawn from the model itself, for the true Fisher.

The KFAC factors that define the PCA directions and the EKFAC eigenbasis are estimated from
output gradients. With the training labels they give the empirical Fisher; with labels drawn
from the model's own predictive distribution they give the true Fisher, the Gauss-Newton
curvature that influence functions call for (`IndexConfig.fisher_labels = "sampled"`).

A Fisher loss has the signature of any `LossFn`: (model, batch) → per-example losses. Draw
labels with torch's default generator (as `sample_targets` does): the index build seeds it
for every batch, so builds stay reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_targets(logits: torch.Tensor) -> torch.Tensor:
    """One class per row of `logits` (..., C), drawn from softmax(logits); no gradient.

    Drawn by inverting each row's cumulative distribution (in float64) at one uniform number
    from torch's default generator: a class of probability 0 is never drawn. On a CPU this is
    some 30 times faster than `torch.multinomial` for a vocabulary of thousands, which made
    the sampling a large part of a language model's first pass."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    probs = torch.softmax(flat.to(torch.float64), -1)
    cdf = torch.cumsum(probs, -1)
    u = torch.rand(flat.shape[0], 1, dtype=torch.float64, device=flat.device) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=flat.shape[-1] - 1)
    return drawn.view(logits.shape[:-1])


def sampled_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) logits → (B,) cross-entropy against labels drawn from the logits themselves.

    A classifier's Fisher loss is then one line::

        def fisher_loss(model, batch):
            x, _ = batch.inputs
            return sampled_cross_entropy(model(x))
    """
    if logits.dim() != 2:
        raise ValueError(f"expected (batch, classes) logits, got shape {tuple(logits.shape)}")
    return F.cross_entropy(logits, sample_targets(logits), reduction="none")
