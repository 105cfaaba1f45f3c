"""Splicing: an SAE inside the backbone, at the hook it was trained on.

    from visae.backbones import load_backbone
    from visae.sae import load_sae
    from visae.splice import splice

    bb, sae = load_backbone("ViT-B-16:openai"), load_sae("runs/sae_layer8")
    with splice(bb, sae):                              # layer and token from the SAE's cfg.json
        emb = bb.encode_image(images)                  # the model with x_hat at that block
    with splice(bb, sae, error_node=True, ablate=[17]) as sp:
        emb = bb.encode_image(images)                  # latent 17 removed, everything else exact
    with splice(bb, sae, clamp={42: 5.0}):             # steering: latent 42 held at 5.0
        emb = bb.encode_image(images)

The residual stream after block ``layer`` (the output of ``backbone.blocks[layer]``, shape
``[B, N, W]``: ``N`` tokens, ``num_prefix_tokens`` of them class / register tokens first) is
replaced, for the tokens the SAE was trained on, by the SAE's reconstruction:

* ``token="cls"``: token 0; ``"patch"``: the tokens after the prefix tokens; ``"all"``: every token.
* The ``B * n`` selected vectors go through the SAE as one ``[B * n, W]`` batch (raw
  activations: the SAE applies its own input normalisation), so callers never reshape.
* ``ablate`` (latent indices) sets those codes to 0, ``clamp`` (``{latent: value}``, values
  in the SAE's code units) sets them to a value, before decoding.
* The decode reads only the active codes' decoder rows when the codes are sparse (``sparse``:
  an embedding-bag, :func:`visae.sae.kernels.sparse_decode`), so a trained SAE (L0 in the tens)
  costs little more than its encoder GEMM (``benchmarks/bench_splice.py``, BENCHMARKS.md).
* ``error_node=True`` adds back the SAE's error of the *unmodified* codes, detached:
  ``x_new = x_hat' + (x - x_hat).detach()`` where ``x_hat'`` is the reconstruction after
  ablation / clamping (the "error node" of Marks et al. 2024, *Sparse Feature Circuits*,
  section 2). Without interventions the output then equals the clean forward (up to float
  rounding), while gradients flow through the latents for attribution.

SAEs trained on the mean of the patch tokens (``token="mean"``) cannot be spliced: the mean
has no inverse that would give back one vector per token; they are refused with
:class:`SpliceError`. So are SAEs on the final image embedding (there is no residual block
to put them in: use their reconstructions of the embedding directly).

Zero-ablating every latent leaves ``decode(0) = b_dec`` (times the input norm for a
``unit_norm`` SAE), so with ``b_dec`` set to the tokens' mean it is mean-ablation of those
tokens (``tests/test_splice.py`` checks this).

Zero-shot accuracy for an SAE on any layer (an SAE on a middle layer has no zero-shot score of its
own: its reconstruction must go through the remaining blocks):

    base = zeroshot_baseline(bb, batches, classifier, layer=8, token="all")  # clean + mean-ablated
    acc = spliced_accuracy(bb, sae, batches, classifier)                       # the model with x_hat
    accuracy_recovered(acc, base)      # (spliced - ablated) / (clean - ablated)

The baseline is mean-ablation: the layer's tokens replaced by their mean over the evaluation
images. Cost: one forward pass over the images per SAE, plus two for the baseline (shared by
every SAE of that layer and token); shards of the layer are not enough, the model is needed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from visae.errors import VisaeError

__all__ = ["SpliceError", "Splice", "splice", "splice_target", "SPLICE_TOKENS", "SPARSE_DECODE_MAX_DENSITY",
           "replace_tokens", "zeroshot_baseline", "spliced_accuracy", "spliced_topk", "accuracy_recovered"]

SPLICE_TOKENS = ("cls", "patch", "all")


class SpliceError(VisaeError, ValueError):
    """An SAE cannot be put into this backbone (wrong layer / token / width, or no residual hook)."""


@dataclass
class Splice:
    """What an active :func:`splice` does, and what it saw.

    Attributes:
        layer: 0-based block index whose output is replaced.
        token: "cls" | "patch" | "all".
        error_node: whether the detached SAE error is added back.
        ablate: latent indices set to 0.
        clamp: {latent: value} codes set to a value.
        calls: how many forward passes went through the hook.
        sparse_decodes: how many of them decoded from the active codes only (``sparse``).
        codes: with ``record_codes=True``, the (unmodified) codes of the last pass,
            ``[B, n, d_sae]`` in the SAE's dtype, detached; otherwise None.
    """

    layer: int
    token: str
    error_node: bool
    ablate: tuple[int, ...]
    clamp: dict[int, float]
    calls: int = 0
    sparse_decodes: int = 0
    codes: Tensor | None = field(default=None, repr=False)


def _sae_source(sae: Any) -> dict[str, Any]:
    """The ``source`` record of the activations the SAE was trained on (cfg.json extra), or {}."""
    extra = dict(getattr(sae, "extra", {}) or {})
    if isinstance(extra.get("member"), dict):
        extra = {**extra, **extra["member"]}
    shards = extra.get("shards")
    if isinstance(shards, dict) and isinstance(shards.get("source"), dict):
        return dict(shards["source"])
    if isinstance(extra.get("source"), dict):
        return dict(extra["source"])
    return {}


def splice_target(backbone: Any, sae: Any, layer: int | None = None, token: str | None = None,
                  check_model: bool = True) -> tuple[int, str]:
    """Resolve (block index, token choice) for ``sae`` in ``backbone``, checking everything before any forward.

    ``layer`` / ``token`` default to the SAE's cfg.json record (``extra.shards.source`` or
    ``extra.source``: ``layer``, ``token``). Raises :class:`SpliceError` for a final-embedding
    or mean-of-patches SAE, a width that is not the backbone's residual width, a model other
    than the one recorded (``check_model``), or a backbone without residual blocks.
    """
    src = _sae_source(sae)
    where = "SAE (cfg.json extra.shards.source)"
    if layer is None:
        layer = src.get("layer")
        if isinstance(layer, str) and layer.strip().lower() not in ("", "final", "embedding", "image_embedding"):
            raise SpliceError(f"{where}: records layer {layer!r}, not a block index (an imported SAE whose format "
                              "does not say); pass layer=... (and token=...) to splice it")
        if layer is None or isinstance(layer, str):
            if not src:
                raise SpliceError(f"{where}: records no source layer; pass layer=... (and token=...) to splice it")
            raise SpliceError(f"{where}: trained on the final image embedding (layer {layer!r}), not a residual "
                              "stream; there is no block to splice it into (use its reconstructions of the embedding "
                              "directly, e.g. visae zeroshot)")
    if token is None:
        token = src.get("token") or ("all" if src.get("tokens") == "all" else None)
        if token is None:
            raise SpliceError(f"{where}: records no token choice (cls / patch / all); pass token=...")
    token = str(token).lower()
    if token == "mean":
        raise SpliceError(f"{where}: trained on the mean of the patch tokens (token 'mean'); the mean has no inverse "
                          "(one vector cannot be put back as many tokens), so it cannot be spliced. Train on "
                          "token 'patch' or 'cls' to splice")
    if token not in SPLICE_TOKENS:
        raise SpliceError(f"token must be one of {SPLICE_TOKENS}, got {token!r}")
    if check_model and src.get("model") and str(src["model"]) != str(backbone.name):
        raise SpliceError(f"{where}: trained on activations of {src['model']!r}, the backbone is {backbone.name!r} "
                          "(pass check_model=False to splice anyway)")
    if backbone.blocks is None:
        raise SpliceError(f"{backbone.name}: its image tower has no residual blocks to splice into")
    try:
        idx = backbone.resolve_layer(int(layer))
    except (TypeError, ValueError) as e:
        raise SpliceError(f"layer {layer!r}: {e}") from None
    if token == "cls" and not backbone.has_cls_token:
        raise SpliceError(f"{backbone.name} has no class token; a token 'cls' SAE cannot be spliced into it")
    if int(sae.d_in) != int(backbone.width):
        raise SpliceError(f"SAE d_in={sae.d_in} but {backbone.name}'s residual stream has width {backbone.width}")
    return idx, token


SPARSE_DECODE_MAX_DENSITY = 0.05
"""Automatic choice (``splice(..., sparse=None)``): decode from the active codes only when at most this
fraction of the ``[M, d_sae]`` codes is non-zero. Measured on one core (AMD EPYC, torch 2.14 CPU,
d_sae 6,144, W 768): a multiply-add in the embedding-bag costs ~6 times one in the dense GEMM, so the
two break even near 1/6 active; 1/20 leaves room for finding the active codes."""


def _topk_shortcut(sae: Any) -> bool:
    """True when the SAE's inference codes are ReLU(TopK_k(pre)) (``TopKSAE._activate``, not overridden)."""
    from visae.sae.topk import TopKSAE

    return isinstance(sae, TopKSAE) and type(sae)._activate is TopKSAE._activate


