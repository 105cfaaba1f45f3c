"""Fast training-step kernels: a fused dense ReLU + L1 step and sparsity-aware (gather) paths.

Both compute exactly the loss of ``SAE._reference_loss`` (tests compare values and gradients)
with fewer passes over the big [S, B, d_sae] matrices:

* ``_FusedReLULoss`` (dense ReLU + L1): one autograd Function for the whole loss. The decoder
  bias is folded into the encoder bias (pre = x W_enc + (b_enc - b_dec W_enc)), so the backward
  needs no gradient w.r.t. the centred input: five GEMMs per step instead of six. The ReLU mask
  is read from the saved codes, the L1 gradient rides in the bias of the g_f GEMM, and the
  [S, B, d_sae] buffers are reused between steps (no page faults on fresh allocations).
* ``sparse_training_loss`` (TopK, BatchTopK, JumpReLU, and ReLU once L0 is low): after the
  encoder GEMM only the active codes are touched. Decoding is an embedding-bag over the active
  latents, the code gradient a sampled dense-dense product (SDDMM) at the active positions, and
  dW_dec / dW_enc sparse-dense products: O(nnz * d_in) work instead of three dense GEMMs.

With bf16 autocast enabled on the input's device, the GEMMs run in bf16 (fp32 accumulation);
losses, metrics and parameter gradients stay fp32.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from visae.sae.base import LossOutput, _explained_variance, aux_k_term

if TYPE_CHECKING:
    from visae.sae.base import SAE

__all__ = ["relu_training_loss", "sparse_training_loss", "Pattern", "compute_dtype", "sparse_decode"]



def compute_dtype(x: Tensor) -> torch.dtype:
    """bf16 / fp16 when autocast is enabled for ``x``'s device, else ``x.dtype``."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


# ----------------------------------------------------------------------------- workspace


