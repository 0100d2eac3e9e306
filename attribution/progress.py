"""The one progress-bar helper: tqdm on stderr, silent when disabled or not a terminal."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    items: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    unit: str = "it",
) -> Iterator[T]:
    """Wrap an iterable with a progress bar (disabled by `enabled=False` or LEDGER_QUIET=1)."""
    disable = not enabled or os.environ.get("LEDGER_QUIET") == "1"
    yield from tqdm(
        items, desc=desc, total=total, disable=disable, unit=unit, leave=False, dynamic_ncols=True
    )
