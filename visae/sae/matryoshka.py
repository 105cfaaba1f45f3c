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

__all__ = ["MatryoshkaSAE", "prefix_sizes", "prefix_forward"]


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

    @property
    def prefix_sizes(self) -> list[int]:
        """[m_1, ..., m_L = d_sae]: the nested prefix sizes."""
        return prefix_sizes(self.d_sae, self.cfg.matryoshka_levels)

    def _groups(self) -> list[tuple[int, int]]:
        sizes = self.prefix_sizes
        return list(zip([0] + sizes[:-1], sizes))

    # ------------------------------------------------------------------ reference (plain autograd)
    def _reference_loss(self, x: Tensor, coeff: Tensor, dead_mask: Tensor | None) -> LossOutput:
        S, B, d = self.n_models, x.shape[-2], self.d_in
        pre = self.preacts(x)
        f, _ = self._train_codes(pre, coeff)
        xs = self._stacked(x)
        W_dec = self.W_dec.to(f.dtype)
        x_hat = self.b_dec[:, None, :].to(f.dtype).expand(S, B, d)
        prefix_loss = torch.zeros(S, device=x.device)
        for lo, hi in self._groups():
            x_hat = torch.baddbmm(x_hat, f[:, :, lo:hi], W_dec[:, lo:hi])
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
        for lo, hi in self._groups():
            sub_p, sub_c = [], []
            for p, c in zip(patterns, codes):
                keep = (p.col >= lo) & (p.col < hi)
                sub_p.append(K.Pattern.from_rows_cols(p.row[keep], p.col[keep] - lo, B, hi - lo))
                sub_c.append(c[keep])
            x_hat = x_hat + K._SparseDecode.apply(self.W_dec[:, lo:hi], None, sub_p, *sub_c)
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
    with latents >= ``size`` zeroed); for a stack, [S, B, ...] as ``forward``. Works for any
    SAE (for a Matryoshka SAE, ``size`` in ``sae.prefix_sizes`` is a trained prefix).
    Raises SAEFormatError for ``size`` outside [0, d_sae].
    """
    if not 0 <= int(size) <= sae.d_sae:
        raise SAEFormatError(f"prefix_forward: size {size} outside [0, d_sae={sae.d_sae}]")
    sae.check_input(x, where="prefix_forward input")
    x_sae, norm = sae.normalize_input(x.to(sae.W_enc.dtype))
    f = sae._activate(sae.preacts(x_sae)).clone()
    f[..., int(size):] = 0
    x_hat = sae._decode_sae(f)
    if sae.cfg.scale_factor != 1.0:
        x_hat = x_hat / sae.cfg.scale_factor
    if norm is not None:
        x_hat = x_hat * norm
    return sae._squeeze(x_hat, x), sae._squeeze(f, x)
