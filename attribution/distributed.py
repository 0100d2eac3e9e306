"""Data-parallel passes under `torchrun`: shares, fixed-order sums, and their reduction.

Every pass of an index build is split into units that do not depend on the number of
processes: unit u is index block u (`rows_per_block` examples), a batch belongs to the block of
its first example, and a pass repeated d times (the draws of the curvature pass) has units
d · blocks + u. Rank r of W takes the contiguous share r·C/W .. (r+1)·C/W of the C blocks.

A statistic (KFAC factors, the curvature's second moments) is summed in float64 within a unit
in batch order, and the units' partial sums are added in one fixed binary tree over unit
numbers (`TreeSum`): node (level, i) is the sum of units i·2^level .. (i+1)·2^level − 1, left
plus right. A rank sums the nodes that lie within its share; the main rank receives the others'
and finishes the tree. Every node is computed from the same operands in the same order
whatever the number of ranks, so the sum, and all that is derived from it, is bit-identical
with 1, 2 or W processes (given the same hardware and libraries: see docs/scaling.md).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 3600
"""Seconds a collective waits for the other ranks (`LEDGER_COLLECTIVE_TIMEOUT` overrides):
longer than the largest gap between ranks at a barrier, the last rank's share of a pass."""

Value = list  # a unit's partial sums: a list of float64 arrays or tensors


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank `rank` of `world` (0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> range:
        """This rank's contiguous share of `count` units (empty when there are fewer units)."""
        return range(count * self.rank // self.world, count * (self.rank + 1) // self.world)


def ranks() -> Ranks:
    """The current job's ranks: those of the initialised process group, else one process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def launched() -> bool:
    """Whether this process was started by `torchrun` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def collective_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("LEDGER_COLLECTIVE_TIMEOUT", DEFAULT_TIMEOUT_S)))


@contextmanager
def process_group() -> Iterator[Ranks]:
    """Join the job `torchrun` started (Gloo on CPUs, NCCL when this process has a GPU), for
    the block; one process without torchrun. Collectives time out after
    `collective_timeout()`, so a rank that never arrives fails the job instead of hanging it."""
    if not launched() or dist.is_initialized():
        yield ranks()
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend, timeout=collective_timeout())
    yield ranks()
    # Only after success: a failed rank exits at once, and torchrun stops the others.
    dist.destroy_process_group()


class PeerFailure(Exception):  # noqa: N818 - not a RuntimeError: a model's failure is one
    """A collective failed: another rank of the job stopped (it failed, or was killed) or did
    not arrive within `collective_timeout()`."""


