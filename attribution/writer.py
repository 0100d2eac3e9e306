"""Writing the index's rows without stalling the device that computes them.

The logging loop hands each batch's projected gradients (on the device) to a `BlockWriter`.
On a GPU they are copied into a pinned host buffer with a non-blocking copy, and an event marks
when the copy is done; a thread of the writer's own waits for that event, converts the rows to
the storage dtype, checks them and writes complete blocks. The device goes on with batch n + 1
while batch n crosses to the host and reaches the disk. On a CPU the thread still takes the
conversion and the disk writes off the compute loop. A bounded queue keeps at most a few
batches in flight, so a slow disk slows the loop rather than filling the host's memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from attribution.store import META_SCHEMA, write_block

IN_FLIGHT = 3
"""Batches handed over and not yet converted; the loop waits when there are more."""


@dataclass
class _Item:
    host: torch.Tensor  # (n, D) rows on the host (a pinned buffer on a GPU)
    ready: torch.cuda.Event | None  # set when the copy into `host` is complete
    meta: list[dict]
    example_ids: list[str]
    blocks: list[int]  # each row's block number
    release: Callable[[], None] | None  # gives a pinned buffer back to the pool


class _PinnedPool:
    """Pinned host buffers reused by shape: allocating pinned memory is slow, and batches of
    one build mostly share a shape."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(shape), dtype)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def give(self, t: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)


class BlockWriter:
    """Rows handed over with `add`, each with its block number, written by a thread in
    `dtype` as index blocks once complete: `rows_per_block` rows, or the rest of the `total`
    examples for the last block. Without `total`, the block still open at `close` is written as
    the last one; with it, a block left incomplete at `close` is an error (the data yielded
    fewer examples than counted).

    An error of the thread (a non-finite row, a value beyond float16, a full disk) is raised by
    the next `add` or by `close`; blocks written before it stay, so a resumed build goes on from
    there. Use as a context manager: leaving the block without an error closes the writer."""

    def __init__(
        self, root: Path, rows_per_block: int, dtype: str, total: int | None = None
    ) -> None:
        self.root = root
        self.rows_per_block = rows_per_block
        self.total = total
        self.dtype = np.dtype(dtype)
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=IN_FLIGHT)
        self._pending: dict[int, tuple[list[np.ndarray], list[dict]]] = {}
        self._error: BaseException | None = None
        self._pool = _PinnedPool()
        self._thread = threading.Thread(target=self._run, name="index-block-writer", daemon=True)
        self._thread.start()

    def add(
        self, g: torch.Tensor, meta: list[dict], example_ids: list[str], blocks: list[int]
    ) -> None:
        """Hand over a batch's rows (n, D), on any device, with each row's metadata, example
        id and block number (rows of a block in order, across calls)."""
        self._raise()
        g = g.detach()
        if g.device.type == "cuda":
            host = self._pool.take(g.shape, g.dtype)
            host.copy_(g, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(g.device))
            item = _Item(host, ready, meta, example_ids, blocks, lambda: self._pool.give(host))
        else:
            item = _Item(g.cpu(), None, meta, example_ids, blocks, None)
        while True:  # wait for room, but not for a thread that has stopped on an error
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self._raise()

    def close(self) -> None:
        """Stop the thread, raise its error if any, and write the last block (without
        `total`) or refuse one left incomplete (with it)."""
        self._stop()
        self._raise()
        if self._pending and self.total is None:
            last = max(self._pending)
            self._write(last)
        if self._pending:
            raise ValueError(
                f"the training data yielded fewer than the {self.total} examples of its first pass"
            )

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stop()

    def _stop(self) -> None:
        if self._thread.is_alive():
            while True:
                try:
                    self._queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    if not self._thread.is_alive():
                        break
            self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._stop()
            raise error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._store(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, raised there
                self._error = exc
                return

    def _store(self, item: _Item) -> None:
        if item.ready is not None:
            item.ready.synchronize()
        rows = item.host.numpy()
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            raise ValueError(f"gradient of training example '{item.example_ids[bad.argmax()]}' "
                             "is not finite")  # fmt: skip
        with np.errstate(over="ignore"):  # found and reported below
            stored = rows.astype(self.dtype)  # a copy: the pinned buffer can be reused
        if item.release is not None:
            item.release()
        if not np.isfinite(stored).all():  # beyond the storage dtype's range (float16)
            row = int((~np.isfinite(stored)).any(axis=1).nonzero()[0][0])
            raise ValueError(
                f"gradient of training example '{item.example_ids[row]}' has a value "
                f"of {float(np.abs(rows[row]).max()):.3g}, beyond {self.dtype.name}'s largest "
                f"{float(np.finfo(self.dtype).max):.6g}; build the index with dtype float32"
            )
        for row, (number, meta) in enumerate(zip(item.blocks, item.meta, strict=True)):
            grads, metas = self._pending.setdefault(number, ([], []))
            grads.append(stored[row])
            metas.append(meta)
            if len(metas) == self._block_rows(number):
                self._write(number)

    def _block_rows(self, number: int) -> int:
        if self.total is None:
            return self.rows_per_block
        return min(self.rows_per_block, self.total - number * self.rows_per_block)

    def _write(self, number: int) -> None:
        grads, meta = self._pending.pop(number)
        write_block(self.root, number, np.stack(grads), pl.DataFrame(meta, schema=META_SCHEMA))
