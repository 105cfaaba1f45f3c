"""Sparse autoencoders: one stacked module per architecture, a registry, and one-call loading.

    from visae.sae import SAEConfig, build_sae, load_sae
    sae = build_sae(SAEConfig(architecture="topk", d_in=512, d_sae=4096, k=32))
    out = sae.training_loss(batch, l1_coeff=0.0)      # batch: [B, 512] unit-norm shard rows
    sae.save("runs/sae")                              # cfg.json + weights.safetensors
    sae = load_sae("runs/sae")                        # or visae.sae.SAE.load("runs/sae")
    x_hat, f = sae(raw_activations)                   # no manual normalisation needed

Adding an architecture = one file with a subclass of :class:`SAE` decorated by
``@register_architecture`` (or an entry in ``ARCHITECTURES``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from visae.sae.base import (CFG_FILE, FORMAT_NAME, FORMAT_VERSION, WEIGHTS_FILE, SAE, LossOutput, SAEConfig,
                            SAEFormatError)

__all__ = ["SAE", "SAEConfig", "LossOutput", "SAEFormatError", "ARCHITECTURES", "register_architecture",
           "build_sae", "load_sae", "stack_saes"]

ARCHITECTURES: dict[str, type[SAE]] = {}


def register_architecture(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make ``cls`` buildable / loadable under ``cls.architecture``."""
    if not cls.architecture:
        raise ValueError(f"{cls.__name__}.architecture is empty")
    ARCHITECTURES[cls.architecture] = cls
    return cls


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


_register_builtin()


def sae_class(architecture: str) -> type[SAE]:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise SAEFormatError(f"unknown SAE architecture {architecture!r}; registered: {sorted(ARCHITECTURES)}") from None


def build_sae(cfg: SAEConfig | None = None, *, generator: torch.Generator | None = None, device: Any = None,
              **overrides: Any) -> SAE:
    """A freshly initialised SAE (stack) for ``cfg`` (fields may be given as keyword overrides)."""
    import dataclasses

    cfg = dataclasses.replace(cfg or SAEConfig(), **overrides) if overrides else (cfg or SAEConfig())
    return sae_class(cfg.architecture)(cfg, generator=generator, device=device)


def load_sae(path: str | Path, device: Any = "cpu") -> SAE:
    """Load ``path/cfg.json`` + ``path/weights.safetensors`` into a ready-to-use SAE (raw-input inference)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / CFG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise SAEFormatError(f"SAE directory {path} does not exist")
    if not cfg_path.is_file():
        raise SAEFormatError(f"{cfg_path} is missing: {path} is not an SAE directory (expected {CFG_FILE} + {WEIGHTS_FILE})")
    if not w_path.is_file():
        raise SAEFormatError(f"{w_path} is missing (the weights of the SAE described by {cfg_path})")
    try:
        doc = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SAEFormatError(f"{cfg_path} is not valid JSON: {e}") from None
    if doc.get("format") != FORMAT_NAME:
        raise SAEFormatError(f"{cfg_path}: field 'format' is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise SAEFormatError(f"{cfg_path}: field 'format_version' is {doc.get('format_version')!r}, "
                             f"this visae reads version {FORMAT_VERSION}")
    extra = doc.pop("extra", {}) or {}
    doc.pop("format"), doc.pop("format_version")
    try:
        cfg = SAEConfig.from_dict(doc, where=str(cfg_path))
    except (TypeError, ValueError) as e:
        raise SAEFormatError(f"{cfg_path}: {e}") from None
    sae = sae_class(cfg.architecture)(cfg, device=device)
    try:
        state = load_file(str(w_path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise SAEFormatError(f"{w_path}: not a readable safetensors file ({e})") from None
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        bad = {k: (got[k], expected[k]) for k in expected if k in got and got[k] != expected[k]}
        raise SAEFormatError(f"{w_path}: tensors do not fit {cfg_path} (missing {missing}, unexpected "
                             f"{sorted(set(got) - set(expected))}, shape (file, cfg) {bad})")
    sae.load_state_dict(state)
    sae.extra = extra
    sae.eval()
    return sae


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
