"""Where and in what precision the model runs: `--device` and `--precision`.

The model's forward and backward run on the device in the chosen precision; what the index
keeps is computed from them in float32 at least (projected activations and output gradients,
their per-example products) and summed in float64 (KFAC factors, curvature), so a model in
bfloat16 on a GPU stores rows of the same kind as a float32 model on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Literal

import torch
from torch import nn

from attribution.types import Batch

DeviceSpec = str | torch.device | None
Precision = Literal["float32", "bfloat16", "float16"]
PRECISIONS: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEFAULT_DEVICE = "auto"
DEFAULT_PRECISION = "float32"


def resolve_device(spec: DeviceSpec = DEFAULT_DEVICE) -> torch.device:
    """`auto` (or None): the first GPU when torch sees one, else the CPU; `cpu`; `cuda` or
    `cuda:N`, refused in one line when torch sees no such GPU."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or DEFAULT_DEVICE).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"unknown device '{spec}' (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"unknown device '{spec}' (auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device '{spec}' is not available: this torch ({torch.__version__}) sees no CUDA "
            "GPU; use --device cpu (or auto)"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device '{spec}' is not available: this machine has {count} GPU(s)")
    return device


def resolve_precision(name: str | None) -> torch.dtype:
    """The model's dtype for `--precision` (float32, bfloat16 or float16; None: float32)."""
    name = name or DEFAULT_PRECISION
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision '{name}' ({', '.join(PRECISIONS)})")
    return PRECISIONS[name]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model without."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(value, device: torch.device):
    """Tensors in `value` (a tensor, or mappings, lists and tuples of them) on `device`;
    anything else as it is. Host-to-GPU copies are asynchronous (`non_blocking`)."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return type(value)({k: to_device(v, device) for k, v in value.items()})
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    return value


def batch_on(batch: Batch, device: torch.device) -> Batch:
    """The batch with its inputs and mask on `device` (the same object when already there)."""
    mask = batch.mask
    if _all_on(batch.inputs, device) and (mask is None or mask.device == device):
        return batch
    return replace(
        batch,
        inputs=to_device(batch.inputs, device),
        mask=None if mask is None else to_device(mask, device),
    )


def _all_on(value, device: torch.device) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device == device
    if isinstance(value, Mapping):
        return all(_all_on(v, device) for v in value.values())
    if isinstance(value, tuple | list):
        return all(_all_on(v, device) for v in value)
    return True


def place_model(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Move the model (in place) to `device`, and to `dtype` when given."""
    if dtype is None:
        model.to(device)
    else:
        model.to(device=device, dtype=dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the index's quantities are computed in from model tensors of `dtype`: at
    least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


@contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matrix products in full float32 for the block (no TF32 on a GPU, whatever the
    caller set with `torch.set_float32_matmul_precision`): scores and per-example products
    keep float32's 24-bit mantissa, not TF32's 11 bits."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
