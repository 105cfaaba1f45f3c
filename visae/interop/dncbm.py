"""Discover-then-Name checkpoints -> visae ReLU SAEs.

Discover-then-Name (Rao, Mahajan, Böhle, Schiele, ECCV 2024; github.com/neuroexplicit-saar/Discover-then-Name,
read at commit 03484baef77747596712cf971e402f77b9da5a9a) trains its SAE with the
``sparse_autoencoder`` library it vendors (``sparse_autoencoder/sparse_autoencoder/autoencoder/``)
and saves ``torch.save(autoencoder.state_dict())`` as
``<save_dir>/sae_checkpoints/sparse_autoencoder_final.pt`` (``dncbm/custom_pipeline.py``,
``save_checkpoint``). With ``n_components = C`` (DnCBM uses ``len(hook_points) = 1``) the
state_dict holds, for ``n`` input features and ``m`` learned features::

    tied_bias                          [C, n]     (also under pre_encoder_bias._bias_reference and
                                                   post_decoder_bias._bias_reference: the same tensor)
    encoder._weight                    [C, m, n]
    encoder._bias                      [C, m]
    decoder._weight                    [C, n, m]  (unit-norm columns)

(without the leading ``C`` when the model was built with ``n_components=None``), and the
forward (``model.py``, ``linear_encoder.py``, ``unit_norm_decoder.py``, ``tied_bias.py``) is::

    f     = ReLU((x - tied_bias) encoder._weight^T + encoder._bias)
    x_hat = f decoder._weight^T + tied_bias

on the raw CLIP image embeddings ``model.encode_image(images)`` (OpenAI ``clip`` package, not
normalised; ``scripts/save_cc3m_features.py``). That is visae's ReLU SAE with
``W_enc = encoder._weight^T``, ``b_enc = encoder._bias``, ``W_dec = decoder._weight^T``,
``b_dec = tied_bias``, ``input_normalization = "none"``, ``scale_factor = 1``; the source
is the final image embedding (``read: image_embedding``), so ``visae name`` and zero-shot
selection accept the imported SAE. DnCBM's default backbone ``clip_ViT-B/16`` is open_clip's
``ViT-B-16:openai``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from visae.interop import InteropError, check_out_dir, sae_from_matrices, torch_load_error

__all__ = ["import_dncbm", "DNCBM_COMMIT", "DNCBM_FILE"]

DNCBM_COMMIT = "03484baef77747596712cf971e402f77b9da5a9a"
DNCBM_FILE = "sparse_autoencoder_final.pt"
_KEYS = ("tied_bias", "encoder._weight", "encoder._bias", "decoder._weight")


def _find(path: Path) -> Path:
    if path.is_file():
        return path
    for cand in (path / "sae_checkpoints" / DNCBM_FILE, path / DNCBM_FILE):
        if cand.is_file():
            return cand
    raise InteropError(f"{path}: no Discover-then-Name checkpoint (looked for {path}/sae_checkpoints/{DNCBM_FILE} "
                       f"and {path}/{DNCBM_FILE})")


def _embedding_width(model: str) -> int | None:
    """The image-embedding width of open_clip model config ``model`` (``embed_dim``), or None when open_clip does
    not know the name (timm models, a checkpoint file): nothing to compare with."""
    try:
        import open_clip

        cfg = open_clip.get_model_config(model)
    except Exception:  # noqa: BLE001 - an unknown name: no width to check
        return None
    return int(cfg["embed_dim"]) if cfg and "embed_dim" in cfg else None


def import_dncbm(path: str | Path, out: str | Path | None = None, *, model: str | None = "ViT-B-16:openai",
                 component: int = 0) -> Any:
    """Load a Discover-then-Name ``sparse_autoencoder_final.pt`` (file or its save dir) as a visae ReLU SAE.

    ``model`` names the backbone whose raw image embeddings it was trained on (recorded as the
    source: ``ViT-B-16:openai`` for DnCBM's default ``clip_ViT-B/16``; ``None`` leaves it
    unknown). ``component`` picks one of ``n_components`` SAEs. The SAE works on raw
    embeddings ``[B, n]`` exactly as the original forward does. Saved to ``out`` when given.
    Raises :class:`InteropError` naming the file and the missing / misshapen keys, or when ``n`` is not the
    image-embedding width of ``model`` (an open_clip config's ``embed_dim``).
    """
    from visae.backbones import parse_backbone_name

    f = _find(Path(path))
    try:
        state = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle / zip errors of every kind: name the file
        raise InteropError(f"{f}: not a readable torch state_dict ({torch_load_error(e)})") from None
    if not isinstance(state, dict):
        raise InteropError(f"{f}: expected a state_dict (dict of tensors), got {type(state).__name__}")
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise InteropError(f"{f}: missing key(s) {missing} of the sparse_autoencoder library's SparseAutoencoder "
                           f"(expected {list(_KEYS)}; found {sorted(state)[:12]})")
    tb, We, be, Wd = (state[k].detach().float() for k in _KEYS)
    if tb.ndim == 1:  # n_components=None: no component axis
        tb, We, be, Wd = tb[None], We[None], be[None], Wd[None]
    C, n = tb.shape
    if We.ndim != 3 or We.shape[0] != C or We.shape[2] != n:
        raise InteropError(f"{f}: encoder._weight has shape {list(state['encoder._weight'].shape)}, expected "
                           f"[C={C}, m, n={n}] (from tied_bias {list(state['tied_bias'].shape)})")
    m = We.shape[1]
    for name, t, want in (("encoder._bias", be, (C, m)), ("decoder._weight", Wd, (C, n, m))):
        if tuple(t.shape) != want:
            raise InteropError(f"{f}: {name} has shape {list(t.shape)}, expected {list(want)}")
    if not 0 <= component < C:
        raise InteropError(f"{f}: component {component} out of range (the checkpoint has n_components={C})")
    source: dict[str, Any] = {"model": None, "pretrained": None, "layer": None, "token": None,
                              "read": "image_embedding", "normalization": "none"}
    if model:
        source["model"], source["pretrained"] = parse_backbone_name(model, None)
        width = _embedding_width(source["model"])
        if width is not None and width != n:  # the source record would send names / splices to another model
            raise InteropError(f"{f}: the SAE reads {n}-wide embeddings but model={model!r} embeds images in {width} "
                               "dimensions; pass model= the CLIP it was trained on (DnCBM's clip_ViT-L/14: "
                               "'ViT-L-14:openai', 768; clip_RN50: 'RN50:openai', 1024) or model=None (unknown)")
    extra = {"source": source,
             "imported_from": {"format": "discover-then-name", "path": str(f.resolve()), "repo_commit": DNCBM_COMMIT,
                               "component": component, "n_components": C,
                               "input": "raw image embeddings (model.encode_image, not normalised)"}}
    sae = sae_from_matrices("relu", W_enc=We[component].T, b_enc=be[component], W_dec=Wd[component].T,
                            b_dec=tb[component], extra=extra, where=str(f), input_normalization="none",
                            scale_factor=1.0)
    if out is not None:
        check_out_dir(out, ("cfg.json", "weights.safetensors"), "import_dncbm")
        sae.save(out)
    return sae
