"""Score matrices of the project's LoGra (through its public API) and of simple baselines.

An index is built once per (projection kind, k, dtype); other damping factors reuse its
eigendecomposition: λ_l = factor × mean eigenvalue, exactly as `fit_curvature` sets it, and
scores then come from the core's own `score`. RelatIF divides by sqrt of the self-influence
recomputed with the same damping (`Curvature.self_influence`).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribution import IndexConfig, ProjectionConfig, ScoreConfig, build_index, score
from attribution.curvature import Curvature
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

    @property
    def dim(self) -> int:
        return self.index.dim


def build(
    setting: Setting, kind: str, k: int, dtype: str, workdir: Path, damping: float = 0.1
) -> BuiltIndex:
    label = f"{kind}-k{k}-{dtype}" if kind != "identity" else f"identity-{dtype}"
    root = Path(workdir) / setting.name / label
    shutil.rmtree(root, ignore_errors=True)
    config = IndexConfig(
        projection=ProjectionConfig(kind=kind, k_in=k, k_out=k),
        dtype=dtype,
        damping_factor=damping,
    )
    model = setting.base_model()
    start = time.perf_counter()
    index = build_index(
        model, setting.train_loss, setting.train_data, root, config, show_progress=False
    )
    seconds = time.perf_counter() - start
    _, q = query_gradients(model, setting.query_loss, setting.query_data, index)
    size = sum(p.stat().st_size for p in index.block_files())
    return BuiltIndex(label, kind, k, dtype, index, q, seconds, size)


def redamped(curvature: Curvature, factor: float) -> Curvature:
    """The same eigenbasis and eigenvalues with λ_l = factor × mean eigenvalue of each layer."""
    return curvature.with_damping(factor)


def influence_scores(built: BuiltIndex, factor: float, relatif: bool) -> np.ndarray:
    """(n_queries, n_train) dense scores at damping `factor` (RelatIF or raw influence)."""
    curvature = redamped(built.index.curvature, factor)
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