def _encode_active(sae: Any, x: Tensor, sparse: bool | None, need_dense: bool
                   ) -> tuple[Tensor | None, Any, Tensor | None]:
    """Codes of raw activations x [M, d_in] as ``(f [M, d_sae] or None, pattern or None, values [nnz] or None)``.

    The codes are exactly ``sae.encode(x)``'s (same pre-activations, same activation rule). They
    come back in sparse form (a :class:`visae.sae.kernels.Pattern` of the non-zero codes and their
    values) when ``sparse`` is True, or None (auto) and at most :data:`SPARSE_DECODE_MAX_DENSITY`
    of them are non-zero; otherwise only dense. A TopK SAE goes straight from ``pre.topk`` to the
    sparse form (no dense ``[M, d_sae]`` codes unless ``need_dense``); other architectures apply
    their own rule to the dense pre-activations, then gather the non-zero codes.
    """
    from visae.sae.kernels import Pattern

    sae.check_input(x, where="splice input", allow_stacked=False)
    M, n = x.shape[0], sae.d_sae
    x_sae, _ = sae.normalize_input(x)
    pre = sae.preacts(x_sae)  # [1, M, d_sae]
    if _topk_shortcut(sae) and (sparse or (sparse is None and sae.cfg.k <= SPARSE_DECODE_MAX_DENSITY * n)):
        vals, idx = pre[0].topk(sae.cfg.k, dim=-1)  # the call of TopKSAE._activate: same latents on ties
        vals = torch.relu(vals)
        f = torch.zeros_like(pre[0]).scatter(-1, idx, vals) if need_dense else None
        idx, order = idx.sort(dim=-1)  # CSR rows: ascending latents
        return f, Pattern.from_topk(idx, n), vals.gather(1, order).reshape(-1)
    f = sae._activate(pre)[0]
    if sparse is False or (sparse is None and int(torch.count_nonzero(f)) > SPARSE_DECODE_MAX_DENSITY * M * n):
        return f, None, None
    nz = f.nonzero()
    row, col = nz[:, 0], nz[:, 1]
    return f, Pattern.from_rows_cols(row, col, M, n), f[row, col]


