"""Concept bottleneck classifier (CBM) over named SAE concepts: a sparse linear model whose decisions are short
lists of named concepts, with explanations and interventions.

Discover-then-Name (Rao et al. 2024, section 3.3) trains a sparse linear probe on the SAE's concept
activations; visae does the same with a solver of its own in torch:

* **Features** ``z [N, L]``: the SAE's codes (``sae.encode`` on the raw activations) of the labelled
  shard sets, restricted to the named latents of ``concepts.json`` (``--latents named``) or all latents,
  each divided by its standard deviation on the training split (``scale [L]``) so one penalty fits all.
* **Model**: multinomial logistic regression ``logits = z W^T + b``, ``W [C, L]``, penalised by
  ``lam * (alpha * |W|_1 + (1 - alpha) / 2 * |W|_2^2)`` (``alpha = 1``: lasso; else elastic net), the bias
  unpenalised. Solved full batch by FISTA (Beck & Teboulle 2009): a gradient step on the mean cross
  entropy (step 1 / Lipschitz, Lipschitz = 0.5 * sigma_max(z)^2 / N + the L2 part) then soft-thresholding.
* **Path**: lam from ``lam_max`` (the smallest value at which W = 0) down a geometric grid with warm
  starts; the model kept is the one with the most concepts per class (non-zero weights per row of W,
  averaged over classes) not above ``target_concepts_per_class``, refined by bisection between the two
  bracketing grid points.
* **Refit** (``refit``, on by default): the relaxed lasso (Meinshausen 2007, "Relaxed Lasso", section 2; the
  "debiasing" step of sparse probing): the path only chooses which concepts each class uses; the weights on that
  support are then fitted again with a small L2 penalty (``refit_l2``) and no L1, so that the L1 shrinkage of the
  strongly penalised path point does not cost accuracy. Same support, same concepts per class.
* **Baselines** on the same splits: a linear probe on the clean embeddings (L-BFGS, small L2) and the
  backbone's zero-shot accuracy when the shard set holds a CLIP's final embedding.
* **Explanations**: per class the concepts with non-zero weight, by |weight|; per example the concepts
  whose contributions ``w_c,j * z_j`` to the predicted class are largest. **Interventions**: remove a
  concept (its activation set to 0) or clamp it to a value, and predict again.

Output directory (docs/cbm.md): ``cbm.json`` (config, metrics, classes with their concepts, the path),
``cbm.safetensors`` (``W``, ``b``, ``latents``, ``scale``), ``examples.jsonl`` (per validation example:
label, prediction and the deciding concepts).

    visae cbm --sae runs/best --concepts runs/concepts --train_shards runs/train --val_shards runs/val --out runs/cbm
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from visae.errors import VisaeError
from visae.shards import ShardError, ShardSet

__all__ = ["CBMConfig", "CBMError", "ConceptBottleneck", "fit_sparse_logistic", "refit_on_support", "fit_cbm_path", "linear_probe",
           "concept_features", "train_cbm", "load_cbm", "top_weights_name_the_class", "intervention_effects", "main"]

log = logging.getLogger(__name__)

CBM_FORMAT = "visae.cbm"
CBM_VERSION = 1


class CBMError(VisaeError, ValueError):
    """Bad CBM input (missing SAE / names / labels, shapes that do not fit) or an unreadable CBM directory."""


@dataclass(frozen=True)
class CBMConfig:
    """Train a sparse concept bottleneck classifier on an SAE's named concepts and compare it with a linear probe
    and zero-shot."""

    sae: str = field(default="", metadata={"help": "SAE directory (cfg.json + weights.safetensors)"})
    member: int = field(default=0, metadata={"help": "member of a stacked SAE"})
    concepts: str = field(default="", metadata={"help": "naming result (concepts.json or its directory); required "
                                                        "for --latents named and for concept names"})
    train_shards: str = field(default="", metadata={"help": "labelled shard set the classifier is trained on"})
    val_shards: str = field(default="", metadata={"help": "labelled shard set it is scored on"})
    label_column: str = field(default="label", metadata={"help": "metadata column with the class index (-1 = "
                                                                 "unlabelled, skipped)"})
    latents: Literal["named", "all"] = field(default="named", metadata={"help": "concepts the classifier may use: "
                                                                                "the named latents, or all"})
    target_concepts_per_class: float = field(default=5.0, metadata={
        "help": "the path stops at the most concepts per class (non-zero weights, averaged over classes) not above this"})
    alpha: float = field(default=1.0, metadata={"help": "penalty mix: 1 = L1 (lasso), < 1 = elastic net "
                                                        "(alpha L1 + (1 - alpha)/2 L2)"})
    nonneg: bool = field(default=False, metadata={"help": "constrain the weights to >= 0 (a concept can only vote "
                                                          "for a class)"})
    n_lambdas: int = field(default=16, metadata={"help": "geometric grid of the path, lam_max down to lam_max * 1e-3"})
    bisect_steps: int = field(default=6, metadata={"help": "bisection steps between the two grid points around the "
                                                           "target"})
    max_iter: int = field(default=100, metadata={
        "help": "FISTA iterations per path point (300 gave the same model as 100 on world2, BENCHMARKS.md, at 3x the "
                "time)"})
    tol: float = field(default=1e-5, metadata={"help": "stop a path point when the largest weight change is below "
                                                       "this (standardised units)"})
    probe_l2: float = field(default=1e-4, metadata={"help": "L2 weight of the clean linear probe (mean cross entropy "
                                                            "+ probe_l2/2 |W|^2)"})
    refit: bool = field(default=True, metadata={"help": "relaxed lasso: refit the weights on the concepts the path "
                                                        "chose, L2 penalty refit_l2 and no L1 (same support)"})
    refit_l2: float = field(default=1e-4, metadata={"help": "L2 weight of the refit (mean cross entropy + "
                                                            "refit_l2/2 |W|^2 on standardised concepts)"})
    refit_iter: int = field(default=300, metadata={"help": "FISTA iterations of the refit"})
    zero_shot: bool = field(default=True, metadata={"help": "also score the backbone's zero-shot classifier (needs "
                                                            "a CLIP's final embedding in the shards)"})
    benchmark: str = field(default="auto", metadata={"help": "zero-shot benchmark (visae zeroshot --benchmark)"})
    text_cache: Optional[str] = field(default=None, metadata={"help": "text-embedding cache directory (default: "
                                                                      "visae's)"})
    n_explain: int = field(default=200, metadata={"help": "validation examples explained in examples.jsonl"})
    top_concepts: int = field(default=5, metadata={"help": "concepts listed per example explanation"})
    batch_size: int = field(default=4096, metadata={"help": "shard rows per SAE forward pass"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    out: str = field(default="runs/cbm", metadata={"help": "output directory"})
    progress: bool = field(default=True, metadata={"help": "a progress bar (stderr) over the path's points; "
                                                          "--no_progress: none"})

    def __post_init__(self) -> None:
        from visae.devices import check_device

        check_device(self.device, "CBMConfig.device")
        if not 0.0 < self.alpha <= 1.0:
            raise CBMError(f"CBMConfig.alpha must be in (0, 1], got {self.alpha}")
        if not (self.target_concepts_per_class > 0 and math.isfinite(self.target_concepts_per_class)):
            raise CBMError(f"CBMConfig.target_concepts_per_class must be positive and finite, got {self.target_concepts_per_class}")
        if int(self.n_lambdas) < 2:  # one point is lam_max, where every weight is 0: a classifier by bias alone
            raise CBMError(f"CBMConfig.n_lambdas must be >= 2 (the first point, lam_max, uses no concept), got "
                           f"{self.n_lambdas}")
        for name in ("max_iter", "batch_size", "refit_iter"):
            if int(getattr(self, name)) < 1:
                raise CBMError(f"CBMConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("bisect_steps", "n_explain", "top_concepts", "member"):
            if int(getattr(self, name)) < 0:
                raise CBMError(f"CBMConfig.{name} must be >= 0, got {getattr(self, name)}")
        from visae.config import check_bounds

        # a negative tol acted as 0 (every path point ran max_iter), a negative probe_l2 rewarded large weights
        check_bounds(self, {"tol": (0.0, None), "probe_l2": (0.0, None), "refit_l2": (0.0, None)})


# ----------------------------------------------------------------------------- the solver


def _lipschitz(z: Tensor, iters: int = 50, mu: Tensor | None = None) -> float:
    """0.5 * sigma_max(z - mu)^2 / N: a Lipschitz constant of the mean softmax cross entropy's gradient in W
    (``mu`` [L]: the column means the solver centres the features by; None: no centring). Power iteration."""
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(z.shape[1], 1, generator=g).to(z)
    m = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device) if mu is None else mu

    def zc(u: Tensor) -> Tensor:  # (z - 1 mu^T) u
        return z @ u - m @ u

    for _ in range(iters):
        w = zc(v)
        v = z.T @ w - m[:, None] * w.sum(0)
        v = v / v.norm().clamp_min(1e-30)
    s2 = float(zc(v).pow(2).sum())
    return 0.5 * s2 / z.shape[0] + 1e-12


class _Design:
    """The feature matrix z [N, L] and its transpose, as sparse CSR when SAE codes are sparse (most are 0):
    the two products per iteration then cost O(nnz * C) instead of O(N * L * C).

    ``mu`` [L]: the products are those of the centred matrix z - 1 mu^T, computed without forming it (so a
    sparse z stays sparse). Centring does not change the lasso's W (the unpenalised bias absorbs mu W^T) but
    lowers the Lipschitz constant (SAE codes are >= 0: their mean direction dominates sigma_max(z)), so the
    same FISTA step count gets closer to the optimum (glmnet centres its features likewise)."""

    def __init__(self, z: Tensor, max_density: float = 0.05, mu: Tensor | None = None):
        self.shape = z.shape
        self.dense = z
        self.mu = mu
        self.sparse = z.numel() > 0 and float((z != 0).float().mean()) < max_density
        if self.sparse:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                self.z = z.to_sparse_csr()
                self.zt = z.T.contiguous().to_sparse_csr()

    def mm(self, w_t: Tensor) -> Tensor:
        """(z - 1 mu^T) @ w_t: [N, L] x [L, C] -> [N, C]."""
        out = self.z @ w_t if self.sparse else self.dense @ w_t
        return out if self.mu is None else out - self.mu @ w_t

    def tmm(self, p: Tensor) -> Tensor:
        """(z - 1 mu^T)^T @ p: [L, N] x [N, C] -> [L, C]."""
        out = self.zt @ p if self.sparse else self.dense.T @ p
        return out if self.mu is None else out - self.mu[:, None] * p.sum(0)


def _ce_grad(z: "_Design", y: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross entropy and its gradients (dW [C, L], db [C])."""
    logits = z.mm(W.T.contiguous()) + b
    p = torch.softmax(logits, dim=1)
    loss = torch.nn.functional.cross_entropy(logits, y)
    p[torch.arange(len(y)), y] -= 1.0
    p /= len(y)
    return loss, z.tmm(p).T, p.sum(0)


