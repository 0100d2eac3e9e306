"""What an index build will take, before it starts: rows, dimensions, disk, memory and time.

`plan_build` counts the examples, sizes every tracked layer's projection, adds up the bytes the
build writes and holds (the KFAC factors of the first pass, their eigendecompositions, the
curvature), and times a few batches of the logging pass on the device to estimate the passes
over the data. `Plan.problems` lists what cannot fit (free disk, host or device memory), each
in one line; `ledger index --plan` prints the plan and refuses such a build up front.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from attribution.config import IndexConfig
from attribution.device import model_device
from attribution.index import RAW_FACTOR_BYTES_LIMIT, fixed_output_projections
from attribution.projection import (
    Tracked,
    checkpoint_prefix,
    find_layers,
    layer_specs,
    members_eval_mode,
    output_head_name,
    random_projectors,
    tracked_gradients,
)
from attribution.types import Batch, LossFn

F64, F32 = 8, 4


@dataclass
class LayerPlan:
    name: str
    n_in: int
    n_out: int
    k_in: int
    k_out: int

    @property
    def dim(self) -> int:
        return self.k_in * self.k_out


@dataclass
class Plan:
    """What a build takes; byte counts are exact for what the index stores, estimates for
    what a pass holds at once."""

    rows: int
    batches: int
    layers: list[LayerPlan]
    disk_bytes: int
    """Gradient blocks (rows × dims in the storage dtype) and the files beside them."""
    factor_bytes: int
    """KFAC factor sums of the first pass (float64; raw n × n for PCA, k × k for random)."""
    eigen_bytes: int
    """The largest eigendecomposition at once (a factor, its eigenvectors and workspace)."""
    curvature_bytes: int
    """The curvature kept per layer (EKFAC bases and eigenvalues, or full d × d)."""
    model_bytes: int
    device: str
    seconds_per_batch: float | None = None
    passes: float = 0.0
    """Passes over the data, in batches' worth: the first pass, the logging pass and the
    sampled-label curvature pass (its share of the data × draws)."""
    peak_device_bytes: int | None = None
    """Peak device memory of the timed batches (GPUs only)."""
    free_disk_bytes: int | None = None
    free_device_bytes: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return sum(layer.dim for layer in self.layers)

    @property
    def seconds(self) -> float | None:
        if self.seconds_per_batch is None:
            return None
        return self.seconds_per_batch * self.batches * self.passes

    @property
    def host_bytes(self) -> int:
        """Host memory beyond the model: factors (saved from the host), the largest
        eigendecomposition, the curvature, and a block of rows being written."""
        return self.factor_bytes + self.eigen_bytes + self.curvature_bytes

    def scale_for_checkpoints(self, models: int) -> None:
        """An index over `models` models of one architecture: each row holds every model's
        layers, and every pass runs each model."""
        self.layers = [
            LayerPlan(f"{checkpoint_prefix(m)}{layer.name}", layer.n_in, layer.n_out,
                      layer.k_in, layer.k_out)
            for m in range(models) for layer in self.layers
        ]  # fmt: skip
        for name in ("disk_bytes", "factor_bytes", "curvature_bytes", "model_bytes"):
            setattr(self, name, getattr(self, name) * models)
        if self.seconds_per_batch is not None:
            self.seconds_per_batch *= models

    def lines(self) -> list[str]:
        """The plan as text, one fact a line."""
        out = [
            f"examples (index rows): {self.rows:,} in {self.batches:,} batches",
            f"tracked layers: {len(self.layers)}, {self.dim:,} dims per row",
        ]
        width = max(len(layer.name) for layer in self.layers)
        for layer in self.layers:
            out.append(
                f"  {layer.name:<{width}}  {layer.n_in:>6} → {layer.n_out:<6} "
                f"k_in {layer.k_in:>4} × k_out {layer.k_out:<5} = {layer.dim:>8,} dims"
            )
        out += [
            f"on disk: {_size(self.disk_bytes)}"
            + (f" (free: {_size(self.free_disk_bytes)})" if self.free_disk_bytes is not None
               else ""),
            f"host memory: {_size(self.host_bytes)} (KFAC factors {_size(self.factor_bytes)}, "
            f"largest eigendecomposition {_size(self.eigen_bytes)}, curvature "
            f"{_size(self.curvature_bytes)}) besides the model's {_size(self.model_bytes)}",
            f"device ({self.device}): the model {_size(self.model_bytes)}, factor sums "
            f"{_size(self.factor_bytes)}"
            + (f", peak of the timed batches {_size(self.peak_device_bytes)}"
               if self.peak_device_bytes is not None else "")
            + (f" (free: {_size(self.free_device_bytes)})"
               if self.free_device_bytes is not None else ""),
        ]  # fmt: skip
        if self.seconds is not None:
            out.append(
                f"time: about {_duration(self.seconds)} ({self.seconds_per_batch:.3g} s per "
                f"batch measured, {self.passes:.2f} passes over {self.batches:,} batches)"
            )
        out += [f"cannot fit: {p}" for p in self.problems]
        return out


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _share(cap: int | None, rows: int) -> float:
    """The share of the data a pass capped at `cap` examples (None: all) goes through."""
    return 1.0 if cap is None or rows == 0 else min(1.0, cap / rows)


FIRST_PASS_COST = 2.5
"""A first-pass batch (raw KFAC factor products, labels drawn from the model) in logging
batches: 1.33 s against 0.53 s on the CPU for GPT-2 6 × 512 (benchmarks/index_cost.py)."""


def plan_build(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    rows: int,
    config: IndexConfig,
    out_dir: str | Path,
    *,
    timed_batches: int = 2,
) -> Plan:
    """The plan of indexing `rows` examples, arriving as `batches`, with `model` where it is
    (its device) into `out_dir`. The first `timed_batches` batches (after one untimed batch
    that warms the kernels up) are run through the logging pass to time it."""
    proj = config.projection
    tracked = find_layers(model, proj)
    specs = layer_specs(tracked, output_head_name(model, tracked))
    layers = [LayerPlan(s.name, s.n_in, s.n_out, *proj.dims_for(s.name, s.n_in, s.n_out, s.head))
              for s in specs]  # fmt: skip
    fixed = set(fixed_output_projections(specs, proj))
    if proj.kind == "random":
        factor = sum((layer.k_in**2 + layer.k_out**2) * F64 for layer in layers)
        largest = max(max(layer.k_in, layer.k_out) for layer in layers)
    else:
        raw_out = {layer.name: 0 if layer.name in fixed else layer.n_out for layer in layers}
        factor = sum((layer.n_in**2 + raw_out[layer.name] ** 2) * F64 for layer in layers)
        largest = max(max(layer.n_in, raw_out[layer.name]) for layer in layers)
    eigen = 3 * largest * largest * F64  # the matrix, its eigenvectors, the solver's workspace
    if config.curvature == "full":
        curvature = sum(layer.dim**2 * F64 for layer in layers)
    else:
        curvature = sum((layer.k_in**2 + layer.k_out**2 + layer.dim) * F64 for layer in layers)
    dim = sum(layer.dim for layer in layers)
    storage = 2 if config.dtype == "float16" else F32
    disk = rows * dim * storage + rows * 64 + 2 * factor + curvature
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    device = model_device(model)
    batch_list = []
    for b in batches:
        batch_list.append(b)
        if len(batch_list) > timed_batches:
            break
    n_batches = 0
    plan = Plan(rows, n_batches, layers, disk, factor, eigen, curvature, model_bytes, str(device))
    plan.batches = max(1, math.ceil(rows / max(len(batch_list[0]), 1))) if batch_list else 0
    sampled = 0.0
    if config.curvature_labels == "sampled":
        sampled = _share(config.curvature_examples, rows) * config.curvature_draws
    first = _share(config.factor_examples, rows)
    plan.passes = 1 + FIRST_PASS_COST * first + sampled
    if batch_list:
        plan.seconds_per_batch, plan.peak_device_bytes = _time_batches(
            model, loss_fn, batch_list, tracked, specs, config
        )
    parent = Path(out_dir)
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    plan.free_disk_bytes = shutil.disk_usage(parent).free
    if device.type == "cuda":
        plan.free_device_bytes = torch.cuda.mem_get_info(device)[0]
    plan.problems = _problems(plan, config)
    return plan


def _time_batches(model, loss_fn, batches, tracked, specs, config) -> tuple[float, int | None]:
    projectors = random_projectors(specs, config.projection)
    member = Tracked(model, tracked, projectors).on_model_device()
    device = model_device(model)
    cuda = device.type == "cuda"
    with members_eval_mode([member]):
        tracked_gradients([member], loss_fn, batches[0])  # warm-up, untimed
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        timed = batches[1:] or batches[:1]
        start = time.perf_counter()
        for b in timed:
            tracked_gradients([member], loss_fn, b).cpu()
        if cuda:
            torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / len(timed)
    return seconds, torch.cuda.max_memory_allocated(device) if cuda else None


def available_host_bytes() -> int | None:
    """Physical memory not in use now (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _problems(plan: Plan, config: IndexConfig) -> list[str]:
    problems = []
    free_host = available_host_bytes()
    if free_host is not None and plan.host_bytes > free_host:
        problems.append(
            f"the host needs about {_size(plan.host_bytes)} for the factors, their "
            f"eigendecomposition and the curvature, {_size(free_host)} are free: use random "
            "projections, lower --k-in/--k-out, or fewer layers (--modules)"
        )
    if config.projection.kind in ("pca", "identity") and plan.factor_bytes > RAW_FACTOR_BYTES_LIMIT:
        problems.append(
            f"{config.projection.kind} projections need the raw KFAC factors of every layer, "
            f"{_size(plan.factor_bytes)} in float64 (limit {_size(RAW_FACTOR_BYTES_LIMIT)}): "
            "use random projections or fewer layers (--modules)"
        )
    if plan.free_disk_bytes is not None and plan.disk_bytes > plan.free_disk_bytes:
        problems.append(
            f"the index needs {_size(plan.disk_bytes)} on disk, {_size(plan.free_disk_bytes)} "
            "are free: lower --k-in/--k-out, store --dtype float16, or write elsewhere (--out)"
        )
    if plan.free_device_bytes is not None:
        need = plan.factor_bytes + (plan.peak_device_bytes or plan.model_bytes)
        if need > plan.free_device_bytes:
            problems.append(
                f"the device needs about {_size(need)} (factor sums and the peak of a batch), "
                f"{_size(plan.free_device_bytes)} are free: lower --batch-size, or use random "
                "projections"
            )
    return problems
