"""`ledger index`, `attribute` and `verify` as one data-parallel job under `torchrun`.

`torchrun --nproc-per-node N -m ledger index ...` starts N processes; each joins the job
(`attribution.distributed.process_group`: Gloo on CPUs, NCCL on GPUs) and does its share.
Only the main rank prints; a rank that fails exits non-zero with one line naming it, and
torchrun then stops the others. Without torchrun (or with one process) nothing changes.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import Any

import click


def torchrun_job(fn: Callable) -> Callable:
    """Run a command as one rank of the torchrun job that started this process, if any."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return fn(*args, **kwargs)
        from attribution.distributed import PeerFailure, process_group
        from attribution.types import first_line

        with process_group() as ranks, contextlib.ExitStack() as quiet:
            if not ranks.main:  # one report of the job, from the main rank
                os.environ["LEDGER_QUIET"] = "1"
                quiet.enter_context(contextlib.redirect_stdout(open(os.devnull, "w")))  # noqa: SIM115
            where = f"rank {ranks.rank} of {ranks.world}"
            try:
                return fn(*args, **kwargs)
            except click.ClickException as exc:
                raise click.ClickException(f"{where}: {exc.format_message()}") from exc
            except (click.exceptions.Exit, click.exceptions.Abort, SystemExit):
                raise
            except PeerFailure as exc:  # the consequence of another rank's error, not a cause
                raise click.ClickException(f"{where}: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - one line for the job's log, not a traceback
                raise click.ClickException(
                    f"{where}: {type(exc).__name__}: {first_line(exc)}"
                ) from exc

    return wrapper


class Job:
    """This process's part in a torchrun job (the whole job without torchrun): attribution
    splits the outputs between the ranks, and their results reach the ledger once."""

    def __init__(self) -> None:
        from attribution.distributed import ranks

        self.ranks = ranks()

    @property
    def main(self) -> bool:
        return self.ranks.main

    def barrier(self) -> None:
        from attribution.distributed import barrier

        barrier()

    def share(self, items: list, batch: int) -> list:
        """This rank's contiguous share of `items` in whole batches of `batch`, so that each
        batch is the one a single process would form (its padding, so its arithmetic, alike)."""
        batches = self.ranks.share(-(-len(items) // batch))
        return items[batches.start * batch : batches.stop * batch]

    def to_writer(self, engine: Any, rows: list) -> list:
        """The rows this rank records: on SQLite (one writer) the main rank records every
        rank's rows, in rank order; on PostgreSQL every rank records its own at once."""
        if self.ranks.world == 1 or engine.dialect.name != "sqlite":
            return rows
        from attribution.distributed import gather_to_main

        gathered = gather_to_main({self.ranks.rank: rows})
        return [] if gathered is None else [r for k in sorted(gathered) for r in gathered[k]]

    def total(self, n: int) -> int:
        """`n` summed over the ranks (on every rank)."""
        if self.ranks.world == 1:
            return n
        import torch

        from attribution.distributed import collective, comm_device

        t = torch.tensor([n], dtype=torch.int64, device=comm_device())
        collective("all_reduce", t)
        return int(t.item())

    def combine(self, count: int, agreeing: int, worst: float) -> tuple[int, int, float]:
        """Counts summed and the largest difference over the ranks (on every rank)."""
        if self.ranks.world == 1:
            return count, agreeing, worst
        from attribution.distributed import collective

        parts: list[Any] = [None] * self.ranks.world
        collective("all_gather_object", parts, (count, agreeing, worst))
        return sum(p[0] for p in parts), sum(p[1] for p in parts), max(p[2] for p in parts)
