"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per example (then ReLU).

f = ReLU(TopK_k((x - b_dec) W_enc + b_enc)), x_hat = f W_dec + b_dec, loss = MSE + aux_coeff * aux.
The aux-k term lets the ``aux_k`` largest *dead* latents (``dead_mask`` from the trainer)
reconstruct the residual x - x_hat, so dead latents get a gradient. It has Gao et al.'s weighting
(section A.2 and their reference code: MSE / Var(x) + 1/32 * aux-MSE / Var(r)), expressed in MSE
units: aux = aux-MSE * Var(x) / Var(r) (:func:`visae.sae.base.aux_k_term`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from visae.sae.base import SAE, LossOutput

__all__ = ["TopKSAE"]


class TopKSAE(SAE):
    architecture = "topk"
    uses_aux = True

    def _activate(self, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def _train_codes(self, pre: Tensor, sparsity_coeff: Tensor) -> tuple[Tensor, Tensor]:
        return self._activate(pre), torch.zeros_like(sparsity_coeff)

    def _sparse_select(self, pre: Tensor, s: int):
        from visae.sae.kernels import Pattern

        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        idx, order = idx.sort(dim=-1)  # CSR: ascending latents within a row
        return Pattern.from_topk(idx, pre.shape[1]), vals.gather(1, order).reshape(-1)

    def _sparse_codes(self, vals: Tensor, pattern, s: int, coeff: Tensor, dec_norm: Tensor | None):
        return torch.relu(vals), vals.new_zeros(())

    def _training_loss(self, x: Tensor, coeff: Tensor, dead_mask: Tensor | None, impl: str) -> LossOutput:
        if impl == "reference" or impl == "fused":
            return self._reference_loss(x, coeff, dead_mask)
        from visae.sae import kernels

        return kernels.sparse_training_loss(self, x, coeff, dead_mask)
