"""Matryoshka SAE with BatchTopK codes: nested prefixes of the dictionary that each reconstruct the input.

Source: Bussmann, Nabeshima, Karvonen & Nanda, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders" (2025), section 3 (the BatchTopK variant with fixed prefix groups), after
Nabeshima's "Matryoshka Sparse Autoencoders" (2024).

Prefix sizes ``m_1 < m_2 < ... < m_L = d_sae`` with ``m_l = d_sae >> (L - l)`` (``L =
cfg.matryoshka_levels``; d_sae / 16, / 8, / 4, / 2, 1 for the default L = 5). The codes are
BatchTopK's over the whole dictionary (:class:`visae.sae.batchtopk.BatchTopKSAE`: in training
the k * B largest codes of the batch, at inference the running threshold). The prefix
reconstructions are cumulative, one decode's work in all::

    x_hat_0 = b_dec
    x_hat_l = x_hat_{l-1} + f[:, m_{l-1}:m_l] W_dec[m_{l-1}:m_l]          (m_0 = 0)
    loss    = sum_l mean_{B, d_in} (x - x_hat_l)^2  +  aux_coeff * aux-k(x - x_hat_L)

So the first ``m_1`` latents must reconstruct the input alone, and later latents only refine
it: a broad concept cannot be split into specialised fragments without hurting the small
prefixes (no feature absorption of parents into children). ``LossOutput.mse`` / ``sq_err`` /
``explained_variance`` describe the full reconstruction ``x_hat_L`` (the SAE's output, as for
every architecture); ``loss`` holds the sum over prefixes. Inference, export, stacking and
naming are BatchTopK's; :func:`prefix_forward` reconstructs from a prefix only.

**Which latents form a prefix: ranked by use, not by index.** Nabeshima's Matryoshka SAE
(reference code github.com/noanabeshima/matryoshka-saes, ``sae.py``, ``MatryoshkaSAE.step`` with
``permute_latents=True``) keeps after every step an exponential average (momentum 0.95) of each
latent's mean squared decoder-norm-scaled code, and permutes the latents (their parameters and
their Adam state) so that this average is descending: the prefixes are the most used latents.
Here the latents are not moved; the prefix groups are taken in that order instead, which is the
same computation (a latent keeps its parameters and optimizer state, only its group changes)::

    latent_sq_avg[s, j] <- 0.95 latent_sq_avg[s, j] + 0.05 mean_B (f[s, :, j] ||W_dec[s, j]||)^2
    order[s] = argsort(latent_sq_avg[s], descending, stable)   (the average as of the previous step)
    prefix l = the latents order[s, :m_l]

The average is updated on training steps only (grad enabled, train mode; as BatchTopK's
threshold), is a buffer (saved, stacked, averaged across data-parallel ranks like the
threshold) and starts at zero, so the first step's order is the index order. Without it, on
planted hierarchical data (BENCHMARKS.md, issue 14) 2-5 of the first prefix's 16 latents lose
the race for the batch's top-k codes in the first steps and never fire again (an aux-k term on
the full residual or on their own level's residual, and 10x longer training, did not revive
them), and the parents they would have carried are learnt by later latents: the first prefix
held 10-12 of 16 parents, with the ranking all 16. :meth:`MatryoshkaSAE.prefix_mask` and
:func:`prefix_forward` use the ranking; :meth:`MatryoshkaSAE.latent_rank` gives each latent's place.

Training paths: ``reference`` (plain autograd) and ``sparse`` (``auto``): the sparse path
reuses :mod:`visae.sae.kernels`' gather kernels, decoding each prefix group's active codes
with an embedding bag (the same total work as one sparse decode).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from visae.sae.base import LossOutput, SAEFormatError, _explained_variance, aux_k_term
from visae.sae.batchtopk import BatchTopKSAE

__all__ = ["MatryoshkaSAE", "prefix_sizes", "prefix_forward", "SQ_AVG_MOMENTUM"]

#: Momentum of the per-latent average of squared codes that orders the prefixes (Nabeshima's 0.95).
SQ_AVG_MOMENTUM = 0.95


def prefix_sizes(d_sae: int, levels: int) -> list[int]:
    """Nested prefix sizes ``[d_sae >> (levels-1), ..., d_sae >> 1, d_sae]`` (strictly increasing).

    Raises ValueError when the smallest prefix would be empty (``levels > d_sae.bit_length()``).
    """
    d_sae, levels = int(d_sae), int(levels)
    if levels < 1 or (d_sae >> (levels - 1)) < 1:
        raise ValueError(f"matryoshka: {levels} levels do not fit d_sae={d_sae} (the smallest prefix "
                         f"d_sae >> (levels - 1) must be >= 1)")
    return [d_sae >> (levels - 1 - i) for i in range(levels)]


class MatryoshkaSAE(BatchTopKSAE):
    """A stack of Matryoshka SAEs with BatchTopK codes (see the module docstring); parameters as BatchTopK's."""

    architecture = "matryoshka"
    uses_aux = True

    def _init_extra(self) -> None:
        super()._init_extra()
        self.register_buffer("latent_sq_avg", torch.zeros(self.n_models, self.d_sae, device=self.W_enc.device))

    def _reset_extra(self) -> None:
        super()._reset_extra()
        self.latent_sq_avg.zero_()

    def _fold_extra(self, c: float) -> None:
        super()._fold_extra(c)
        self.latent_sq_avg.div_(c * c)  # the codes are divided by c; the order does not change

    def reset_latents_(self, mask: Tensor) -> None:
        """Resampled latents (``mask [S, d_sae]``) start with no use: they rank last."""
        super().reset_latents_(mask)
        self.latent_sq_avg.masked_fill_(mask.to(self.latent_sq_avg.device), 0.0)

    @property
    def prefix_sizes(self) -> list[int]:
        """[m_1, ..., m_L = d_sae]: the nested prefix sizes."""
        return prefix_sizes(self.d_sae, self.cfg.matryoshka_levels)

    def _groups(self) -> list[tuple[int, int]]:
        sizes = self.prefix_sizes
        return list(zip([0] + sizes[:-1], sizes))

    @torch.no_grad()
    def latent_order(self) -> Tensor:
        """[S, d_sae] int64: the latents by descending ``latent_sq_avg`` (ties by index); prefix l = order[:, :m_l]."""
        return torch.argsort(self.latent_sq_avg, dim=-1, descending=True, stable=True)

    @torch.no_grad()
    def latent_rank(self) -> Tensor:
        """[S, d_sae] int64: each latent's position in :meth:`latent_order` (0 = the most used)."""
        order = self.latent_order()
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(self.d_sae, device=order.device).expand_as(order).contiguous())
        return rank

    @torch.no_grad()
    def prefix_mask(self, size: int) -> Tensor:
        """[S, d_sae] bool: the latents of the first ``size`` (rank < size). Raises SAEFormatError outside [0, d_sae]."""
        if not 0 <= int(size) <= self.d_sae:
            raise SAEFormatError(f"prefix_mask: size {size} outside [0, d_sae={self.d_sae}]")
        return self.latent_rank() < int(size)

    @torch.no_grad()
    def sorted_by_rank(self) -> "MatryoshkaSAE":
        """A copy whose latents are stored in rank order: latent j of the copy is ``latent_order()[s, j]`` of self.

        Then prefix l is latents 0 .. m_l - 1 by index too (for tools that read prefixes as index
        ranges, e.g. an export); the forward pass is unchanged up to that permutation of the codes.
        Optimizer state is not carried: sort a finished SAE, not one still training.
        """
        out = self.copy()
        order = self.latent_order()  # [S, n]
        S, n, d = self.n_models, self.d_sae, self.d_in
        out.W_enc.copy_(self.W_enc.gather(2, order[:, None, :].expand(S, d, n)))
        out.W_dec.copy_(self.W_dec.gather(1, order[:, :, None].expand(S, n, d)))
        out.b_enc.copy_(self.b_enc.gather(1, order))
        out.latent_sq_avg.copy_(self.latent_sq_avg.gather(1, order))
        return out

    @torch.no_grad()
    def _update_sq_avg(self, sq_mean: Tensor) -> None:
        """sq_mean [S, d_sae]: this batch's mean of (f ||W_dec||)^2; on training steps only (as the threshold)."""
        if not self._grad_enabled:
            return
        m = SQ_AVG_MOMENTUM
        self.latent_sq_avg.mul_(m).add_(sq_mean.to(self.latent_sq_avg.dtype), alpha=1.0 - m)

    # ------------------------------------------------------------------ reference (plain autograd)
    def _reference_loss(self, x: Tensor, coeff: Tensor, dead_mask: Tensor | None) -> LossOutput:
        S, B, d = self.n_models, x.shape[-2], self.d_in
        pre = self.preacts(x)
        f, _ = self._train_codes(pre, coeff)
        xs = self._stacked(x)
        n = self.d_sae
        order = self.latent_order()  # the ranking as of the previous step (module docstring)
        f_o = f.gather(2, order[:, None, :].expand(S, B, n))
        W_o = self.W_dec.to(f.dtype).gather(1, order[:, :, None].expand(S, n, d))
        x_hat = self.b_dec[:, None, :].to(f.dtype).expand(S, B, d)
        prefix_loss = torch.zeros(S, device=x.device)
        for lo, hi in self._groups():
            x_hat = torch.baddbmm(x_hat, f_o[:, :, lo:hi], W_o[:, lo:hi])
            err = x_hat - xs
            prefix_loss = prefix_loss + err.pow(2).mean(dim=(1, 2))
        mse = err.pow(2).mean(dim=(1, 2))
        aux = torch.zeros(S, device=x.device)
        if dead_mask is not None and bool(dead_mask.any()):
            aux = self._aux_loss_reference(pre, err, dead_mask, x)
        loss = (prefix_loss + self.cfg.aux_coeff * aux).sum()
        with torch.no_grad():
            counts = (f > 0).sum(dim=1)
            dec_norm = self.W_dec.norm(dim=-1)
            self._update_sq_avg(f.float().square().mean(dim=1) * dec_norm.float().square())
            l1 = (f.float().sum(dim=1) * dec_norm).sum(-1) / B
            sq_err = err.detach().float().pow(2).sum(-1)
            return LossOutput(loss=loss, mse=mse.detach(), l1=l1, l0=counts.sum(-1).float() / B,
                              explained_variance=_explained_variance(sq_err, x), aux=aux.detach(),
                              fired=counts > 0, sq_err=sq_err)

    # ------------------------------------------------------------------ dispatch
    def _training_loss(self, x: Tensor, coeff: Tensor, dead_mask: Tensor | None, impl: str) -> LossOutput:
        # Threshold updates only on training steps (grad enabled, train mode), as BatchTopK.
        self._grad_enabled = torch.is_grad_enabled() and self.training
        try:
            if impl == "reference" or impl == "fused":
                return self._reference_loss(x, coeff, dead_mask)
            return self._sparse_loss(x, coeff, dead_mask)
        finally:
            self._grad_enabled = False

    # ------------------------------------------------------------------ sparse path
    def _sparse_loss(self, x: Tensor, coeff: Tensor, dead_mask: Tensor | None) -> LossOutput:
        """The reference loss touching only the active codes after the encoder GEMM (values and gradients equal)."""
        from visae.sae import kernels as K

        S, n, d = self.n_models, self.d_sae, self.d_in
        B = x.shape[-2]
        dev = x.device
        grad = torch.is_grad_enabled() and self.W_enc.requires_grad
        use_aux = dead_mask is not None and bool(dead_mask.any())
        patterns, vals, aux_patterns, aux_vals = K.select_active(self, x, dead_mask if use_aux else None, grad)
        members = list(range(S)) + (list(range(S)) if use_aux else [])
        enc_out = K._SparseEncode.apply(self.W_enc, self.b_enc, self.b_dec, x.float(), patterns + aux_patterns,
                                        members, *vals, *aux_vals)
        main_vals, aux_pre_vals = enc_out[:S], enc_out[S:]
        codes = [self._sparse_codes(main_vals[s], patterns[s], s, coeff[s], None)[0] for s in range(S)]
        xs_all = K._x_stats(x.float(), S)
        x_hat = self.b_dec[:, None, :].expand(S, B, d)
        prefix_loss = torch.zeros(S, device=dev)
        rank = self.latent_rank()  # the ranking as of the previous step (module docstring)
        ranks = [rank[s, p.col] for s, p in enumerate(patterns)]
        for lo, hi in self._groups():
            sub_p, sub_c = [], []
            for p, c, r in zip(patterns, codes, ranks):
                keep = (r >= lo) & (r < hi)
                sub_p.append(K.Pattern.from_rows_cols(p.row[keep], p.col[keep], B, n))
                sub_c.append(c[keep])
            x_hat = x_hat + K._SparseDecode.apply(self.W_dec, None, sub_p, *sub_c)
            err = x_hat - xs_all
            sq_err_g = K._SquaredError.apply(err)
            prefix_loss = prefix_loss + sq_err_g.sum(-1) / (B * d)
        sq_err = sq_err_g.detach()
        aux = torch.zeros(S, device=dev)
        if use_aux:  # as kernels.sparse_training_loss: dead latents reconstruct the full residual x - x_hat_L
            f_aux = [torch.relu(v) for v in aux_pre_vals]
            e_hat = K._SparseDecode.apply(self.W_dec, None, aux_patterns, *f_aux)
            aux = aux_k_term(e_hat, -err, x, self.b_dec) * dead_mask.any(-1)
        loss = (prefix_loss + self.cfg.aux_coeff * aux).sum()
        with torch.no_grad():
            dec_norm = self.W_dec.norm(dim=-1)
            counts = torch.stack([torch.bincount(p.col[c > 0], minlength=n) for p, c in zip(patterns, codes)])
            sq = torch.stack([torch.bincount(p.col, weights=c.detach().float().square(), minlength=n)
                              for p, c in zip(patterns, codes)])
            self._update_sq_avg(sq / B * dec_norm.float().square())
            l1 = torch.stack([(c.detach() * dec_norm[s, p.col]).sum()
                              for s, (p, c) in enumerate(zip(patterns, codes))]) / B
            l0 = counts.sum(-1).float() / B
            self.__dict__["_last_active_frac"] = float(l0.max()) / n
            return LossOutput(loss=loss, mse=sq_err.sum(-1) / (B * d), l1=l1, l0=l0,
                              explained_variance=_explained_variance(sq_err, x), aux=aux.detach(),
                              fired=counts > 0, sq_err=sq_err)


