"""What an index was built from, hashed by the library itself as it streams.

`build_index` records, whatever the caller passes as `model_info` / `data_info`:

- `weights_sha256`: sha256 of each model's state (every parameter and buffer: name, dtype,
  shape and bytes, in `state_dict` order), for the model and each further checkpoint;
- `data_sha256`: a running sha256 over the training batches in their order: every example's
  id, provider, shard and token count, and the batch's content (its `inputs`, tensors by dtype,
  shape and bytes, and its mask); `examples`: how many there were.

A directory that already holds an index (complete or not) is reused only when both, and the
settings, are the same; anything else is refused with `IndexMismatchError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from attribution.types import Batch


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1).contiguous()
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    return memoryview(flat.view(torch.uint8).cpu().numpy())


def weights_sha256(model: nn.Module) -> str:
    """Hex sha256 over the model's state: each entry's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=False).items():
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        if tensor.numel() and tensor.device.type != "meta":
            digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _update(digest, value: Any, depth: int = 0) -> None:
    """Feed `value` (tensors, arrays, mappings, sequences, scalars, dataclasses, objects by
    their attributes) to `digest` unambiguously: each item is tagged with its kind and, for
    tensors, dtype and shape."""
    if depth > 32:
        raise TypeError("training inputs nest more than 32 levels deep: cannot fingerprint them")
    if isinstance(value, torch.Tensor):
        digest.update(f"T{value.dtype}{tuple(value.shape)}\0".encode())
        if value.numel():
            digest.update(_tensor_bytes(value))
    elif isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        digest.update(f"A{a.dtype.str}{a.shape}\0".encode())
        if a.dtype.hasobject:
            for item in a.reshape(-1):
                _update(digest, item, depth + 1)
        else:
            digest.update(memoryview(a).cast("B"))
    elif isinstance(value, Mapping):
        digest.update(f"M{len(value)}\0".encode())
        for key in sorted(value, key=repr):
            _update(digest, key, depth + 1)
            _update(digest, value[key], depth + 1)
    elif isinstance(value, list | tuple):
        digest.update(f"L{len(value)}\0".encode())
        for item in value:
            _update(digest, item, depth + 1)
    elif value is None or isinstance(value, bool | int | str):
        digest.update(("S" + json.dumps(value) + "\0").encode())
    elif isinstance(value, float):
        digest.update(f"F{value.hex() if math.isfinite(value) else value}\0".encode())
    elif isinstance(value, bytes | bytearray):
        digest.update(f"B{len(value)}\0".encode() + bytes(value))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        digest.update(f"D{type(value).__qualname__}\0".encode())
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        _update(digest, fields, depth + 1)
    elif hasattr(value, "__dict__"):
        digest.update(f"O{type(value).__qualname__}\0".encode())
        _update(digest, vars(value), depth + 1)
    else:
        digest.update(f"R{type(value).__qualname__}:{value!r}\0".encode())


def batch_sha256(batch: Batch) -> bytes:
    """The digest of one batch: its examples' ids, providers, shards, token counts, inputs
    and mask."""
    digest = hashlib.sha256()
    _update(digest, [batch.example_ids, batch.providers, batch.shards, batch.token_counts])
    _update(digest, batch.inputs)
    _update(digest, batch.mask)
    return digest.digest()


class DuplicateExampleError(ValueError):
    """Two training examples with one id: the index's rows would not be told apart."""


class FingerprintedData:
    """Training batches that hash themselves as they stream.

    Every complete pass over the data computes the running `data_sha256` of its batches in
    order; the first one also refuses a repeated example id, naming it and both positions
    (0-based, in data order). A later pass that yields other batches, or the same in another
    order, is refused: the data must be re-iterable in a fixed order.
    """

    def __init__(self, data: Iterable[Batch]) -> None:
        self.data = data
        self.digest: str | None = None
        self.examples = 0

    def __iter__(self) -> Iterator[Batch]:
        running = hashlib.sha256()
        first = self.digest is None
        seen: dict[str, tuple[int, int]] = {}
        position = 0
        for number, batch in enumerate(self.data):
            if first:
                for j, example_id in enumerate(batch.example_ids):
                    if example_id in seen:
                        at, in_batch = seen[example_id]
                        raise DuplicateExampleError(
                            f"example id {example_id!r} appears twice in the training data: at "
                            f"positions {at} and {position + j} (batches {in_batch} and "
                            f"{number}); every example needs its own id"
                        )
                    seen[example_id] = (position + j, number)
            position += len(batch)
            running.update(batch_sha256(batch))
            yield batch
        digest = running.hexdigest()
        if first:
            self.digest, self.examples = digest, position
        elif digest != self.digest:
            raise ValueError(
                "the training data yielded other batches on a later pass than on the first "
                "(another order or other content): it must yield the same batches in the same "
                "order every time it is iterated"
            )

    def fingerprint(self) -> dict:
        """`{"data_sha256", "examples"}`, making a pass over the data if none has completed."""
        if self.digest is None:
            for _ in self:
                pass
        return {"data_sha256": self.digest, "examples": self.examples}
