"""Projected empirical Fisher per layer, its eigendecomposition, damping and preconditioning.

F_l = mean_i g_{i,l} g_{i,l}ᵀ; λ_l = damping_factor × mean eigenvalue of F_l; a query is
preconditioned as (F_l + λ_l I)⁻¹ q_l, computed through the eigenbasis.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

# Fisher accumulators of layers summed per pass stay below this many bytes (float64).
FISHER_PASS_BYTES = 1 << 30


@dataclass(frozen=True)
class LayerSlice:
    """Where a layer's projected gradient lies in the concatenated row."""

    name: str
    start: int
    stop: int

    @property
    def dim(self) -> int:
        return self.stop - self.start


@dataclass
class LayerCurvature:
    """Eigendecomposition F = V diag(eigvals) Vᵀ of one layer and its damping λ."""

    eigvals: np.ndarray  # (d,) float64
    eigvecs: np.ndarray  # (d, d) float64, columns are eigenvectors
    damping: float

    def inverse_diagonal(self) -> np.ndarray:
        """1 / (eigvals + λ), the damped inverse in the eigenbasis."""
        return 1.0 / (np.maximum(self.eigvals, 0.0) + self.damping)


class Curvature:
    """All layers' damped Fisher inverses, applied to concatenated gradient rows."""

    def __init__(self, slices: list[LayerSlice], layers: list[LayerCurvature]) -> None:
        self.slices = slices
        self.layers = layers

    @property
    def dim(self) -> int:
        return self.slices[-1].stop if self.slices else 0

    def precondition(self, g: np.ndarray) -> np.ndarray:
        """(n, D) → (n, D): per layer (F_l + λ_l I)⁻¹ g_l, in float64."""
        g = np.asarray(g, dtype=np.float64)
        out = np.empty_like(g)
        for s, c in zip(self.slices, self.layers, strict=True):
            z = g[:, s.start : s.stop] @ c.eigvecs
            out[:, s.start : s.stop] = (z * c.inverse_diagonal()) @ c.eigvecs.T
        return out

    def self_influence(self, g: np.ndarray) -> np.ndarray:
        """(n, D) → (n,): Σ_l g_lᵀ (F_l + λ_l I)⁻¹ g_l, in float64."""
        g = np.asarray(g, dtype=np.float64)
        total = np.zeros(g.shape[0], dtype=np.float64)
        for s, c in zip(self.slices, self.layers, strict=True):
            z = g[:, s.start : s.stop] @ c.eigvecs
            total += (z * z) @ c.inverse_diagonal()
        return total

    def save(self, path: Path) -> None:
        tensors = {}
        for s, c in zip(self.slices, self.layers, strict=True):
            tensors[f"{s.name}.eigvals"] = c.eigvals
            tensors[f"{s.name}.eigvecs"] = np.ascontiguousarray(c.eigvecs)
            tensors[f"{s.name}.damping"] = np.array([c.damping], dtype=np.float64)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)

    @staticmethod
    def load(path: Path, slices: list[LayerSlice]) -> Curvature:
        t = load_file(str(path))
        layers = [
            LayerCurvature(
                t[f"{s.name}.eigvals"], t[f"{s.name}.eigvecs"], float(t[f"{s.name}.damping"][0])
            )
            for s in slices
        ]
        return Curvature(slices, layers)


def _pass_groups(slices: list[LayerSlice], budget: int) -> list[list[LayerSlice]]:
    """Split layers into groups whose Fisher accumulators fit the memory budget together."""
    groups: list[list[LayerSlice]] = [[]]
    used = 0
    for s in slices:
        size = s.dim * s.dim * 8
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(s)
        used += size
    return groups


def fit_curvature(
    blocks: Iterable[np.ndarray] | None,
    slices: list[LayerSlice],
    damping_factor: float,
    *,
    block_source=None,
    budget_bytes: int = FISHER_PASS_BYTES,
) -> Curvature:
    """Projected empirical Fisher from gradient rows, eigendecomposed and damped.

    `block_source()` returns a fresh iterable of (n, D) row blocks; several passes are made when
    all layers' accumulators would not fit `budget_bytes` at once. `blocks` may be given instead
    for a single pass.
    """
    if damping_factor <= 0:
        raise ValueError(f"damping factor must be positive, got {damping_factor}")
    if block_source is None:
        materialised = list(blocks or [])
        block_source = lambda: materialised  # noqa: E731
    fitted: dict[str, LayerCurvature] = {}
    for group in _pass_groups(slices, budget_bytes):
        acc = {s.name: np.zeros((s.dim, s.dim), dtype=np.float64) for s in group}
        n = 0
        for block in block_source():
            b = np.asarray(block, dtype=np.float64)
            for s in group:
                g = b[:, s.start : s.stop]
                acc[s.name] += g.T @ g
            n += b.shape[0]
        if n == 0:
            raise ValueError("curvature needs at least one training example")
        for s in group:
            fisher = acc[s.name] / n
            eigvals, eigvecs = np.linalg.eigh((fisher + fisher.T) / 2)
            eigvals = np.maximum(eigvals, 0.0)
            mean = float(eigvals.mean())
            # A layer whose gradients are all zero still needs a positive damping.
            damping = damping_factor * mean if mean > 0 else 1.0
            fitted[s.name] = LayerCurvature(eigvals, eigvecs, damping)
    return Curvature(slices, [fitted[s.name] for s in slices])