@torch.no_grad()
def prefix_forward(sae: Any, x: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Reconstruct RAW activations from the first ``size`` latents only.

    x [B, d_in] (raw, as ``sae.forward`` takes) -> (x_hat [B, d_in] raw space, codes [B, d_sae]
    with the codes of the other latents zeroed); for a stack, [S, B, ...] as ``forward``. Works
    for any SAE: for a Matryoshka SAE the first ``size`` latents of its ranking
    (:meth:`MatryoshkaSAE.prefix_mask`; ``size`` in ``sae.prefix_sizes`` is a trained prefix),
    for others latents 0 .. size-1. Raises SAEFormatError for ``size`` outside [0, d_sae].
    """
    if not 0 <= int(size) <= sae.d_sae:
        raise SAEFormatError(f"prefix_forward: size {size} outside [0, d_sae={sae.d_sae}]")
    sae.check_input(x, where="prefix_forward input")
    x_sae, norm = sae.normalize_input(x.to(sae.W_enc.dtype))
    f = sae._activate(sae.preacts(x_sae)).clone()
    if isinstance(sae, MatryoshkaSAE):
        f.masked_fill_(~sae.prefix_mask(size)[:, None, :], 0.0)  # f [S, B, d_sae]
    else:
        f[..., int(size):] = 0
    x_hat = sae._decode_sae(f)
    if sae.cfg.scale_factor != 1.0:
        x_hat = x_hat / sae.cfg.scale_factor
    if norm is not None:
        x_hat = x_hat * norm
    return sae._squeeze(x_hat, x), sae._squeeze(f, x)
