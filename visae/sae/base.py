"""The stacked SAE base class: config, initialisation, encode/decode, training loss, checkpoints.

Every parameter has a leading member axis ``S`` (``cfg.n_models``), so one module holds a
single SAE (S = 1) or a sweep's stack of same-shape SAEs, trained in one pass over the data
with one code path::

    W_enc [S, d_in, d_sae]   b_enc [S, d_sae]   W_dec [S, d_sae, d_in]   b_dec [S, d_in]

Spaces. Shards hold per-example unit-norm activations (``input_normalization="unit_norm"``).
The weights work in *SAE space*: ``x_sae = x_shard * scale_factor``. ``training_loss``
takes shard batches; ``encode`` / ``forward`` take RAW activations and apply the input
normalisation themselves (divide by the example's norm, multiply by ``scale_factor``), and
``forward`` maps the reconstruction back to raw space, so a loaded SAE needs no manual
normalisation. ``fold_scale_factor_`` folds ``scale_factor`` into the weights exactly.

Architectures (``relu``, ``topk``, ``batchtopk``, ``jumprelu``) subclass :class:`SAE` and
are registered by name in :mod:`visae.sae` (see ``register_architecture``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from visae.errors import VisaeError
from visae.integrity import check_finite, json_digest, sha256_bytes

__all__ = ["SAEConfig", "SAE", "LossOutput", "SAEFormatError", "FORMAT_NAME", "FORMAT_VERSION", "aux_k_term"]

FORMAT_NAME = "visae.sae"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CFG_FILE = "cfg.json"
CHECKSUMS_FIELD = "checksums"
UNVERIFIED_WARNING = ("records no checksums (made by another tool or an older visae): its weights cannot be "
                      "verified; save it again with visae to record them")
K_ARCHITECTURES = ("topk", "batchtopk", "matryoshka")  # the architectures that read SAEConfig.k


class SAEFormatError(VisaeError, ValueError):
    """An SAE directory is missing, malformed, or does not fit the data it is given."""


@dataclass(frozen=True)
class SAEConfig:
    """Shape and architecture of a (stack of) sparse autoencoder(s)."""

    architecture: Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"] = field(
        default="relu", metadata={"help": "SAE architecture: relu (+L1), topk, batchtopk, jumprelu, matryoshka "
                                          "(nested prefixes, BatchTopK codes)"})
    d_in: int = field(default=512, metadata={"help": "input (activation) width"})
    d_sae: int = field(default=4096, metadata={"help": "number of latents (dictionary size)"})
    n_models: int = field(default=1, metadata={"help": "stack size S: same-shape SAEs held and trained as one module"})
    k: int = field(default=32, metadata={"help": "topk / batchtopk: active latents per example (batchtopk: on average)"})
    aux_k: int = field(default=512, metadata={"help": "topk / batchtopk: dead latents used by the aux-k loss"})
    aux_coeff: float = field(default=1.0 / 32, metadata={"help": "topk / batchtopk: weight of the aux-k loss"})
    threshold_momentum: float = field(
        default=0.99, metadata={"help": "batchtopk: momentum of the running inference threshold"})
    jumprelu_bandwidth: float = field(
        default=1e-3, metadata={"help": "jumprelu: bandwidth of the straight-through threshold gradient"})
    jumprelu_init_threshold: float = field(default=1e-3, metadata={"help": "jumprelu: initial threshold"})
    matryoshka_levels: int = field(
        default=5, metadata={"help": "matryoshka: number of nested prefixes, of sizes d_sae / 2^(L-1), ..., "
                                     "d_sae / 2, d_sae (rounded down)"})
    input_normalization: Literal["unit_norm", "none"] = field(
        default="unit_norm", metadata={"help": "unit_norm: the SAE divides each raw input by its L2 norm and "
                                               "multiplies the reconstruction back; none: inputs used as given"})
    scale_factor: float = field(
        default=1.0, metadata={"help": "dataset-wide factor: SAE space = normalised input * scale_factor "
                                       "(folded into the weights by fold_scale_factor_)"})
    impl: Literal["auto", "reference", "fused", "sparse"] = field(
        default="auto", metadata={"help": "training-step kernels: auto picks the fastest exact one; reference "
                                          "is plain autograd"})
    sparse_threshold: float = field(
        default=0.02, metadata={"help": "auto impl: use the sparse path when the fraction of active codes is below this"})

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae", "n_models"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"SAEConfig.{name} must be positive, got {getattr(self, name)}")
        if self.architecture in K_ARCHITECTURES:  # relu / jumprelu ignore k (aux_k is clamped to d_sae where used)
            if int(self.k) <= 0:
                raise ValueError(f"SAEConfig.k must be positive for {self.architecture}, got {self.k}")
            if self.k > self.d_sae:
                raise ValueError(f"SAEConfig.k={self.k} exceeds d_sae={self.d_sae} ({self.architecture} keeps k latents)")
        if self.architecture == "matryoshka" and not 1 <= int(self.matryoshka_levels) <= int(self.d_sae).bit_length():
            raise ValueError(f"SAEConfig.matryoshka_levels must be in [1, {int(self.d_sae).bit_length()}] for "
                             f"d_sae={self.d_sae} (the smallest prefix, d_sae / 2^(levels-1), must hold a latent), "
                             f"got {self.matryoshka_levels}")
        if self.input_normalization not in ("unit_norm", "none"):
            raise ValueError(f"SAEConfig.input_normalization must be 'unit_norm' or 'none', got {self.input_normalization!r}")
        if not (self.scale_factor > 0 and math.isfinite(self.scale_factor)):
            raise ValueError(f"SAEConfig.scale_factor must be a positive finite number, got {self.scale_factor}")
        if self.impl not in ("auto", "reference", "fused", "sparse"):
            raise ValueError(f"SAEConfig.impl must be auto/reference/fused/sparse, got {self.impl!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "SAEConfig") -> "SAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SAEFormatError(f"{where}: unknown SAE config field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


class LossOutput(NamedTuple):
    """What ``training_loss`` returns. ``loss`` is a scalar (summed over members); the rest are detached.

    mse [S]: mean over batch and d_in of the squared error (SAE space); l1 [S]: mean over batch
    of sum_j f_j * ||W_dec_j||; l0 [S]: mean active latents per example; explained_variance [S];
    aux [S]: aux-k term in the units of mse (0 when unused; :func:`aux_k_term`); fired [S, d_sae]
    bool; sq_err [S, B]: per-example squared error summed over d_in; sparsity [S] or None: the architecture's own sparsity metric
    (``SAE.sparsity_metric``, before lambda) when it is not one of the fields above.
    """

    loss: Tensor
    mse: Tensor
    l1: Tensor
    l0: Tensor
    explained_variance: Tensor
    aux: Tensor
    fired: Tensor
    sq_err: Tensor
    sparsity: Tensor | None = None


def _coeff(value: float | Tensor, S: int, like: Tensor) -> Tensor:
    """A per-member coefficient [S] from a float or a tensor [S] / [] (no grad)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device).detach()
    if t.ndim == 0:
        t = t.expand(S)
    if t.shape != (S,):
        raise ValueError(f"coefficient must be a float or a tensor of shape [{S}] (one per member), got {list(t.shape)}")
    return t