class _Workspace:
    """Big per-step buffers kept between steps (keyed by name, shape, dtype).

    ``generation`` changes on every grad-enabled forward; a backward whose forward is not the
    latest one would read overwritten buffers, so it raises instead.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}
        self.generation = 0

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        t = self.buffers.get(name)
        if t is None or t.shape != tuple(shape) or t.dtype != dtype or t.device != device:
            self.buffers.pop(name, None)
            t = torch.empty(tuple(shape), dtype=dtype, device=device)
            self.buffers[name] = t
        return t


def _workspace(sae: "SAE") -> _Workspace:
    ws = sae.__dict__.get("_kernel_ws")
    if ws is None:
        ws = _Workspace()
        sae.__dict__["_kernel_ws"] = ws
    return ws


def _addmm_s(bias: Tensor | None, a: Tensor, b: Tensor, out: Tensor, beta: float = 1.0) -> Tensor:
    """out[s] = bias[s] + a[s] @ b[s] for stacked [S, ...] operands; plain mm when S == 1."""
    if a.shape[0] == 1:
        if bias is None:
            torch.mm(a[0], b[0], out=out[0])
        else:
            torch.addmm(bias[0], a[0], b[0], beta=beta, out=out[0])
    elif bias is None:
        torch.bmm(a, b, out=out)
    else:
        torch.baddbmm(bias, a, b, beta=beta, out=out)
    return out


def _mm_s(a: Tensor, b: Tensor) -> Tensor:
    if a.shape[0] == 1:
        return torch.mm(a[0], b[0])[None]
    return torch.bmm(a, b)


def _mv_s(m: Tensor, v: Tensor) -> Tensor:
    """out[s] = m[s] @ v[s] for m [S, r, c], v [S, c] -> [S, r]: one ``torch.mv`` per member, for every S.

    Not ``torch.bmm(m, v[..., None])``: for S > 1 that runs a GEMM with one column per member,
    for S = 1 a GEMV, and the two sum in different orders (on torch 2.14.1 CPU they differ in the
    last bits), so a sweep's stacked member would drift away from the same trial trained alone
    (issue 10). The same call on the same operands makes member s bit-identical whatever S.
    """
    return torch.stack([torch.mv(m[s], v[s]) for s in range(m.shape[0])])


# ----------------------------------------------------------------------------- dense fused ReLU + L1


class _FusedReLULoss(torch.autograd.Function):
    """Dense ReLU + L1 loss over all members; outputs (loss, mse [S], l1 [S], counts [S, d_sae], sq_err [S, B]).

    Passes over the [S, B, d_sae] matrices: forward = encoder GEMM (bias in its epilogue), ReLU in
    place, decoder GEMM, sign (into the g_f buffer, free until the backward) and two GEMVs for the
    per-latent sums and counts; backward = g_f GEMM (the L1 gradient as its bias), the ReLU mask in
    place, one GEMV for db_enc, and the two weight-gradient GEMMs.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, coeff: Tensor,
                ws: _Workspace | None, cd: torch.dtype):
        S, d, n = W_enc.shape
        xs = x if x.ndim == 3 else x.unsqueeze(0).expand(S, -1, -1)
        B = xs.shape[1]
        dev = x.device
        get = (lambda name, shape, dt: ws.get(name, shape, dt, dev)) if ws is not None else \
            (lambda name, shape, dt: torch.empty(shape, dtype=dt, device=dev))
        xc = xs.to(cd)
        b_eff = b_enc - _mv_s(W_enc.transpose(1, 2), b_dec)  # [S, n]: b_dec folded into the encoder bias
        f = _addmm_s(b_eff[:, None, :].to(cd), xc, W_enc.to(cd), get("f", (S, B, n), cd))
        f.relu_()
        x_hat = _addmm_s(b_dec[:, None, :].to(cd), f, W_dec.to(cd), get("xhat", (S, B, d), cd))
        err = (x_hat if cd == torch.float32 else x_hat.float()).sub_(xs)  # in place: x_hat is not needed again
        sq_err = torch.linalg.vector_norm(err, dim=-1).square_()  # [S, B]
        mse = sq_err.sum(-1) / (B * d)
        dec_norm = torch.linalg.vector_norm(W_dec, dim=-1)  # [S, n]
        fsum = _colsum(f, get)  # [S, n] fp32
        counts = _colsum(torch.sign(f, out=get("gf", (S, B, n), cd)), get)  # exact: integers < 2^24
        l1 = (fsum * dec_norm).sum(-1) / B
        loss = (mse + coeff * l1).sum()
        ctx.save_for_backward(xs, f, err, W_enc, W_dec, b_dec, dec_norm, fsum, coeff)
        ctx.ws, ctx.generation, ctx.cd = ws, (ws.generation if ws is not None else None), cd
        ctx.mark_non_differentiable(mse, l1, counts, sq_err)
        return loss, mse, l1, counts, sq_err

    @staticmethod
    def backward(ctx, g_loss: Tensor, *_unused):
        ws, cd = ctx.ws, ctx.cd
        if ws is not None and ws.generation != ctx.generation:
            raise RuntimeError("visae fused SAE loss: training_loss was called again before backward() of an "
                               "earlier call; call backward() (or use torch.no_grad() for evaluation) in between")
        xs, f, err, W_enc, W_dec, b_dec, dec_norm, fsum, coeff = ctx.saved_tensors
        S, B, n = f.shape
        d = W_enc.shape[1]
        dev = f.device
        get = (lambda name, shape, dt: ws.get(name, shape, dt, dev)) if ws is not None else \
            (lambda name, shape, dt: torch.empty(shape, dtype=dt, device=dev))
        g = g_loss.float()
        # dL/dx_hat = 2 (x_hat - x) / (B d)
        g_xhat = torch.mul(err, 2.0 / (B * d) * g, out=get("gxhat", (S, B, d), err.dtype))
        db_dec = g_xhat.sum(1)
        g_xc = g_xhat.to(cd)
        # Decoder: reconstruction part + L1 part (d||W_dec_j|| / dW_dec_j = W_dec_j / ||W_dec_j||).
        l1w = (g * coeff / B)[:, None]  # [S, 1]
        dW_dec = _mm_s(f.transpose(1, 2), g_xc).float()
        dW_dec.addcmul_(W_dec, (l1w * fsum / dec_norm.clamp_min(1e-12))[..., None])
        # Codes: g_f = g_xhat W_dec^T + l1_coeff ||W_dec_j|| / B, then the ReLU mask (from f > 0), in place.
        g_f = _addmm_s((l1w * dec_norm)[:, None, :].to(cd), g_xc, W_dec.to(cd).transpose(1, 2),
                       get("gf", (S, B, n), cd))
        torch.ops.aten.threshold_backward.grad_input(g_f, f, 0, grad_input=g_f)
        db_enc = _colsum(g_f, get)  # = dL/db_eff
        # pre = x W_enc + b_enc - b_dec W_enc = (x - b_dec) W_enc + b_enc
        x_centred = torch.sub(xs, b_dec[:, None, :], out=get("xcent", (S, B, d), xs.dtype)).to(cd)
        dW_enc = _mm_s(x_centred.transpose(1, 2), g_f).float()
        db_dec.sub_(_mv_s(W_enc, db_enc))
        return None, dW_enc, db_enc, dW_dec, db_dec, None, None, None


