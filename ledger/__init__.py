"""The credit ledger: SQL tables, value statements and exact royalty allocation.

Money is `Decimal` in Python and whole minor units in SQL; scores are floats, but every sum that
feeds money is computed deterministically. See DESIGN.md and docs/sql.md.
"""

from ledger.errors import LedgerError

__all__ = ["LedgerError"]
