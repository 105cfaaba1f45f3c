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
           "assert_bitwise_equal", "max_diff", "sae_step_bounds", "backbone_in_float64", "assert_same_unit_vectors"]


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


def sae_step_bounds(sae: Any, x: torch.Tensor, coeff: torch.Tensor, dead: torch.Tensor | None = None) -> dict:
    """{name: (n_terms, scale)} for one SAE training step: every LossOutput field and every parameter gradient.

    For comparing two evaluations of the same step (a fast path and the reference, a stack member and
    the SAE alone) with ``assert_close_derived(..., probabilistic=True)``. x: [B, d_in] or [S, B, d_in];
    coeff: [S]; dead: the aux-k dead mask [S, d_sae] or None. "codes" and "x_hat" bound an inference
    forward pass (encode / decode of the same rows, raw inputs normalised first) in SAE space.

    Each scale bounds the sum of |terms| of that value: P = |x - b_dec| |W_enc| + |b_enc| bounds each
    pre-activation; only the codes the float64 reference keeps (M: its active mask; STE rows of JumpReLU
    and the aux-k latents included) enter X = (M P) |W_dec| + |b_dec|, which bounds a reconstruction, and
    E = X + |x| a residual. Gradients are the same products with the upstream scale (G = 2 E / (B d) for
    d mse / d x_hat). The aux-k term (num sst_x / (B d sst_r)) adds the relative errors of its three sums.
    n_terms: the longest chain of sums a value went through (forward, then backward: B for a weight
    gradient, d or the active count for a code gradient), compared with the probabilistic bound.
    """
    S, n, d = sae.n_models, sae.d_sae, sae.d_in
    f64 = {k: getattr(sae, k).detach().double().abs() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    xv = x.double() if x.ndim == 3 else x.double().expand(S, *x.shape)
    B = xv.shape[1]
    ref = sae.copy().double()
    with torch.no_grad():
        pre = ref.preacts(x.double())
        f, _ = ref._train_codes(pre, coeff.double())
        r = xv - ref._decode_sae(f)
    M = (f != 0).double()
    if hasattr(sae, "log_threshold"):  # the L0 / threshold STE touches rows within the bandwidth of theta
        M = torch.maximum(M, (pre > sae.log_threshold.detach().double().exp()[:, None, :]
                              - sae.cfg.jumprelu_bandwidth / 2).double())
    if dead is not None and dead.any():
        k_aux = min(sae.cfg.aux_k, n)
        top = pre.masked_fill(~dead[:, None, :], float("-inf")).topk(k_aux, dim=-1).indices
        M_aux = torch.zeros_like(M).scatter(-1, top, 1.0) * dead[:, None, :].double()
    else:
        M_aux = torch.zeros_like(M)
    xs = xv.abs()
    xc = xs + f64["b_dec"][:, None, :]
    P = xc @ f64["W_enc"] + f64["b_enc"][:, None, :]  # [S, B, n]
    X = (M * P) @ f64["W_dec"] + f64["b_dec"][:, None, :]  # [S, B, d]
    E = X + xs
    k_max = int(torch.maximum(M, M_aux).sum(-1).max())
    dec_norm = f64["W_dec"].norm(dim=-1)  # [S, n]
    c = coeff.double().abs()[:, None, None]
    n_fwd = (d + 2) + (k_max + 2) + d + B  # pre, x_hat and err, ||err||^2, the batch sum
    n_grad = n_fwd + max(B, d, k_max) + d  # then g_f (d terms), then a weight gradient (B terms)
    sq = 2 * E.square().sum(-1)  # [S, B]: d ||err||^2
    mse = sq.sum(-1) / (B * d)
    sst = (xv - xv.mean(-2, keepdim=True)).square().sum(dim=(-2, -1))  # [S]
    G = 2 * E / (B * d)  # d mse / d x_hat
    sparse_grad = M * c / B * (dec_norm[:, None, :] + 1.0 / sae.cfg.jumprelu_bandwidth)  # L1 (ReLU) / L0 STE
    l1 = (M * P * dec_norm[:, None, :]).sum(dim=(1, 2)) / B
    aux = torch.zeros(S, dtype=torch.float64)
    G_aux = torch.zeros_like(G)
    P_aux = M_aux * P
    if sae.uses_aux:
        # aux = sum (e_hat - r)^2 sst_x / (B d sst_r) (Var(x) / Var(r) per element, base.aux_k_term)
        sst_r = (r - r.mean(1, keepdim=True)).square().sum(dim=(1, 2)).clamp_min(1e-30)  # [S]
        w = (sst / sst_r / (B * d))[:, None, None]
        X_aux = P_aux @ f64["W_dec"] + f64["b_dec"][:, None, :]
        num = 2 * (X_aux + E).square()  # d |e_hat - r|^2, term by term
        rel = 4 * xs.square().sum(dim=(1, 2)) / sst + 4 * E.square().sum(dim=(1, 2)) / sst_r  # of sst_x, sst_r
        aux = (num * w).sum(dim=(1, 2)) * (1 + rel)
        G_aux = sae.cfg.aux_coeff * 2 * (X_aux + E) * w
    G_pre = (M * (G @ f64["W_dec"].transpose(1, 2)) + M_aux * (G_aux @ f64["W_dec"].transpose(1, 2))
             + sparse_grad)  # [S, B, n]
    n_inf = (d + 4) + (d + 2) + (n + 2)  # inference on raw inputs: the normalisation, then pre, then x_hat
    out = {
        "codes": (n_inf, P), "x_hat": (n_inf, P @ f64["W_dec"] + f64["b_dec"][:, None, :] + xs),  # any active set
        "sq_err": (n_fwd, sq), "mse": (n_fwd, mse), "l1": (n_fwd, l1), "l0": (2, torch.full((S,), float(n))),
        "explained_variance": (n_fwd, sq.sum(-1) / sst.clamp_min(1e-30)), "aux": (n_fwd, aux),
        "loss": (n_fwd, (mse + c.flatten() * (l1 + n) + sae.cfg.aux_coeff * aux).sum()),
        "W_enc": (n_grad, xc.transpose(1, 2) @ G_pre), "b_enc": (n_grad, G_pre.sum(1)),
        "W_dec": (n_grad, (M * P).transpose(1, 2) @ G + P_aux.transpose(1, 2) @ G_aux
                  + c / B * (M * P).sum(1)[..., None]),
        "b_dec": (n_grad, (G + G_aux).sum(1) + (f64["W_enc"] @ G_pre.sum(1)[..., None])[..., 0]),
    }
    if hasattr(sae, "log_threshold"):  # d/d log theta = theta d/d theta: the STE terms of every row
        theta = sae.log_threshold.detach().double().exp()
        out["log_threshold"] = (n_grad, theta * ((theta / sae.cfg.jumprelu_bandwidth)[:, None, :] * G_pre).sum(1))
    return out


def backbone_in_float64(bb: Any) -> Any:
    """A shallow copy of a backbone (registry ``Backbone`` or namespace) with a float64 deep copy of its model.

    Two float32 passes through a transformer with different batch shapes, thread splits or SIMD paths round
    differently by amounts no useful bound covers; in float64 they differ by ~1e-15, and the float32 unit
    vectors that visae.text returns are then each rounded once from values that close: compare them with
    :func:`assert_same_unit_vectors`.
    """
    import copy
    from types import SimpleNamespace

    model = copy.deepcopy(bb.model).double()
    return SimpleNamespace(**{**vars(bb), "model": model, "encode_text": model.encode_text})


def assert_same_unit_vectors(got: Any, ref: Any, what: str = "") -> None:
    """Float64 computations rounded to float32 once each: |got - ref| <= 2 u32 |ref| (1e-6 floor for the float64 chain)."""
    assert_close_derived(got, ref, n_terms=2, scale=_f64(ref).abs() + 1e-6, dtype=torch.float32, msg=what)
