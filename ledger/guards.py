"""Application-side refusal to change final statements (the database refuses too, by triggers).

A `before_flush` hook on every ORM session raises `StatementFinalError` when a flush would
update or delete a final statement, its lines, its run links or the adjustments it carries.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.orm import Session

from ledger.errors import StatementFinalError
from ledger.models import Adjustment, Statement, StatementLine


def _was_final(statement: Statement) -> bool:
    history = inspect(statement).attrs.status.history
    if history.deleted:
        return history.deleted[0] == "final"
    return statement.status == "final"


LEGACY_SEALING = "ledger_sealing_legacy_statements"
"""`Session.info` key of the one session allowed to write to final statements: migration 0003
giving statements finalised before the journal their content, hash chain and transfers."""


def _refuse_final_changes(session: Session, _context: Any, _instances: Any) -> None:
    if session.info.get(LEGACY_SEALING):
        return
    for obj in list(session.dirty) + list(session.deleted):
        if isinstance(obj, Statement):
            deleted = obj in session.deleted
            if _was_final(obj) and (deleted or session.is_modified(obj)):
                raise StatementFinalError(
                    f"statement {obj.id} ({obj.period_label}) is final and cannot be changed"
                )
        elif isinstance(obj, StatementLine | Adjustment):
            parent = session.get(Statement, obj.statement_id)
            if parent is not None and _was_final(parent):
                if obj in session.deleted or session.is_modified(obj):
                    raise StatementFinalError(
                        f"statement {parent.id} ({parent.period_label}) is final; "
                        "its lines and adjustments cannot be changed"
                    )
    for obj in session.new:
        if isinstance(obj, StatementLine | Adjustment):
            parent = session.get(Statement, obj.statement_id) if obj.statement_id else None
            if parent is not None and _was_final(parent):
                raise StatementFinalError(
                    f"statement {parent.id} ({parent.period_label}) is final; "
                    "nothing can be added to it"
                )


def install(session: Session | None = None) -> None:
    """Attach the guard to all ORM sessions (idempotent); `session` is accepted for clarity."""
    if not event.contains(Session, "before_flush", _refuse_final_changes):
        event.listen(Session, "before_flush", _refuse_final_changes)


install()
