"""Command-line values of the accuracy scripts, refused in one line when they cannot work."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

from benchmarks.accuracy.settings import SETTINGS


def choice_list(choices: Iterable[str], what: str) -> Callable[[str], list[str]]:
    """A parser of a non-empty comma list of names from `choices` (`what`: their plural)."""
    known = list(choices)

    def parse(value: str) -> list[str]:
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [n for n in names if n not in known]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {unknown or [value]}; choose from {', '.join(known)}"
            )
        return names

    return parse


setting_names = choice_list(SETTINGS, "settings")
"""A comma list of `SETTINGS` keys (`--settings lm,lm-b`)."""


def setting_name(value: str) -> str:
    """One `SETTINGS` key (`--setting lm-c`)."""
    names = setting_names(value)
    if len(names) != 1:
        raise argparse.ArgumentTypeError(f"one setting expected, got {value!r}")
    return names[0]


def number_list(kind: type, low: float | None = None) -> Callable[[str], list]:
    """A parser of a comma list of `kind` (int or float), each at least `low` when given."""

    def parse(value: str) -> list:
        try:
            numbers = [kind(v) for v in value.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {kind.__name__}s, got {value!r}"
            ) from None
        if low is not None and any(x < low for x in numbers):
            raise argparse.ArgumentTypeError(f"every value must be at least {low}, got {value!r}")
        return numbers

    return parse


def number_lists(kind: type, low: float | None = None) -> Callable[[str], list[list]]:
    """A parser of one or more comma lists separated by "/" (`3,6,9/6`), each as `number_list`."""
    one = number_list(kind, low)

    def parse(value: str) -> list[list]:
        return [one(part) for part in value.split("/")]

    return parse
