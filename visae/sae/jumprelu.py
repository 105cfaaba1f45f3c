"""JumpReLU SAE (Rajamanoharan et al. 2024): per-latent learned thresholds, L0 penalty.

f_j = pre_j * H(pre_j - theta_j) with theta = exp(log_threshold) > 0 (so f >= 0),
loss = MSE + l1_coeff * L0 where L0 = mean over the batch of sum_j H(pre_j - theta_j).
H has zero gradient almost everywhere; theta learns through straight-through estimators
with a rectangle kernel of width ``jumprelu_bandwidth`` (eps):
    d JumpReLU / d theta = -(theta / eps) * rect((pre - theta) / eps),
    d H / d theta        = -(1 / eps)     * rect((pre - theta) / eps).
(``training_loss``'s ``l1_coeff`` is the L0 coefficient for this architecture.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from visae.sae.base import SAE, LossOutput

__all__ = ["JumpReLUSAE", "jumprelu", "step"]


def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_pre = g * (pre > theta)
        g_theta = -(theta / eps) * _rect((pre - theta) / eps) * g
        return g_pre, _sum_to(g_theta, theta.shape), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_theta = -(1.0 / eps) * _rect((pre - theta) / eps) * g
        return None, _sum_to(g_theta, theta.shape), None


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    while t.ndim > len(shape):
        t = t.sum(0)
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(dims, keepdim=True) if dims else t


def jumprelu(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
    """pre * H(pre - theta) with the straight-through threshold gradient."""
    return _JumpReLU.apply(pre, theta, eps)


def step(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
    """H(pre - theta) with the straight-through threshold gradient (none to pre)."""
    return _Step.apply(pre, theta, eps)


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    sparsity_metric = "l0"
    sparsity_degree = 0
    latent_axes = {**SAE.latent_axes, "log_threshold": 1}

    def _init_extra(self) -> None:
        self.log_threshold = nn.Parameter(torch.empty(self.n_models, self.d_sae, device=self.W_enc.device))

    def _reset_extra(self) -> None:
        self.log_threshold.fill_(math.log(self.cfg.jumprelu_init_threshold))

    @torch.no_grad()
    def reset_latents_(self, mask: Tensor) -> None:
        self.log_threshold.masked_fill_(mask.to(self.log_threshold.device, torch.bool),
                                        math.log(self.cfg.jumprelu_init_threshold))

    def _fold_extra(self, c: float) -> None:
        self.log_threshold.sub_(math.log(c))

    @property
    def threshold(self) -> Tensor:
        """theta [S, d_sae] = exp(log_threshold)."""
        return self.log_threshold.exp()

    def _activate(self, pre: Tensor) -> Tensor:
        theta = self.threshold.to(pre.dtype)[:, None, :]
        return pre * (pre > theta)

    def _train_codes(self, pre: Tensor, sparsity_coeff: Tensor) -> tuple[Tensor, Tensor]:
        theta = self.threshold.to(pre.dtype)[:, None, :]
        eps = self.cfg.jumprelu_bandwidth
        f = jumprelu(pre, theta, eps)
        l0 = step(pre, theta, eps).sum(-1).mean(-1)  # [S]
        return f, sparsity_coeff * l0

    def _training_loss(self, x: Tensor, coeff: Tensor, dead_mask: Tensor | None, impl: str) -> LossOutput:
        if impl == "reference" or impl == "fused":
            return self._reference_loss(x, coeff, dead_mask)
        from visae.sae import kernels

        return kernels.sparse_training_loss(self, x, coeff, dead_mask)

    def _sparse_select(self, pre: Tensor, s: int):
        from visae.sae.kernels import Pattern

        # Codes above theta are active; those within eps/2 below it still get a threshold gradient.
        theta = self.log_threshold[s].detach().exp().to(pre.dtype)
        nz = (pre > theta - self.cfg.jumprelu_bandwidth / 2).nonzero()
        row, col = nz[:, 0], nz[:, 1]
        return Pattern.from_rows_cols(row, col, pre.shape[0], pre.shape[1]), pre[row, col]

    def _sparse_codes(self, vals: Tensor, pattern, s: int, coeff: Tensor, dec_norm: Tensor | None):
        theta = self.log_threshold[s].exp()[pattern.col]
        eps = self.cfg.jumprelu_bandwidth
        f = jumprelu(vals, theta, eps)
        return f, coeff * step(vals, theta, eps).sum() / pattern.B
