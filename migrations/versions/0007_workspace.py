"""A relocatable workspace, and drafts that can be discarded.

- ``ledger_settings`` (name → value) holds ``workspace_root``: on SQLite the directory of the
  database file when it was created or upgraded (paths recorded under it, such as those in an
  index's ``source.json``, are found again after the workspace moves); on PostgreSQL the root
  set by ``ledger workspace relocate``.
- Shard and index paths inside the workspace are stored relative to it; on SQLite the ones
  recorded before are made relative here (the database's directory is the workspace), so a
  workspace moved as a whole, database included, works where it lands.
- PostgreSQL: ``ledger_writer`` may delete statements: the guard trigger refuses a final one,
  so only drafts are discarded (``ledger statements discard``).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _sqlite_directory() -> str | None:
    bind = op.get_bind()
    database = bind.engine.url.database
    if bind.dialect.name != "sqlite" or database in (None, "", ":memory:"):
        return None
    return os.path.dirname(os.path.realpath(database))


def upgrade() -> None:
    op.create_table(
        "ledger_settings",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_ledger_settings"),
    )
    root = _sqlite_directory()
    if root is not None:
        bind = op.get_bind()
        bind.execute(
            sa.text("INSERT INTO ledger_settings (name, value) VALUES ('workspace_root', :root)"),
            {"root": root},
        )
        for table in ("shards", "gradient_indexes"):
            rows = bind.execute(sa.text(f"SELECT rowid, path FROM {table}")).all()
            for rowid, path in rows:
                if os.path.isabs(path) and os.path.commonpath([root, path]) == root:
                    relative = os.path.relpath(path, root).replace(os.sep, "/")
                    bind.execute(
                        sa.text(f"UPDATE {table} SET path = :p WHERE rowid = :r"),
                        {"p": relative, "r": rowid},
                    )
    elif op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            DO $grants$
            BEGIN
                IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ledger_writer') THEN
                    GRANT SELECT, INSERT, UPDATE ON ledger_settings TO ledger_writer;
                    GRANT DELETE ON statements TO ledger_writer;
                END IF;
            END
            $grants$
            """
        )


def downgrade() -> None:
    root = _sqlite_directory()
    if root is not None:
        bind = op.get_bind()
        for table in ("shards", "gradient_indexes"):
            for rowid, path in bind.execute(sa.text(f"SELECT rowid, path FROM {table}")).all():
                if not os.path.isabs(path):
                    bind.execute(
                        sa.text(f"UPDATE {table} SET path = :p WHERE rowid = :r"),
                        {"p": os.path.join(root, path), "r": rowid},
                    )
    elif op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            DO $grants$
            BEGIN
                IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ledger_writer') THEN
                    REVOKE DELETE ON statements FROM ledger_writer;
                END IF;
            END
            $grants$
            """
        )
    op.drop_table("ledger_settings")
