"""saev activation shards -> visae shard sets, and saev SAE checkpoints -> visae SAEs.

saev (github.com/OSU-NLP-Group/saev, read at commit 3d73f1f7122738563404e4c50a98d897aa18a7d0;
``docs/src/developers/protocol.md`` and ``src/saev/data/shards.py``, ``src/saev/nn/modeling.py``).

**Shards, protocol 2.1** (the only version converted; ``metadata.json`` field ``protocol``)::

    DIR/metadata.json   family, ckpt, layers [L ints], content_tokens_per_example P (the protocol
                        text calls it patches_per_ex), cls_token, d_model D, n_examples,
                        max_tokens_per_shard (protocol text: patches_per_shard), dtype "float32",
                        protocol "2.1", data, dataset, pixel_agg
    DIR/shards.json     [{"name": "acts000000.bin", "n_examples": n}, ...]
    DIR/actsNNNNNN.bin  raw float32, C order, shape [E, L, T, D] with T = P + cls_token and
                        E = max_tokens_per_shard // (T * L) (the last shard's file is as large;
                        only its first n_examples are filled)

:func:`convert_saev_shards` picks one layer and a token choice ("patch": the P content tokens,
"cls", "all") and streams it into a visae shard set chunk by chunk: each chunk of examples is
``np.memmap``-ed alone (a bounded window of the file) and copied out, so memory stays bounded
by ``chunk_bytes`` whatever the folder's size (``tests/test_interop_saev.py`` runs it under an
address-space limit smaller than one shard). Activations are raw residual-stream vectors after
block ``layer`` (saev records block outputs), as visae extraction writes with ``--layer``.

**SAE checkpoints** (``<run>/checkpoint/sae.pt``, ``saev.nn.modeling.dump``): one JSON header
line (``schema`` 1-5, or the pre-schema legacy header with ``d_vit``), then
``torch.save(state_dict)`` with ``W_enc [D, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, D]``,
``b_dec [D]`` (BatchTopK: ``activation.threshold []``). saev computes ``pre = x W_enc + b_enc``
(no ``b_dec`` subtracted) on raw activations, so the import folds ``b_dec W_enc`` into ``b_enc``.
Relu -> relu, TopK -> topk (saev keeps the k largest pre-activations even when negative, visae
keeps ReLU of them: identical whenever the k-th largest is positive), BatchTopK -> batchtopk
(the same eval threshold rule). Matryoshka prefixes only matter in training. Checkpoints of
old saev versions trained with ``scale_mean`` / ``scale_norm`` data options need those data
statistics, which the checkpoint does not hold: they are imported as raw-input SAEs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from visae.interop import InteropError, check_out_dir, torch_load_error

__all__ = ["convert_saev_shards", "import_saev_sae", "read_saev_metadata", "SAEV_PROTOCOL", "SAEV_COMMIT"]

SAEV_PROTOCOL = "2.1"
SAEV_COMMIT = "3d73f1f7122738563404e4c50a98d897aa18a7d0"
_ALIASES = {"content_tokens_per_example": "patches_per_ex", "max_tokens_per_shard": "patches_per_shard"}


def read_saev_metadata(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metadata.json with the code's field names, shards.json entries) of a saev shard folder, checked."""
    path = Path(path)
    meta_p, shards_p = path / "metadata.json", path / "shards.json"
    for p in (meta_p, shards_p):
        if not p.is_file():
            raise InteropError(f"{p} is missing: {path} is not a saev shard folder (protocol {SAEV_PROTOCOL}: "
                               "metadata.json + shards.json + acts*.bin)")
    try:
        meta = json.loads(meta_p.read_text())
        shards = json.loads(shards_p.read_text())
    except json.JSONDecodeError as e:
        raise InteropError(f"{path}: metadata.json / shards.json is not valid JSON: {e}") from None
    for code, doc in _ALIASES.items():
        if code not in meta and doc in meta:
            meta[code] = meta[doc]
    if str(meta.get("protocol")) != SAEV_PROTOCOL:
        raise InteropError(f"{meta_p}: field 'protocol' is {meta.get('protocol')!r}; this converter reads saev "
                           f"shard protocol {SAEV_PROTOCOL!r} only")
    need = ("layers", "content_tokens_per_example", "cls_token", "d_model", "n_examples", "max_tokens_per_shard")
    missing = [k for k in need if k not in meta]
    if missing:
        raise InteropError(f"{meta_p}: missing field(s) {missing}")
    if meta.get("dtype", "float32") != "float32":
        raise InteropError(f"{meta_p}: field 'dtype' is {meta['dtype']!r}, protocol {SAEV_PROTOCOL} stores float32")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s and "n_examples" in s for s in shards):
        raise InteropError(f"{shards_p}: expected a list of {{'name', 'n_examples'}} objects")
    total = sum(int(s["n_examples"]) for s in shards)
    if total != int(meta["n_examples"]):
        raise InteropError(f"{shards_p}: shards hold {total} examples, metadata.json n_examples says {meta['n_examples']}")
    return meta, shards


