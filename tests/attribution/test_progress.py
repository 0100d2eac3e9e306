"""Progress: a redrawn bar on a terminal, plain lines every few seconds in a log."""

from __future__ import annotations

import io
import sys

import pytest

import attribution.progress as p


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Log(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """A clock that moves 2 s each time it is read."""
    now = [0.0]

    def monotonic() -> float:
        now[0] += 2.0
        return now[0]

    monkeypatch.setattr(p.time, "monotonic", monotonic)
    return now


def test_a_log_gets_a_plain_line_every_few_seconds(monkeypatch, clock) -> None:
    monkeypatch.delenv("LEDGER_QUIET", raising=False)
    log = Log()
    monkeypatch.setattr(sys, "stderr", log)
    assert list(p.progress(range(10), desc="logging gradients", unit="batch")) == list(range(10))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    # The clock reads 2 s at the start and 2 s more per item: a line every 3rd item (>= 5 s).
    assert lines[0] == "logging gradients: 3/10 batch (6 s)"
    assert lines[-1].startswith("logging gradients: 10/10 batch")
    assert len(lines) == 1 + 10 // 3


def test_a_terminal_gets_a_redrawn_bar(monkeypatch) -> None:
    monkeypatch.delenv("LEDGER_QUIET", raising=False)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert list(p.progress(range(3), desc="attributing", unit="batch")) == [0, 1, 2]
    assert "\r" in term.getvalue() and "attributing" in term.getvalue()


@pytest.mark.parametrize("how", ["enabled=False", "LEDGER_QUIET=1"])
def test_quiet_prints_nothing(monkeypatch, how) -> None:
    out = Terminal()
    monkeypatch.setattr(sys, "stderr", out)
    if how == "LEDGER_QUIET=1":
        monkeypatch.setenv("LEDGER_QUIET", "1")
        items = list(p.progress(range(3), desc="x"))
    else:
        items = list(p.progress(range(3), desc="x", enabled=False))
    assert items == [0, 1, 2] and out.getvalue() == ""
