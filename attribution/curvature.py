"""Projected Fisher per layer, its eigendecomposition, damping and preconditioning.

Two curvature kinds, both built from the stored per-example projected gradients g_{i,l}:

- `full`: the projected empirical Fisher F_l = mean_i g_{i,l} g_{i,l}ᵀ, eigendecomposed. With
  n < d examples F_l has rank at most n: the thin SVD of the rows gives its nonzero eigenpairs
  exactly, and the rest of the space has eigenvalue 0 and is damped by λ_l alone. That is how
  such a layer is fitted, and how a layer too wide for a d × d matrix (over
  `FULL_DENSE_MAX_BYTES` in float64) must be, its rows then within `FISHER_PASS_BYTES`.
- `ekfac`: EKFAC (George et al. 2018) in the projected space. The eigenbasis is the Kronecker
  product Q_out ⊗ Q_in of the eigenvectors of the layer's projected KFAC factors
  P_out S P_outᵀ and P_in A P_inᵀ (S = Σ_t δ_t δ_tᵀ over output gradients, A = Σ_t x_t x_tᵀ
  over inputs, token by token, from the index's first pass; see `IndexConfig.fisher_labels`).
  Its eigenvalues are corrected to the stored gradients' second moments in that basis. Each
  of its d eigenvalues is estimated from all examples, so it stays well conditioned when
  there are fewer examples than dimensions, where the full Fisher is rank-deficient and its
  inverse leans on damping alone. With PCA projections the projected factors are diagonal
  (P holds their top eigenvectors), so the basis is the PCA basis itself.

Either way F_l = V diag(eigvals) Vᵀ, λ_l = damping_factor × mean eigenvalue, and a query is
preconditioned as (F_l + λ_l I)⁻¹ q_l through the eigenbasis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from safetensors.numpy import load_file, save_file

from attribution.files import follow_umask

CurvatureKind = Literal["ekfac", "full"]

# Fisher accumulators of layers summed per pass stay below this many bytes (float64).
FISHER_PASS_BYTES = 1 << 30
# A layer whose d × d Fisher (float64) would be larger is fitted from its rows instead, which
# must then fit FISHER_PASS_BYTES (n × d, with n < d examples); otherwise it is refused.
FULL_DENSE_MAX_BYTES = 4 << 30


@dataclass(frozen=True)
class LayerSlice:
    """Where a layer's projected gradient lies in the concatenated row, and its (k_out, k_in)."""

    name: str
    start: int
    stop: int
    shape: tuple[int, int] | None = None

    @property
    def dim(self) -> int:
        return self.stop - self.start


