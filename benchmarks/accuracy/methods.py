"""Score matrices of the project's LoGra (through its public API) and of simple baselines.

An index is built once per (projection kind, k, dtype) with the library's default curvature
kind and KFAC-factor labels; the other kind is fitted from the same stored rows with the core's `fit_curvature`, so
both curvature kinds are measured on identical gradients. Other damping factors reuse each
curvature's eigendecomposition: λ_l = factor × mean eigenvalue, exactly as `fit_curvature` sets
it (`Curvature.with_damping`), and scores then come from the core's own `score`. RelatIF
divides by sqrt of the self-influence recomputed with the same curvature and damping
(`Curvature.self_influence`).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribution import IndexConfig, ProjectionConfig, ScoreConfig, build_index, score
from attribution.config import (
    DEFAULT_CURVATURE,
    DEFAULT_DAMPING_FACTOR,
    DEFAULT_FISHER_LABELS,
)
from attribution.curvature import Curvature, fit_curvature
from attribution.scoring import query_gradients
from attribution.store import GradientIndex
from benchmarks.accuracy.settings import Setting


@dataclass
class BuiltIndex:
    """An index of a setting's training data, with its queries' gradients and its costs."""

    label: str
    kind: str
    k: int
    dtype: str
    index: GradientIndex
    query_grads: np.ndarray
    log_seconds: float
    """Wall time of `build_index` (PCA pass, logging, curvature, self-influence)."""
    storage_bytes: int
    """Bytes of the stored projected gradients."""
    curvatures: dict[str, Curvature] = dataclasses.field(default_factory=dict)
    """Both curvature kinds of the same rows: the index's own, and the other one fitted."""
    curvature_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """Wall time of fitting the other kind (the index's own is inside `log_seconds`)."""

    @property
    def dim(self) -> int:
        return self.index.dim


CURVATURE_KINDS = ("ekfac", "full")


def build(
    setting: Setting,
    kind: str,
    k: int,
    dtype: str,
    workdir: Path,
    damping: float = DEFAULT_DAMPING_FACTOR,
    curvature: str = DEFAULT_CURVATURE,
    fisher_labels: str = DEFAULT_FISHER_LABELS,
    projection: dict | None = None,
    suffix: str = "",
    checkpoints: tuple = (),
    **index_options,
) -> BuiltIndex:
    """An index of the setting's training data; `projection` overrides further
    `ProjectionConfig` fields (tracked layers, the head's projection, per-layer sizes) and
    `index_options` further `IndexConfig` fields; `suffix` then names the variant in the
    label. The other curvature kind is fitted from the stored rows only when the index's own
    curvature is too (curvature_labels "data"). `checkpoints`: further models the index is
    built over (`build_index(checkpoints=...)`), next to the setting's base model."""
    label = f"{kind}-k{k}-{dtype}" if kind != "identity" else f"identity-{dtype}"
    if fisher_labels != DEFAULT_FISHER_LABELS:
        label += f"-{fisher_labels}-labels"
    label += suffix
    root = Path(workdir) / setting.name / label
    shutil.rmtree(root, ignore_errors=True)
    config = IndexConfig(
        projection=ProjectionConfig(kind=kind, k_in=k, k_out=k, **(projection or {})),
        dtype=dtype,
        curvature=curvature,
        damping_factor=damping,
        fisher_labels=fisher_labels,
        **index_options,
    )
    model = setting.base_model()
    start = time.perf_counter()
    index = build_index(
        model,
        setting.train_loss,
        setting.train_data,
        root,
        config,
        fisher_loss=setting.fisher_loss,
        show_progress=False,
        checkpoints=checkpoints,
    )
    seconds = time.perf_counter() - start
    _, q = query_gradients(model, setting.query_loss, setting.query_data, index, checkpoints)
    size = sum(p.stat().st_size for p in index.block_files())
    built = BuiltIndex(label, kind, k, dtype, index, q, seconds, size)
    built.curvatures[curvature] = index.curvature
    rows = index.dense().numpy()
    for other in CURVATURE_KINDS:
        if other not in built.curvatures and config.curvature_labels == "data":
            start = time.perf_counter()
            built.curvatures[other] = fit_curvature(
                lambda: [rows], index.curvature.slices, damping, other, bases=index.bases()
            )
            built.curvature_seconds[other] = time.perf_counter() - start
    return built


def redamped(curvature: Curvature, factor: float) -> Curvature:
    """The same eigenbasis and eigenvalues with λ_l = factor × mean eigenvalue of each layer."""
    return curvature.with_damping(factor)


def influence_scores(
    built: BuiltIndex, factor: float, relatif: bool, curvature_kind: str | None = None
) -> np.ndarray:
    """(n_queries, n_train) dense scores at damping `factor` (RelatIF or raw influence), with
    the curvature of `curvature_kind` (default: the index's own)."""
    base = built.curvatures.get(curvature_kind) if curvature_kind else built.index.curvature
    if base is None:
        raise KeyError(f"no '{curvature_kind}' curvature on {built.label}")
    curvature = redamped(base, factor)
    index = dataclasses.replace(built.index, curvature=curvature)
    raw = score(index, built.query_grads, ScoreConfig(relatif=False, dense=True, top_k=1)).dense
    raw = raw.astype(np.float64)
    if not relatif:
        return raw
    self_inf = curvature.self_influence(built.index.dense().numpy())
    inv = np.zeros_like(self_inf)
    np.divide(1.0, np.sqrt(self_inf), where=self_inf > 0, out=inv)
    return raw * inv[None, :]


def library_scores(built: BuiltIndex, relatif: bool) -> np.ndarray:
    """Dense scores straight from `score` at the index's own damping (no re-damping)."""
    cfg = ScoreConfig(relatif=relatif, dense=True, top_k=1)
    return score(built.index, built.query_grads, cfg).dense.astype(np.float64)


def grad_dot_scores(identity: BuiltIndex) -> np.ndarray:
    """Plain gradient dot products on full gradients: no curvature at all."""
    g = identity.index.dense().numpy().astype(np.float64)
    return identity.query_grads @ g.T
