"""BatchTopK SAE (Bussmann et al. 2024): keep the k * B largest codes of the whole batch.

Training: f = ReLU(pre) restricted to the batch's top k*B entries, so an example may use more
or fewer than k latents (k on average). A running threshold (``threshold`` [S], the smallest
kept code, exponentially averaged with ``threshold_momentum``) is updated on every training
step (grad enabled and module in train mode); at inference the codes are f = pre * (pre > threshold): a fixed
JumpReLU, independent of the batch. The threshold is saved in the checkpoint; -1 means
"never estimated" (inference then behaves as plain ReLU).
Loss: MSE + aux_coeff * aux, the aux-k term as TopK's (:func:`visae.sae.base.aux_k_term`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from visae.sae.base import SAE, LossOutput

__all__ = ["BatchTopKSAE"]


class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    uses_aux = True

    _grad_enabled = False

    def _init_extra(self) -> None:
        self.register_buffer("threshold", torch.full((self.n_models,), -1.0, device=self.W_enc.device))

    def _reset_extra(self) -> None:
        self.threshold.fill_(-1.0)

    def _fold_extra(self, c: float) -> None:
        self.threshold.div_(c)

    def _activate(self, pre: Tensor) -> Tensor:
        thr = self.threshold.to(pre.dtype)[:, None, None].clamp_min(0.0)
        return pre * (pre > thr)

    def _batch_topk(self, pre: Tensor) -> Tensor:
        """Training codes [S, B, d_sae]: the k*B largest positive entries of each member's batch."""
        S, B, d = pre.shape
        flat = torch.relu(pre).reshape(S, B * d)
        vals, idx = flat.topk(min(self.cfg.k * B, B * d), dim=-1, sorted=False)
        f = torch.zeros_like(flat).scatter(-1, idx, vals).reshape(S, B, d)
        self._update_threshold(vals)
        return f

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        """kept [S, n]: the batch's kept codes; the smallest positive one updates the running threshold."""
        pos = kept.float().masked_fill(kept <= 0, float("inf"))
        for s in range(self.n_models):
            self._update_threshold_member(s, pos[s].min())

    @torch.no_grad()
    def _update_threshold_member(self, s: int, batch_thr: Tensor) -> None:
        if not self._grad_enabled:  # only on training steps, not validation passes
            return
        batch_thr = batch_thr.float() if torch.isfinite(batch_thr) else torch.zeros((), device=batch_thr.device)
        m = self.cfg.threshold_momentum
        old = self.threshold[s]
        self.threshold[s] = batch_thr if old < 0 else m * old + (1 - m) * batch_thr

    @torch.no_grad()
    def _sparse_select(self, pre: Tensor, s: int):
        """Exact batch top-(k*B) without sorting the whole [B, d_sae] matrix.

        A strided sample of the pre-activations gives a value t that (with a safety margin)
        fewer than all but more than k*B entries exceed; only the entries above t are ranked.
        If too few exceed it, t is lowered (down to 0, i.e. all positive entries).
        """
        from visae.sae.kernels import Pattern

        B, n = pre.shape
        total = B * n
        K = min(self.cfg.k * B, total)
        flat = pre.reshape(-1)
        m = min(65536, total)
        stride = max(1, total // m) | 1  # odd stride: does not lock onto one column
        sample = flat[::stride][:m].float()
        m = sample.numel()
        expect = K / total * m
        r = int(min(m, 1.5 * expect + 4 * expect ** 0.5 + 8))
        while True:
            t = float(sample.topk(r).values.min()) if r < m else 0.0
            t = max(t, 0.0)
            nz = (pre > t).nonzero()
            if nz.shape[0] >= K or t == 0.0:
                break
            r = min(m, 2 * r)
        row, col = nz[:, 0], nz[:, 1]
        vals = pre[row, col]
        if vals.numel() > K:
            top = vals.float().topk(K, sorted=False).indices.sort().values  # keep row-major order
            row, col, vals = row[top], col[top], vals[top]
        if vals.numel():
            self._update_threshold_member(s, vals.min())
        return Pattern.from_rows_cols(row, col, B, n), vals

    def _sparse_codes(self, vals: Tensor, pattern, s: int, coeff: Tensor, dec_norm: Tensor | None):
        return vals, vals.new_zeros(())

    def _train_codes(self, pre: Tensor, sparsity_coeff: Tensor) -> tuple[Tensor, Tensor]:
        return self._batch_topk(pre), torch.zeros_like(sparsity_coeff)

    def _training_loss(self, x: Tensor, coeff: Tensor, dead_mask: Tensor | None, impl: str) -> LossOutput:
        # Threshold updates only on training steps (grad enabled), not on validation passes.
        self._grad_enabled = torch.is_grad_enabled() and self.training
        if impl == "reference" or impl == "fused":
            try:
                return self._reference_loss(x, coeff, dead_mask)
            finally:
                self._grad_enabled = False
        from visae.sae import kernels

        try:
            return kernels.sparse_training_loss(self, x, coeff, dead_mask)
        finally:
            self._grad_enabled = False