def convert_saev_shards(src: str | Path, out: str | Path, *, layer: int, token: str = "patch",
                        dtype: str = "float16", shard_size: int = 65536, normalization: str = "unit_norm",
                        model: str | None = None, chunk_bytes: int = 16 << 20, overwrite: bool = False) -> Any:
    """Convert one layer of a saev shard folder (protocol 2.1) into a visae shard set at ``out``.

    Args:
        src: the saev folder (metadata.json, shards.json, acts*.bin).
        out: the visae shard set to write (``visae.shards.ShardWriter``: resumable, atomic per shard).
        layer: a value of ``metadata.layers`` (the ViT block whose output was recorded).
        token: "patch" (the content tokens, one row each, ids ``saev:<example>#p<k>``), "cls"
            (needs ``cls_token``; ids ``saev:<example>``) or "all" (every stored token).
        dtype, shard_size, normalization: of the visae shard set (docs/shard_format.md).
        model: backbone registry name recorded as ``source.model`` (default: from saev's ``ckpt``: a CLIP
            ``"ViT-B-16/openai"`` is open_clip's ``ViT-B-16`` with tag ``openai``; else the string as saev wrote it).
        chunk_bytes: upper bound on the bytes of saev file mapped and copied at once.

    Returns the :class:`visae.shards.ShardSet`. Raises :class:`InteropError` for a layer / token
    the folder does not hold or a shard file of the wrong size, before writing anything; and, with
    ``normalization="unit_norm"``, for a zero or non-finite activation vector (naming the saev file, example and
    token; the rows before it stay committed).
    """
    from visae.shards import ShardSet, ShardWriter

    src = Path(src)
    meta, shards = read_saev_metadata(src)
    layers = [int(v) for v in meta["layers"]]
    if int(layer) not in layers:
        raise InteropError(f"{src}/metadata.json: layer {layer} was not recorded (layers {layers})")
    li = layers.index(int(layer))
    L, P, cls, D = len(layers), int(meta["content_tokens_per_example"]), bool(meta["cls_token"]), int(meta["d_model"])
    T = P + int(cls)
    if token == "cls":
        if not cls:
            raise InteropError(f"{src}/metadata.json: cls_token is false; token 'cls' is not available (use 'patch')")
        tok = slice(0, 1)
    elif token == "patch":
        tok = slice(int(cls), T)
    elif token == "all":
        tok = slice(0, T)
    else:
        raise InteropError(f"token must be 'patch', 'cls' or 'all', got {token!r}")
    n_tok = tok.stop - tok.start
    per_shard = int(meta["max_tokens_per_shard"]) // (T * L)
    ex_bytes = L * T * D * 4
    files = []
    for s in shards:
        f, n = src / str(s["name"]), int(s["n_examples"])
        if not f.is_file():
            raise InteropError(f"{f}: listed in shards.json but missing")
        if n > per_shard or f.stat().st_size < n * ex_bytes:
            raise InteropError(f"{f}: {f.stat().st_size} bytes cannot hold {n} examples of [L={L}, T={T}, D={D}] "
                               f"float32 ({n * ex_bytes} bytes; at most {per_shard} examples per shard)")
        files.append((f, n))
    guess, tag = _backbone_of(meta) if model is None else (model, None)
    source = {"stage": "visae.interop.saev", "model": guess, "pretrained": tag,
              "layer": int(layer), "token": token, "read": f"residual_after_block_{int(layer)}",
              "dataset": str(meta.get("dataset", "")),
              "saev": {"protocol": SAEV_PROTOCOL, "path": str(src.resolve()), "family": meta.get("family"),
                       "ckpt": meta.get("ckpt"), "layers": layers, "cls_token": cls, "repo_commit": SAEV_COMMIT}}
    writer = ShardWriter(out, D, dtype=dtype, shard_size=shard_size, normalization=normalization, source=source,
                         overwrite=overwrite)
    chunk = max(1, int(chunk_bytes) // ex_bytes)
    done = writer.num_written  # resume: skip the rows already committed
    example0 = 0
    with writer:
        for f, n in files:
            for e0 in range(0, n, chunk):
                e1 = min(n, e0 + chunk)
                rows = (e1 - e0) * n_tok
                if done >= rows:
                    done -= rows
                    continue
                window = np.memmap(f, dtype=np.float32, mode="r", offset=e0 * ex_bytes, shape=(e1 - e0, L, T, D))
                acts = np.array(window[:, li, tok, :]).reshape(rows, D)
                del window
                g = np.arange(example0 + e0, example0 + e1)
                if token == "patch":
                    ids = [f"saev:{e}#p{k}" for e in g for k in range(n_tok)]
                elif token == "cls":
                    ids = [f"saev:{e}" for e in g]
                else:
                    ids = [f"saev:{e}#t{k}" for e in g for k in range(n_tok)]
                acts, ids = acts[done:], ids[done:]
                done = 0
                if normalization == "unit_norm":
                    zero = np.flatnonzero(~(np.linalg.norm(acts, axis=1) > 0))
                    if zero.size:  # unit_norm cannot scale it; the writer's message named visae's row, not saev's
                        raise InteropError(f"{f}: {ids[int(zero[0])]} (layer {layer}, token {token}) is a zero or "
                                           f"non-finite activation vector ({zero.size} such rows in examples "
                                           f"{int(g[0])}-{int(g[-1])}), which unit_norm cannot scale; convert with "
                                           "normalization='none', or drop those examples in saev")
                writer.add(acts, ids)
            example0 += n
    return ShardSet(out)


# ----------------------------------------------------------------------------- SAE checkpoints


def _backbone_of(meta: dict[str, Any]) -> tuple[str | None, str | None]:
    """(visae backbone name, pretrained tag) for saev's ``family`` / ``ckpt``: a CLIP checkpoint written
    ``"ViT-B-16/openai"`` (open_clip's model and tag joined by '/') becomes ``("ViT-B-16", "openai")`` when open_clip
    knows the model; anything else is recorded as saev wrote it (name it with ``model=`` to name or splice later)."""
    ckpt = meta.get("ckpt")
    if not isinstance(ckpt, str):
        return None, None
    name, sep, tag = ckpt.partition("/")
    if sep and str(meta.get("family", "clip")).lower() in ("clip", "open_clip", "open-clip") and tag:
        try:
            import open_clip

            if open_clip.get_model_config(name) is not None:
                return name, tag
        except Exception:  # noqa: BLE001 - open_clip cannot say: keep saev's string
            pass
    return ckpt, None


def _find_ckpt(path: Path) -> Path:
    if path.is_file():
        return path
    for cand in (path / "checkpoint" / "sae.pt", path / "sae.pt"):
        if cand.is_file():
            return cand
    raise InteropError(f"{path}: no saev checkpoint (looked for {path}/checkpoint/sae.pt and {path}/sae.pt)")


def _activation(header: dict[str, Any], where: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(activation class name, its params, the SAE cfg dict) from any saev header schema."""
    schema = header.get("schema")
    if schema is None:  # pre-schema: raw config, ReLU
        cfg = dict(header)
        cfg.setdefault("d_model", cfg.get("d_vit"))
        return "Relu", {}, cfg
    cfg = dict(header.get("cfg") or {})
    if schema == 1 and header.get("cls") in ("Relu", "TopK", "BatchTopK"):
        return header["cls"], {"top_k": cfg.get("top_k", 32)}, cfg
    act = cfg.get("activation")
    if not isinstance(act, dict) or "cls" not in act:
        raise InteropError(f"{where}: header schema {schema} has no activation {{'cls', 'params'}} in cfg")
    return str(act["cls"]), dict(act.get("params") or {}), cfg


def import_saev_sae(path: str | Path, out: str | Path | None = None, *, model: str | None = None,
                    layer: int | None = None, token: str | None = None) -> Any:
    """Load a saev SAE checkpoint (``sae.pt``, or a run dir holding ``checkpoint/sae.pt``) as a visae SAE.

    ``model`` / ``layer`` / ``token`` record the activations it was trained on (saev's
    checkpoint does not; splicing needs ``layer`` and ``token``, e.g. from the shard
    folder's metadata.json). Raises :class:`InteropError` naming the file for an unknown
    header or activation, or tensors that do not fit.
    """
    import torch

    from visae.interop import sae_from_matrices

    f = _find_ckpt(Path(path))
    with open(f, "rb") as fh:
        first = fh.readline()
        rest = fh.read()
    try:
        header = json.loads(first)  # bytes: json decodes them as UTF-8, which a binary file is not
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{f}: not a saev checkpoint: its first line is not saev's JSON header "
                           f"({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise InteropError(f"{f}: not a saev checkpoint: its first line is JSON but not saev's header object")
    if header.get("schema") not in (None, 1, 2, 3, 4, 5):
        raise InteropError(f"{f}: header schema {header.get('schema')!r} is unknown (saev schemas 1-5 are read)")
    cls_name, params, cfg = _activation(header, str(f))
    try:
        state = torch.load(io.BytesIO(rest), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: name the file
        raise InteropError(f"{f}: the state_dict after the header cannot be read ({torch_load_error(e)})") from None
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in state]
    if missing:
        raise InteropError(f"{f}: missing tensor(s) {missing} (has {sorted(state)})")
    W_enc, b_enc, W_dec, b_dec = (state[k].float() for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if W_enc.ndim != 2 or tuple(b_dec.shape) != (W_enc.shape[0],):
        raise InteropError(f"{f}: W_enc {list(W_enc.shape)} / b_dec {list(b_dec.shape)} do not fit [d_model, d_sae] / [d_model]")
    b_enc = b_enc + b_dec @ W_enc  # saev: pre = x W_enc + b_enc; visae subtracts b_dec first
    kw: dict[str, Any] = {"input_normalization": "none", "scale_factor": 1.0}
    extra_tensors: dict[str, Any] = {}
    if cls_name == "Relu":
        arch = "relu"
    elif cls_name == "TopK":
        arch, kw["k"] = "topk", int(params.get("top_k", 32))
    elif cls_name == "BatchTopK":
        arch, kw["k"] = "batchtopk", int(params.get("top_k", 32))
        thr = state.get("activation.threshold")
        extra_tensors["threshold"] = (thr if thr is not None else torch.tensor(-1.0)).float().reshape(())
    else:
        raise InteropError(f"{f}: activation {cls_name!r} is not supported (Relu, TopK, BatchTopK)")
    extra = {"source": {"model": model, "layer": layer if layer is not None else "unknown", "token": token},
             "imported_from": {"format": "saev", "path": str(f.resolve()), "schema": header.get("schema"),
                               "activation": cls_name, "saev_cfg": cfg, "repo_commit": SAEV_COMMIT}}
    sae = sae_from_matrices(arch, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, extra_tensors=extra_tensors,
                            extra=extra, where=str(f), **kw)
    if out is not None:
        check_out_dir(out, ("cfg.json", "weights.safetensors"), "import_saev_sae")
        sae.save(out)
    return sae