def _colsum(m: Tensor, get) -> Tensor:
    """Sum over the batch axis of m [S, B, n] -> [S, n] fp32, as a GEMV (faster than a strided reduction)."""
    S, B, n = m.shape
    if m.dtype != torch.float32:
        return m.sum(1, dtype=torch.float32)
    ones = get("ones", (B,), m.dtype)
    ones.fill_(1.0)
    return _mv_s(m.transpose(1, 2), ones.expand(S, B))  # per member, as for S = 1 (see _mv_s)


def relu_training_loss(sae: "SAE", x: Tensor, coeff: Tensor, impl: str) -> LossOutput:
    """ReLU + L1 step: the fused dense Function, or the sparse path once the codes are sparse enough."""
    if impl == "sparse" or (impl == "auto" and _looks_sparse(sae)):
        return sparse_training_loss(sae, x, coeff, None)
    S = sae.n_models
    B = x.shape[-2]
    grad = torch.is_grad_enabled() and sae.W_enc.requires_grad
    ws = None
    if grad:
        ws = _workspace(sae)
        ws.generation += 1
    cd = compute_dtype(x)
    loss, mse, l1, counts, sq_err = _FusedReLULoss.apply(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, coeff, ws, cd)
    l0 = counts.sum(-1).float() / B
    sae.__dict__["_last_active_frac"] = float(l0.max()) / sae.d_sae
    return LossOutput(loss=loss, mse=mse, l1=l1, l0=l0, explained_variance=_explained_variance(sq_err, x),
                      aux=torch.zeros(S, device=x.device), fired=counts > 0, sq_err=sq_err)


def _looks_sparse(sae: "SAE") -> bool:
    frac = sae.__dict__.get("_last_active_frac")
    return frac is not None and frac < sae.cfg.sparse_threshold


def _x_stats(x: Tensor, S: int) -> Tensor:
    """Input for _explained_variance: [S, B, d] (a broadcast view when x is shared)."""
    return x if x.ndim == 3 else x.unsqueeze(0).expand(S, -1, -1)


# ----------------------------------------------------------------------------- sparse paths


