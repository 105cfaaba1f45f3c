"""Text embeddings through a CLIP text tower, fast and cached on disk.

``encode_texts(backbone, texts, templates)`` returns unit-normalised text embeddings
``[len(texts), D]`` (float32, CPU). With prompt templates (``"a photo of a {}."``) each
text's embedding is the mean over templates of the unit prompt embeddings, renormalised.
Zero-shot classification and concept naming both use it.

Fast path. CLIP's text transformer is causal and pools the features of one position
(the end-of-text token for ``argmax`` / ``eos`` pooling, position 0 for ``first``), so
the positions after that one cannot change the embedding. Prompts are sorted by the
length they need and each batch runs only ``L = max needed length`` positions (the
tokens, the positional embedding and the causal mask sliced to ``L``) instead of the
full context of 77. Single words need ~3-5 positions. Models whose text tower does
not fit that pattern (bidirectional, padding masks, ``last`` pooling, CoCa's class
token, HF text towers) fall back to ``backbone.encode_text`` over the full context.
Before trusting the fast path on a model it is checked against ``backbone.encode_text``
on a few prompts.

Cache. ``cache_dir/<key>.safetensors`` (tensor ``embeddings``) where key = sha256 of
(backbone name, pretrained tag, a fingerprint of the text tower's parameter values,
texts, templates). The fingerprint makes random-init models and different local
checkpoints miss each other's entries. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["encode_texts", "embed_prompts", "cache_key", "default_cache_dir", "text_fingerprint", "fast_text_parts",
           "context_length", "prompts_that_do_not_fit", "texts_that_do_not_fit"]

log = logging.getLogger(__name__)

CACHE_FORMAT = "visae.textcache.v1"


# ----------------------------------------------------------------------------- what fits the context


def _token_ids(tokens: Any) -> torch.Tensor:
    return tokens if isinstance(tokens, torch.Tensor) else tokens["input_ids"]  # HF tokenizers: a BatchEncoding


def context_length(tokenizer: Any) -> int:
    """Positions the text tower reads: the width of the tokenizer's output (77 for CLIP, 16 for the toy CLIP)."""
    return int(_token_ids(tokenizer(["x"])).shape[1])


def prompts_that_do_not_fit(tokenizer: Any, prompts: Sequence[str]) -> list[int]:
    """Indices of ``prompts`` whose tokens (with start and end tokens) need more positions than the context.

    A CLIP tokenizer cuts such a prompt to the context silently (open_clip keeps the first ``ctx - 1``
    tokens and puts the end token last), so two prompts that differ only after the cut get identical
    embeddings. Exact: each prompt is tokenised with one position more than the context, and it fits iff
    that extra position holds padding (the value an empty prompt has there). A tokenizer that takes no
    ``context_length`` argument is judged at its own context: a prompt that fills every position counts
    as not fitting (it may have been cut).
    """
    prompts = [str(p) for p in prompts]
    if not prompts:
        return []
    ctx = context_length(tokenizer)
    try:
        wide = _token_ids(tokenizer(prompts, context_length=ctx + 1))
        pad = _token_ids(tokenizer([""], context_length=ctx + 1))[0, -1]
        last = wide[:, ctx] if wide.shape[1] == ctx + 1 else None
    except TypeError:
        last = None
    if last is None:  # no context_length argument: conservative check at the tokenizer's own context
        toks = _token_ids(tokenizer(prompts))
        pad = _token_ids(tokenizer([""]))[0, -1]
        last = toks[:, -1]
    return [int(i) for i in torch.nonzero(last != pad).flatten()]


def texts_that_do_not_fit(tokenizer: Any, texts: Sequence[str], templates: Sequence[str] | None = None) -> list[str]:
    """The texts (in order, each once) some prompt of which does not fit the text tower's context.

    With ``templates`` a text's prompts are ``t.format(text)`` for every template (its embedding is their
    mean, so one cut prompt is enough to spoil it); without, the text itself. See :func:`prompts_that_do_not_fit`.
    """
    texts = [str(t) for t in texts]
    tpl = list(templates) if templates else ["{}"]
    prompts = [t.format(x) for x in texts for t in tpl]
    bad = {i // len(tpl) for i in prompts_that_do_not_fit(tokenizer, prompts)}
    return list(dict.fromkeys(texts[i] for i in sorted(bad)))


# ----------------------------------------------------------------------------- fast path


def fast_text_parts(model: torch.nn.Module) -> dict[str, Any] | None:
    """The pieces of an open_clip causal text tower, or None when the fast path does not apply.

    Handles ``open_clip.CLIP`` (text tower inlined as attributes) and ``CustomTextCLIP``
    whose ``model.text`` is an open_clip ``TextTransformer``.
    """
    holder = None
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "token_embedding") and hasattr(text, "transformer"):
        if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
            return None
        holder = text
        pool, eos = getattr(text, "pool_type", "argmax"), getattr(text, "eos_id", None)
    elif all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        holder = model
        pool, eos = getattr(model, "text_pool_type", "argmax"), getattr(model, "text_eos_id", None)
    if holder is None:
        return None
    mask = getattr(holder, "attn_mask", None)
    if mask is None or mask.ndim != 2 or pool not in ("argmax", "eos", "first"):
        return None  # bidirectional attention or pooling of the last position: every position matters
    if pool == "eos" and eos is None:
        return None
    if type(holder.transformer).forward is not _open_clip_transformer_forward():
        return None  # a transformer we do not know the call signature of
    return {
        "token_embedding": holder.token_embedding,
        "positional_embedding": holder.positional_embedding,
        "transformer": holder.transformer,
        "ln_final": holder.ln_final,
        "text_projection": getattr(holder, "text_projection", None),
        "attn_mask": mask,
        "pool": pool,
        "eos_id": eos,
    }