def _codes_vector(sae: Any, idx: Sequence[int], what: str) -> list[int]:
    out = []
    for j in idx:
        if isinstance(j, bool) or int(j) != j:  # ablate=[1.5] was latent 1, silently; True was latent 1
            raise SpliceError(f"{what}: {j!r} is not a latent index (an integer in 0..{sae.d_sae - 1})")
        j = int(j)
        if not 0 <= j < sae.d_sae:
            raise SpliceError(f"{what}: latent {j} out of range (the SAE has d_sae={sae.d_sae} latents, 0..{sae.d_sae - 1})")
        out.append(j)
    return out


@contextlib.contextmanager
def splice(backbone: Any, sae: Any, *, layer: int | None = None, token: str | None = None,
           error_node: bool = False, ablate: Sequence[int] | None = None,
           clamp: Mapping[int, float] | None = None, member: int = 0, record_codes: bool = False,
           check_model: bool = True, sparse: bool | None = None) -> Iterator[Splice]:
    """Put ``sae`` into ``backbone`` at the block it was trained on while the ``with`` body runs.

    Args:
        backbone: a :class:`visae.backbones.Backbone` (open_clip or timm ViT, any registry name).
        sae: a :class:`visae.sae.SAE` (a stack: ``member`` picks one) whose ``d_in`` is the
            backbone's residual width.
        layer, token: override the SAE's recorded block (0-based, negative from the end) and
            token choice ("cls" | "patch" | "all").
        error_node: add back the detached error of the unmodified reconstruction.
        ablate: latents whose codes are set to 0 before decoding.
        clamp: ``{latent: value}``; codes set to ``value`` (the SAE's code units) before decoding.
        record_codes: keep the last pass's codes ``[B, n, d_sae]`` on the yielded :class:`Splice`.
        sparse: decode from the active codes only (an embedding-bag over their decoder rows,
            :func:`visae.sae.kernels.sparse_decode`: O(L0 * W) per token instead of O(d_sae * W));
            None (default) picks it when at most :data:`SPARSE_DECODE_MAX_DENSITY` of the codes are
            non-zero (a trained SAE: L0 in the tens), False always decodes densely. Both give the
            same reconstruction up to float rounding (``tests/test_splice.py`` bounds the difference).

    The SAE runs in its own dtype (float32 as loaded; ``sae.double()`` for float64) and the
    replacement is cast back to the residual stream's dtype.

    Every forward of the backbone's image tower inside the block (``encode_image``,
    ``encode_layer`` of a later block, the model's own ``forward``) sees the replaced residual
    stream. Raises :class:`SpliceError` (before anything runs) when the SAE does not fit.
    """
    idx, token = splice_target(backbone, sae, layer, token, check_model=check_model)
    if sae.n_models > 1:
        sae = sae.member(member)
    ablate_idx = _codes_vector(sae, list(ablate or ()), "ablate")
    _codes_vector(sae, list((clamp or {}).keys()), "clamp")  # clamp={1.5: v} was latent 1, silently
    clamp_map = {int(k): float(v) for k, v in (clamp or {}).items()}
    bad = {k: v for k, v in clamp_map.items() if not math.isfinite(v)}
    if bad:  # a NaN clamp made every embedding NaN
        raise SpliceError(f"clamp: the values {bad} are not finite numbers (a code value in the SAE's units)")
    clamp_idx = _codes_vector(sae, list(clamp_map), "clamp")
    device = next(backbone.model.parameters()).device
    sae = sae.to(device).eval()
    state = Splice(layer=idx, token=token, error_node=bool(error_node), ablate=tuple(ablate_idx), clamp=clamp_map)
    p = int(backbone.num_prefix_tokens)
    intervene = bool(ablate_idx or clamp_idx)
    clamp_vals = torch.tensor([clamp_map[j] for j in clamp_idx], dtype=sae.W_enc.dtype, device=device)

    touched = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)  # latents whose codes are overwritten
    touched[ablate_idx + clamp_idx] = True

    def raw(x_hat_sae: Tensor, norm: Tensor | None) -> Tensor:
        """SAE-space reconstruction -> raw space (``SAE.decode``'s last steps)."""
        if sae.cfg.scale_factor != 1.0:
            x_hat_sae = x_hat_sae / sae.cfg.scale_factor
        return x_hat_sae if norm is None else x_hat_sae * norm

    def replace(flat: Tensor) -> Tensor:
        """[M, W] raw residual vectors -> [M, W] replacement (same dtype)."""
        from visae.sae.kernels import sparse_decode

        x = flat.to(sae.W_enc.dtype)
        norm = x.norm(dim=-1, keepdim=True) if sae.cfg.input_normalization == "unit_norm" else None
        f, pattern, vals = _encode_active(sae, x, sparse, need_dense=record_codes)
        if record_codes:
            state.codes = f.detach()
        if pattern is None:  # dense decode
            x_hat = sae.decode(f, norm)
            if intervene:
                f2 = f.clone()
                if ablate_idx:
                    f2[:, ablate_idx] = 0.0
                if clamp_idx:
                    f2[:, clamp_idx] = clamp_vals.to(f2.dtype)
                new = sae.decode(f2, norm)
            else:
                new = x_hat
        else:  # decode from the active codes only
            state.sparse_decodes += 1
            W_dec, b_dec = sae.W_dec[0], sae.b_dec[0]
            x_hat = raw(sparse_decode(W_dec, b_dec, pattern, vals), norm)
            if intervene:
                # ablated and clamped latents lose their own codes; the clamped ones then add value * W_dec[j]
                # to every row (a clamp sets the code of every token, active or not)
                vals2 = vals.masked_fill(touched[pattern.col], 0.0)
                h = sparse_decode(W_dec, b_dec, pattern, vals2)
                if clamp_idx:
                    h = h + clamp_vals @ W_dec[clamp_idx]
                new = raw(h, norm)
            else:
                new = x_hat
        if error_node:
            new = new + (x - x_hat).detach()
        return new.to(flat.dtype)

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output
        x = out if backbone.batch_first else out.transpose(0, 1)  # [B, N, W]
        B, N, W = x.shape
        if token == "cls":
            head, sel, tail = x[:, :0], x[:, :1], x[:, 1:]
        elif token == "patch":
            head, sel, tail = x[:, :p], x[:, p:], x[:, N:]
        else:
            head, sel, tail = x[:, :0], x, x[:, N:]
        n = sel.shape[1]
        new = replace(sel.reshape(B * n, W)).reshape(B, n, W)
        if record_codes and state.codes is not None:
            state.codes = state.codes.reshape(B, n, -1)
        y = torch.cat([head, new, tail], dim=1)
        if not backbone.batch_first:
            y = y.transpose(0, 1)
        state.calls += 1
        return (y, *output[1:]) if isinstance(output, tuple) else y

    handle = backbone.blocks[idx].register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- zero-shot through the splice