class Pattern:
    """Positions of the touched codes of one member, row-major (CSR): crow [B+1], col [nnz], row [nnz]."""

    __slots__ = ("crow", "col", "row", "B", "n", "_t")

    def __init__(self, crow: Tensor, col: Tensor, row: Tensor, B: int, n: int):
        self.crow, self.col, self.row, self.B, self.n = crow, col, row, B, n
        self._t: tuple[Tensor, Tensor, Tensor] | None = None

    @staticmethod
    def from_rows_cols(row: Tensor, col: Tensor, B: int, n: int) -> "Pattern":
        """From row-major sorted (row, col) pairs (as ``nonzero`` returns them)."""
        crow = torch.zeros(B + 1, dtype=torch.int64, device=col.device)
        torch.cumsum(torch.bincount(row, minlength=B), 0, out=crow[1:])
        return Pattern(crow, col, row, B, n)

    @staticmethod
    def from_topk(idx: Tensor, n: int) -> "Pattern":
        """From per-row latent indices idx [B, k] (sorted within rows by the caller)."""
        B, k = idx.shape
        dev = idx.device
        crow = torch.arange(B + 1, dtype=torch.int64, device=dev) * k
        row = torch.arange(B, device=dev).repeat_interleave(k)
        return Pattern(crow, idx.reshape(-1), row, B, n)

    def transposed(self) -> tuple[Tensor, Tensor, Tensor]:
        """CSR structure of G^T [n, B]: (crow_t [n+1], batch row of each entry [nnz], order [nnz]); computed once."""
        if self._t is None:
            order = torch.argsort(self.col, stable=True)
            crow_t = torch.zeros(self.n + 1, dtype=torch.int64, device=self.col.device)
            torch.cumsum(torch.bincount(self.col, minlength=self.n), 0, out=crow_t[1:])
            self._t = (crow_t, self.row[order], order)
        return self._t

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    def gather_dot(self, a: Tensor, b_t: Tensor) -> Tensor:
        """(a @ b_t^T) at the pattern's positions: a [B, d], b_t [n, d] -> [nnz] (SDDMM)."""
        if self.nnz == 0:
            return a.new_zeros(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            csr = torch.sparse_csr_tensor(self.crow, self.col, a.new_zeros(self.nnz), (self.B, self.n),
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(csr, a, b_t.t(), beta=0.0).values()


def _spmm_t(p: Pattern, values: Tensor, dense: Tensor) -> Tensor:
    """G^T @ dense where G [B, n] holds ``values`` at the pattern: -> [n, d] (sparse CSR x dense)."""
    if p.nnz == 0:
        return dense.new_zeros(p.n, dense.shape[1])
    crow_t, row_t, order = p.transposed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        gt = torch.sparse_csr_tensor(crow_t, row_t, values.to(dense.dtype)[order], (p.n, p.B), check_invariants=False)
    return gt @ dense


class _SparseEncode(torch.autograd.Function):
    """Gives gradients to (W_enc, b_enc, b_dec) through pre-activation values picked at patterns.

    Forward returns copies of the given values (computed from the dense encoder GEMM, no grad),
    one per pattern; ``members[i]`` is the member pattern i belongs to. Backward scatters their
    gradients: dW_enc[s]^T = sum_i G_i^T (x_s - b_dec_s), db_enc[s] = column sums of the G_i,
    db_dec[s] = -W_enc[s] db_enc[s].
    """

    @staticmethod
    def forward(ctx, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, x: Tensor, patterns: list[Pattern],
                members: list[int], *vals: Tensor):
        ctx.save_for_backward(W_enc, b_dec, x)
        ctx.patterns, ctx.members = patterns, members
        return tuple(v.clone() for v in vals)

    @staticmethod
    def backward(ctx, *g_vals: Tensor):
        W_enc, b_dec, x = ctx.saved_tensors
        S, d, n = W_enc.shape
        dWt = torch.zeros(S, n, d, dtype=W_enc.dtype, device=W_enc.device)
        db_enc = torch.zeros(S, n, dtype=W_enc.dtype, device=W_enc.device)
        for s, p, g in zip(ctx.members, ctx.patterns, g_vals):
            if g is None or p.nnz == 0:
                continue
            g = g.float()
            xs = x[s] if x.ndim == 3 else x
            db_enc[s] += torch.bincount(p.col, weights=g, minlength=n)
            dWt[s] += _spmm_t(p, g, xs)  # [n, d]
        dWt.sub_(db_enc[:, :, None] * b_dec[:, None, :])  # centring: x - b_dec
        db_dec = -_mv_s(W_enc, db_enc)
        return (dWt.transpose(1, 2).contiguous(), db_enc, db_dec, None, None, None) + (None,) * len(g_vals)


class _SparseDecode(torch.autograd.Function):
    """x_hat[s] = sum over the pattern of f * W_dec[s, col] (+ b_dec[s]): embedding-bag decode, -> [S, B, d]."""

    @staticmethod
    def forward(ctx, W_dec: Tensor, b_dec: Tensor | None, patterns: list[Pattern], *f_vals: Tensor):
        S, n, d = W_dec.shape
        B = patterns[0].B
        out = torch.empty(S, B, d, dtype=W_dec.dtype, device=W_dec.device)
        for s, (p, v) in enumerate(zip(patterns, f_vals)):
            if p.nnz:
                out[s] = F.embedding_bag(p.col, W_dec[s], p.crow, mode="sum", per_sample_weights=v.to(W_dec.dtype),
                                         include_last_offset=True)
            else:
                out[s].zero_()
        if b_dec is not None:
            out += b_dec[:, None, :]
        ctx.save_for_backward(W_dec, *f_vals)
        ctx.patterns = patterns
        ctx.has_bias = b_dec is not None
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        W_dec, *f_vals = ctx.saved_tensors
        dW_dec = torch.empty_like(W_dec)
        g_vals = []
        for s, (p, v) in enumerate(zip(ctx.patterns, f_vals)):
            g_vals.append(p.gather_dot(g[s], W_dec[s]))
            dW_dec[s] = _spmm_t(p, v, g[s])
        db_dec = g.sum(1) if ctx.has_bias else None
        return (dW_dec, db_dec, None) + tuple(g_vals)


def sparse_decode(W_dec: Tensor, b_dec: Tensor | None, pattern: Pattern, vals: Tensor) -> Tensor:
    """One member's decode from its active codes only: x_hat[b] = sum_{j in row b} f_bj W_dec[j] (+ b_dec) -> [B, d].

    W_dec: [d_sae, d]; b_dec: [d] or None; pattern: the rows' active latents (CSR, :class:`Pattern`);
    vals: their codes [nnz]. An embedding-bag over the active decoder rows: O(nnz * d) work instead
    of the dense [B, d_sae] x [d_sae, d] GEMM, with autograd (W_dec, b_dec, vals) through
    :class:`_SparseDecode`. Equal to the dense decode up to float rounding (the sum runs over the
    active terms only, in another order). Used by :func:`visae.splice.splice`.
    """
    out = _SparseDecode.apply(W_dec[None], None if b_dec is None else b_dec[None], [pattern], vals)
    return out[0]


class _SquaredError(torch.autograd.Function):
    """sq_err[s, b] = ||err[s, b, :]||^2 (one pass forward, one backward)."""

    @staticmethod
    def forward(ctx, err: Tensor) -> Tensor:
        ctx.save_for_backward(err)
        return torch.linalg.vector_norm(err, dim=-1).square_()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (err,) = ctx.saved_tensors
        return err * (2.0 * g).unsqueeze(-1)


def select_active(sae: "SAE", x: Tensor, dead_mask: Tensor | None, grad: bool
                  ) -> tuple[list[Pattern], list[Tensor], list[Pattern], list[Tensor]]:
    """Per member, the encoder GEMM and the architecture's choice of active codes (no autograd).

    x: [B, d_in] or [S, B, d_in]. Returns (patterns, values [nnz] float32) from ``sae._sparse_select``
    and, when ``dead_mask`` [S, d_sae] is given, the aux-k selection among dead latents (else empty
    lists). The folded encoder bias is per member (``_mv_s``), so a member's codes do not depend on S.
    """
    S, n = sae.n_models, sae.d_sae
    B, dev, cd = x.shape[-2], x.device, compute_dtype(x)
    ws = _workspace(sae) if grad else None
    patterns, vals, aux_patterns, aux_vals = [], [], [], []
    with torch.no_grad():
        We = sae.W_enc.to(cd)
        b_eff = (sae.b_enc - _mv_s(sae.W_enc.transpose(1, 2), sae.b_dec)).to(cd)
        for s in range(S):
            xs = (x[s] if x.ndim == 3 else x).to(cd)
            pre = ws.get("pre", (B, n), cd, dev) if ws is not None else torch.empty(B, n, dtype=cd, device=dev)
            torch.addmm(b_eff[s], xs, We[s], out=pre)
            p, v = sae._sparse_select(pre, s)
            patterns.append(p)
            vals.append(v.float())
            if dead_mask is not None:
                p_aux, v_aux = _aux_select(pre, dead_mask[s], sae.cfg.aux_k)
                aux_patterns.append(p_aux)
                aux_vals.append(v_aux.float())
    return patterns, vals, aux_patterns, aux_vals


def sparse_training_loss(sae: "SAE", x: Tensor, coeff: Tensor, dead_mask: Tensor | None) -> LossOutput:
    """The training loss touching only the active codes after the encoder GEMM (any architecture).

    The architecture supplies ``_sparse_select(pre [B, d_sae], s) -> (Pattern, values [nnz])``
    (which pre-activations may get a non-zero code or gradient) and
    ``_sparse_codes(values, pattern, s, coeff_s, dec_norm) -> (codes [nnz], sparsity loss)`` (with
    autograd; ``dec_norm`` [S, d_sae] = ||W_dec|| with autograd when ``sparse_needs_dec_norm``).
    """
    S, n, d = sae.n_models, sae.d_sae, sae.d_in
    B = x.shape[-2]
    dev = x.device
    grad = torch.is_grad_enabled() and sae.W_enc.requires_grad
    use_aux = sae.uses_aux and dead_mask is not None and bool(dead_mask.any())
    patterns, vals, aux_patterns, aux_vals = select_active(sae, x, dead_mask if use_aux else None, grad)
    n_main = len(vals)
    members = list(range(S)) + (list(range(S)) if use_aux else [])
    enc_out = _SparseEncode.apply(sae.W_enc, sae.b_enc, sae.b_dec, x.float(), patterns + aux_patterns, members,
                                  *vals, *aux_vals)
    main_vals, aux_pre_vals = enc_out[:n_main], enc_out[n_main:]
    codes, sparsity = [], []
    dec_norm = sae.W_dec.norm(dim=-1) if sae.sparse_needs_dec_norm else None
    for s in range(S):
        c, sp = sae._sparse_codes(main_vals[s], patterns[s], s, coeff[s], dec_norm)
        codes.append(c)
        sparsity.append(sp)
    x_hat = _SparseDecode.apply(sae.W_dec, sae.b_dec, patterns, *codes)
    xs_all = _x_stats(x.float(), S)
    err = x_hat - xs_all
    sq_err_g = _SquaredError.apply(err)  # [S, B], one pass each way
    sq_err = sq_err_g.detach()
    mse = sq_err_g.sum(-1) / (B * d)
    aux = torch.zeros(S, device=dev)
    if use_aux:
        f_aux = [torch.relu(v) for v in aux_pre_vals]
        e_hat = _SparseDecode.apply(sae.W_dec, None, aux_patterns, *f_aux)
        aux = aux_k_term(e_hat, -err, x, sae.b_dec) * dead_mask.any(-1)  # 0 for members with no dead latent
    loss = (mse + torch.stack(sparsity) + sae.cfg.aux_coeff * aux).sum()
    with torch.no_grad():
        dec_norm = sae.W_dec.norm(dim=-1)
        counts = torch.stack([torch.bincount(p.col[c > 0], minlength=n) for p, c in zip(patterns, codes)])
        l1 = torch.stack([(c.detach() * dec_norm[s, p.col]).sum() for s, (p, c) in enumerate(zip(patterns, codes))]) / B
        l0 = counts.sum(-1).float() / B
        sae.__dict__["_last_active_frac"] = float(l0.max()) / n
        return LossOutput(loss=loss, mse=mse.detach(), l1=l1, l0=l0,
                          explained_variance=_explained_variance(sq_err, x), aux=aux.detach(),
                          fired=counts > 0, sq_err=sq_err)


def _aux_select(pre: Tensor, dead: Tensor, aux_k: int) -> tuple[Pattern, Tensor]:
    """Top ``aux_k`` pre-activations among the dead latents of each row -> (pattern, values)."""
    B, n = pre.shape
    dead_idx = dead.nonzero()[:, 0]
    kk = min(aux_k, int(dead_idx.numel()))
    sub = pre.index_select(1, dead_idx)
    v, i = sub.topk(kk, dim=-1, sorted=False)
    col = dead_idx[i]
    col, order = col.sort(dim=-1)
    return Pattern.from_topk(col, n), v.gather(1, order).reshape(-1)
