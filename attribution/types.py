"""Types shared across the attribution core."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by whoever builds a Batch; the CLI need not pay for it
    import torch
    from torch import nn


@dataclass
class Batch:
    """A batch of examples, as the loss function and the index need it.

    `inputs` is whatever the user's loss function consumes (a tensor, or a dict of tensors such
    as `input_ids`/`attention_mask`/`labels`). `mask` (B, T), when given, marks real tokens with
    1 and padding with 0; captured activations at padded positions are ignored.
    """

    inputs: Any
    example_ids: list[str]
    providers: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.example_ids)


LossFn = Callable[["nn.Module", Batch], "torch.Tensor"]
"""A per-example loss: `loss_fn(model, batch) -> Tensor (B,)`.

For training examples it is the loss the model was trained on (for language models the summed
token negative log-likelihood); for queries it is the negative utility (the summed negative
log-likelihood of the completion tokens). Examples in a batch must not interact (no BatchNorm in
training mode), so that the gradient of the summed loss splits into per-example gradients.
"""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message (its type's name if there is none),
    for one-line errors that wrap what a library raised."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class InputError(ValueError):
    """Bad user input, located: file, line (1-based, or None) and field (or None). `unit` names
    what `line` counts: a text file's lines, or a table's rows (parquet)."""

    def __init__(
        self, path: str, line: int | None, field: str | None, message: str, unit: str = "line"
    ) -> None:
        self.path, self.line, self.field, self.message = str(path), line, field, message
        self.unit = unit
        where = self.path
        if line is not None:
            where += f", {unit} {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class IndexDamagedError(ValueError):
    """A complete index whose files are missing, cut short or changed since it was built."""

    def __init__(self, root: str | os.PathLike[str], file: str, reason: str) -> None:
        self.root, self.file, self.reason = str(root), file, reason
        super().__init__(
            f"{root}: the gradient index is damaged ({file}: {reason}); restore its files, or "
            "delete the directory and build the index again"
        )


class IndexMismatchError(ValueError):
    """The index directory was started with other settings, another model or other data."""