@dataclass
class LayerCurvature:
    """F = V diag(eigvals) Vᵀ of one layer and its damping λ.

    V is either dense (`eigvecs`, d × d, columns are eigenvectors) or the Kronecker product
    `q_out ⊗ q_in` of two small orthogonal matrices, never formed. A low-rank layer keeps only
    r < d eigenvectors (`eigvecs` d × r, orthonormal columns); the complement of their span has
    eigenvalue 0.
    """

    eigvals: np.ndarray  # (d,) float64
    eigvecs: np.ndarray | None  # (d, d) float64, or None when Kronecker-factored
    damping: float
    q_out: np.ndarray | None = None  # (k_out, k_out)
    q_in: np.ndarray | None = None  # (k_in, k_in)

    @property
    def dim(self) -> int:
        if self.eigvecs is not None:
            return self.eigvecs.shape[0]
        return self.q_out.shape[0] * self.q_in.shape[0]

    @property
    def low_rank(self) -> bool:
        return self.eigvecs is not None and self.eigvecs.shape[1] < self.eigvecs.shape[0]

    def inverse_diagonal(self) -> np.ndarray:
        """1 / (eigvals + λ), the damped inverse in the eigenbasis."""
        return 1.0 / (np.maximum(self.eigvals, 0.0) + self.damping)

    def rotate(self, g: np.ndarray) -> np.ndarray:
        """(n, d) → (n, r): coordinates in the eigenbasis, Vᵀ g (r = d unless low-rank)."""
        if self.eigvecs is not None:
            return g @ self.eigvecs
        k_out, k_in = self.q_out.shape[0], self.q_in.shape[0]
        m = g.reshape(-1, k_out, k_in)
        return np.matmul(np.matmul(self.q_out.T, m), self.q_in).reshape(g.shape[0], -1)

    def unrotate(self, z: np.ndarray) -> np.ndarray:
        """(n, r) → (n, d): V z."""
        if self.eigvecs is not None:
            return z @ self.eigvecs.T
        k_out, k_in = self.q_out.shape[0], self.q_in.shape[0]
        m = z.reshape(-1, k_out, k_in)
        return np.matmul(np.matmul(self.q_out, m), self.q_in.T).reshape(z.shape[0], -1)


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
            g_l = g[:, s.start : s.stop]
            z = c.rotate(g_l)
            if c.low_rank:  # V diag(1/(e+λ)) Vᵀ g + (g − V Vᵀ g) / λ: the complement gets 1 / λ
                out[:, s.start : s.stop] = (
                    c.unrotate(z * (c.inverse_diagonal() - 1.0 / c.damping)) + g_l / c.damping
                )
            else:
                out[:, s.start : s.stop] = c.unrotate(z * c.inverse_diagonal())
        return out

    def self_influence(self, g: np.ndarray) -> np.ndarray:
        """(n, D) → (n,): Σ_l g_lᵀ (F_l + λ_l I)⁻¹ g_l, in float64."""
        g = np.asarray(g, dtype=np.float64)
        total = np.zeros(g.shape[0], dtype=np.float64)
        for s, c in zip(self.slices, self.layers, strict=True):
            g_l = g[:, s.start : s.stop]
            zz = c.rotate(g_l) ** 2
            total += zz @ c.inverse_diagonal()
            if c.low_rank:  # the complement's share of |g|², over λ
                rest = np.einsum("ij,ij->i", g_l, g_l) - zz.sum(axis=1)
                total += np.maximum(rest, 0.0) / c.damping
        return total

    def with_damping(self, factor: float) -> Curvature:
        """The same eigenbasis and eigenvalues with λ_l = factor × mean eigenvalue (over all d
        eigenvalues, the zeros of a low-rank layer included)."""
        layers = [
            LayerCurvature(
                c.eigvals, c.eigvecs, _damping(c.eigvals, factor, c.dim), c.q_out, c.q_in
            )
            for c in self.layers
        ]
        return Curvature(self.slices, layers)

    def save(self, path: Path) -> None:
        tensors = {}
        for s, c in zip(self.slices, self.layers, strict=True):
            tensors[f"{s.name}.eigvals"] = c.eigvals
            tensors[f"{s.name}.damping"] = np.array([c.damping], dtype=np.float64)
            if c.eigvecs is not None:
                tensors[f"{s.name}.eigvecs"] = np.ascontiguousarray(c.eigvecs)
            else:
                tensors[f"{s.name}.q_out"] = np.ascontiguousarray(c.q_out)
                tensors[f"{s.name}.q_in"] = np.ascontiguousarray(c.q_in)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        follow_umask(tmp)
        tmp.replace(path)

    @staticmethod
    def load(path: Path, slices: list[LayerSlice]) -> Curvature:
        t = load_file(str(path))
        layers = [
            LayerCurvature(
                t[f"{s.name}.eigvals"],
                t.get(f"{s.name}.eigvecs"),
                float(t[f"{s.name}.damping"][0]),
                t.get(f"{s.name}.q_out"),
                t.get(f"{s.name}.q_in"),
            )
            for s in slices
        ]
        return Curvature(slices, layers)


def _damping(eigvals: np.ndarray, factor: float, dim: int) -> float:
    mean = float(np.maximum(eigvals, 0.0).sum()) / dim if dim else 0.0
    # A layer whose gradients are all zero still needs a positive damping.
    return factor * mean if mean > 0 else 1.0


def _pass_groups(
    slices: list[LayerSlice], size: Callable[[LayerSlice], int], budget: int
) -> list[list[LayerSlice]]:
    """Split layers into groups whose accumulators fit the memory budget together."""
    groups: list[list[LayerSlice]] = [[]]
    used = 0
    for s in slices:
        if groups[-1] and used + size(s) > budget:
            groups.append([])
            used = 0
        groups[-1].append(s)
        used += size(s)
    return groups


BlockSource = Callable[[], Iterable[np.ndarray]]
Bases = dict[str, tuple[np.ndarray, np.ndarray]]
"""Layer name → (Q_out, Q_in), the EKFAC eigenbasis."""


def kfac_bases(factors: Iterable) -> Bases:
    """(Q_out, Q_in) of each layer from its projected KFAC factors (`KfacFactors`, s and a)."""
    return {
        f.name: (_eigenbasis(np.asarray(f.s, dtype=np.float64)),
                 _eigenbasis(np.asarray(f.a, dtype=np.float64)))
        for f in factors
    }  # fmt: skip


