"""SAELens SAE directories (layout of sae_lens >= 6.0) <-> visae SAEs.

    from visae.interop.saelens import import_saelens, export_saelens
    sae = import_saelens("path/to/saelens_dir", out="runs/imported")   # -> visae SAE (and dir)
    export_saelens(load_sae("runs/sae"), "runs/sae_saelens")           # -> sae_lens.SAE.load_from_disk

The layout (sae_lens 6.x, checked against sae-lens 6.54.12, the version pinned in
pyproject.toml's ``saelens`` extra)::

    DIR/cfg.json                  {"architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input",
                                   "normalize_activations", "reshape_activations", "metadata": {...},
                                   topk: "k", "rescale_acts_by_decoder_norm"}
    DIR/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in],
                                  jumprelu: threshold [d_sae]

and SAELens computes ``pre = (x - b_dec * apply_b_dec_to_input) W_enc + b_enc``,
``standard``: ReLU(pre); ``topk``: ReLU of the k largest (pre times the decoder row norms when
``rescale_acts_by_decoder_norm``); ``jumprelu``: ReLU(pre) * (pre > threshold);
``x_hat = f W_dec + b_dec``. Pre-6 directories (``hook_point``, ``activation_fn_str``) are
renamed the way sae_lens does it.

Mapping: standard <-> relu, topk <-> topk, jumprelu <-> jumprelu; visae batchtopk (a fixed
inference threshold) is exported as a jumprelu with that threshold on every latent; a SAELens
``batchtopk`` training directory (``topk_threshold`` tensor) is imported as visae batchtopk.
Normalisation: SAELens ``constant_norm_rescale`` (x * sqrt(d_in) / ||x||) is visae
``unit_norm`` with ``scale_factor = sqrt(d_in)``; ``none`` and ``expected_average_only_in``
(folded at the end of SAELens training, identity at inference) are ``none``. A visae
``unit_norm`` SAE with factor c is exported as ``constant_norm_rescale`` with the factor
c / sqrt(d_in) folded into the weights (codes unchanged); a ``none`` one with c folded in.
``layer_norm`` / ``covariance_whitening`` normalisation, ``hook_z`` reshaping and an unfolded
``finetuning_scaling_factor`` have no visae equivalent and are refused.

visae's own cfg (architecture, k, ...) and ``extra`` (training config, activation source)
travel in ``metadata["visae"]``, so a visae -> SAELens -> visae round trip keeps them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from visae.interop import InteropError, check_out_dir, sae_from_matrices

__all__ = ["import_saelens", "export_saelens", "is_saelens_dir", "SAELENS_WEIGHTS", "SAELENS_CFG",
           "SAELENS_LAYOUT_VERSION"]

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"
SAELENS_LAYOUT_VERSION = "6.54.12"  # the sae_lens version whose layout is written (metadata.sae_lens_version)
_TINY = torch.finfo(torch.float32).tiny


def is_saelens_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / SAELENS_WEIGHTS).is_file() and (p / SAELENS_CFG).is_file()


def _version_tuple(v: Any) -> tuple[int, ...]:
    nums = re.findall(r"\d+", str(v or ""))
    return tuple(int(n) for n in nums[:3]) if nums else ()


def _read_cfg(path: Path) -> dict[str, Any]:
    cfg_path = path / SAELENS_CFG
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InteropError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise InteropError(f"{cfg_path}: expected a JSON object")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = cfg.get("sae_lens_version") or meta.get("sae_lens_version")
    if not version or _version_tuple(version) < (6,):
        # pre-6.0 layout: the renames sae_lens itself applies (handle_pre_6_0_config)
        ren = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
        cfg = {ren.get(k, k): v for k, v in cfg.items()}
        cfg.setdefault("apply_b_dec_to_input", True)
        cfg.setdefault("architecture", "standard")
        kw = cfg.get("activation_fn_kwargs") or {}
        if cfg.get("activation_fn") == "topk" and kw.get("k") is not None:
            cfg["architecture"], cfg["k"] = "topk", kw["k"]
        meta = {k: cfg[k] for k in ("model_name", "hook_name", "hook_head_index", "context_size", "dataset_path")
                if k in cfg}
        cfg["metadata"] = meta
    return cfg


def _source_from_hook(meta: dict[str, Any]) -> dict[str, Any]:
    """visae ``source`` (model, layer, token) from SAELens metadata: ``blocks.L.hook_resid_post`` -> layer L."""
    hook = str(meta.get("hook_name") or "")
    src: dict[str, Any] = {"model": meta.get("model_name"), "hook_name": hook or None, "token": "all"}
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook)
    m_pre = re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", hook)
    if m:
        src["layer"] = int(m.group(1))
    elif m_pre and int(m_pre.group(1)) > 0:
        src["layer"] = int(m_pre.group(1)) - 1  # the input of block L is the output of block L - 1
    else:
        src["layer"] = "unknown"  # not a residual-stream hook visae can name: splicing asks for layer=...
    return src


def import_saelens(path: str | Path, out: str | Path | None = None, *, model: str | None = None,
                   layer: int | None = None, token: str | None = None) -> Any:
    """Load a SAELens SAE directory as a visae SAE (raw-activation inference), optionally saving it to ``out``.

    ``model`` / ``layer`` / ``token`` override the activation source read from the SAELens
    metadata (``model_name``; ``hook_name`` ``blocks.L.hook_resid_post`` -> layer L, token
    "all"). Raises :class:`InteropError` naming the field for anything visae cannot represent
    exactly (see the module docstring), before anything is written.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not is_saelens_dir(path):
        raise InteropError(f"{path}: not a SAELens SAE directory (expected {SAELENS_CFG} + {SAELENS_WEIGHTS})")
    cfg = _read_cfg(path)
    where = str(path / SAELENS_CFG)
    try:
        state = {k: v.to(torch.float32) for k, v in load_file(str(path / SAELENS_WEIGHTS)).items()}
    except (SafetensorError, OSError) as e:
        raise InteropError(f"{path / SAELENS_WEIGHTS}: not a readable safetensors file ({e})") from None
    arch = cfg.get("architecture", "standard")
    norm = cfg.get("normalize_activations", "none")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise InteropError(f"{where}: reshape_activations={cfg['reshape_activations']!r} (attention hook_z SAEs) "
                           "has no visae equivalent; only 'none' is supported")
    if norm in ("none", "expected_average_only_in", None):
        norm_kw: dict[str, Any] = {"input_normalization": "none"}
    elif norm == "constant_norm_rescale":
        norm_kw = {"input_normalization": "unit_norm", "scale_factor": math.sqrt(int(cfg["d_in"]))}
    else:
        raise InteropError(f"{where}: normalize_activations={norm!r} has no visae equivalent (supported: none, "
                           "expected_average_only_in, constant_norm_rescale)")
    for key in ("finetuning_scaling_factor", "scaling_factor"):
        if key in state and not torch.allclose(state[key], torch.ones_like(state[key])):
            raise InteropError(f"{path / SAELENS_WEIGHTS}: holds an unfolded {key}; fold it with sae_lens first")
    need = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    missing = sorted(need - set(state))
    if missing:
        raise InteropError(f"{path / SAELENS_WEIGHTS}: missing tensor(s) {missing} for architecture {arch!r} "
                           f"(has {sorted(state)})")
    W_enc, b_enc, W_dec, b_dec = state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"]
    if tuple(W_enc.shape) != (int(cfg["d_in"]), int(cfg["d_sae"])):
        raise InteropError(f"{path / SAELENS_WEIGHTS}: W_enc has shape {list(W_enc.shape)}, cfg.json says "
                           f"[d_in={cfg['d_in']}, d_sae={cfg['d_sae']}]")
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens: pre = x W_enc + b_enc; visae always subtracts b_dec first: fold b_dec W_enc into b_enc
        b_enc = b_enc + b_dec @ W_enc
    extra_tensors: dict[str, torch.Tensor] = {}
    kw: dict[str, Any] = dict(norm_kw)
    if arch == "standard":
        visae_arch = "relu"
    elif arch == "topk":
        visae_arch, kw["k"] = "topk", int(cfg.get("k", 0))
    elif arch == "jumprelu":
        visae_arch = "jumprelu"
        # ReLU(pre) * (pre > t) == pre * (pre > max(t, tiny)) except for pre in (0, tiny]: visae keeps log(t)
        extra_tensors["log_threshold"] = state["threshold"].clamp_min(_TINY).log()
    elif arch == "batchtopk" and "topk_threshold" in state:
        visae_arch, kw["k"] = "batchtopk", int(cfg.get("k", 1))
        extra_tensors["threshold"] = state["topk_threshold"].reshape(())
    else:
        raise InteropError(f"{where}: architecture {arch!r} is not supported (standard, topk, jumprelu; batchtopk "
                           "training checkpoints with topk_threshold)")
    if arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm"):
        # f = TopK(pre * ||W_dec_j||), x_hat = (f / ||W_dec_j||) W_dec: fold the norms (exact; a batchtopk
        # threshold is already in those rescaled units)
        n = W_dec.norm(dim=-1).clamp_min(1e-12)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    meta = cfg.get("metadata") or {}
    visae_meta = meta.get("visae") if isinstance(meta.get("visae"), dict) else {}
    extra = dict(visae_meta.get("extra") or {})
    if not isinstance(extra.get("source"), dict) and not isinstance((extra.get("shards") or {}).get("source"), dict):
        extra["source"] = _source_from_hook(meta)
    src = extra["source"] if isinstance(extra.get("source"), dict) else extra["shards"]["source"]
    for k, v in (("model", model), ("layer", layer), ("token", token)):
        if v is not None:
            src[k] = v
    extra["imported_from"] = {"format": "sae_lens", "path": str(path.resolve()), "architecture": arch,
                              "normalize_activations": norm, "sae_lens_version": meta.get("sae_lens_version"),
                              "hook_name": meta.get("hook_name")}
    sae = sae_from_matrices(visae_arch, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                            extra_tensors=extra_tensors, extra=extra, where=where, **kw)
    if out is not None:
        check_out_dir(out, ("cfg.json", "weights.safetensors"), "import_saelens")
        sae.save(out)
    return sae


