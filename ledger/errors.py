"""Exceptions raised by the ledger for bad input or forbidden changes.

Every error is a `LedgerError` with a one-sentence message meant for the user, so the command line
can show it without a traceback. Errors about malformed values are also `ValueError`s.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of all errors the ledger raises on purpose."""


class PeriodError(LedgerError, ValueError):
    """A period string or date range that cannot be parsed or is empty."""


class MoneyError(LedgerError, ValueError):
    """An unknown currency, or an amount that does not fit the currency's minor unit."""


class NotFoundError(LedgerError, LookupError):
    """A provider, shard, run, query or statement that the ledger does not hold."""


class ConflictError(LedgerError):
    """A write that contradicts what the ledger already holds (same key, different content)."""


class StatementFinalError(LedgerError):
    """An attempt to change, rebuild or delete a final statement."""


class EmptyStatementError(LedgerError):
    """A statement was asked for a period in which no served query earned any credit."""


class ClosedPeriodError(ConflictError):
    """Credits for outputs served in a period whose statement is final (they would never be
    paid, so they are refused)."""