def collective(name: str, *args: Any, **kwargs: Any) -> Any:
    """`torch.distributed.<name>(*args, **kwargs)`, its failure a `PeerFailure`."""
    try:
        return getattr(dist, name)(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the backends raise several kinds
        lines = [re.sub(r"^\[[^\]]*\]\s*", "", line.strip()) for line in str(exc).splitlines()]
        lines = [line for line in lines if line]
        raise PeerFailure(
            f"stopped: another rank of the job failed or did not answer within "
            f"{collective_timeout().total_seconds():g} s ({lines[0] if lines else type(exc).__name__})"
        ) from exc


def barrier() -> None:
    if ranks().world > 1:
        collective("barrier")


def _add(a: Value | None, b: Value | None) -> Value | None:
    if a is None:
        return b
    if b is None:
        return a
    return [x + y for x, y in zip(a, b, strict=True)]


class TreeSum:
    """Sums of units added in a fixed binary tree over unit numbers (see the module's text).

    `push(level, i, value)` takes node (level, i) in unit order; two nodes that are siblings
    are merged at once (left + right). `total()` adds what remains from left to right. A unit
    without data is None, which adds nothing."""

    def __init__(self) -> None:
        self.stack: list[tuple[int, int, Value | None]] = []

    def push(self, level: int, index: int, value: Value | None) -> None:
        self.stack.append((level, index, value))
        while len(self.stack) >= 2:
            (l1, i1, v1), (l2, i2, v2) = self.stack[-2:]
            if l1 != l2 or i1 % 2 or i2 != i1 + 1:
                break
            self.stack[-2:] = [(l1 + 1, i1 // 2, _add(v1, v2))]

    def total(self) -> Value | None:
        out = None
        for _, _, v in self.stack:
            out = _add(out, v)
        return out


class UnitSums:
    """This rank's partial sums, unit by unit, pushed into a `TreeSum` as whole units: units
    are added in increasing order, each unit's values summed in the order added; an owned unit
    that gets no value is pushed as None. `shares`: the units this rank owns (ascending)."""

    def __init__(self, shares: Sequence[range]) -> None:
        self.shares = [s for s in shares if len(s)]
        self.tree = TreeSum()
        self.next = 0  # every owned unit below this one is pushed
        self.current: Value | None = None
        self.current_unit: int | None = None

    def owns(self, unit: int) -> bool:
        return any(unit in s for s in self.shares)

    def _push_until(self, stop: int) -> None:
        for s in self.shares:
            for u in range(max(s.start, self.next), min(s.stop, stop)):
                self.tree.push(0, u, self.current if u == self.current_unit else None)
        self.next = max(self.next, stop)

    def add(self, unit: int, value: Value) -> None:
        if not self.owns(unit) or unit < self.next:
            raise ValueError(f"unit {unit} is not one of this rank's units still open")
        if unit != self.current_unit:
            self._push_until(unit)
            self.current_unit, self.current = unit, None
        self.current = _add(self.current, value)

    def finish(self, end: int | None = None) -> TreeSum:
        """The tree, with every owned unit below `end` pushed (all owned units when None)."""
        self._push_until(end if end is not None else max((s.stop for s in self.shares), default=0))
        return self.tree


def _kind(value: Value) -> str:
    return "numpy" if isinstance(value[0], np.ndarray) else "torch"


def comm_device() -> torch.device:
    """Where tensors go through the collectives: the GPU for NCCL, the CPU for Gloo."""
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def reduce_to_main(tree: TreeSum) -> Value | None:
    """The total of every rank's tree, on the main rank (None on the others): the nodes of all
    ranks are pushed in unit order into one tree, which has then the shape a single process
    would give it. Collective: every rank calls it."""
    r = ranks()
    if r.world == 1:
        return _refold(tree.stack)
    mine = [
        (level, index, None if v is None else (_kind(v), [tuple(x.shape) for x in v]))
        for level, index, v in tree.stack
    ]
    headers: list[Any] = [None] * r.world if r.main else None
    collective("gather_object", mine, headers, dst=0)
    device = comm_device()
    if not r.main:
        for _, _, v in tree.stack:
            for x in v or []:
                collective("send", torch.as_tensor(x).to(device, torch.float64).contiguous(), 0)
        return None
    nodes = []
    for rank, header in enumerate(headers):
        local = iter(tree.stack) if rank == 0 else None
        for level, index, described in header:
            value = next(local)[2] if local is not None else None
            if described is not None and local is None:
                kind, shapes = described
                value = []
                for shape in shapes:
                    t = torch.empty(shape, dtype=torch.float64, device=device)
                    collective("recv", t, rank)
                    value.append(t.cpu().numpy() if kind == "numpy" else t)
            nodes.append((index << level, level, index, value))
    nodes.sort(key=lambda n: n[0])
    return _refold([(level, index, value) for _, level, index, value in nodes])


def _refold(nodes: list[tuple[int, int, Value | None]]) -> Value | None:
    tree = TreeSum()
    for level, index, value in nodes:
        tree.push(level, index, value)
    return tree.total()


def gather_to_main(items: dict) -> dict | None:
    """Every rank's `items` merged into one dict on the main rank (None on the others)."""
    r = ranks()
    if r.world == 1:
        return dict(items)
    gathered: list[Any] = [None] * r.world if r.main else None
    collective("gather_object", items, gathered, dst=0)
    if not r.main:
        return None
    merged: dict = {}
    for part in gathered:
        merged.update(part)
    return merged


def blocks_of(examples: int, rows_per_block: int) -> int:
    """Index blocks of `examples` rows."""
    return math.ceil(examples / rows_per_block)


class BlockPlan:
    """One rank's units of a pass over the data, repeated `repeats` times (the curvature's
    label draws): unit `repeat · blocks + b` holds the batches whose first example lies in
    index block b. `blocks` None: one process, which learns the number at the end of the pass
    (`finish(examples)`); only for a pass made once."""

    def __init__(self, rows_per_block: int, blocks: int | None, repeats: int = 1) -> None:
        self.rows_per_block, self.blocks, self.repeats = rows_per_block, blocks, repeats
        r = ranks()
        if blocks is None:
            if r.world > 1 or repeats != 1:
                raise ValueError("a pass of several ranks or repeats needs the number of blocks")
            shares = [range(1 << 62)]
        else:
            mine = r.share(blocks)
            shares = [
                range(d * blocks + mine.start, d * blocks + mine.stop) for d in range(repeats)
            ]
        self.sums = UnitSums(shares)

    def unit(self, position: int, repeat: int = 0) -> int | None:
        """The unit of a batch whose first example is at `position`; None if not this rank's."""
        block = position // self.rows_per_block
        unit = repeat * (self.blocks or 0) + block
        return unit if self.sums.owns(unit) else None

    def add(self, unit: int, value: Value) -> None:
        self.sums.add(unit, value)

    def finish(self, examples: int) -> Value | None:
        """The pass's total over every rank, on the main rank (None on the others)."""
        blocks = (
            self.blocks if self.blocks is not None else blocks_of(examples, self.rows_per_block)
        )
        return reduce_to_main(self.sums.finish(self.repeats * blocks))
