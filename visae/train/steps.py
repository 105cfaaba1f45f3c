"""What the trainer does between epochs: validation through the inference path, and resampling of dead latents."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import numpy as np
import torch

from visae.optim import StackedAdam
from visae.shards import ShardView
from visae.train.config import TrainConfig, TrainError
from visae.train.data import _seed_int
from visae.train.state import _ev_or_none, _warn_undefined_ev

__all__ = ["evaluate", "resample_dead_latents"]


@torch.no_grad()  # validation only: no autograd graphs
def evaluate(sae: Any, view: ShardView, batch_size: int, l1_coeff: torch.Tensor, device: torch.device,
             amp: Any = None, dense_threshold: float = 0.1, aux_coeff: float = 0.0,
             dp: Any = None) -> list[dict[str, float | None]]:
    """Metrics of every member on ``view`` (one pass) through the INFERENCE path, as the saved SAE computes them.

    Codes are ``sae._activate(sae.preacts(x))`` on the inputs normalised as ``SAE.forward``
    normalises raw activations (so BatchTopK uses its running threshold, not the batch top-k of
    training): the logged validation L0 / EV equal those of the exported SAE on the same rows.
    Returns per member: ``mse`` (mean over examples and d_in, SAE space), ``l1`` (mean of
    sum_j f_j ||W_dec_j||), ``l0`` (mean active latents per example), ``loss`` (mse + lambda x the
    architecture's ``sparsity_metric``, also logged under its name; no aux-k term: it needs the trainer's dead mask),
    ``explained_variance`` (1 - SSE / SST over the whole view; None with a warning when SST = 0,
    e.g. a 1-row split), ``dead_fraction`` (never fired on it), ``dense_fraction`` (fires on more
    than ``dense_threshold`` of it), ``examples``. ``aux_coeff`` is accepted for compatibility.
    ``dp`` (:class:`visae.train.dist.DataParallel`): rank r scores batches j = r mod W and the sums are
    all-reduced, so every rank returns the metrics of the whole view.
    """
    S, d_sae = sae.n_models, sae.d_sae
    n = 0
    sums = torch.zeros(4, S, dtype=torch.float64, device=device)
    sse = torch.zeros(S, dtype=torch.float64, device=device)
    fire = torch.zeros(S, d_sae, dtype=torch.float64, device=device)
    sx = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    sxx = torch.zeros((), dtype=torch.float64, device=device)
    coeff = torch.as_tensor(l1_coeff, dtype=torch.float64, device=device).reshape(-1).expand(S)
    was_training = sae.training
    sae.eval()
    dec_norm = sae.W_dec.detach().norm(dim=-1).double()  # [S, d_sae]
    for j, b in enumerate(view.sequential_batches(batch_size)):
        if dp is not None and not dp.my_batches(j):
            continue
        x = torch.from_numpy(b.acts).to(device)
        B = x.shape[0]
        with amp or nullcontext():
            xs, _ = sae.normalize_input(x.to(sae.W_enc.dtype))  # SAE.forward's input path
            f = sae._activate(sae.preacts(xs))  # [S, B, d_sae] inference codes
            x_hat = sae._decode_sae(f)
        xs = xs.double()
        f = f.double()
        sq = (x_hat.double() - xs).square().sum(-1)  # [S, B]
        l0 = (f > 0).sum(-1).double().sum(-1)  # [S]
        l1 = (f.sum(1) * dec_norm).sum(-1)  # [S]
        sums += torch.stack([sq.sum(-1) / sae.d_in, l1, l0, sae.sparsity_metric_value(f)])
        sse += sq.sum(-1)
        fire += (f > 0).sum(dim=1).double()
        sx += xs.sum(0)
        sxx += xs.square().sum()
        n += B
    sae.train(was_training)
    n = _summed(dp, [sums, sse, fire, sx, sxx], n)
    if n == 0:
        return [{} for _ in range(S)]
    means = (sums / n).cpu()
    freq = fire / n
    dead_frac = (freq == 0).double().mean(-1).cpu().tolist()
    dense_frac = (freq > dense_threshold).double().mean(-1).cpu().tolist()
    ev = _ev_or_none(sse.cpu(), sx.cpu(), sxx.cpu(), n, sae.d_in)
    if ev[0] is None:
        _warn_undefined_ev(f"validation split ({n} examples)", n)
    out = []
    name = sae.sparsity_metric
    for s in range(S):
        mse, l1, l0, sp = (float(v) for v in means[:, s])
        rec = {"mse": mse, "l1": l1, "l0": l0, "loss": mse + float(coeff[s]) * sp, "explained_variance": ev[s],
               "dead_fraction": dead_frac[s], "dense_fraction": dense_frac[s], "examples": n}
        if name is not None and name not in rec:  # an architecture's own sparsity metric
            rec[name] = sp
        out.append(rec)
    return out


@torch.no_grad()
def resample_dead_latents(sae: Any, opt: StackedAdam, dead: torch.Tensor, view: ShardView, cfg: TrainConfig,
                          tag: int, batch_size: int, member_keys: Sequence[int] | None = None,
                          dp: Any = None) -> torch.Tensor:
    """Anthropic resampling of ``dead [S, d_sae]`` latents; returns the number resampled per member [S] (CPU).

    Scores a seeded subset of ``view`` with the current SAE; each dead latent gets as decoder row a
    unit-normalised input drawn with probability proportional to loss^2, the square of the
    input's squared reconstruction error ``loss = ||x - x_hat||^2`` (Anthropic, "Towards
    Monosemanticity" (2023), appendix "Neuron Resampling"; the resampler Discover-then-Name
    uses), per member, as encoder column that input times ``resample_encoder_scale`` times the
    mean norm of the member's alive encoder columns, a zero encoder bias, and fresh Adam state.
    Member s draws from its own generator seeded by ``(cfg.seed, tag, member_keys[s])``
    (:func:`member_key`; default: the member index), so its draws do not depend on the other members.
    ``dp`` (:class:`visae.train.dist.DataParallel`): rank r scores the batches j = r mod W of the same
    subset (the same batches as one process, so each error is bit-identical), the errors are
    all-reduced (the other ranks contribute exact zeros) and every rank draws from the same
    generators: the rows resampled are identical on every rank and equal one process's.
    """
    dead = dead.to(sae.W_enc.device)
    n_dead = dead.sum(-1).cpu()
    if int(n_dead.sum()) == 0:
        return n_dead
    S = sae.n_models
    dev = sae.W_enc.device
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, tag, 0x2E5A]))
    n = min(cfg.resample_examples, len(view))
    pos = np.sort(rng.choice(len(view), size=n, replace=False))
    sub = ShardView(view.shards, view.index[pos])
    errs = []
    spans = []  # (start, end) columns of each scored batch
    was_training = sae.training
    kernel_state = sae.kernel_state()  # scoring must not change the training kernels' choice
    sae.eval()  # scoring must not move running statistics (e.g. BatchTopK's threshold)
    at = 0
    for j, b in enumerate(sub.sequential_batches(batch_size)):
        spans.append((at, at + b.acts.shape[0]))
        at += b.acts.shape[0]
        if dp is None or dp.my_batches(j):
            out = sae.training_loss(torch.from_numpy(b.acts).to(dev), 0.0)
            errs.append(out.sq_err.float().cpu())
    sae.train(was_training)
    sae.load_kernel_state(kernel_state)
    sq_err = _gathered(errs, spans, S, dp).clamp_min(0)  # [S, n], positions in `pos` order
    keys = list(member_keys) if member_keys is not None else list(range(S))
    if len(keys) != S:
        raise TrainError(f"resample_dead_latents: {S} members need {S} member_keys, got {len(keys)}")
    for s in range(S):
        idx = torch.nonzero(dead[s]).flatten()
        m = idx.numel()
        if m == 0:
            continue
        gen = torch.Generator().manual_seed(_seed_int(cfg.seed, tag, 0x51E, keys[s]))
        p = sq_err[s].double().square()  # loss^2, loss = per-input squared error
        if not torch.isfinite(p).all() or p.sum() <= 0:
            p = torch.ones_like(p)
        replace = m > int((p > 0).sum())
        choice = torch.multinomial(p, m, replacement=replace, generator=gen).numpy()
        x = torch.from_numpy(sub.read(choice)).to(dev, torch.float32) * sae.cfg.scale_factor
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        alive = ~dead[s]
        enc_norm = sae.W_enc[s].norm(dim=0)  # [d_sae] column norms
        scale = enc_norm[alive].mean() if bool(alive.any()) else torch.tensor(1.0, device=dev)
        sae.W_dec[s, idx, :] = x.to(sae.W_dec.dtype)
        sae.W_enc[s, :, idx] = (x * (cfg.resample_encoder_scale * scale)).T.to(sae.W_enc.dtype)
        sae.b_enc[s, idx] = 0.0
    sae.reset_latents_(dead)  # the architecture's extras (e.g. a learned threshold) of those latents
    opt.reset_latents_(dead)
    return n_dead


def _summed(dp: Any, sums: list[torch.Tensor], n: int) -> int:
    """Data-parallel: all-reduce ``sums`` in place and return the total count (``n`` with one process)."""
    if dp is None or not dp.active:
        return n
    n_t = torch.tensor([float(n)], dtype=torch.float64, device=sums[0].device)
    dp.sum_(sums + [n_t])
    return int(n_t.item())


def _gathered(errs: list[torch.Tensor], spans: list[tuple[int, int]], S: int, dp: Any) -> torch.Tensor:
    """The scored errors [S, n] of every batch: this process's ``errs`` (one per batch, or per batch j = r mod W
    of rank r) placed at their ``spans`` and, data-parallel, summed over ranks (x + 0 = x exactly)."""
    if dp is None or not dp.active:
        return torch.cat(errs, dim=1)
    n = spans[-1][1] if spans else 0
    full = torch.zeros(S, n, dtype=torch.float32, device=dp.reduce_device)
    for e, j in zip(errs, range(dp.rank, len(spans), dp.world)):
        full[:, spans[j][0]:spans[j][1]] = e.to(full.device)
    dp.sum_([full])
    return full.cpu()
