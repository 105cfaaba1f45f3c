"""Import and export of other tools' SAEs and activations: one small module per format.

=====================  ======================================  =========================================
format                 module                                  what
=====================  ======================================  =========================================
SAELens (>= 6)         :mod:`visae.interop.saelens`            SAE dirs both ways (cfg.json +
                                                               sae_weights.safetensors)
Discover-then-Name     :mod:`visae.interop.dncbm`              ``sparse_autoencoder_final.pt`` -> visae
saev                   :mod:`visae.interop.saev`               activation shards (protocol 2.1) -> shard
                                                               set; ``sae.pt`` checkpoints -> visae
Hugging Face hub       :mod:`visae.interop.hub`                ``load_sae("hf://org/repo[/sub]")``,
                                                               ``visae push``
=====================  ======================================  =========================================

Every importer returns a :class:`visae.sae.SAE` that works on raw activations and records in
``extra`` where it came from (``imported_from``) and, where the foreign format says so, the
activations it was trained on (``source``: model, layer, token), which splicing and naming
read. ``detect_layout(path)`` names the foreign layout of a directory; ``visae.sae.load_sae``
uses it to point at the right importer. The formats, with the versions and commits they
were taken from, are written down in docs/interop.md.
"""

from __future__ import annotations

from typing import Any, Sequence

from visae.errors import VisaeError
from visae.interop.layouts import detect_layout, import_hint

__all__ = ["InteropError", "detect_layout", "import_hint", "sae_from_matrices", "check_out_dir", "torch_load_error"]


class InteropError(VisaeError, ValueError):
    """A foreign SAE / activation file is malformed, of an unsupported version, or cannot be represented."""


def check_out_dir(out: Any, writes: Sequence[str], what: str) -> None:
    """Refuse to write an import or export into a directory that holds anything but an earlier result of the same
    kind (the files ``writes``): exporting to SAELens over a trained visae SAE replaced its cfg.json and lost it, and
    importing over a training run left that run's metrics and checkpoint beside another SAE. Raises InteropError
    naming the directory and what is in it; an absent or empty directory, or one with only ``writes``, passes."""
    from pathlib import Path

    from visae.atomic import OutputPathError, check_output_path

    out = Path(out)
    try:  # out, or a parent of it, is a file (or a dangling link)
        check_output_path(out, what)
    except OutputPathError as e:
        raise InteropError(f"{what}: {e}") from None
    if not out.exists():
        return
    # hidden files pass: the lock (.visae.lock), a killed write's temp files (.cfg.json.<pid>.<hex>.tmp), .DS_Store
    other = sorted(f.name for f in out.iterdir() if f.name not in writes and not f.name.startswith("."))
    if other:
        raise InteropError(f"{what}: {out} already holds other files ({', '.join(other[:5])}"
                           f"{', ...' if len(other) > 5 else ''}); write into a new or empty directory")
    if "cfg.json" in writes and (out / "cfg.json").is_file():
        import json

        try:
            doc = json.loads((out / "cfg.json").read_text())
        except (OSError, ValueError):
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        is_visae = doc.get("format") == "visae.sae"
        if "weights.safetensors" in writes:  # an import: only an earlier import may be replaced
            if not is_visae or not isinstance((doc.get("extra") or {}).get("imported_from"), dict):
                raise InteropError(f"{what}: {out} holds an SAE that is not an earlier import (cfg.json format "
                                   f"{doc.get('format')!r}); write into a new or empty directory")
        elif is_visae:  # an export over a visae SAE directory would replace its cfg.json
            raise InteropError(f"{what}: {out} holds a visae SAE (cfg.json format 'visae.sae'); write into a new or "
                               "empty directory")


def sae_from_matrices(architecture: str, *, W_enc: Any, b_enc: Any, W_dec: Any,
                      b_dec: Any, extra_tensors: dict[str, Any] | None = None,
                      extra: dict[str, Any] | None = None, where: str = "checkpoint", **cfg: Any):
    """A single visae SAE (S = 1) from plain matrices, float32.

    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] in visae's convention
    (``pre = (x - b_dec) W_enc + b_enc``, ``x_hat = f W_dec + b_dec``); ``extra_tensors`` are
    architecture tensors without the member axis (``threshold`` [], ``log_threshold`` [d_sae]).
    ``cfg`` holds further :class:`visae.sae.SAEConfig` fields. Raises :class:`InteropError` on shapes and on
    non-finite (NaN / Inf) values, naming the tensor.
    """
    import torch

    from visae.sae import SAEConfig, build_sae

    W_enc, b_enc, W_dec, b_dec = (t.detach().to(torch.float32).cpu() for t in (W_enc, b_enc, W_dec, b_dec))
    if W_enc.ndim != 2:
        raise InteropError(f"{where}: encoder weight must be 2-D [d_in, d_sae], got {list(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    want = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, t in (("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        if tuple(t.shape) != want[name]:
            raise InteropError(f"{where}: {name} has shape {list(t.shape)}, expected {list(want[name])} "
                               f"(from the encoder's [d_in={d_in}, d_sae={d_sae}])")
    try:
        sae = build_sae(SAEConfig(architecture=architecture, d_in=int(d_in), d_sae=int(d_sae), **cfg))
    except ValueError as e:
        raise InteropError(f"{where}: {e}") from None
    state = {"W_enc": W_enc[None], "b_enc": b_enc[None], "W_dec": W_dec[None], "b_dec": b_dec[None]}
    for k, v in (extra_tensors or {}).items():
        state[k] = v.detach().to(torch.float32).cpu()[None]
    from visae.integrity import check_finite

    check_finite(state, where, InteropError)  # imported, it failed only when named or browsed ("retrain" it)
    sae.load_state_dict(state)
    sae.extra = dict(extra or {})
    return sae.eval()


def torch_load_error(e: BaseException) -> str:
    """What ``torch.load(..., weights_only=True)`` said, as one clause without torch's advice to retry with
    ``weights_only=False`` (which runs the file's pickled code: wrong for a damaged file, unsafe for an untrusted
    one): the exception's type and the first line of its message, and that visae loads tensors only."""
    import re

    msg = str(e)
    if "Weights only load failed" in msg:
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", msg, re.S)
        detail = " ".join(m.group(1).split()) if m else ""
        if "Unsupported global" in detail:
            what = f"it holds objects other than tensors ({detail.split(' was not')[0]})"
        else:
            what = f"not a torch checkpoint, or damaged ({detail or 'unreadable'})"
    else:
        what = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {what}; visae loads checkpoints with weights_only=True and runs no pickled code"
