"""Which index pays: a re-run over another index supersedes the outputs' current results, and
so changes every credit they carry. `ledger attribute` does that only when told (`--index` or
`--supersede`) and says what it supersedes before it writes."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ledger import models as m
from ledger.errors import ConflictError


@dataclass(frozen=True)
class Superseded:
    """Outputs whose current result a run over `new_index` would replace."""

    outputs: int
    runs: list[tuple[str, str, int]]
    """(run id, index id, outputs) of the current results, most outputs first."""
    new_index: str

    def describe(self, path: str) -> str:
        run, index, _ = self.runs[0]
        more = f" and {len(self.runs) - 1} other run(s)" if len(self.runs) > 1 else ""
        return (
            f"{self.outputs} output(s) of {path} have current results from run {run[:16]} "
            f"(index {index[:16]}){more}; attributing over index {self.new_index[:16]} "
            "supersedes them"
        )


def superseded_results(session: Session, external_ids: list[str], index_id: str) -> Superseded:
    """The outputs among `external_ids` whose current result comes from a run over another
    index than `index_id`, grouped by that run."""
    r, q, runs = m.QueryResult.__table__, m.Query.__table__, m.AttributionRun.__table__
    counts: dict[tuple[str, str], int] = {}
    for start in range(0, len(external_ids), 500):
        rows = session.execute(
            select(r.c.run_id, runs.c.index_id, func.count())
            .select_from(r.join(q, q.c.id == r.c.query_id).join(runs, runs.c.id == r.c.run_id))
            .where(
                r.c.is_current,
                runs.c.index_id != index_id,
                q.c.external_id.in_(external_ids[start : start + 500]),
            )
            .group_by(r.c.run_id, runs.c.index_id)
        )
        for run_id, old_index, n in rows:
            counts[(run_id, old_index)] = counts.get((run_id, old_index), 0) + int(n)
    ordered = sorted(((run, idx, n) for (run, idx), n in counts.items()), key=lambda x: -x[2])
    return Superseded(sum(counts.values()), ordered, index_id)


def check_supersede(
    superseded: Superseded, path: str, *, index_named: bool, supersede: bool
) -> None:
    """Refuse, in one line, to change which index pays unless the index was named or
    superseding was asked for."""
    if superseded.outputs and not (index_named or supersede):
        raise ConflictError(
            f"{superseded.describe(path)}: name the index with --index "
            f"{superseded.new_index[:16]}, or pass --supersede (nothing was written)"
        )
