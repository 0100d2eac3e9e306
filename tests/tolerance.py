"""Tolerances of the tests' numeric comparisons, derived from the dtype and the computation.

A value that comes out of a reduction of n rounded terms (a matrix product, a sum, a pass
through layers of that width) is off by about eps · sqrt(n) · (the magnitude of the terms):
one unit roundoff per operation, accumulated as a random walk. The order of the reduction,
and so which way each rounding goes, depends on the CPU's kernels (AVX2, AVX-512, none), the
BLAS and the thread count; the size of the error does not. A tolerance of a few such units
(`ulps`) therefore holds on any CPU, while an error of 1e-4 relative or more still fails.

`scale` is the magnitude of the terms that made each value: the largest |value| of the
computation, or elementwise Σ|x_i·y_i| where terms cancel (a dot product much smaller than its
terms is only known to float precision of its terms, not of itself).
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23 ≈ 1.2e-7
EPS64 = float(np.finfo(np.float64).eps)  # 2**-52 ≈ 2.2e-16
ULPS = 4  # safety factor over the random-walk estimate: measured errors stay below 1 unit


def float_tol(
    scale, reduction_length: int = 1, ulps: float = ULPS, eps: float = EPS32
) -> np.ndarray:
    """ulps · eps · sqrt(reduction_length) · scale (elementwise when `scale` is an array)."""
    return ulps * eps * math.sqrt(max(int(reduction_length), 1)) * np.asarray(scale, np.float64)


def float32_tol(scale, reduction_length: int = 1, ulps: float = ULPS) -> np.ndarray:
    return float_tol(scale, reduction_length, ulps, EPS32)


def float64_tol(scale, reduction_length: int = 1, ulps: float = ULPS) -> np.ndarray:
    return float_tol(scale, reduction_length, ulps, EPS64)


def assert_close(
    actual,
    expected,
    reduction_length: int,
    *,
    scale=None,
    ulps: float = ULPS,
    eps: float = EPS32,
    what: str = "values",
) -> None:
    """|actual − expected| ≤ float_tol(scale, reduction_length, ulps, eps) elementwise, compared
    in float64. `scale` defaults to the largest |expected|. The message names the worst value
    with its error, tolerance and scale. NaN never passes."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if e.ndim == 0:  # one expected value for every actual one
        e = np.broadcast_to(e, a.shape)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} against {e.shape}")
    if scale is None:
        scale = np.abs(e).max(initial=0.0)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), e.shape)
    tol = float_tol(scale, reduction_length, ulps, eps)
    err = np.abs(a - e)
    bad = ~(err <= tol)
    if bad.any():
        ratio = np.where(bad, np.nan_to_num(err / np.where(tol > 0, tol, np.inf), nan=np.inf), 0)
        i = np.unravel_index(int(np.argmax(ratio)), e.shape)
        name = {EPS32: "float32", EPS64: "float64"}.get(eps, f"eps={eps:g}")
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {e.size} differ by more than {ulps} × {name} eps × "
            f"sqrt({reduction_length}) × scale; worst at {tuple(int(x) for x in i)}: "
            f"{a[i]!r} against {e[i]!r}, error {err[i]:.3g}, tolerance {tol[i]:.3g}, "
            f"scale {scale[i]:.3g}"
        )


def assert_close_f32(actual, expected, reduction_length: int, **kw) -> None:
    """`assert_close` for a result computed (or stored) in float32."""
    assert_close(actual, expected, reduction_length, eps=EPS32, **kw)


def assert_close_f64(actual, expected, reduction_length: int, **kw) -> None:
    """`assert_close` for a result computed in float64 throughout."""
    assert_close(actual, expected, reduction_length, eps=EPS64, **kw)


def dot_scale(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Σ_k |x_ik|·|y_jk|: the magnitude of the terms of the products x @ yᵀ (float64)."""
    return np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(y, np.float64)).T