MAX_DAMPING_FACTOR = 1e6
"""Beyond this the damped inverse is 1/λ times the identity to within 1e-6 (scores rank as the
gradient dot product), and λ's scale only risks float32's range when queries are scored."""


def check_damping_factor(factor: float) -> None:
    """Refuse a damping factor that is not a number in (0, `MAX_DAMPING_FACTOR`]."""
    if not (isinstance(factor, int | float) and 0 < factor <= MAX_DAMPING_FACTOR):
        raise ValueError(
            f"damping factor must be positive and at most {MAX_DAMPING_FACTOR:g}, got {factor}"
        )


def fit_curvature(
    block_source: BlockSource,
    slices: list[LayerSlice],
    damping_factor: float,
    kind: CurvatureKind = "ekfac",
    *,
    bases: Bases | None = None,
    budget_bytes: int = FISHER_PASS_BYTES,
) -> Curvature:
    """Curvature of each layer from gradient rows; `block_source()` returns a fresh iterable of
    (n, D) row blocks (passes are streamed, never all rows in memory). `ekfac` needs the
    layers' eigenbases (`kfac_bases` of the index's KFAC factors)."""
    check_damping_factor(damping_factor)
    if kind == "full":
        fitted = _fit_full(block_source, slices, budget_bytes)
    elif kind == "ekfac":
        fitted = _fit_ekfac(block_source, slices, bases)
    else:
        raise ValueError(f"unknown curvature kind '{kind}' (ekfac or full)")
    return Curvature(slices, fitted).with_damping(damping_factor)


def _fit_full(source: BlockSource, slices: list[LayerSlice], budget: int) -> list[LayerCurvature]:
    def dense_fits(s: LayerSlice) -> bool:
        return s.dim * s.dim * 8 <= FULL_DENSE_MAX_BYTES

    groups = _pass_groups([s for s in slices if dense_fits(s)], lambda s: s.dim**2 * 8, budget)
    groups += [[s] for s in slices if not dense_fits(s)]  # rows only, a pass of its own
    fitted: dict[str, LayerCurvature] = {}
    for group in groups:
        acc = {s.name: _FullFisherSum(s, None if dense_fits(s) else budget) for s in group}
        for block in source():
            b = np.asarray(block, dtype=np.float64)
            for s in group:
                acc[s.name].add(b[:, s.start : s.stop])
        for s in group:
            fitted[s.name] = acc[s.name].fit()
    return [fitted[s.name] for s in slices]


class _FullFisherSum:
    """One layer's Σ g gᵀ. While there are fewer rows than dimensions it keeps the rows (never
    more than the d × d matrix it replaces) and fits the rank-n Fisher from their thin SVD,
    which is exact and much cheaper than a d × d eigendecomposition; from d rows on, the d × d
    sum. `rows_budget`: a layer too wide for that matrix, which may only keep rows, at most
    this many bytes of them."""

    def __init__(self, layer: LayerSlice, rows_budget: int | None = None) -> None:
        self.layer, self.rows_budget = layer, rows_budget
        self.dim, self.n = layer.dim, 0
        self.rows: list[np.ndarray] = []
        self.sum: np.ndarray | None = None

    def add(self, g: np.ndarray) -> None:
        self.n += g.shape[0]
        if self.rows_budget is not None:
            self._check_rows()
        if self.sum is None and self.n < self.dim:
            self.rows.append(np.array(g))
            return
        if self.sum is None:
            self.sum = np.zeros((self.dim, self.dim))
            for r in self.rows:
                self.sum += r.T @ r
            self.rows = []
        self.sum += g.T @ g

    def _check_rows(self) -> None:
        n, d = self.n, self.dim
        if n < d and n * d * 8 <= self.rows_budget:
            return
        why = (
            f"its rows of {n:,} or more examples (not fewer than its dimensions) give no "
            f"low-rank form" if n >= d else
            f"the rows of {n:,} or more examples need over {_size(self.rows_budget)}"
        )  # fmt: skip
        raise ValueError(
            f"layer '{self.layer.name}': a full Fisher of {d:,} dimensions needs "
            f"{_size(d * d * 8)} as a matrix, and {why}; use the 'ekfac' curvature or a "
            f"smaller projection"
        )

    def fit(self) -> LayerCurvature:
        _require_rows(self.n)
        if self.sum is None:  # F = V diag(σ² / n) Vᵀ from the thin SVD of the rows, n < d
            _, sigma, vt = np.linalg.svd(np.concatenate(self.rows), full_matrices=False)
            return LayerCurvature(sigma**2 / self.n, np.ascontiguousarray(vt.T), 0.0)
        fisher = self.sum / self.n
        eigvals, eigvecs = np.linalg.eigh((fisher + fisher.T) / 2)
        return LayerCurvature(np.maximum(eigvals, 0.0), eigvecs, 0.0)


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} bytes"


