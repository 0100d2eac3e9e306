"""The one progress-bar helper: a tqdm bar on a terminal; in a log or CI (stderr not a
terminal), a plain line every few seconds instead of carriage-return redraws."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

LINE_INTERVAL_S = 5.0
"""Seconds between two plain progress lines when stderr is not a terminal."""


def progress(
    items: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    unit: str = "it",
) -> Iterator[T]:
    """Wrap an iterable with a progress bar (disabled by `enabled=False` or LEDGER_QUIET=1)."""
    if not enabled or os.environ.get("LEDGER_QUIET") == "1":
        yield from items
        return
    if not sys.stderr.isatty():
        yield from _lines(items, desc, total, unit, LINE_INTERVAL_S)
        return
    yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


def _lines(
    items: Iterable[T], desc: str, total: int | None, unit: str, interval: float
) -> Iterator[T]:
    """The items, with `desc: done/total unit (elapsed)` on stderr at most every `interval`
    seconds, and once at the end when the work took longer than one interval."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    started = last = time.monotonic()
    done = 0

    def line(now: float) -> str:
        of = f"/{total}" if total is not None else ""
        return f"{desc}: {done}{of} {unit} ({now - started:.0f} s)\n"

    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval:
            sys.stderr.write(line(now))
            sys.stderr.flush()
            last = now
    if last != started:
        sys.stderr.write(line(time.monotonic()))
        sys.stderr.flush()