def _open_clip_transformer_forward():
    try:
        from open_clip.transformer import Transformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return None
    return Transformer.forward


def _pool_index(tokens: torch.Tensor, pool: str, eos_id: int | None) -> torch.Tensor:
    """Position whose features are pooled, per row: [n] long (the same rule as open_clip's text_global_pool)."""
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos":
        return (tokens == eos_id).int().argmax(dim=-1)
    return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)


@torch.no_grad()
def _fast_forward(parts: dict[str, Any], tokens: torch.Tensor, pool_idx: torch.Tensor) -> torch.Tensor:
    """Text features of ``tokens`` [B, ctx] running only the first L = max(pool_idx)+1 positions -> [B, D]."""
    L = int(pool_idx.max()) + 1
    transformer = parts["transformer"]
    cast = transformer.get_cast_dtype() if hasattr(transformer, "get_cast_dtype") else parts["token_embedding"].weight.dtype
    x = parts["token_embedding"](tokens[:, :L]).to(cast)
    x = x + parts["positional_embedding"][:L].to(cast)
    x = transformer(x, attn_mask=parts["attn_mask"][:L, :L])
    x = parts["ln_final"](x)
    x = x[torch.arange(x.shape[0], device=x.device), pool_idx]
    proj = parts["text_projection"]
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def embed_prompts(backbone: Any, prompts: Sequence[str], *, batch_size: int = 256, fast: bool = True,
                  progress: bool = False) -> torch.Tensor:
    """Unit-normalised embeddings of ``prompts`` (no templates, no cache): [n, D] float32 on CPU.

    ``fast=True`` uses the causal-truncation path when the model allows it (see module doc).
    """
    if backbone.tokenizer is None or not getattr(backbone, "has_text", True):
        raise ValueError(f"backbone {getattr(backbone, 'name', backbone)!r} has no text tower; cannot embed text")
    prompts = list(prompts)
    if not prompts:
        return torch.zeros(0, int(getattr(backbone, "embed_dim", 0) or 0))
    device = _model_device(backbone.model)
    tokens = _token_ids(backbone.tokenizer(prompts))
    full = torch.nonzero(tokens[:, -1] != _token_ids(backbone.tokenizer([""]))[0, -1]).flatten().tolist()
    if full:  # prompts that fill the context: only these can have been cut, check them exactly
        cut = [prompts[full[i]] for i in prompts_that_do_not_fit(backbone.tokenizer, [prompts[i] for i in full])]
        if cut:
            log.warning("%d prompt(s) longer than the text context of %d tokens were cut to it (their embeddings "
                        "ignore the rest; prompts that differ only after the cut embed identically): %s",
                        len(cut), tokens.shape[1], cut)
    tokens = tokens.to(device)
    parts = fast_text_parts(backbone.model) if fast else None
    if parts is not None and not _fast_path_agrees(backbone, parts, tokens):
        log.warning("fast text path disagrees with encode_text on %s; using the full context", getattr(backbone, "name", "?"))
        parts = None
    chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
    if parts is None:
        order = torch.arange(len(prompts), device=device)
        pool_idx = None
    else:
        pool_idx = _pool_index(tokens, parts["pool"], parts["eos_id"])
        order = torch.argsort(pool_idx, stable=True)  # similar lengths share a batch
    bar = None
    if progress:  # counted in prompts, so the bar's rate reads prompts/s
        import sys

        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="text embeddings", unit="prompt", file=sys.stderr, mininterval=1.0)
    for start in range(0, len(prompts), batch_size):
        sel = order[start:start + batch_size]
        if parts is None:
            feats = backbone.encode_text(tokens[sel])
        else:
            feats = _fast_forward(parts, tokens[sel], pool_idx[sel])
        chunks.append((sel, F.normalize(feats.float(), dim=-1).cpu()))
        if bar is not None:
            bar.update(len(sel))
    if bar is not None:
        bar.close()
    D = chunks[0][1].shape[1]
    out = torch.empty(len(prompts), D, dtype=torch.float32)
    for sel, feats in chunks:
        out[sel.cpu()] = feats
    return out


def _fast_path_agrees(backbone: Any, parts: dict[str, Any], tokens: torch.Tensor, n: int = 2, atol: float = 1e-3) -> bool:
    """Check the fast path against ``backbone.encode_text`` on the first ``n`` prompts (cheap insurance)."""
    t = tokens[:n]
    ref = F.normalize(backbone.encode_text(t).float(), dim=-1)
    got = F.normalize(_fast_forward(parts, t, _pool_index(t, parts["pool"], parts["eos_id"])).float(), dim=-1)
    return bool(torch.allclose(ref, got, atol=atol, rtol=0))


