"""Sparse autoencoders: one stacked module per architecture, a registry, and one-call loading.

    from visae.sae import SAEConfig, build_sae, load_sae
    sae = build_sae(SAEConfig(architecture="topk", d_in=512, d_sae=4096, k=32))
    out = sae.training_loss(batch, l1_coeff=0.0)      # batch: [B, 512] unit-norm shard rows
    sae.save("runs/sae")                              # cfg.json + weights.safetensors
    sae = load_sae("runs/sae")                        # or visae.sae.SAE.load("runs/sae")
    x_hat, f = sae(raw_activations)                   # no manual normalisation needed

Adding an architecture = one file with a subclass of :class:`SAE` decorated by
``@register_architecture`` (or an entry in ``ARCHITECTURES``). It implements ``_activate`` and
``_train_codes`` and declares what the trainer needs (``visae.train`` names no architecture):
``sparsity_metric`` (+ ``sparsity_metric_value`` for its own metric), ``sparsity_degree``,
``uses_aux``, ``latent_axes`` for its extra parameters and ``reset_latents_`` for what
resampling must reset (docs/training.md, "Architectures own their knowledge";
tests/test_train_architectures.py declares one in the test file).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from visae.sae.base import (ARCHITECTURES, CFG_FILE, FORMAT_NAME, FORMAT_VERSION, SAE, WEIGHTS_FILE,  # noqa: F401
                            LossOutput, SAEConfig, SAEFormatError, load_sae, register_architecture, sae_class)

__all__ = ["SAE", "SAEConfig", "LossOutput", "SAEFormatError", "ARCHITECTURES", "register_architecture",
           "build_sae", "load_sae", "stack_saes"]

def _register_builtin() -> None:
    from visae.sae.relu import ReLUSAE

    register_architecture(ReLUSAE)
    try:
        from visae.sae.topk import TopKSAE

        register_architecture(TopKSAE)
    except ImportError:
        pass
    try:
        from visae.sae.batchtopk import BatchTopKSAE

        register_architecture(BatchTopKSAE)
    except ImportError:
        pass
    try:
        from visae.sae.jumprelu import JumpReLUSAE

        register_architecture(JumpReLUSAE)
    except ImportError:
        pass
    try:
        from visae.sae.matryoshka import MatryoshkaSAE

        register_architecture(MatryoshkaSAE)
    except ImportError:
        pass


_register_builtin()


# URI schemes load_sae accepts -> (module, function), imported by name when used (like visae.cli's
# SUBCOMMANDS): the loaders live in visae.interop, which builds on visae.sae, not the other way round.
URI_LOADERS: dict[str, tuple[str, str]] = {"hf://": ("visae.interop.hub", "load_sae_from_hub")}


def load_sae(path: Any, device: Any = "cpu") -> SAE:  # noqa: F811 - wraps visae.sae.base.load_sae
    """Load an SAE directory (``cfg.json`` + ``weights.safetensors``) into a ready-to-use SAE (raw-input inference).

    ``path`` may also be ``"hf://org/repo[/subfolder]"``: fetched through ``huggingface_hub``'s
    cache (``HF_HUB_OFFLINE=1`` honoured), see :func:`visae.interop.hub.load_sae_from_hub`.
    A directory in another tool's layout (SAELens, saev, Discover-then-Name) raises
    :class:`SAEFormatError` naming the importer to use (docs/interop.md).
    """
    import importlib

    from visae.interop.layouts import import_hint
    from visae.sae import base as _base

    for scheme, (module, func) in URI_LOADERS.items():
        if str(path).startswith(scheme):
            return getattr(importlib.import_module(module), func)(str(path), device=device)
    try:
        return _base.load_sae(path, device=device)
    except SAEFormatError as e:
        hint = import_hint(path)
        if hint is None:
            raise
        raise SAEFormatError(f"{e}\n{hint}") from None


def build_sae(cfg: SAEConfig | None = None, *, generator: torch.Generator | None = None, device: Any = None,
              **overrides: Any) -> SAE:
    """A freshly initialised SAE (stack) for ``cfg`` (fields may be given as keyword overrides)."""
    import dataclasses

    cfg = dataclasses.replace(cfg or SAEConfig(), **overrides) if overrides else (cfg or SAEConfig())
    return sae_class(cfg.architecture)(cfg, generator=generator, device=device)


def stack_saes(saes: Sequence[SAE]) -> SAE:
    """Stack same-architecture, same-shape SAEs (each S >= 1) into one module; members in order."""
    import dataclasses

    if not saes:
        raise ValueError("stack_saes: empty list")
    first = saes[0]
    base = dataclasses.replace(first.cfg, n_models=1)
    for i, s in enumerate(saes):
        if type(s) is not type(first) or dataclasses.replace(s.cfg, n_models=1) != base:
            raise ValueError(f"stack_saes: SAE {i} has config {s.cfg}, SAE 0 has {first.cfg}; only same-shape, "
                             "same-architecture SAEs can be stacked")
    cfg = dataclasses.replace(first.cfg, n_models=sum(s.n_models for s in saes))
    out = type(first)(cfg, device=first.W_enc.device)
    states = [s.state_dict() for s in saes]
    out.load_state_dict({k: torch.cat([st[k] for st in states]) for k in states[0]})
    members = []
    for s in saes:
        if isinstance(s.extra.get("members"), list):
            members.extend(s.extra["members"])
        else:
            members.extend([s.extra] * s.n_models)
    out.extra = {"members": members}
    return out