def _hook_name(src: dict[str, Any]) -> str | None:
    layer = src.get("layer")
    if isinstance(layer, int) and layer >= 0:
        return f"blocks.{layer}.hook_resid_post"
    if isinstance(src.get("hook_name"), str):
        return src["hook_name"]
    return None


def export_saelens(sae: Any, out: str | Path, *, member: int = 0, model_name: str | None = None,
                   hook_name: str | None = None, beside: Sequence[str] = ()) -> Path:
    """Write ``sae`` (one member of a stack) as a SAELens >= 6 directory that ``sae_lens.SAE.load_from_disk`` loads.

    The SAELens SAE gives the same reconstructions as ``sae`` on raw activations (up to float
    rounding of the folded factors). ``metadata.model_name`` / ``hook_name`` come from the
    SAE's recorded source (``blocks.L.hook_resid_post`` for a residual layer L) unless given.
    Files are written atomically, cfg.json last. Returns ``out``.

    Raises InteropError for an architecture SAELens has no equivalent of, or an ``out`` that holds anything but an
    earlier export (and the files ``beside``, which a caller writes next to it: ``visae push``'s README.md), before
    anything is written (:func:`visae.interop.check_out_dir`).
    """
    from safetensors.torch import save as st_save

    from visae.atomic import atomic_write_bytes, atomic_write_text

    if sae.n_models > 1:
        sae = sae.member(member)
    sae = sae.copy()
    c, d_in = float(sae.cfg.scale_factor), int(sae.d_in)
    arch = sae.architecture
    if arch not in ("relu", "topk", "jumprelu", "batchtopk", "matryoshka"):
        raise InteropError(f"architecture {arch!r} has no SAELens equivalent (relu, topk, jumprelu, batchtopk, "
                           "matryoshka)")
    with torch.no_grad():
        W_enc, b_enc, W_dec, b_dec = (t[0].detach().float().clone() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
        if sae.cfg.input_normalization == "unit_norm":
            r, norm = c / math.sqrt(d_in), "constant_norm_rescale"   # visae space u*c = SAELens space u*sqrt(d) * r
        else:
            r, norm = c, "none"                                       # visae space x*c = raw x * r
        if r != 1.0:  # codes unchanged: W_enc *= r, W_dec /= r, b_dec /= r
            W_enc, W_dec, b_dec = W_enc * r, W_dec / r, b_dec / r
        state = {"W_enc": W_enc.contiguous(), "b_enc": b_enc.contiguous(), "W_dec": W_dec.contiguous(),
                 "b_dec": b_dec.contiguous()}
        cfg: dict[str, Any] = {"d_in": d_in, "d_sae": int(sae.d_sae), "dtype": "float32", "device": "cpu",
                               "apply_b_dec_to_input": True, "normalize_activations": norm,
                               "reshape_activations": "none"}
        if arch == "relu":
            cfg["architecture"] = "standard"
        elif arch == "topk":
            cfg.update(architecture="topk", k=int(sae.cfg.k), rescale_acts_by_decoder_norm=False)
        elif arch == "jumprelu":
            cfg["architecture"] = "jumprelu"
            state["threshold"] = sae.log_threshold[0].detach().float().exp().contiguous()
        else:  # batchtopk (and matryoshka, whose codes are batchtopk's; its prefixes only shape training) at
            # inference: pre * (pre > max(threshold, 0)) for every latent
            cfg["architecture"] = "jumprelu"
            thr = float(sae.threshold[0].clamp_min(0.0))
            state["threshold"] = torch.full((int(sae.d_sae),), thr)
    src = dict((sae.extra.get("shards") or {}).get("source") or sae.extra.get("source") or {})
    cfg["metadata"] = {
        "sae_lens_version": SAELENS_LAYOUT_VERSION,
        "sae_lens_training_version": None,
        "model_name": model_name or src.get("model"),
        "hook_name": hook_name or _hook_name(src),
        "hook_head_index": None,
        "visae": {"architecture": arch, "cfg": sae.cfg.to_dict(), "extra": sae.extra},
    }
    out = Path(out)
    check_out_dir(out, (SAELENS_WEIGHTS, SAELENS_CFG, *beside), "export_saelens")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / SAELENS_WEIGHTS, st_save(state, metadata={"format": "pt"}))
    atomic_write_text(out / SAELENS_CFG, json.dumps(cfg, indent=1, default=str))
    return out