@contextlib.contextmanager
def replace_tokens(backbone: Any, layer: int, token: str, value: Tensor) -> Iterator[None]:
    """Set the ``token`` tokens ("cls" | "patch" | "all") of the residual after block ``layer`` to ``value`` [W].

    Mean-ablation when ``value`` is the tokens' mean over the data (the baseline of
    :func:`zeroshot_baseline`).
    """
    idx = backbone.resolve_layer(layer)
    if token not in SPLICE_TOKENS:
        raise SpliceError(f"token must be one of {SPLICE_TOKENS}, got {token!r}")
    p = int(backbone.num_prefix_tokens)

    def hook(_m: Any, _i: Any, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output
        x = out if backbone.batch_first else out.transpose(0, 1)
        sel = {"cls": slice(0, 1), "patch": slice(p, None), "all": slice(None)}[token]
        y = x.clone()
        y[:, sel] = value.to(y.dtype)
        if not backbone.batch_first:
            y = y.transpose(0, 1)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    handle = backbone.blocks[idx].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _accuracy(backbone: Any, batches: Any, classifier: Any) -> tuple[int, int]:
    hits, total = _topk_correct(backbone, batches, classifier, ks=(1,))
    return hits[1], total


def _topk_correct(backbone: Any, batches: Any, classifier: Any, ks: Sequence[int] = (1, 5),
                  hits: dict[int, list[Tensor]] | None = None) -> tuple[dict[int, int], int]:
    """({k: images whose label is in the top k}, images) of ``backbone.encode_image`` over ``batches``.

    Top-k with ties to the lower class index (:func:`visae.ranking.topk_hits`); k above the
    number of classes is dropped. ``hits``: when given, each batch's per-image hits (bool [B], on the CPU) are
    appended to ``hits[k]``, in the order of ``batches``.
    """
    from visae.ranking import topk_hits

    ks = tuple(k for k in ks if k <= classifier.num_classes) or (1,)
    correct = {k: 0 for k in ks}
    total = 0
    for images, labels in batches:
        labels = torch.as_tensor(labels).to(classifier.weights.device)
        emb = backbone.encode_image(images.to(backbone.device))
        for k, hit in topk_hits(classifier.logits(emb.to(classifier.weights.device)), labels, ks).items():
            correct[k] += int(hit.sum())
            if hits is not None:
                hits.setdefault(k, []).append(hit.cpu())
        total += int(labels.numel())
    return correct, total


def zeroshot_baseline(backbone: Any, batches: Any, classifier: Any, *, layer: int, token: str,
                      mean: Tensor | None = None, ks: Sequence[int] = (1,)) -> dict[str, Any]:
    """Clean and mean-ablated zero-shot accuracy of ``backbone`` at (``layer``, ``token``): the reference points
    of :func:`accuracy_recovered`.

    ``batches``: a re-iterable of ``(images [B, 3, H, W], labels [B])`` (a list, a DataLoader);
    ``classifier``: a :class:`visae.zeroshot.ZeroShotClassifier`. The ablation baseline replaces
    the layer's ``token`` tokens by their mean over ``batches`` (computed during the clean pass
    unless ``mean`` [W] is given). Cost: two forward passes over the images. Returns
    ``{"clean", "ablated", "n", "layer", "token", "mean" [W], "baseline"}`` (``clean`` / ``ablated``:
    top-1 accuracy), ``clean_topk`` / ``ablated_topk``: ``{k: accuracy}`` for each of ``ks``, and
    ``clean_hits``: ``{k: bool [n]}``, each image's clean hit in the order of ``batches`` (the reference of
    :func:`spliced_topk`'s discordant counts).
    """
    idx = backbone.resolve_layer(layer)
    if token not in SPLICE_TOKENS:
        raise SpliceError(f"token must be one of {SPLICE_TOKENS} for a mean-ablation baseline, got {token!r}")
    p = int(backbone.num_prefix_tokens)
    acc: dict[str, Any] = {"sum": None, "count": 0}

    def capture(_m: Any, _i: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        x = out if backbone.batch_first else out.transpose(0, 1)
        sel = {"cls": x[:, :1], "patch": x[:, p:], "all": x}[token]
        s = sel.detach().double().sum(dim=(0, 1))
        acc["sum"] = s if acc["sum"] is None else acc["sum"] + s
        acc["count"] += sel.shape[0] * sel.shape[1]

    with torch.no_grad():
        h = backbone.blocks[idx].register_forward_hook(capture) if mean is None else None
        clean_hits: dict[int, list[Tensor]] = {}
        try:
            c, n = _topk_correct(backbone, batches, classifier, ks=tuple(ks) + (1,), hits=clean_hits)
        finally:
            if h is not None:
                h.remove()
        if n == 0:
            raise SpliceError("zeroshot_baseline: no images in batches")
        if mean is None:
            mean = (acc["sum"] / acc["count"]).float()
        with replace_tokens(backbone, idx, token, mean):
            ca, _ = _topk_correct(backbone, batches, classifier, ks=tuple(ks) + (1,))
    return {"clean": c[1] / n, "ablated": ca[1] / n, "clean_topk": {k: v / n for k, v in c.items()},
            "ablated_topk": {k: v / n for k, v in ca.items()}, "n": n, "layer": idx, "token": token, "mean": mean,
            "clean_hits": {k: torch.cat(v) for k, v in clean_hits.items()},
            "baseline": f"mean-ablation of the {token} tokens after block {idx} (their mean over the {n} images)"}


def spliced_accuracy(backbone: Any, sae: Any, batches: Any, classifier: Any, **splice_kw: Any) -> float:
    """Zero-shot top-1 accuracy of ``backbone`` with ``sae`` spliced in (one forward pass over ``batches``)."""
    with torch.no_grad(), splice(backbone, sae, **splice_kw):
        c, n = _accuracy(backbone, batches, classifier)
    if n == 0:
        raise SpliceError("spliced_accuracy: no images in batches")
    return c / n


def spliced_topk(backbone: Any, sae: Any, batches: Any, classifier: Any, ks: Sequence[int] = (1, 5),
                 ref_hits: dict[int, Tensor] | None = None, discordant: dict[int, tuple[int, int]] | None = None,
                 **splice_kw: Any) -> dict[int, float]:
    """``{k: top-k zero-shot accuracy}`` of ``backbone`` with ``sae`` spliced in (one forward pass over ``batches``).

    With ``ref_hits`` ({k: bool [n]}, e.g. :func:`zeroshot_baseline`'s ``clean_hits`` over the same ``batches`` in the
    same order) and a dict ``discordant``, fills ``discordant[k] = (lost, gained)``: images right in the reference
    and wrong spliced, and the reverse (the paired counts of :func:`visae.select.drop_standard_error`).

    Raises:
        SpliceError: no images in ``batches``, or ``ref_hits`` of another length than the images.
    """
    from visae.ranking import discordant as discordant_counts  # (the argument ``discordant`` is the output dict)

    hits: dict[int, list[Tensor]] | None = {} if ref_hits is not None and discordant is not None else None
    with torch.no_grad(), splice(backbone, sae, **splice_kw):
        c, n = _topk_correct(backbone, batches, classifier, ks=ks, hits=hits)
    if n == 0:
        raise SpliceError("spliced_topk: no images in batches")
    if hits is not None:
        for k, parts in hits.items():
            ref, now = ref_hits[k].bool(), torch.cat(parts)
            if ref.shape != now.shape:
                raise SpliceError(f"spliced_topk: ref_hits[{k}] has {ref.numel()} images, the batches {now.numel()}")
            lost, gained = discordant_counts(ref, now)
            discordant[k] = (int(lost), int(gained))
    return {k: v / n for k, v in c.items()}


def accuracy_recovered(spliced: float, baseline: dict[str, Any]) -> float | None:
    """(spliced − ablated) / (clean − ablated): 1 = the SAE keeps all the accuracy the layer's tokens carry,
    0 = no better than mean-ablating them (the language-model "loss recovered" of SAELens, for zero-shot
    accuracy). None when clean == ablated (the tokens carry no accuracy to recover)."""
    gap = baseline["clean"] - baseline["ablated"]
    return None if gap == 0 else (spliced - baseline["ablated"]) / gap