class SAE(nn.Module):
    """A stack of ``cfg.n_models`` same-shape sparse autoencoders (base class; see module docstring).

    Subclasses set ``architecture`` and implement ``_activate`` (pre-activations -> codes at
    inference) and ``_train_codes`` (pre-activations -> codes + sparsity loss, with autograd).
    """

    architecture: ClassVar[str] = ""
    uses_aux: ClassVar[bool] = False
    sparse_needs_dec_norm: ClassVar[bool] = False
    # What the trainer needs to know about an architecture, declared by the architecture (the
    # trainer names none): see ``step_sparsity``, ``sparsity_metric_value``, ``latent_axis``
    # and ``reset_latents_``.
    #: The metric lambda multiplies in the loss, logged under this name: "l1", "l0" (LossOutput
    #: fields) or the architecture's own (then ``LossOutput.sparsity`` and ``sparsity_metric_value``
    #: compute it); None: no lambda-weighted term (e.g. sparsity by construction).
    sparsity_metric: ClassVar[str | None] = None
    #: Degree of that metric in the codes (L1: 1, L0: 0): how lambda converts between input scales.
    sparsity_degree: ClassVar[int] = 1
    #: Which axis of each parameter (leading member axis S included) indexes latents; None: none.
    #: Subclasses add their extra parameters (per-latent Adam state is reset along this axis).
    latent_axes: ClassVar[dict[str, int | None]] = {"W_enc": 2, "b_enc": 1, "W_dec": 1, "b_dec": None}

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None, device: Any = None):
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(f"{type(self).__name__} is architecture {self.architecture!r}, cfg says {cfg.architecture!r}")
        self.cfg = cfg
        self.extra: dict[str, Any] = {}
        S, d_in, d_sae = cfg.n_models, cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(S, d_in, d_sae, device=device))
        self.b_enc = nn.Parameter(torch.zeros(S, d_sae, device=device))
        self.W_dec = nn.Parameter(torch.empty(S, d_sae, d_in, device=device))
        self.b_dec = nn.Parameter(torch.zeros(S, d_in, device=device))
        self._init_extra()
        self.reset_parameters(generator=generator)

    # ------------------------------------------------------------------ shape facts
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def n_models(self) -> int:
        return self.cfg.n_models

    def __repr__(self) -> str:
        c = self.cfg
        return (f"{type(self).__name__}(d_in={c.d_in}, d_sae={c.d_sae}, n_models={c.n_models}, k={c.k}, "
                f"input_normalization={c.input_normalization!r}, scale_factor={c.scale_factor:g})")

    # ------------------------------------------------------------------ init
    def _init_extra(self) -> None:
        """Register architecture-specific parameters / buffers (leading axis S)."""

    def _reset_extra(self) -> None:
        """Initialise architecture-specific parameters / buffers."""

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The recipe: W_dec He-uniform, rows rescaled to unit norm, W_enc = W_dec^T, biases zero."""
        S, d_in, d_sae = self.n_models, self.d_in, self.d_sae
        w = torch.empty(S, d_sae, d_in, device=self.W_dec.device)
        bound = math.sqrt(6.0 / d_in)  # kaiming_uniform (gain sqrt 2) with fan_in = d_in
        w.uniform_(-bound, bound, generator=generator)
        w /= w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.transpose(1, 2))
        self.b_enc.zero_()
        self.b_dec.zero_()
        self._reset_extra()

    @torch.no_grad()
    def init_b_dec_(self, sample: Tensor, method: str = "geometric_median", n_iter: int = 10) -> Tensor:
        """Set every member's b_dec to the geometric median (Weiszfeld) or mean of ``sample`` [N, d_in].

        ``sample`` is in shard space (like training batches); returns the new b_dec [d_in] (SAE space).
        """
        sample = torch.as_tensor(sample)
        self.check_input(sample, where="init_b_dec_ sample", allow_stacked=False)
        x = sample.to(self.b_dec.device, torch.float32) * self.cfg.scale_factor
        y = x.mean(0)
        if method == "geometric_median":
            for _ in range(n_iter):
                w = 1.0 / (x - y).norm(dim=-1).clamp_min(1e-8)
                y = (w[:, None] * x).sum(0) / w.sum()
        elif method != "mean":
            raise ValueError(f"init_b_dec_: method must be 'geometric_median' or 'mean', got {method!r}")
        self.b_dec.copy_(y.expand_as(self.b_dec))
        return y

    # ------------------------------------------------------------------ input checks & normalisation
    def check_input(self, x: Tensor, where: str = "input", allow_stacked: bool = True) -> None:
        """Raise a clear error unless ``x`` is [B, d_in] (or [S, B, d_in]) for this SAE."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
        ok_ndim = (2, 3) if allow_stacked else (2,)
        if x.ndim not in ok_ndim:
            shapes = "[B, d_in] or [S, B, d_in]" if allow_stacked else "[N, d_in]"
            raise SAEFormatError(f"{where}: expected a tensor of shape {shapes} with d_in={self.d_in}, got {list(x.shape)}")
        if x.shape[-1] != self.d_in:
            raise SAEFormatError(
                f"{where}: has width {x.shape[-1]} but this SAE was trained on d_in={self.d_in} "
                f"({self.extra.get('source', {}).get('model', 'see cfg.json')}); were these activations "
                "extracted from another model or layer?")
        if x.ndim == 3 and x.shape[0] != self.n_models:
            hint = ("" if self.n_models > 1 else
                    f"; if it is [B, N, W] = {list(x.shape)} tokens of a model's residual stream, pass them as "
                    "[B*N, W] (x.reshape(-1, x.shape[-1])), or put the SAE into the model with visae.splice.splice, "
                    "which does that")
            raise SAEFormatError(f"{where}: stacked input has {x.shape[0]} members, this SAE stack has "
                                 f"{self.n_models}{hint}")

    def normalize_input(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Raw activations -> (SAE-space x, per-example norms [..., 1] or None)."""
        norm = None
        if self.cfg.input_normalization == "unit_norm":
            norm = x.norm(dim=-1, keepdim=True)
            x = x / norm.clamp_min(1e-12)
        if self.cfg.scale_factor != 1.0:
            x = x * self.cfg.scale_factor
        return x, norm

    # ------------------------------------------------------------------ building blocks
    def _stacked(self, x: Tensor) -> Tensor:
        """[B, d] -> [S, B, d] (a broadcast view) ; [S, B, d] unchanged."""
        return x.expand(self.n_models, *x.shape) if x.ndim == 2 else x

    def preacts(self, x_sae: Tensor) -> Tensor:
        """Encoder pre-activations (x - b_dec) W_enc + b_enc: x_sae [B, d_in] | [S, B, d_in] -> [S, B, d_sae]."""
        W_enc = self.W_enc.to(x_sae.dtype) if x_sae.dtype != self.W_enc.dtype else self.W_enc
        xc = self._stacked(x_sae) - self.b_dec[:, None, :].to(x_sae.dtype)
        return torch.baddbmm(self.b_enc[:, None, :].to(x_sae.dtype), xc, W_enc)

    def _decode_sae(self, f: Tensor) -> Tensor:
        """Codes [S, B, d_sae] -> SAE-space reconstruction [S, B, d_in]."""
        return torch.baddbmm(self.b_dec[:, None, :].to(f.dtype), f, self.W_dec.to(f.dtype))

    def _activate(self, pre: Tensor) -> Tensor:
        """Pre-activations [S, B, d_sae] -> codes at inference (architecture-specific)."""
        raise NotImplementedError

    def _train_codes(self, pre: Tensor, sparsity_coeff: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-activations -> (codes [S, B, d_sae], per-member sparsity loss [S]) for training, with autograd."""
        raise NotImplementedError

    def _sparse_select(self, pre: Tensor, s: int) -> tuple[Any, Tensor]:
        """Sparse path: member ``s``'s pre [B, d_sae] -> (kernels.Pattern of the codes that may be non-zero or
        get a gradient, their pre-activation values [nnz])."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse training path")

    def _sparse_codes(self, vals: Tensor, pattern: Any, s: int, coeff: Tensor,
                      dec_norm: Tensor | None) -> tuple[Tensor, Tensor]:
        """Sparse path: pre-activation values [nnz] (with grad) -> (codes [nnz], sparsity loss [])."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse training path")

    # ------------------------------------------------------------------ public inference API (raw inputs)
    def _squeeze(self, t: Tensor, x: Tensor) -> Tensor:
        return t[0] if (self.n_models == 1 and x.ndim == 2) else t

    def encode(self, x: Tensor) -> Tensor:
        """Codes of RAW activations: x [B, d_in] | [S, B, d_in] -> [S, B, d_sae] ([B, d_sae] when S == 1 and x is 2-D)."""
        self.check_input(x, where="encode input")
        x_sae, _ = self.normalize_input(x.to(self.W_enc.dtype))
        return self._squeeze(self._activate(self.preacts(x_sae)), x)

    def decode(self, f: Tensor, norm: Tensor | None = None) -> Tensor:
        """Reconstruction from codes f [B, d_sae] | [S, B, d_sae] -> [S, B, d_in] (2-D when S == 1 and f is 2-D).

        Without ``norm`` the result is in normalised (shard) space; pass the inputs' norms
        [B, 1] (or call ``forward``) to get raw space when ``input_normalization == "unit_norm"``.
        """
        if f.shape[-1] != self.d_sae:
            raise SAEFormatError(f"decode: codes have width {f.shape[-1]}, this SAE has d_sae={self.d_sae}")
        fs = f[None] if f.ndim == 2 and self.n_models == 1 else self._stacked(f)
        x_hat = self._decode_sae(fs.to(self.W_dec.dtype))
        if self.cfg.scale_factor != 1.0:
            x_hat = x_hat / self.cfg.scale_factor
        if norm is not None:
            x_hat = x_hat * norm
        return x_hat[0] if (self.n_models == 1 and f.ndim == 2) else x_hat

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """RAW activations x [B, d_in] | [S, B, d_in] -> (x_hat in raw space, codes f); shapes as in encode/decode."""
        self.check_input(x, where="SAE input")
        x_sae, norm = self.normalize_input(x.to(self.W_enc.dtype))
        f = self._activate(self.preacts(x_sae))
        x_hat = self._decode_sae(f)
        if self.cfg.scale_factor != 1.0:
            x_hat = x_hat / self.cfg.scale_factor
        if norm is not None:
            x_hat = x_hat * norm
        return self._squeeze(x_hat, x), self._squeeze(f, x)

    # ------------------------------------------------------------------ training
    def training_loss(self, x: Tensor, l1_coeff: float | Tensor = 0.0, dead_mask: Tensor | None = None,
                      impl: str | None = None) -> LossOutput:
        """Loss and metrics on a shard batch ``x`` [B, d_in] (already normalised, as stored) or [S, B, d_in].

        ``l1_coeff``: float or [S] -- the sparsity coefficient (ReLU: L1 on decoder-norm-weighted
        codes; JumpReLU: L0; TopK / BatchTopK: unused). ``dead_mask`` [S, d_sae] bool: latents the
        trainer considers dead, used by the aux-k loss (TopK / BatchTopK). ``impl`` overrides
        ``cfg.impl``: "reference" (plain autograd), "fused", "sparse" or "auto".
        """
        self.check_input(x, where="training batch")
        x = x.to(self.W_enc.dtype)
        if self.cfg.scale_factor != 1.0:
            x = x * self.cfg.scale_factor
        coeff = _coeff(l1_coeff, self.n_models, x)
        if dead_mask is not None:
            dead_mask = torch.as_tensor(dead_mask, device=x.device, dtype=torch.bool)
            if dead_mask.shape != (self.n_models, self.d_sae):
                raise ValueError(f"dead_mask must be [S={self.n_models}, d_sae={self.d_sae}] bool, got {list(dead_mask.shape)}")
        return self._training_loss(x, coeff, dead_mask, impl or self.cfg.impl)

    def _training_loss(self, x: Tensor, coeff: Tensor, dead_mask: Tensor | None, impl: str) -> LossOutput:
        """Dispatch to a fast path (architecture-specific) or the reference path."""
        return self._reference_loss(x, coeff, dead_mask)

    def _reference_loss(self, x: Tensor, coeff: Tensor, dead_mask: Tensor | None) -> LossOutput:
        """Plain-autograd training loss: the definition every fast path is tested against."""
        S, B = self.n_models, x.shape[-2]
        pre = self.preacts(x)
        f, sparsity = self._train_codes(pre, coeff)
        x_hat = self._decode_sae(f)
        xs = self._stacked(x)
        err = x_hat - xs
        mse = err.pow(2).mean(dim=(1, 2))
        aux = torch.zeros(S, device=x.device)
        if self.uses_aux and dead_mask is not None and bool(dead_mask.any()):
            aux = self._aux_loss_reference(pre, err, dead_mask, x)
        loss = (mse + sparsity + self.cfg.aux_coeff * aux).sum()
        with torch.no_grad():
            active = f > 0
            counts = active.sum(dim=1)  # [S, d_sae]
            dec_norm = self.W_dec.norm(dim=-1)
            l1 = (f.float().sum(dim=1) * dec_norm).sum(-1) / B
            sq_err = err.detach().float().pow(2).sum(-1)
            own = self.sparsity_metric is not None and self.sparsity_metric not in LossOutput._fields
            return LossOutput(loss=loss, mse=mse.detach(), l1=l1, l0=counts.sum(-1).float() / B,
                              explained_variance=_explained_variance(sq_err, x),
                              aux=aux.detach(), fired=counts > 0, sq_err=sq_err,
                              sparsity=self.sparsity_metric_value(f.detach()) if own else None)

    def _aux_loss_reference(self, pre: Tensor, err: Tensor, dead_mask: Tensor, x: Tensor) -> Tensor:
        """Aux-k term [S] (plain autograd): the top ``aux_k`` dead latents reconstruct the residual.

        pre [S, B, d_sae] pre-activations, err [S, B, d_in] = x_hat - x, dead_mask [S, d_sae],
        x [B, d_in] | [S, B, d_in] the SAE-space batch. The aux reconstruction is
        ``ReLU(TopK_aux_k(pre over dead latents)) W_dec + b_dec``; its target ``(x - x_hat) + b_dec``
        is detached (Gao et al. 2024, A.2, as in their reference code). See :func:`aux_k_term`.
        """
        k_aux = min(self.cfg.aux_k, self.d_sae)
        masked = pre.masked_fill(~dead_mask[:, None, :], float("-inf"))
        vals, idx = masked.topk(k_aux, dim=-1)
        vals = torch.relu(torch.nan_to_num(vals, neginf=0.0))
        f_aux = torch.zeros_like(pre).scatter(-1, idx, vals)
        e_hat = torch.bmm(f_aux, self.W_dec.to(f_aux.dtype))
        return aux_k_term(e_hat, -err, x, self.b_dec) * dead_mask.any(-1)  # 0 for members with no dead latent

    # ------------------------------------------------------------------ decoder constraints
    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from W_dec.grad the component parallel to each decoder row; call before the optimizer step."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        # g -= (g . w / ||w||^2) w, row by row, without [S, d_sae, d_in] temporaries.
        dot = torch.linalg.vecdot(g, w, dim=-1)  # [S, d_sae]
        sq = torch.linalg.vector_norm(w, dim=-1).square_().clamp_min_(1e-24)
        g.addcmul_(w, dot.div_(sq).unsqueeze(-1), value=-1.0)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row W_dec[s, j, :] to unit norm; call after the optimizer step."""
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=-1, keepdim=True).clamp_min_(1e-12))

    @torch.no_grad()
    def reset_latents_(self, mask: Tensor) -> None:
        """Hook for dead-latent resampling: reset architecture extras of latents ``mask [S, d_sae]`` (True = reset).

        The trainer rewrites W_enc / W_dec / b_enc itself; subclasses reset what only they know
        (JumpReLU: the threshold back to its initial value).
        """

    # ------------------------------------------------------------------ what the trainer asks the architecture
    def latent_axis(self, name: str) -> int | None:
        """The axis of parameter ``name`` (stacked, ``[S, ...]``) that indexes latents, from ``latent_axes``.

        Raises SAEFormatError for a parameter the architecture did not declare.
        """
        axes = type(self).latent_axes
        if name not in axes:
            raise SAEFormatError(f"{type(self).__name__}: parameter {name!r} has no entry in latent_axes "
                                 f"(declared: {sorted(axes)}); say which axis indexes latents, or None")
        return axes[name]

    def sparsity_metric_value(self, f: Tensor) -> Tensor:
        """The ``sparsity_metric`` [S] of codes ``f`` [S, B, d_sae] (mean over the batch; zeros when None).

        "l1": sum_j f_j ||W_dec_j||; "l0": number of active codes. An architecture with its own
        metric overrides this (the trainer's validation and the reference loss call it).
        """
        if self.sparsity_metric == "l1":
            return (f.sum(1) * self.W_dec.detach().norm(dim=-1).to(f.dtype)).sum(-1) / f.shape[1]
        if self.sparsity_metric == "l0":
            return (f > 0).sum(-1).to(f.dtype).mean(-1)
        if self.sparsity_metric is None:
            return f.new_zeros(f.shape[0])
        raise NotImplementedError(f"{type(self).__name__} declares sparsity_metric {self.sparsity_metric!r}: "
                                  "override sparsity_metric_value to compute it")

    def step_sparsity(self, out: LossOutput) -> Tensor:
        """The ``sparsity_metric`` [S] of a training step's ``out`` (before lambda); zeros when None."""
        if self.sparsity_metric is None:
            return torch.zeros_like(out.mse)
        if out.sparsity is not None:
            return out.sparsity
        return getattr(out, self.sparsity_metric)

    # ------------------------------------------------------------------ kernel choice (checkpointed)
    def kernel_state(self) -> dict[str, Any]:
        """What the ``impl="auto"`` dispatch remembers between steps, JSON-able (the trainer checkpoints it).

        ``last_active_frac``: the largest per-member fraction of active codes on the last
        ``training_loss`` call (None before the first); the fused / sparse kernel choice of the
        next step depends on it (``kernels._looks_sparse``), so a resume must restore it to be
        bit-identical.
        """
        v = self.__dict__.get("_last_active_frac")
        return {"last_active_frac": None if v is None else float(v)}

    def load_kernel_state(self, state: dict[str, Any]) -> None:
        """Restore what ``kernel_state`` returned (missing keys: as a fresh module)."""
        v = (state or {}).get("last_active_frac")
        if v is None:
            self.__dict__.pop("_last_active_frac", None)
        else:
            self.__dict__["_last_active_frac"] = float(v)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def fold_scale_factor_(self, keep_codes: bool = False) -> "SAE":
        """Fold ``cfg.scale_factor`` (c) into the weights exactly; afterwards ``scale_factor == 1``.

        Default (``keep_codes=False``): decoder rows stay unit-norm and the codes come out in raw
        units (f / c): b_enc /= c, b_dec /= c, architecture thresholds /= c.
        ``keep_codes=True`` (Gemma Scope, appendix A): codes unchanged, W_enc *= c, W_dec /= c,
        b_dec /= c (decoder rows then have norm 1 / c). Either way ``forward`` on raw activations
        is unchanged. Returns self.
        """
        c = float(self.cfg.scale_factor)
        if c == 1.0:
            return self
        if keep_codes:
            self.W_enc.mul_(c)
            self.W_dec.div_(c)
        else:
            self.b_enc.div_(c)
            self._fold_extra(c)
        self.b_dec.div_(c)
        self.cfg = dataclasses.replace(self.cfg, scale_factor=1.0)
        return self

    def _fold_extra(self, c: float) -> None:
        """Scale architecture thresholds (in code units) by 1 / c."""

    def exported(self, keep_codes: bool = False) -> "SAE":
        """A copy with the scale factor folded in, for inference on raw activations."""
        out = self.copy()
        return out.fold_scale_factor_(keep_codes=keep_codes)

    def copy(self) -> "SAE":
        out = type(self)(self.cfg, device=self.W_enc.device)
        out.load_state_dict(self.state_dict())
        out.extra = json.loads(json.dumps(self.extra))
        return out

    # ------------------------------------------------------------------ members
    def member(self, i: int) -> "SAE":
        """Member ``i`` of the stack as a single SAE (S = 1), parameters copied."""
        if not -self.n_models <= i < self.n_models:
            raise IndexError(f"member {i} out of range for a stack of {self.n_models}")
        cfg = dataclasses.replace(self.cfg, n_models=1)
        out = type(self)(cfg, device=self.W_enc.device)
        out.load_state_dict({k: v[i:i + 1].clone() for k, v in self.state_dict().items()})
        out.extra = json.loads(json.dumps(self.extra))
        members = self.extra.get("members")
        if isinstance(members, list) and len(members) == self.n_models:
            out.extra.pop("members")
            out.extra["member"] = members[i]
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``path/weights.safetensors`` and ``path/cfg.json`` (the commit point, written last, atomically).

        An existing directory is replaced only when the new one is complete: both files are
        written into a staging directory beside ``path`` (which carries the directory's other
        files as hard links), then swapped in (:func:`visae.atomic.staged_dir`); a save that
        raises or is killed leaves the previous SAE byte-identical.

        ``cfg.json`` records under ``"checksums"`` the SHA-256 and size of the weights file and
        a digest of its own content (canonical JSON without that field), which ``load_sae``
        verifies (docs/sae_format.md).

        ``extra`` (JSON-able: training config, shard source, metrics) is stored in cfg.json under
        ``"extra"`` and kept on ``self.extra``.
        """
        from visae.atomic import atomic_write_bytes, atomic_write_text, staged_dir
        from visae.integrity import safetensors_bytes

        path = Path(path)
        if extra is not None:
            self.extra = dict(extra)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "architecture": self.architecture}
        data = safetensors_bytes(tensors, meta)  # metadata in a fixed order: equal SAEs, equal bytes
        doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **self.cfg.to_dict(), "extra": self.extra}
        doc = json.loads(json.dumps(doc, default=_json_default))  # as a reader will parse it
        doc[CHECKSUMS_FIELD] = {WEIGHTS_FILE: {"sha256": sha256_bytes(data), "bytes": len(data)},
                                CFG_FILE: {"json_sha256": json_digest(doc)}}
        text = json.dumps(doc, indent=1)
        # Written beside, then swapped in: a failed or killed save leaves the previous SAE whole.
        # The directory's other files (training logs, curves, checkpoint/) are carried as hard links.
        keep = ([e.name for e in path.iterdir() if e.name not in (WEIGHTS_FILE, CFG_FILE)]
                if path.is_dir() else None)
        with staged_dir(path, carry=keep) as tmp:
            atomic_write_bytes(tmp / WEIGHTS_FILE, data)
            atomic_write_text(tmp / CFG_FILE, text)
        return path

    @classmethod
    def load(cls, path: str | Path, device: Any = "cpu") -> "SAE":
        """Load an SAE directory written by ``save`` (any registered architecture)."""
        sae = load_sae(path, device=device)
        if cls is not SAE and not isinstance(sae, cls):
            raise SAEFormatError(f"{path}: holds a {type(sae).__name__}, not a {cls.__name__}")
        return sae



# ----------------------------------------------------------------------------- registry and loading
# Here, beside ``SAE.save``, so that ``SAE.load`` needs no import of the package (no import cycle);
# ``visae.sae`` re-exports them and registers the built-in architectures.

ARCHITECTURES: dict[str, type[SAE]] = {}


def register_architecture(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make ``cls`` buildable / loadable under ``cls.architecture``."""
    if not cls.architecture:
        raise ValueError(f"{cls.__name__}.architecture is empty")
    ARCHITECTURES[cls.architecture] = cls
    return cls


def sae_class(architecture: str) -> type[SAE]:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise SAEFormatError(f"unknown SAE architecture {architecture!r}; registered: {sorted(ARCHITECTURES)}") from None


def load_sae(path: str | Path, device: Any = "cpu") -> SAE:
    """Load ``path/cfg.json`` + ``path/weights.safetensors`` into a ready-to-use SAE (raw-input inference)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    cfg_path, w_path = path / CFG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise SAEFormatError(f"SAE directory {path} does not exist")
    if not cfg_path.is_file():
        if (path / "checkpoint").is_dir():  # visae.train.CHECKPOINT_DIR: a run killed before it saved its SAE
            how = ("`visae sweep` (this is a sweep group's directory; its SAEs go to <sweep>/trials/)"
                   if path.parent.name == "groups" else "`visae train`")
            raise SAEFormatError(f"{path} holds an unfinished training run (a checkpoint/, no {CFG_FILE} yet): rerun "
                                 f"{how} with the same settings to finish it, then use it")
        raise SAEFormatError(f"{cfg_path} is missing: {path} is not an SAE directory (expected {CFG_FILE} + {WEIGHTS_FILE})")
    if not w_path.is_file():
        raise SAEFormatError(f"{w_path} is missing (the weights of the SAE described by {cfg_path})")
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{cfg_path} is not valid JSON: {e}") from None
    except OSError as e:
        raise SAEFormatError(f"{cfg_path} cannot be read: {e}") from None
    if not isinstance(doc, dict):
        raise SAEFormatError(f"{cfg_path}: expected a JSON object, got {type(doc).__name__}")
    if not isinstance(doc.get("extra", {}), (dict, type(None))):
        raise SAEFormatError(f"{cfg_path}: field 'extra' must be an object, got {type(doc['extra']).__name__}")
    if doc.get("format") != FORMAT_NAME:
        raise SAEFormatError(f"{cfg_path}: field 'format' is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise SAEFormatError(f"{cfg_path}: field 'format_version' is {doc.get('format_version')!r}, "
                             f"this visae reads version {FORMAT_VERSION}")
    checksums = doc.pop(CHECKSUMS_FIELD, None)
    try:
        data = w_path.read_bytes()
    except OSError as e:
        raise SAEFormatError(f"{w_path}: cannot be read ({e})") from None
    _verify_checksums(checksums, doc, data, cfg_path, w_path)
    extra = doc.pop("extra", {}) or {}
    doc.pop("format"), doc.pop("format_version")
    try:
        cfg = SAEConfig.from_dict(doc, where=str(cfg_path))
    except (TypeError, ValueError) as e:
        raise SAEFormatError(f"{cfg_path}: {e}") from None
    sae = sae_class(cfg.architecture)(cfg, device=device)
    try:
        state = st_load(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise SAEFormatError(f"{w_path}: not a readable safetensors file ({e})") from None
    check_finite(state, str(w_path), SAEFormatError)
    state = {k: v.to(device) for k, v in state.items()}
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        bad = {k: (got[k], expected[k]) for k in expected if k in got and got[k] != expected[k]}
        sizes = ""
        if "W_enc" in got and len(got["W_enc"]) >= 2:  # [S, d_in, d_sae] or [d_in, d_sae]: say it in cfg.json's words
            d_in, d_sae = got["W_enc"][-2:]
            sizes = f"; the weights are d_in={d_in}, d_sae={d_sae}, cfg.json says d_in={cfg.d_in}, d_sae={cfg.d_sae}"
        raise SAEFormatError(f"{w_path}: tensors do not fit {cfg_path} (missing {missing}, unexpected "
                             f"{sorted(set(got) - set(expected))}, shape (file, cfg) {bad}){sizes}")
    sae.load_state_dict(state)
    sae.extra = extra
    sae.eval()
    return sae


# weights rewritten on purpose (cast, pruned) by other code than SAE.save: what to do instead of retraining
_REWRITTEN = ("(weights rewritten on purpose, e.g. cast to fp16: save them with visae's SAE.save, which records new "
              "checksums, or delete the checksums field of cfg.json to load them unverified)")


def _verify_checksums(checksums: Any, doc: dict[str, Any], data: bytes, cfg_path: Path, w_path: Path) -> None:
    """Check ``cfg.json``'s recorded checksums against its content and the weights' bytes; name the damaged file.

    No ``checksums`` field (an SAE directory written by another tool or before visae recorded
    them): accepted with a warning. Raises SAEFormatError for a mismatch or a malformed field.
    """
    import warnings

    if checksums is None:
        warnings.warn(f"SAE directory {cfg_path.parent} {UNVERIFIED_WARNING}", UserWarning, stacklevel=3)
        return
    w = checksums.get(WEIGHTS_FILE) if isinstance(checksums, dict) else None
    c = checksums.get(CFG_FILE) if isinstance(checksums, dict) else None
    if not (isinstance(w, dict) and isinstance(w.get("sha256"), str) and isinstance(c, dict)
            and isinstance(c.get("json_sha256"), str)):
        raise SAEFormatError(f"{cfg_path}: field {CHECKSUMS_FIELD!r} is malformed (expected {{{WEIGHTS_FILE!r}: "
                             f"{{'sha256', 'bytes'}}, {CFG_FILE!r}: {{'json_sha256'}}}})")
    if json_digest(doc) != c["json_sha256"]:
        raise SAEFormatError(f"{cfg_path} is damaged or was edited: its content does not match the checksum it "
                             f"recorded when it was written (if you edited it on purpose, delete its "
                             f"{CHECKSUMS_FIELD!r} field to load it unverified)")
    if w.get("bytes") is not None and w["bytes"] != len(data):
        raise SAEFormatError(f"{w_path} is damaged: {len(data)} bytes, {cfg_path} recorded {w['bytes']} "
                             f"(truncated or replaced); restore it or retrain {_REWRITTEN}")
    if sha256_bytes(data) != w["sha256"]:
        raise SAEFormatError(f"{w_path} is damaged: its SHA-256 differs from the one {cfg_path} recorded when it "
                             f"was written; restore it or retrain {_REWRITTEN}")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"cfg.json extra: {type(o).__name__} is not JSON-serialisable")


def aux_k_term(e_hat: Tensor, residual: Tensor, x: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """The aux-k term [S] of TopK-style SAEs, in the units of ``LossOutput.mse`` (Gao et al. 2024, A.2).

    e_hat [S, B, d_in]: the aux reconstruction decoded from the top ``aux_k`` dead latents
    (with grad, no decoder bias); residual [S, B, d_in] = x - x_hat (detached here);
    x [B, d_in] | [S, B, d_in]: the SAE-space batch; b_dec [S, d_in] or None.

    Gao et al. (their reference ``train.py``) minimise, with alpha = ``aux_coeff`` = 1/32,

        L = MSE(x_hat, x) / Var(x)  +  alpha * MSE(e_hat + b_dec, r + sg(b_dec)) / Var(r),   r = sg(x - x_hat)

    where MSE is the mean over batch and d_in, Var(v) = mean over batch and d_in of
    (v - batch mean of v)^2 (the per-element variance), and sg() stops the gradient. visae
    keeps the main term in plain MSE units (``mse``, comparable with the ReLU runs) and
    returns ``aux = MSE(e_hat, r) * Var(x) / Var(r)``, so that ``loss = mse + alpha * aux``
    equals ``Var(x) * L``: the same objective times a per-batch constant, hence the same
    gradient directions and the same ratio of the two terms (Adam is invariant to the
    constant). Var(x) is the batch's (the reference estimates it once from a data sample;
    for training batches of thousands the two agree to sampling error). When ``b_dec`` is
    given it receives the aux term's gradient as in the reference, where the aux decode adds
    ``b_dec`` and the target adds it detached (the value does not change).

    Where Var(r) is 0 (a 1-row batch, or one residual for every row) the term is 0, as the
    reference's ``nan_to_num(0)``. Raises nothing; shapes are the caller's contract.
    """
    S, B, d = e_hat.shape
    r = residual.detach().float()
    xd = x.detach().float()
    r_c = r - r.mean(dim=1, keepdim=True)
    sst_r = r_c.square().sum(dim=(1, 2))  # [S] = B * d * Var(r)
    sst_x = (xd - xd.mean(dim=-2, keepdim=True)).square().sum(dim=(-2, -1))  # [] or [S] = B * d * Var(x)
    # Below the float32 cancellation error of the centring, the residual has no spread: undefined.
    defined = sst_r > 4.0 * (B * d) * torch.finfo(torch.float32).eps * r.square().sum(dim=(1, 2))
    ratio = torch.where(defined, sst_x / sst_r.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(sst_r))
    diff = e_hat.float() - r
    if b_dec is not None:
        diff = diff + (b_dec - b_dec.detach()).float()[:, None, :]  # value 0, gradient into b_dec
    return diff.square().sum(dim=(1, 2)) / (B * d) * ratio


def _explained_variance(sq_err: Tensor, x: Tensor) -> Tensor:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 per member: sq_err [S, B], x [B, d] (shared) or [S, B, d] -> [S].

    NaN where the batch has no spread (B = 1, or identical rows): the denominator is then 0 up to
    the float64 cancellation error of sum ||x||^2 - B ||mean||^2, about (B * d) * eps64 * sum ||x||^2.
    """
    x = x.detach()
    B, d = x.shape[-2], x.shape[-1]
    # sum ||x - mean||^2 = sum ||x||^2 - B ||mean||^2, in float64 (no [S, B, d] temporaries)
    total = torch.linalg.vector_norm(x, dim=(-2, -1), dtype=torch.float64).square()
    mean_sq = torch.linalg.vector_norm(x.sum(-2, dtype=torch.float64), dim=-1).square() / B
    var = total - mean_sq
    tol = 4.0 * (B * d) * torch.finfo(torch.float64).eps * total
    ev = 1.0 - sq_err.double().sum(-1) / var.clamp_min(1e-300)
    return torch.where(var > tol, ev, torch.full_like(ev, float("nan"))).float()