def _fit_ekfac(
    source: BlockSource, slices: list[LayerSlice], bases: Bases | None
) -> list[LayerCurvature]:
    layers = ekfac_layers(slices, bases)
    second = [np.zeros(s.dim) for s in slices]
    n = 0
    for block in source():
        second = [a + b for a, b in zip(second, second_moments(layers, slices, block), strict=True)]
        n += block.shape[0]
    return with_second_moments(layers, second, n)


def ekfac_layers(slices: list[LayerSlice], bases: Bases | None) -> list[LayerCurvature]:
    """Each layer's EKFAC eigenbasis (Q_out, Q_in) from `bases`, its eigenvalues still 0."""
    layers = []
    for s in slices:
        if bases is None or s.name not in bases:
            raise ValueError(f"layer '{s.name}': EKFAC needs the eigenbasis of its KFAC factors")
        q_out, q_in = bases[s.name]
        if s.shape is None or q_out.shape[0] * q_in.shape[0] != s.dim:
            raise ValueError(f"layer '{s.name}': eigenbasis does not match its {s.dim} dimensions")
        layers.append(LayerCurvature(np.zeros(s.dim), None, 0.0, q_out, q_in))
    return layers


def second_moments(
    layers: list[LayerCurvature], slices: list[LayerSlice], block: np.ndarray
) -> list[np.ndarray]:
    """Per layer, Σ over the block's rows of (Vᵀ g)², each coordinate in the eigenbasis."""
    b = np.asarray(block, dtype=np.float64)
    return [
        (c.rotate(b[:, s.start : s.stop]) ** 2).sum(axis=0)
        for s, c in zip(slices, layers, strict=True)
    ]


def with_second_moments(
    layers: list[LayerCurvature], second: list[np.ndarray], n: int
) -> list[LayerCurvature]:
    """The layers with eigenvalues Σ (Vᵀ g)² / n, the gradients' second moments (`n` rows)."""
    _require_rows(n)
    for c, sums in zip(layers, second, strict=True):
        c.eigvals = sums / n
    return layers


def shrink_to_kfac(
    curvature: Curvature, factors: Iterable, examples: int, prior_examples: int
) -> Curvature:
    """EKFAC eigenvalues ê fitted on `examples` examples, shrunk toward each layer's KFAC
    eigenvalues κ (diag(Q_outᵀ S Q_out) ⊗ diag(Q_inᵀ A Q_in), from `factors`, the
    `KfacFactors` the eigenbasis came from) rescaled by c = Σê / Σκ:
    (m·ê + m0·c·κ) / (m + m0). The trace, so the mean eigenvalue and the damping, is unchanged.
    Only Kronecker-factored layers are shrunk; `prior_examples` 0 returns `curvature`."""
    if prior_examples <= 0:
        return curvature
    if examples < 1:
        raise ValueError(f"examples must be positive, got {examples}")
    by_name = {f.name: f for f in factors}
    m, m0 = float(examples), float(prior_examples)
    layers = []
    for s, c in zip(curvature.slices, curvature.layers, strict=True):
        if c.eigvecs is not None or s.name not in by_name:
            layers.append(c)
            continue
        f = by_name[s.name]
        s_fac, a_fac = (np.asarray(x, dtype=np.float64) for x in (f.s, f.a))
        kappa_out = np.einsum("ji,jk,ki->i", c.q_out, s_fac, c.q_out)
        kappa_in = np.einsum("ji,jk,ki->i", c.q_in, a_fac, c.q_in)
        kappa = np.maximum(np.outer(kappa_out, kappa_in).ravel(), 0.0)
        observed = np.maximum(c.eigvals, 0.0)
        scale = observed.sum() / kappa.sum() if kappa.sum() > 0 else 0.0
        eigvals = (m * observed + m0 * scale * kappa) / (m + m0)
        layers.append(LayerCurvature(eigvals, None, c.damping, c.q_out, c.q_in))
    return Curvature(curvature.slices, layers)


def _eigenbasis(m: np.ndarray) -> np.ndarray:
    _, vecs = np.linalg.eigh((m + m.T) / 2)
    return vecs


def _require_rows(n: int) -> None:
    if n == 0:
        raise ValueError("curvature needs at least one training example")
