"""ReLU + L1 SAE: the Discover-then-Name / Anthropic recipe.

f = ReLU((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec,
loss = MSE(x, x_hat) + l1_coeff * sum_j f_j ||W_dec_j||   (mean over the batch).

The L1 term is computed as (sum_b f_bj) . ||W_dec_j||, never materialising [B, d_sae, d_in].
"""

from __future__ import annotations

import torch
from torch import Tensor

from visae.sae.base import SAE, LossOutput

__all__ = ["ReLUSAE"]


class ReLUSAE(SAE):
    architecture = "relu"
    sparse_needs_dec_norm = True
    sparsity_metric = "l1"
    sparsity_degree = 1

    def _activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def _train_codes(self, pre: Tensor, sparsity_coeff: Tensor) -> tuple[Tensor, Tensor]:
        f = torch.relu(pre)
        B = pre.shape[1]
        l1 = (f.sum(dim=1) * self.W_dec.norm(dim=-1).to(f.dtype)).sum(-1) / B  # [S]
        return f, sparsity_coeff * l1

    def _training_loss(self, x: Tensor, coeff: Tensor, dead_mask: Tensor | None, impl: str) -> LossOutput:
        if impl == "reference":
            return self._reference_loss(x, coeff, dead_mask)
        from visae.sae import kernels

        return kernels.relu_training_loss(self, x, coeff, impl)

    def _sparse_select(self, pre: Tensor, s: int):
        from visae.sae.kernels import Pattern

        nz = (pre > 0).nonzero()
        row, col = nz[:, 0], nz[:, 1]
        return Pattern.from_rows_cols(row, col, pre.shape[0], pre.shape[1]), pre[row, col]

    def _sparse_codes(self, vals: Tensor, pattern, s: int, coeff: Tensor, dec_norm: Tensor | None):
        l1 = (vals * dec_norm[s, pattern.col]).sum() / pattern.B
        return vals, coeff * l1
