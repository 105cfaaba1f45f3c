"""Float tolerances derived from the arithmetic, shared by the whole test suite (issue 10).

A float result that adds up ``n`` terms is rounded at every partial sum. Whatever the order of the
additions (sequential, pairwise, SIMD lanes, GEMM tiles, a split between threads, another CPU's
kernels), it lies within ``gamma_n * sum|t_i|`` of the exact sum, where ``gamma_n = n u / (1 - n u)``
and ``u = eps / 2`` is the unit roundoff of the dtype (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., 2002, Lemma 3.1 and eq. 3.5; a dot product of length n is such a
sum of n rounded products). Two computations of the same quantity in the same dtype, in different
orders, therefore differ by at most ``2 gamma_n sum|t_i|``; a single rounding (a cast, storage in
float16) is the case ``n = 1``.

So every tolerance here is ``computations * gamma(n_terms, dtype) * scale`` with

* ``n_terms``: how many roundings the compared value went through (the terms of its longest sum,
  plus the elementwise operations after it),
* ``scale``: an upper bound of ``sum |t_i|`` for that value (a float, or a tensor/array broadcastable
  to it; for ``a @ b`` it is ``|a| @ |b|``, see :func:`matmul_scale`),
* ``dtype``: the dtype the arithmetic ran in.

This is a worst-case bound, never a value tuned to what passed on one machine: a comparison that
fails it has found a real difference (another formula, a lost term, a wrong index), not rounding.
For long chains (hundreds of terms through several products) the worst case is so loose that it
would also accept real errors; ``probabilistic=True`` then uses the bound that holds with
probability >= 1 - 2 n exp(-lambda^2 (1-u)^2 / 2) when the rounding errors are independent and of mean
zero, gamma~_n(lambda) = exp(lambda sqrt(n) u + n u^2 / (1 - u)) - 1 ~ lambda sqrt(n) u (Higham & Mary,
"A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019,
Theorem 2.8), with lambda = 8 (failure probability below 1e-11 per term).

Results of many optimiser steps have no such bound (rounding differences are amplified by the
optimiser and by discrete choices such as top-k); tests compare those bit for bit
(:func:`assert_bitwise_equal`) where the two computations are identical by construction, or run the
arithmetic in float64 where the float64 bound is far below any real effect.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["unit_roundoff", "gamma", "gamma_prob", "error_bound", "matmul_scale", "assert_close_derived",
           "assert_bitwise_equal", "max_diff"]


def unit_roundoff(dtype: Any) -> float:
    """u = eps / 2 of a torch or numpy float dtype (float64: 1.1e-16, float32: 6.0e-8, bfloat16: 3.9e-3)."""
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps / 2
    return float(np.finfo(dtype).eps) / 2


def gamma(n_terms: int, dtype: Any) -> float:
    """gamma_n = n u / (1 - n u): relative error bound of a sum of n terms (Higham 2002, Lemma 3.1)."""
    n = max(int(n_terms), 1)
    nu = n * unit_roundoff(dtype)
    if nu >= 0.5:
        raise ValueError(f"gamma({n_terms}, {dtype}): n*u = {nu:.3g} is too large for a rounding-error bound")
    return nu / (1.0 - nu)


PROB_LAMBDA = 8.0


def gamma_prob(n_terms: int, dtype: Any, lam: float = PROB_LAMBDA) -> float:
    """Probabilistic gamma~_n(lambda) = exp(lambda sqrt(n) u + n u^2 / (1 - u)) - 1 (Higham & Mary 2019, Thm 2.8)."""
    n, u = max(int(n_terms), 1), unit_roundoff(dtype)
    return float(np.expm1(lam * np.sqrt(n) * u + n * u * u / (1.0 - u)))


def error_bound(n_terms: int, scale: Any, dtype: Any, computations: int = 2, probabilistic: bool = False) -> Any:
    """``computations * gamma(n_terms, dtype) * scale``: how far ``computations`` (1 or 2) float evaluations may be apart."""
    g = gamma_prob(n_terms, dtype) if probabilistic else gamma(n_terms, dtype)
    return computations * g * _f64(scale)


def matmul_scale(a: Any, b: Any) -> torch.Tensor:
    """|a| @ |b| in float64: the per-element sum of |a_ik b_kj| of a matrix product (its scale for the bound)."""
    return _f64(a).abs() @ _f64(b).abs()


def _f64(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.astype(np.float64))
    if isinstance(x, (list, tuple)):
        return torch.as_tensor(np.asarray(x, dtype=np.float64))
    return float(x)


def max_diff(actual: Any, expected: Any) -> tuple[float, float, int]:
    """(max |actual - expected|, max relative difference, number of differing elements), in float64."""
    a, e = _f64(actual), _f64(expected)
    a, e = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(e, dtype=torch.float64)
    d = (a - e).abs()
    d = torch.where(torch.isnan(a) & torch.isnan(e), torch.zeros_like(d), d)
    if d.numel() == 0:
        return 0.0, 0.0, 0
    rel = d / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
    return float(d.max()), float(rel.max()), int((d != 0).sum())


def assert_close_derived(actual: Any, expected: Any, *, n_terms: int, scale: Any, dtype: Any,
                         computations: int = 2, probabilistic: bool = False, msg: str = "") -> None:
    """Assert |actual - expected| <= computations * gamma(n_terms, dtype) * scale, element by element.

    ``actual`` / ``expected``: tensors, arrays or floats of one shape; ``scale``: float or
    broadcastable tensor/array (see the module docstring for what it must bound). ``computations``:
    2 when both sides are float computations in ``dtype``, 1 when ``expected`` is exact (or float64
    and ``dtype`` a narrower type). ``probabilistic``: the lambda sqrt(n) u bound instead of n u (see
    the module docstring). NaNs must be at the same places. On failure the message gives the largest
    absolute and relative differences, where, and the bound there.
    """
    a = torch.as_tensor(_f64(actual), dtype=torch.float64)
    e = torch.as_tensor(_f64(expected), dtype=torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{msg}: shapes differ, {list(a.shape)} vs {list(e.shape)}")
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(f"{msg}: NaN at different places ({int(nan_a.sum())} vs {int(nan_e.sum())} NaNs)")
    bound = torch.as_tensor(error_bound(n_terms, scale, dtype, computations, probabilistic), dtype=torch.float64)
    bound = bound.expand_as(a) if bound.shape != a.shape else bound
    d = torch.where(nan_a, torch.zeros_like(a), (a - e).abs())
    bad = d > bound
    if bool(bad.any()):
        flat = int(torch.argmax(torch.where(bad, d - bound, torch.full_like(d, -1.0)).flatten()))
        where = tuple(int(i) for i in np.unravel_index(flat, tuple(a.shape))) if a.ndim else ()
        dmax, rmax, _ = max_diff(a, e)
        raise AssertionError(
            f"{msg + ': ' if msg else ''}{int(bad.sum())} of {a.numel()} elements differ by more than the rounding "
            f"bound {computations} x gamma{'~' if probabilistic else ''}_{n_terms}({_name(dtype)}) x scale; "
            f"max |diff| {dmax:.3g}, max rel diff "
            f"{rmax:.3g}; worst at {where}: actual {float(a.flatten()[flat]):.9g}, expected "
            f"{float(e.flatten()[flat]):.9g}, |diff| {float(d.flatten()[flat]):.3g} > bound {float(bound.flatten()[flat]):.3g}")


def assert_bitwise_equal(actual: Any, expected: Any, msg: str = "") -> None:
    """Assert two results are identical bit for bit (same computation by construction); prints the difference if not."""
    a, e = torch.as_tensor(_f64(actual)), torch.as_tensor(_f64(expected))
    ok = a.shape == e.shape and bool(((a == e) | (torch.isnan(a) & torch.isnan(e))).all())
    if not ok:
        if a.shape != e.shape:
            raise AssertionError(f"{msg}: shapes differ, {list(a.shape)} vs {list(e.shape)}")
        dmax, rmax, n = max_diff(a, e)
        raise AssertionError(f"{msg + ': ' if msg else ''}not bit-identical: {n} of {a.numel()} elements differ, "
                             f"max |diff| {dmax:.3g}, max rel diff {rmax:.3g}")


def _name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")
