"""Alembic environment and versions of the ledger schema (importable so it ships in the wheel)."""
