"""Adam over stacked parameters: one lr per stack member, state resettable per (member, latent).

``torch.optim.Adam`` takes one learning rate per parameter group, but a stack of S SAEs
keeps every member in the same tensor (``W_enc [S, d_in, d_sae]``), so per-member learning
rates need a per-slice lr. :class:`StackedAdam` is plain Adam (Kingma & Ba, no weight
decay, no amsgrad) whose lr is a tensor ``[S]`` broadcast over each parameter's member axis
(axis 0). Its step counts are tensors too, kept per (member, latent) along a parameter's
latent axis, so the Adam state of resampled latents can be reset to a fresh start (zero
moments, step 0, hence fresh bias correction) while the rest continue. With S = 1 and no
reset it computes exactly what ``torch.optim.Adam`` computes (tests check step by step).

Example::

    opt = StackedAdam([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], latent_axes=[2, 1, 1, None])
    loss.backward()
    opt.step(lr=torch.tensor([1e-4, 5e-4]))      # lr: [S]
    opt.zero_grad()
    opt.reset_latents_(dead)                     # dead: [S, d_sae] bool
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["StackedAdam"]


class StackedAdam:
    """Adam for parameters with a leading member axis S and a per-member learning rate.

    Args:
        params: tensors (``requires_grad``) each of shape ``[S, ...]``.
        lr: default learning rate, float or ``[S]``; ``step(lr=...)`` overrides it per step
            (schedules pass the current lr there).
        betas, eps: as in ``torch.optim.Adam``.
        latent_axes: per parameter, the axis that indexes latents (e.g. 2 for ``W_enc
            [S, d_in, d_sae]``, 1 for ``W_dec [S, d_sae, d_in]``) or None. Step counts are kept
            per (member, latent) on these parameters so ``reset_latents_`` can restart them.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        latent_axes: Sequence[int | None] | None = None,
    ):
        self.params = list(params)
        if not self.params:
            raise ValueError("StackedAdam: no parameters given")
        self.n_models = int(self.params[0].shape[0])
        for p in self.params:
            if p.dim() < 1 or p.shape[0] != self.n_models:
                raise ValueError(f"StackedAdam: every parameter needs leading member axis {self.n_models}, got shape {list(p.shape)}")
        self.latent_axes = list(latent_axes) if latent_axes is not None else [None] * len(self.params)
        if len(self.latent_axes) != len(self.params):
            raise ValueError("StackedAdam: latent_axes must have one entry per parameter")
        for p, ax in zip(self.params, self.latent_axes):
            if ax is not None and not 1 <= ax < p.dim():
                raise ValueError(f"StackedAdam: latent axis {ax} invalid for parameter of shape {list(p.shape)}")
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.lr = self._lr_tensor(lr)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        # Step counts in float64: bias corrections are then computed in double precision,
        # as torch.optim.Adam does with Python floats.
        self.steps = [torch.zeros(self._step_shape(p, ax), dtype=torch.float64, device=p.device)
                      for p, ax in zip(self.params, self.latent_axes)]

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _step_shape(p: torch.Tensor, axis: int | None) -> list[int]:
        shape = [p.shape[0]] + [1] * (p.dim() - 1)
        if axis is not None:
            shape[axis] = p.shape[axis]
        return shape

    def _lr_tensor(self, lr: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
        dev = self.params[0].device
        t = torch.as_tensor(lr, dtype=torch.float64, device=dev).reshape(-1)
        if t.numel() == 1:
            t = t.expand(self.n_models).clone()
        if t.numel() != self.n_models:
            raise ValueError(f"StackedAdam: lr has {t.numel()} values for {self.n_models} members")
        return t

    # ------------------------------------------------------------------ API
    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, lr: float | torch.Tensor | None = None) -> None:
        """One Adam update of every parameter with a gradient; ``lr``: float or ``[S]`` (default: ``self.lr``)."""
        lr_t = self.lr if lr is None else self._lr_tensor(lr)
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not idx:
            return
        params = [self.params[i] for i in idx]
        grads = [self.params[i].grad for i in idx]
        m = [self.exp_avg[i] for i in idx]
        v = [self.exp_avg_sq[i] for i in idx]
        steps = [self.steps[i] for i in idx]
        # Moments: same-shape lists, so the fused multi-tensor kernels apply.
        torch._foreach_lerp_(m, grads, 1.0 - self.beta1)
        torch._foreach_mul_(v, self.beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - self.beta2)
        # Bias corrections per (member, latent), in double as torch.optim.Adam computes them:
        # bc1 = 1 - beta1^t, bc2_sqrt = sqrt(1 - beta2^t). Small tensors, one kernel per op for all.
        torch._foreach_add_(steps, 1.0)
        bc1 = list(torch._foreach_pow(self.beta1, steps))
        bc2 = list(torch._foreach_pow(self.beta2, steps))
        torch._foreach_neg_(bc1)
        torch._foreach_add_(bc1, 1.0)
        torch._foreach_neg_(bc2)
        torch._foreach_add_(bc2, 1.0)
        torch._foreach_sqrt_(bc2)
        denom = torch._foreach_sqrt(v)
        for j, p in enumerate(params):
            view = [-1] + [1] * (steps[j].dim() - 1)
            denom[j].div_(bc2[j].to(p.dtype))
            bc1[j] = (lr_t.view(view) / bc1[j]).to(p.dtype)  # step size lr / bc1
        torch._foreach_add_(denom, self.eps)
        upd = torch._foreach_div(m, denom)
        for j in range(len(params)):
            upd[j].mul_(bc1[j])
        torch._foreach_sub_(params, upd)

    @torch.no_grad()
    def reset_latents_(self, mask: torch.Tensor) -> None:
        """Restart Adam for latents ``mask [S, d_sae]`` (True = reset): zero moments, step 0.

        Only parameters with a latent axis are touched (e.g. W_enc columns, b_enc entries,
        W_dec rows); the others (b_dec) keep their state.
        """
        mask = mask.to(torch.bool)
        for p, ax, m, v, st in zip(self.params, self.latent_axes, self.exp_avg, self.exp_avg_sq, self.steps):
            if ax is None:
                continue
            if mask.shape != (p.shape[0], p.shape[ax]):
                raise ValueError(f"reset_latents_: mask shape {list(mask.shape)} != [S, latents] {[p.shape[0], p.shape[ax]]}")
            shape = [p.shape[0]] + [1] * (p.dim() - 1)
            shape[ax] = p.shape[ax]
            mk = mask.to(p.device).view(shape)
            m.masked_fill_(mk, 0.0)
            v.masked_fill_(mk, 0.0)
            st.masked_fill_(mk.view(st.shape), 0.0)

    def state_dict(self) -> dict[str, Any]:
        """Tensors only (safetensors-friendly): ``exp_avg.<i>``, ``exp_avg_sq.<i>``, ``step.<i>``, ``lr``."""
        out: dict[str, torch.Tensor] = {"lr": self.lr}
        for i in range(len(self.params)):
            out[f"exp_avg.{i}"] = self.exp_avg[i]
            out[f"exp_avg_sq.{i}"] = self.exp_avg_sq[i]
            out[f"step.{i}"] = self.steps[i]
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i in range(len(self.params)):
            for name, mine in (("exp_avg", self.exp_avg[i]), ("exp_avg_sq", self.exp_avg_sq[i]), ("step", self.steps[i])):
                key = f"{name}.{i}"
                if key not in state:
                    raise KeyError(f"optimizer state is missing {key!r}")
                if tuple(state[key].shape) != tuple(mine.shape):
                    raise ValueError(f"optimizer state {key!r} has shape {list(state[key].shape)}, expected {list(mine.shape)}")
                mine.copy_(state[key])
        if "lr" in state:
            self.lr = self._lr_tensor(state["lr"])