def fit_sparse_logistic(z: Tensor, y: Tensor, n_classes: int, lam: float, *, alpha: float = 1.0,
                        W0: Tensor | None = None, b0: Tensor | None = None, max_iter: int = 300, tol: float = 1e-5,
                        lipschitz: float | None = None, nonneg: bool = False,
                        support: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """Multinomial logistic regression with an elastic-net penalty, by FISTA (Beck & Teboulle 2009, section 4).

    z [N, L] features, y [N] int64 in [0, n_classes), lam >= 0, alpha in [0, 1] (0: L2 only); minimises
    mean CE(z W^T + b, y) + lam * (alpha |W|_1 + (1 - alpha)/2 |W|_2^2), with ``nonneg`` subject to W >= 0
    (a concept can only vote for a class) and, when ``support`` [C, L] (bool) is given, to W = 0 outside it
    (projected steps: the relaxed lasso's refit, ``refit_on_support``). Returns (W [C, L], b [C], iterations).
    Warm start from (W0, b0). Raises CBMError on shapes that do not fit.

    The iterations run on the centred features z - mean(z) (same W at the optimum, the bias shifted by
    mean(z) W^T; a smaller Lipschitz constant, see ``_Design``); ``lipschitz``, when given, must be that of the
    centred features (``_lipschitz(z, mu=z.mean(0))``). W and b returned are for the features as given.
    """
    if z.ndim != 2 or y.ndim != 1 or len(y) != len(z):
        raise CBMError(f"fit_sparse_logistic: z must be [N, L] and y [N], got {list(z.shape)} and {list(y.shape)}")
    C, L = n_classes, z.shape[1]
    if support is not None and tuple(support.shape) != (C, L):
        raise CBMError(f"fit_sparse_logistic: support must be [{C}, {L}], got {list(support.shape)}")
    keep = None if support is None else support.to(z.dtype)
    mu = z.mean(0)
    zd = _Design(z, mu=mu)
    W = torch.zeros(C, L, dtype=z.dtype, device=z.device) if W0 is None else W0.clone()
    b = torch.zeros(C, dtype=z.dtype, device=z.device) if b0 is None else b0.clone()
    b = b + mu @ W.T  # the bias of the centred problem
    l2 = lam * (1.0 - alpha)
    lip = (lipschitz if lipschitz is not None else _lipschitz(z, mu=mu)) + l2
    lip_b = 0.5  # the bias: the softmax Hessian's largest eigenvalue is <= 1/2
    step, thr = 1.0 / max(lip, lip_b), lam * alpha / max(lip, lip_b)
    Wy, by, t = W.clone(), b.clone(), 1.0
    it = 0
    for it in range(1, max_iter + 1):
        _, gW, gb = _ce_grad(zd, y, Wy, by)
        if l2:
            gW = gW + l2 * Wy
        W_new = Wy - step * gW
        if nonneg:  # prox of L1 + the indicator of W >= 0
            W_new = torch.clamp(W_new - thr, min=0.0)
        else:  # soft threshold (prox of L1)
            W_new = torch.sign(W_new) * torch.clamp(W_new.abs() - thr, min=0.0)
        if keep is not None:
            W_new = W_new * keep
        b_new = by - step * gb
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        mom = (t - 1.0) / t_new
        Wy = W_new + mom * (W_new - W)
        by = b_new + mom * (b_new - b)
        delta = float((W_new - W).abs().max()) if W.numel() else 0.0
        W, b, t = W_new, b_new, t_new
        if delta < tol and it > 5:
            break
    return W, b - mu @ W.T, it


def refit_on_support(z: Tensor, y: Tensor, W: Tensor, b: Tensor, *, l2: float = 1e-4, max_iter: int = 300,
                     tol: float = 1e-5, nonneg: bool = False, lipschitz: float | None = None) -> tuple[Tensor, Tensor, int]:
    """The relaxed lasso's second step (Meinshausen 2007, section 2): refit W [C, L] and b [C] on the same features
    z [N, L] and labels y [N], keeping W's zero pattern (its support: each class's concepts) and replacing the L1
    penalty by ``l2``/2 |W|^2; warm-started from (W, b). Returns (W [C, L], b [C], iterations); W is zero wherever
    the given W is. ``lipschitz``: of the centred features, as in ``fit_sparse_logistic``."""
    return fit_sparse_logistic(z, y, W.shape[0], l2, alpha=0.0, W0=W, b0=b, max_iter=max_iter, tol=tol,
                               lipschitz=lipschitz, nonneg=nonneg, support=W != 0)


def _concepts_per_class(W: Tensor) -> float:
    return float((W != 0).sum(1).float().mean())


def _accuracy(z: Tensor, y: Tensor, W: Tensor, b: Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    return float(((z @ W.T + b).argmax(1) == y).float().mean())


def fit_cbm_path(z: Tensor, y: Tensor, n_classes: int, target: float, *, alpha: float = 1.0, n_lambdas: int = 16,
                 bisect_steps: int = 6, max_iter: int = 100, tol: float = 1e-5, z_val: Tensor | None = None,
                 y_val: Tensor | None = None, nonneg: bool = False, progress: bool = False) -> dict[str, Any]:
    """The regularisation path down to ``target`` concepts per class (see the module docstring).

    ``progress``: a tqdm bar (stderr) over the path points (at most ``n_lambdas + bisect_steps``) with the concepts
    per class reached. Returns {"W", "b", "lam", "concepts_per_class", "path": [{lam, concepts_per_class,
    train_top1, val_top1, iterations}, ...]}: the chosen model is the one with the most concepts per class <= target.
    """
    from tqdm.auto import tqdm

    C = n_classes
    b0 = torch.log(torch.bincount(y, minlength=C).to(z.dtype).clamp_min(1.0) / len(y))
    _, gW, _ = _ce_grad(_Design(z), y, torch.zeros(C, z.shape[1], dtype=z.dtype, device=z.device), b0)
    lam_max = float((-gW).clamp_min(0).max() if nonneg else gW.abs().max()) / alpha * (1.0 + 1e-6)
    lip = _lipschitz(z, mu=z.mean(0))  # of the centred features, as fit_sparse_logistic iterates on them
    path: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None

    def point(lam: float, W0: Tensor, bb0: Tensor) -> tuple[Tensor, Tensor, float]:
        nonlocal best
        W, b, it = fit_sparse_logistic(z, y, C, lam, alpha=alpha, W0=W0, b0=bb0, max_iter=max_iter, tol=tol,
                                       lipschitz=lip, nonneg=nonneg)
        cpc = _concepts_per_class(W)
        rec = {"lam": lam, "concepts_per_class": cpc, "train_top1": _accuracy(z, y, W, b), "iterations": it}
        if z_val is not None and y_val is not None:
            rec["val_top1"] = _accuracy(z_val, y_val, W, b)
        path.append(rec)
        bar.update(1)
        bar.set_postfix(concepts_per_class=f"{cpc:.2f}", target=target)
        if cpc <= target and (best is None or cpc > best["concepts_per_class"]
                              or (cpc == best["concepts_per_class"] and lam < best["lam"])):
            best = {"W": W, "b": b, "lam": lam, "concepts_per_class": cpc}
        return W, b, cpc

    W, b = torch.zeros(C, z.shape[1], dtype=z.dtype, device=z.device), b0
    lams = lam_max * np.geomspace(1.0, 1e-3, n_lambdas)
    lo = hi = None  # lam above the target (sparser) / below it (denser)
    W_lo, b_lo = W, b
    bar = tqdm(total=n_lambdas + bisect_steps, desc="cbm path", unit="point", disable=not progress, leave=False)
    for lam in lams:
        W, b, cpc = point(float(lam), W, b)
        if cpc <= target:
            lo, W_lo, b_lo = float(lam), W, b
        else:
            hi = float(lam)
            break
    if lo is not None and hi is not None:
        for _ in range(bisect_steps):
            mid = math.sqrt(lo * hi)
            Wm, bm, cpc = point(mid, W_lo, b_lo)
            if cpc <= target:
                lo, W_lo, b_lo = mid, Wm, bm
            else:
                hi = mid
    bar.total = bar.n  # the path stops when it has crossed the target: done, not "11 of 22"
    bar.refresh()
    bar.close()
    assert best is not None  # lam_max gives W = 0, 0 concepts per class <= target
    best["path"] = sorted(path, key=lambda r: -r["lam"])
    return best


def linear_probe(x: Tensor, y: Tensor, n_classes: int, l2: float = 1e-4, max_iter: int = 200) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression on clean embeddings x [N, D] by L-BFGS: mean CE + l2/2 |W|^2 -> (W [C, D], b [C])."""
    W = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ W.T + b, y) + 0.5 * l2 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


# ----------------------------------------------------------------------------- the model


@dataclass
class ConceptBottleneck:
    """A trained CBM. W [C, L] on standardised concepts, b [C], latents [L] (SAE latent ids), scale [L]
    (train std of each concept's activation), names [L] and classnames [C]."""

    W: Tensor
    b: Tensor
    latents: Tensor
    scale: Tensor
    names: list[str]
    classnames: list[str]

    def features(self, codes: Tensor) -> Tensor:
        """SAE codes [N, d_sae] -> standardised concept activations [N, L]."""
        return codes[:, self.latents] / self.scale

    def _column(self, latent: int) -> int:
        hits = (self.latents == int(latent)).nonzero()
        if hits.numel() == 0:
            raise CBMError(f"latent {latent} is not one of the CBM's {len(self.latents)} concepts")
        return int(hits[0, 0])

    def latents_named(self, name: str) -> list[int]:
        """The SAE latent ids of every concept of the CBM named ``name`` (names are not unique: several latents of
        an SAE can get one word). ``remove=model.latents_named("red")`` removes the concept "red" whole; ``remove=
        [latent]`` removes one latent, one row of a class page. Raises CBMError when no concept has that name."""
        out = [int(self.latents[j]) for j, nm in enumerate(self.names) if nm == name]
        if not out:
            raise CBMError(f"no concept of the CBM is named {name!r}")
        return out

    def logits(self, codes: Tensor, remove: Sequence[int] = (), clamp: Mapping[int, float] | None = None) -> Tensor:
        """Class logits [N, C] from SAE codes [N, d_sae]; ``remove``: latents whose activation is set to 0;
        ``clamp``: {latent: activation in SAE code units} set for every example (interventions)."""
        z = codes[:, self.latents].clone()
        for j in remove:
            z[:, self._column(j)] = 0.0
        for j, v in (clamp or {}).items():
            z[:, self._column(j)] = float(v)
        return (z / self.scale) @ self.W.T + self.b

    def predict(self, codes: Tensor, remove: Sequence[int] = (), clamp: Mapping[int, float] | None = None) -> Tensor:
        """Predicted class [N] (see ``logits``)."""
        return self.logits(codes, remove, clamp).argmax(1)

    def class_concepts(self, c: int) -> list[dict[str, Any]]:
        """Class c's concepts with non-zero weight, largest |weight| first: [{latent, name, weight}]."""
        w = self.W[c]
        nz = (w != 0).nonzero()[:, 0]
        order = nz[w[nz].abs().argsort(descending=True)]
        return [{"latent": int(self.latents[j]), "name": self.names[j], "weight": float(w[j])} for j in order]

    def explain(self, codes: Tensor, top: int = 5) -> list[dict[str, Any]]:
        """Per example [N]: the predicted class and the ``top`` concepts of largest contribution w_{pred,j} z_j."""
        z = self.features(codes)
        logits = z @ self.W.T + self.b
        pred = logits.argmax(1)
        contrib = z * self.W[pred]  # [N, L]
        out = []
        for i in range(len(z)):
            c = contrib[i]
            nz = (c != 0).nonzero()[:, 0]
            order = nz[c[nz].abs().argsort(descending=True)][:top]
            out.append({"pred": int(pred[i]), "pred_name": self.classnames[int(pred[i])],
                        "concepts": [{"latent": int(self.latents[j]), "name": self.names[j],
                                      "contribution": float(c[j])} for j in order]})
        return out

    def save(self, path: str | Path, doc: dict[str, Any], files: dict[str, bytes] | None = None) -> Path:
        """Write ``cbm.safetensors``, then each of ``files`` (name -> bytes, e.g. ``examples.jsonl``), then
        ``cbm.json`` (``doc`` + names), each atomically. ``cbm.json`` is the commit: it records every other file's
        SHA-256 (``files``), so a run killed before it leaves files that :func:`load_cbm` refuses beside the
        earlier ``cbm.json`` rather than mixing two runs."""
        from visae.atomic import atomic_write_bytes, atomic_write_text
        from visae.integrity import safetensors_bytes, sha256_bytes

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"W": self.W.float().contiguous().cpu(), "b": self.b.float().contiguous().cpu(),
                   "latents": self.latents.long().contiguous().cpu(), "scale": self.scale.float().contiguous().cpu()}
        written = {"cbm.safetensors": safetensors_bytes(tensors, {"format": CBM_FORMAT}), **(files or {})}
        for name, data in written.items():
            atomic_write_bytes(path / name, data)
        full = {"format": CBM_FORMAT, "version": CBM_VERSION, **doc, "concept_names": self.names,
                "classnames": self.classnames, "files": {k: sha256_bytes(v) for k, v in written.items()}}
        atomic_write_text(path / "cbm.json", json.dumps(full, indent=1, default=_json_default))
        return path


def top_weights_name_the_class(model: ConceptBottleneck, class_values: Callable[[str], Sequence[tuple[str, str]]],
                               matches: Callable[[str, str, str], bool], k: int = 2) -> list[dict[str, Any]]:
    """Per class: are its ``k`` largest-|weight| concepts named by the words of the factor values that define it?

    ``class_values(classname)`` gives the (factor, value) pairs the class is defined by (world2's ``family_shape``
    class "red circle": ``[("colour_family", "red"), ("shape", "circle")]``); ``matches(name, factor, value)`` is the
    world's naming truth (``visae.world2.name_matches``). A class passes when it has at least ``k`` concepts and every
    one of its values is named by one of its top ``k`` concepts (the issue 14 criterion with k = 2: the two largest
    weights on latents named by the class's colour and shape words). Returns, per class [C], ``{class, name,
    top: [k names], named: {factor: bool}, ok}``."""
    out = []
    for c, cname in enumerate(model.classnames):
        top = [x["name"] for x in model.class_concepts(c)[:k]]
        named = {f: any(matches(nm, f, v) for nm in top) for f, v in class_values(cname)}
        out.append({"class": c, "name": cname, "top": top, "named": named,
                    "ok": len(top) == k and all(named.values())})
    return out


def intervention_effects(model: ConceptBottleneck, codes: Tensor, y: Tensor, n_remove: int = 1) -> list[dict[str, Any]]:
    """Per class c: remove c's ``n_remove`` top concepts (the latents of largest |weight| in row c, the first rows of
    its class page) from every example and predict again (issue 14's intervention test).

    ``codes`` [N, d_sae]: SAE codes of labelled examples, ``y`` [N] int64 class indices. Accuracies are exact
    fractions of image counts (``fractions.Fraction``, compared with thresholds without rounding). Returns, per class
    with at least one example and one concept, ``{class, name, concepts: [names removed], latents, users: classes
    using any removed latent (c included), own: change of c's accuracy, other_max: largest |change| of a class not
    using them (with examples), other_pooled: change of the accuracy of those classes' examples pooled, n: c's
    examples}``. Raises CBMError when ``codes`` and ``y`` differ in length."""
    from fractions import Fraction

    if codes.ndim != 2 or y.ndim != 1 or len(codes) != len(y):
        raise CBMError(f"intervention_effects: codes must be [N, d_sae] and y [N], got {list(codes.shape)} and "
                       f"{list(y.shape)}")
    C = len(model.classnames)
    counts = torch.bincount(y, minlength=C)
    base_ok = model.predict(codes) == y
    per_class = [set(int(x["latent"]) for x in model.class_concepts(k)) for k in range(C)]

    def acc(ok: Tensor, k: int) -> Fraction:
        return Fraction(int(ok[y == k].sum()), int(counts[k]))

    out = []
    for c in range(C):
        concepts = model.class_concepts(c)[:n_remove]
        if not concepts or int(counts[c]) == 0:
            continue
        removed = [int(x["latent"]) for x in concepts]
        after_ok = model.predict(codes, remove=removed) == y
        users = {k for k in range(C) if per_class[k] & set(removed)}
        others = [k for k in range(C) if k not in users and int(counts[k]) > 0]
        mask = torch.isin(y, torch.tensor(others, dtype=y.dtype))
        pooled = Fraction(int(after_ok[mask].sum()) - int(base_ok[mask].sum()), max(int(mask.sum()), 1))
        worst = max((abs(acc(after_ok, k) - acc(base_ok, k)) for k in others), default=Fraction(0))
        out.append({"class": c, "name": model.classnames[c], "concepts": [x["name"] for x in concepts],
                    "latents": removed, "users": len(users), "own": acc(after_ok, c) - acc(base_ok, c),
                    "other_max": worst, "other_pooled": pooled, "n": int(counts[c])})
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def load_cbm(path: str | Path) -> tuple[ConceptBottleneck, dict[str, Any]]:
    """Read a CBM directory written by :func:`train_cbm` -> (model, cbm.json).

    Raises CBMError naming the file when it is not a CBM directory, cbm.json is not valid JSON or not a CBM's, a
    file it records (``files``: cbm.safetensors, examples.jsonl; the explanations may be deleted) is missing or has
    another SHA-256 (a ``visae cbm``
    killed before it committed cbm.json, or a file copied from another run), or cbm.safetensors cannot be read or
    lacks a tensor. A cbm.json without ``files`` (written before 2026-12-02) is read without that check."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from visae.integrity import sha256_file

    path = Path(path)
    j, w = path / "cbm.json", path / "cbm.safetensors"
    if not j.is_file() or not w.is_file():
        raise CBMError(f"{path} is not a CBM directory (expected cbm.json + cbm.safetensors)")
    try:
        doc = json.loads(j.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CBMError(f"{j} is not valid JSON ({e}): a damaged file; rerun visae cbm") from None
    if not isinstance(doc, dict) or doc.get("format") != CBM_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CBMError(f"{j}: field 'format' is {got!r}, expected {CBM_FORMAT!r}")
    files = doc.get("files") or {}
    if not isinstance(files, dict):
        raise CBMError(f"{j}: field 'files' is {type(files).__name__}, expected {{name: sha256}}")
    for name, digest in files.items():
        f = path / name
        if name == "examples.jsonl" and not f.exists():  # explanations only, deleted on purpose: the model stands
            continue
        if not f.is_file() or sha256_file(f) != digest:
            why = "is missing" if not f.is_file() else "does not belong to it (its SHA-256 differs from the one recorded)"
            raise CBMError(f"{f} {why}: {j} records it; a visae cbm killed before it finished, or a file from "
                           "another run; rerun visae cbm")
    try:
        t = load_file(str(w))
        model = ConceptBottleneck(W=t["W"], b=t["b"], latents=t["latents"], scale=t["scale"],
                                  names=list(doc["concept_names"]), classnames=list(doc["classnames"]))
    except (SafetensorError, OSError) as e:
        raise CBMError(f"{w} cannot be read ({e}): a damaged file; rerun visae cbm") from None
    except KeyError as e:
        raise CBMError(f"{path}: no {e} in cbm.safetensors / cbm.json: not a CBM visae wrote") from None
    return model, doc


# ----------------------------------------------------------------------------- data


def concept_features(sae: Any, shards: ShardSet, label_column: str, *, member: int = 0, batch_size: int = 4096,
                     device: str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """(codes [N, d_sae] float32, labels [N] int64, clean unit embeddings [N, d]) of the labelled rows of ``shards``.

    Codes are ``sae.encode`` of the raw activations (stored unit rows times stored norms). Dense: memory
    N * (d_sae + d) * 4 bytes. Raises CBMError when the label column is missing or nothing is labelled.
    """
    from visae.recovery import collect_codes

    meta = shards.metadata()
    if label_column not in meta:
        raise CBMError(f"{shards.path}: no metadata column {label_column!r}; columns: {sorted(meta)}")
    labels = np.asarray(meta[label_column]).astype(np.int64)
    rows, cols, vals = collect_codes(sae, shards, member=member, batch_size=batch_size, device=device)
    keep = labels >= 0
    if not keep.any():
        raise CBMError(f"{shards.path}: column {label_column!r} has no labelled row (all -1)")
    codes = torch.zeros(len(shards), sae.d_sae)
    codes[torch.from_numpy(rows), torch.from_numpy(cols)] = torch.from_numpy(vals).float()
    x = torch.from_numpy(np.asarray(shards.read(np.arange(len(shards))), np.float32))
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    idx = torch.from_numpy(np.flatnonzero(keep))
    return codes[idx], torch.from_numpy(labels[keep]), x[idx]


def _classnames(train: ShardSet, column: str, n_classes: int, val: ShardSet | None = None) -> list[str]:
    names = train.label_names.get(column) or (val.label_names.get(column) if val is not None else None) or []
    if len(names) >= n_classes:
        return list(names)
    return [str(i) for i in range(n_classes)]


def _open(path: str, what: str) -> ShardSet:
    if not path:
        raise CBMError(f"--{what} is required: a labelled shard set")
    try:
        return ShardSet(path)
    except ShardError as e:
        raise CBMError(f"--{what} {path}: {e}") from None


def _zero_shot(cfg: CBMConfig, val: ShardSet) -> dict[str, Any]:
    from visae.zeroshot import ZeroShotError, classifier_for_shards, evaluate

    try:
        clf, column, facts = classifier_for_shards(val, benchmark=cfg.benchmark, label_column=cfg.label_column,
                                                   text_cache=cfg.text_cache, device=cfg.device)
        if column != cfg.label_column:
            return {"top1": None, "reason": f"the zero-shot benchmark labels column {column!r}, the CBM "
                                            f"{cfg.label_column!r}"}
        res = evaluate(val, clf, label_column=column, device=cfg.device)
        return {"top1": res["clean"]["top1"], "benchmark": facts.get("benchmark")}
    except (ZeroShotError, ValueError, OSError) as e:
        return {"top1": None, "reason": str(e)}


def train_cbm(cfg: CBMConfig, *, sae: Any = None) -> dict[str, Any]:
    """Train, score and write the CBM that ``cfg`` describes; returns the cbm.json dict (also in ``cfg.out``).

    Raises CBMError naming the field before any training: shard sets of other widths, an SAE of another d_in, names
    (``--concepts``) made for another SAE or member (:func:`visae.naming.check_concepts_sae`), a missing label column.
    Warns (UserWarning) when the training and validation shard sets are the same directory.
    """
    from visae.atomic import check_output_path
    from visae.config import absolute_paths, changed_settings
    from visae.naming import NamingError, check_concepts_sae, read_concepts, sae_weights_sha256
    from visae.sae import SAEFormatError, load_sae

    check_output_path(cfg.out, "visae cbm")  # found at the end, after every fit, it was too late
    train, val = _open(cfg.train_shards, "train_shards"), _open(cfg.val_shards, "val_shards")
    if train.d != val.d:
        raise CBMError(f"--train_shards has d={train.d}, --val_shards d={val.d}: not the same activations")
    rec = absolute_paths(dataclasses.asdict(cfg), ("sae", "concepts", "train_shards", "val_shards", "text_cache", "out"))
    replaced = changed_settings(Path(cfg.out) / "cbm.json", rec, ("batch_size", "device", "text_cache", "progress"))
    if Path(cfg.train_shards).resolve() == Path(cfg.val_shards).resolve():
        import warnings

        warnings.warn(f"--train_shards and --val_shards are the same shard set ({cfg.val_shards}): every top-1 this run "
                      "reports (CBM, linear probe, zero-shot) is measured on the examples the classifiers were fitted "
                      "to, not held out", UserWarning, stacklevel=2)
    if sae is None:
        if not cfg.sae:
            raise CBMError("--sae is required: an SAE directory")
        try:
            sae = load_sae(cfg.sae)
        except SAEFormatError as e:
            raise CBMError(f"--sae {cfg.sae}: {e}") from None
    if sae.d_in != train.d:
        raise CBMError(f"--sae has d_in={sae.d_in} but the shard sets have d={train.d}")
    from visae.zeroshot import sae_shards_mismatch

    for flag, ss in (("--train_shards", train), ("--val_shards", val)):
        diffs = sae_shards_mismatch(sae, ss)
        if diffs:  # same width, other activations (another layer or token): codes of rows the SAE never saw
            raise CBMError(f"--sae {cfg.sae} was not trained on the activations of {flag} {ss.path}: {'; '.join(diffs)}")
    names = [""] * sae.d_sae
    if cfg.concepts:
        try:
            doc = read_concepts(cfg.concepts)
            check_concepts_sae(doc, cfg.sae or None, cfg.member, f"--concepts {cfg.concepts}")
        except NamingError as e:  # its message names --concepts already when check_concepts_sae raised it
            raise CBMError(str(e) if str(e).startswith("--concepts") else f"--concepts {cfg.concepts}: {e}") from None
        if int(doc.get("num_concepts", sae.d_sae)) != sae.d_sae:
            raise CBMError(f"--concepts {cfg.concepts} names {doc.get('num_concepts')} latents, the SAE has {sae.d_sae}")
        for c in doc["concepts"]:
            names[int(c["latent"])] = c.get("name") or ""
    elif cfg.latents == "named":
        raise CBMError("--latents named needs --concepts (a naming result, concepts.json); or pass --latents all")
    for name, ss in (("train_shards", train), ("val_shards", val)):
        if cfg.label_column != "label" and cfg.label_column not in ss.manifest.get("columns", {}):
            raise CBMError(f"--{name} {ss.path}: no column {cfg.label_column!r}; columns: "
                           f"['label', {', '.join(map(repr, ss.manifest.get('columns', {})))}]")
    names_t, names_v = (ss.label_names.get(cfg.label_column) or [] for ss in (train, val))
    if names_t and names_v and list(names_t) != list(names_v):  # label i would be one class in train, another in val
        bad = next((i for i, (a, b) in enumerate(zip(names_t, names_v)) if a != b), min(len(names_t), len(names_v)))
        raise CBMError(f"--train_shards and --val_shards name their {cfg.label_column!r} labels otherwise (manifest "
                       f"label_names: {len(names_t)} vs {len(names_v)} classes; label {bad} is "
                       f"{names_t[bad] if bad < len(names_t) else None!r} vs {names_v[bad] if bad < len(names_v) else None!r})")
    if bool(names_t) != bool(names_v):
        import warnings

        warnings.warn(f"only the {'training' if names_t else 'validation'} set names its {cfg.label_column!r} labels "
                      "(manifest label_names); the class indices of the two sets are taken to mean the same classes",
                      UserWarning, stacklevel=2)

    sae.eval()
    meta = train.metadata()
    if cfg.label_column in meta:  # before the codes are computed: a one-class split trains no classifier
        lab = np.asarray(meta[cfg.label_column])
        present = np.unique(lab[lab >= 0])
        if present.size < 2:
            raise CBMError(f"--train_shards {train.path}: column {cfg.label_column!r} holds {present.size} class(es) "
                           "among its labelled rows; a classifier needs at least 2 (another --label_column, or "
                           "training shards with more classes)")
    codes_t, y_t, x_t = concept_features(sae, train, cfg.label_column, member=cfg.member, batch_size=cfg.batch_size,
                                         device=cfg.device)
    codes_v, y_v, x_v = concept_features(sae, val, cfg.label_column, member=cfg.member, batch_size=cfg.batch_size,
                                         device=cfg.device)
    C = int(max(y_t.max(), y_v.max())) + 1
    classnames = _classnames(train, cfg.label_column, C, val)
    if cfg.latents == "named":
        cand = [j for j in range(sae.d_sae) if names[j]]
    else:
        cand = list(range(sae.d_sae))
    std = codes_t[:, cand].std(0) if cand else torch.zeros(0)
    latents = torch.tensor([j for j, s in zip(cand, std.tolist()) if s > 0], dtype=torch.long)
    if latents.numel() == 0:
        raise CBMError(f"no {'named ' if cfg.latents == 'named' else ''}latent fires on the training shards: "
                       "nothing to build a concept bottleneck from")
    scale = codes_t[:, latents].std(0)
    z_t, z_v = codes_t[:, latents] / scale, codes_v[:, latents] / scale

    fit = fit_cbm_path(z_t, y_t, C, cfg.target_concepts_per_class, alpha=cfg.alpha, n_lambdas=cfg.n_lambdas,
                       bisect_steps=cfg.bisect_steps, max_iter=cfg.max_iter, tol=cfg.tol, z_val=z_v, y_val=y_v,
                       nonneg=cfg.nonneg, progress=cfg.progress)
    cbm_top1 = _accuracy(z_v, y_v, fit["W"], fit["b"])
    if not (fit["W"] != 0).any():
        log.warning("the CBM uses no concept: every prediction is the classes' biases alone (the majority class); "
                    "raise --target_concepts_per_class, --n_lambdas or --max_iter")
    refit: dict[str, Any] = {"done": False}
    if cfg.refit:
        W_r, b_r, it = refit_on_support(z_t, y_t, fit["W"], fit["b"], l2=cfg.refit_l2, max_iter=cfg.refit_iter,
                                        tol=cfg.tol, nonneg=cfg.nonneg)
        lasso_top1, cbm_top1 = cbm_top1, _accuracy(z_v, y_v, W_r, b_r)
        refit = {"done": True, "l2": cfg.refit_l2, "iterations": it,
                 "train_top1": {"lasso": _accuracy(z_t, y_t, fit["W"], fit["b"]), "refit": _accuracy(z_t, y_t, W_r, b_r)},
                 "val_top1": {"lasso": lasso_top1, "refit": cbm_top1}}
        fit = {**fit, "W": W_r, "b": b_r, "concepts_per_class": _concepts_per_class(W_r)}
    model = ConceptBottleneck(W=fit["W"], b=fit["b"], latents=latents, scale=scale,
                              names=[names[int(j)] for j in latents], classnames=classnames)
    Wp, bp = linear_probe(x_t, y_t, C, l2=cfg.probe_l2)
    probe_top1 = _accuracy(x_v, y_v, Wp, bp)
    zs = _zero_shot(cfg, val) if cfg.zero_shot else {"top1": None, "reason": "--no_zero_shot"}

    pred_v = model.predict(codes_v)
    per_class = []
    for c in range(C):
        m = y_v == c
        per_class.append({"class": c, "name": classnames[c], "n_val": int(m.sum()),
                          "val_top1": float((pred_v[m] == c).float().mean()) if m.any() else None,
                          "concepts": model.class_concepts(c)})
    used = (fit["W"] != 0).any(0)
    # files and directories absolute (rec, above): the record says which were used, read from anywhere (recorded as
    # typed, a relative path was resolved from the wrong directory); the SAE also by its weights' digest, which visae
    # browse --cbm compares with the SAE it shows (a copy of the same SAE passes)
    result = {
        "config": rec,
        "sae": rec["sae"], "sae_weights_sha256": sae_weights_sha256(cfg.sae) if cfg.sae else None,
        "member": cfg.member, "label_column": cfg.label_column,
        "n_train": int(len(y_t)), "n_val": int(len(y_v)), "num_classes": C,
        "num_candidate_concepts": int(len(latents)), "num_concepts_used": int(used.sum()),
        "lam": fit["lam"], "concepts_per_class": fit["concepts_per_class"],
        "top1": {"cbm": cbm_top1, "linear_probe": probe_top1, "zero_shot": zs.get("top1")},
        "refit": refit,
        "zero_shot": zs,
        "classes": per_class,
        "path": fit["path"],
    }
    out = Path(cfg.out)
    if replaced:  # a rerun replaces the CBM (written atomically, cbm.json last); say so when it was made otherwise
        log.warning("%s holds a CBM made with other settings; replacing it (%s)", out / "cbm.json", "; ".join(replaced))
    n = min(cfg.n_explain, len(y_v))
    lines = []
    for i, e in enumerate(model.explain(codes_v[:n], top=cfg.top_concepts)):
        lines.append(json.dumps({"index": i, "label": int(y_v[i]), "label_name": classnames[int(y_v[i])], **e}))
    examples = ("\n".join(lines) + ("\n" if lines else "")).encode()
    model.save(out, result, files={"examples.jsonl": examples})  # cbm.json last: it commits the other two
    return json.loads((out / "cbm.json").read_text())


def format_result(res: dict[str, Any]) -> str:
    t = res["top1"]
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"CBM: top-1 {fmt(t['cbm'])} with {res['concepts_per_class']:.2f} concepts per class on average "
             f"({res['num_concepts_used']} of {res['num_candidate_concepts']} concepts used, {res['num_classes']} classes)",
             *([f"  (the lasso's weights before the refit on its concepts: top-1 {fmt(res['refit']['val_top1']['lasso'])})"]
               if res.get("refit", {}).get("done") else []),
             f"linear probe on clean embeddings: top-1 {fmt(t['linear_probe'])}",
             f"zero-shot: top-1 {fmt(t['zero_shot'])}" + ("" if t["zero_shot"] is not None
                                                           else f" ({res['zero_shot'].get('reason')})")]
    for c in res["classes"][:10]:
        cs = ", ".join(f"{x['name'] or '#' + str(x['latent'])} {x['weight']:+.2f}" for x in c["concepts"][:5])
        lines.append(f"  {c['name']}: {cs}")
    if len(res["classes"]) > 10:
        lines.append(f"  ... {len(res['classes']) - 10} more classes in cbm.json")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from visae.devices import resolve_device
    from visae.config import parse_config
    from visae.errors import report
    from visae.resources import config_yaml

    try:
        cfg = parse_config(CBMConfig, argv, default_yaml=config_yaml("cbm.yaml"), prog="visae cbm")
        cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))  # 'auto' resolved; one this machine lacks refused
        res = train_cbm(cfg)
    except VisaeError as e:  # a bad flag, SAE, names or shard set (exit 2), a lock held (1): visae.errors
        return report("visae cbm", e)
    print(format_result(res))
    print(f"wrote {cfg.out}/cbm.json, cbm.safetensors, examples.jsonl")
    return 0


if __name__ == "__main__":
    from visae.cli import run_main

    sys.exit(run_main("python -m visae.cbm", main))