# ----------------------------------------------------------------------------- cache


def text_fingerprint(model: torch.nn.Module, samples: int = 64) -> str:
    """sha256 over a strided sample of every non-visual parameter's values (cheap; tells weights apart)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if name.startswith("visual.") or name.startswith("visual"):
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(backbone: Any, texts: Sequence[str], templates: Sequence[str] | None) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "model": str(getattr(backbone, "name", "")),
        "pretrained": str(getattr(backbone, "pretrained", "")),
        "backbone_key": str(getattr(backbone, "cache_key", "")),
        "weights": text_fingerprint(backbone.model),
        "texts": list(texts),
        "templates": None if templates is None else list(templates),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:32]


def _cache_load(path: Path, n: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        from safetensors.torch import load_file

        emb = load_file(str(path))["embeddings"]
    except Exception as e:  # noqa: BLE001 - a damaged entry is recomputed, not fatal
        log.warning("text cache entry %s is unreadable (%s); recomputing", path, e)
        return None
    return emb if emb.shape[0] == n else None


def _cache_save(path: Path, emb: torch.Tensor, meta: dict[str, str]) -> None:
    from visae.atomic import atomic_write_bytes
    from visae.integrity import safetensors_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, safetensors_bytes({"embeddings": emb.contiguous()}, meta))


# ----------------------------------------------------------------------------- public API


def template_problem(t: Any) -> str | None:
    """Why ``t`` cannot be a prompt template (None when it can): a string with exactly one ``{}`` for the word and
    nothing else ``str.format`` reads (``"{} {}"``, ``"a {} {"`` and ``"{0}"`` raised inside the text stage)."""
    import string

    if not isinstance(t, str):
        return f"prompt template {t!r} is not a string"
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(t) if name is not None]
    except ValueError:
        return f"prompt template {t!r} has a stray brace (write {{{{ or }}}} for a literal one)"
    if fields != [("", "", None)]:  # '{{}}' is a literal pair of braces, not a field
        return f"prompt template {t!r} must contain exactly one '{{}}' for the word, e.g. 'a photo of a {{}}.'"
    return None


def _check_templates(templates: Sequence[str]) -> list[str]:
    out = []
    for t in templates:
        why = template_problem(t)
        if why:
            raise ValueError(why)
        out.append(t)
    if not out:
        raise ValueError("templates is an empty list; pass None for no templates")
    return out


def encode_texts(
    backbone: Any,
    texts: list[str],
    templates: list[str] | None = None,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    fast: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Unit text embeddings ``[len(texts), D]`` float32 (CPU), cached on disk when ``cache_dir`` is given.

    Args:
        backbone: a ``visae.backbones.Backbone`` with a text tower (``tokenizer``, ``encode_text``, ``model``).
        texts: the words / class names.
        templates: prompt templates with a ``{}`` placeholder; the embedding of a text is then the
            renormalised mean over templates of its unit prompt embeddings.
        cache_dir: directory of the text cache (shared by zero-shot and naming); None: ``$VISAE_TEXT_CACHE``
            when set, else nothing is cached.
        batch_size: prompts per forward pass.
        fast: use the causal-truncation fast path where the model allows it.
    """
    texts = [str(t) for t in texts]
    if cache_dir is None:
        cache_dir = default_cache_dir()
    if templates is not None:
        templates = _check_templates(templates)
    if not texts:
        return torch.zeros(0, int(getattr(backbone, "embed_dim", 0) or 0))
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{cache_key(backbone, texts, templates)}.safetensors"
        hit = _cache_load(path, len(texts))
        if hit is not None:
            return hit
    if templates is None:
        emb = embed_prompts(backbone, texts, batch_size=batch_size, fast=fast, progress=progress)
    else:
        prompts = [t.format(x) for t in templates for x in texts]
        # Embed each distinct prompt once (templates without the placeholder's effect, repeated words).
        uniq = list(dict.fromkeys(prompts))
        pos = {p: i for i, p in enumerate(uniq)}
        u = embed_prompts(backbone, uniq, batch_size=batch_size, fast=fast, progress=progress)
        per = u[torch.tensor([pos[p] for p in prompts], dtype=torch.long)].reshape(len(templates), len(texts), -1)
        emb = F.normalize(per.mean(dim=0), dim=-1)
    if path is not None:
        meta = {
            "format": CACHE_FORMAT,
            "model": str(getattr(backbone, "name", "")),
            "pretrained": str(getattr(backbone, "pretrained", "")),
            "n_texts": str(len(texts)),
            "templates": json.dumps(templates),
        }
        _cache_save(path, emb, meta)
    return emb


def default_cache_dir() -> Path | None:
    """The cache used when ``cache_dir`` is None: ``$VISAE_TEXT_CACHE`` if set, else no cache."""
    v = os.environ.get("VISAE_TEXT_CACHE")
    return Path(v) if v else None
