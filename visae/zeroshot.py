"""Zero-shot classification of a labelled shard set and of its SAE reconstructions.

The Discover-then-Name selection score: CLIP's zero-shot accuracy when the image embeddings
are replaced by an SAE's reconstructions of them. Done correctly:

* the classifier is built from class names x prompt templates through the *same* model's
  text tower: per class the mean of the unit-normalised template embeddings, renormalised
  (``visae.text.encode_texts``, cached on disk keyed by model and prompts) -> ``W [C, D]``;
* image embeddings (and reconstructions) are unit-normalised, and
  ``logits = logit_scale * cos(x, W_c)`` with the model's own (exp'd) logit scale. The scale
  does not move the argmax but it does set the cross-entropy / KL figures reported here;
* the shard set must hold that model's *final* image embedding (``manifest["source"]``):
  a residual-stream layer is not in the text tower's space. Its SAEs are scored spliced into
  the model instead (:func:`spliced_selection`, :class:`SplicedSelection`): the zero-shot
  accuracy of the model with the layer's tokens replaced by the SAE's reconstruction, over the
  images behind the rows, with the mean-ablation baseline and accuracy recovered
  = (spliced - ablated) / (clean - ablated) (docs/sweeps.md; cost: 2 + 1 per SAE forward
  passes over the images);
* reconstructions come from the SAE applied to the **raw** activations (stored unit rows x
  stored norms), the input the SAE contract defines. For an SAE with per-example
  ``unit_norm`` input normalisation this equals feeding the stored unit rows (it divides by
  the norm and multiplies back, and cosine ignores the scale); for an SAE trained on
  dataset-scaled raw activations (``input_normalization: none`` with a folded scale factor)
  only the raw rows are right, because its biases make it not scale-equivariant.

Ties: top-k membership is decided by rank with an explicit tie-break, the lower class index
wins (``rank(y) = #{c: l_c > l_y} + #{c < y: l_c = l_y}``; correct at k iff ``rank < k``).
An all-zero reconstruction (all logits equal) therefore predicts class 0, and its top-1
accuracy is exactly the frequency of class 0 in the set.

Streaming: shards are read one at a time through memmaps, only the ``label`` and ``norm``
metadata columns are loaded, and the work is done in batches of ``batch_size`` rows.

    python scripts/zeroshot.py --shards DIR --model NAME [--pretrained TAG] [--sae DIR]
"""

from __future__ import annotations

import dataclasses

import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from visae.atomic import atomic_write_text
from visae.errors import VisaeError
from visae.ranking import discordant, rank_of_label, topk_hits  # noqa: F401 - re-exported (zeroshot's public API)
from visae.resources import config_yaml
from visae.shards import ShardError, ShardSet, ShardView

DEFAULT_YAML = config_yaml("zeroshot.yaml")

__all__ = [
    "ClassifierConfig",
    "ZeroShotConfig",
    "ZeroShotClassifier",
    "ZeroShotError",
    "final_embedding_problem",
    "benchmark_classes",
    "build_classifier",
    "check_source",
    "rank_of_label",
    "topk_hits",
    "iter_labelled_batches",
    "classifier_for_shards",
    "residual_layer",
    "site_mismatch",
    "sae_shards_mismatch",
    "splice_problem",
    "SplicedSelection",
    "selection_images",
    "spliced_selection",
    "default_text_cache",
    "evaluate",
    "zeroshot",
    "main",
]

# layer / token values that mean "the model's final (projected) image embedding"
_FINAL_LAYERS = (None, "", "final", "embedding", "embed", "output", "proj", "projection", "image_embedding")
_FINAL_TOKENS = (None, "", "cls", "embedding", "pooled")


class ZeroShotError(VisaeError, ValueError):
    """The shard set, SAE or classifier cannot be zero-shot evaluated together."""


@dataclass(frozen=True)
class ClassifierConfig:
    """The zero-shot classifier: a backbone's text tower over a benchmark's class names and prompt templates.

    Shared by ``visae zeroshot`` (``ZeroShotConfig.classifier``) and the sweep's selection
    (``SweepSelection.classifier``).
    """

    model: str = field(default="", metadata={"help": "backbone name (visae.backbones); empty: the shard set's source model"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "pretrained tag or checkpoint path; null: the shard set's source"})
    benchmark: str = field(
        default="auto",
        metadata={"help": "class names + templates: imagenet (open_clip's, OpenAI templates), toy (= toy:colour_shape) "
                          "or toy:<factor> (visae.toyworld), world2 (= world2:family_shape) or world2:<factor> "
                          "(visae.world2), files (--classnames_file/--templates_file), auto (from the shard source)"})
    classnames_file: Optional[str] = field(default=None, metadata={"help": "text file, one class name a line (benchmark=files)"})
    templates_file: Optional[str] = field(default=None, metadata={"help": "text file, one template with '{}' a line (benchmark=files)"})
    label_column: str = field(default="", metadata={"help": "metadata column holding the class index (-1 = unknown, "
                                                            "skipped); empty: the benchmark's column if the shards "
                                                            "have it, else 'label'"})
    text_cache: Optional[str] = field(default=None, metadata={"help": "text-embedding cache dir; null: $VISAE_TEXT_CACHE "
                                                                      "or ~/.cache/visae/text"})


@dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot accuracy of a labelled shard set's image embeddings and of their SAE reconstructions."""

    shards: str = field(default="", metadata={"help": "labelled shard set of the model's final image embedding, or of "
                                                      "a residual layer (with --sae: scored through the splice)",
                                              "required": True})
    images: Optional[str] = field(default=None, metadata={"help": "residual-layer shards: the images they were "
                                                                  "extracted from (null: the manifest's source.dataset)"})
    image_batch_size: int = field(default=64, metadata={"help": "residual-layer shards: images per forward pass"})
    random_init: bool = field(default=False, metadata={"help": "random-initialised backbone (tests only; accuracy is "
                                                               "chance); implied when the shard source says so"})
    sae: Optional[str] = field(default=None, metadata={"help": "SAE dir whose reconstructions are scored too"})
    batch_size: int = field(default=8192, metadata={"help": "rows per batch"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    out: Optional[str] = field(default=None, metadata={"help": "write the result JSON here (default: print only)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig,
                                         metadata={"help": "the zero-shot classifier (text tower, benchmark)"})

    def __post_init__(self) -> None:
        from visae.devices import check_device

        check_device(self.device, "ZeroShotConfig.device")
        from visae.config import check_bounds

        # a negative batch_size gave zero batches: no images scored
        check_bounds(self, {"batch_size": (1, None), "image_batch_size": (1, None)})


# ----------------------------------------------------------------------------- classifier


@dataclass
class ZeroShotClassifier:
    """Class text embeddings ``weights [C, D]`` (unit rows) and the model's ``logit_scale`` (exp'd)."""

    weights: torch.Tensor
    logit_scale: float
    classnames: list[str]
    key: dict[str, Any] = field(default_factory=dict)  # what made it (model, benchmark, n templates)

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[0])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., B, D] (any scale) -> [..., B, C] = logit_scale * cos(x, W_c); zero rows give all-zero logits."""
        w = self.__dict__.get("_scaled_t")
        if w is None or w.device != self.weights.device:
            # scale folded into W^T once: one [B, D] x [D, C] matmul, no pass over [B, C]
            w = self.__dict__["_scaled_t"] = (self.weights.T * self.logit_scale).contiguous()
        x = x.to(w.dtype)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return x @ w


def _template_strings(templates: Sequence[str | Callable[[str], str]]) -> list[str]:
    """open_clip ships its templates as lambdas; the text cache keys on strings with '{}'."""
    out = []
    for t in templates:
        s = t if isinstance(t, str) else t("{}")
        from visae.text import template_problem

        why = template_problem(s)
        if why:
            raise ZeroShotError(why.replace("for the word", "for the class name"))
        out.append(s)
    return out


def _toy_table() -> dict[str, dict[str, Any]]:
    from visae.toyworld import toy_classnames_and_templates

    return toy_classnames_and_templates()


def _world2_table() -> dict[str, dict[str, Any]]:
    from visae.world2 import classnames_and_templates

    return classnames_and_templates()


# the synthetic worlds' benchmarks: benchmark prefix -> (its table of {name: column, classnames, templates}, the
# default name); a new world is one entry here
_WORLD_BENCHMARKS: dict[str, tuple[Callable[[], dict[str, dict[str, Any]]], str]] = {
    "toy": (_toy_table, "colour_shape"),
    "world2": (_world2_table, "family_shape"),
}


def benchmark_classes(benchmark: str, classnames_file: str | None = None,
                      templates_file: str | None = None) -> tuple[list[str], list[str], str | None]:
    """(class names, template strings, label column or None) of a benchmark.

    ``imagenet``: open_clip's 1000 class names and the 80 OpenAI templates (labels in the
    standard class index, column ``label``). ``toy`` / ``toy:<name>``: a benchmark of
    ``visae.toyworld.toy_classnames_and_templates()`` (``toy`` = ``toy:colour_shape``), its
    labels in the factor's column; ``world2`` / ``world2:<name>`` likewise from
    ``visae.world2.classnames_and_templates()`` (``world2`` = ``world2:family_shape``, 253 classes).
    ``files``: names / templates from text files.

    Raises:
        ZeroShotError: an unknown benchmark or benchmark name; ``files`` without a class-names file, or with an empty
            class-names or templates file.
    """
    if benchmark == "imagenet":
        import open_clip

        return list(open_clip.IMAGENET_CLASSNAMES), _template_strings(open_clip.OPENAI_IMAGENET_TEMPLATES), None
    world = benchmark.split(":", 1)[0]
    if world in _WORLD_BENCHMARKS:
        table_of, default = _WORLD_BENCHMARKS[world]
        table = {k: v for k, v in table_of().items() if not k.startswith("_")}
        name = benchmark.split(":", 1)[1] if ":" in benchmark else default
        if name not in table:
            raise ZeroShotError(f"unknown {world} benchmark {name!r}; that world has {sorted(table)}")
        spec = table[name]
        return list(spec["classnames"]), _template_strings(spec["templates"]), spec.get("column", name)
    if benchmark == "files":
        if not classnames_file:
            raise ZeroShotError("benchmark 'files' needs --classnames_file (one class name a line)")
        def lines(path: str, flag: str) -> list[str]:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ZeroShotError(f"{flag} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
            except OSError as e:  # a missing file named by a flag: a bad input (exit 2), not the machine's fault
                raise ZeroShotError(f"{flag} {path}: {e.strerror or e}") from None
            return [ln.strip() for ln in text.splitlines() if ln.strip()]

        names = lines(classnames_file, "--classnames_file")
        if not names:
            raise ZeroShotError(f"--classnames_file {classnames_file}: no class names (expected one class name a line)")
        templates = ["{}"] if not templates_file else lines(templates_file, "--templates_file")
        if not templates:
            raise ZeroShotError(f"--templates_file {templates_file}: no templates (expected one template a line, with "
                                "'{}' where the class name goes, e.g. 'a photo of a {}.')")
        return names, _template_strings(templates), None
    raise ZeroShotError(f"unknown benchmark {benchmark!r}; expected imagenet, toy, toy:<factor>, world2, "
                        "world2:<factor> or files")


def build_classifier(backbone: Any, classnames: Sequence[str], templates: Sequence[str | Callable],
                     *, cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
                     progress: bool = False) -> ZeroShotClassifier:
    """Per class: mean of unit template embeddings, renormalised -> weights [C, D] (cached by visae.text).

    ``progress``: a progress bar (prompts/s) while the prompts are embedded; a cache hit embeds
    nothing. Cost on a miss: C x T prompts through the text tower (ImageNet: 1,000 classes x 80
    templates = 80,000 prompts, about half an hour for a ViT-B text tower on a CPU)."""
    from visae.text import encode_texts

    if not getattr(backbone, "has_text", False):
        raise ZeroShotError(f"backbone {backbone.name!r} has no text tower; zero-shot classification needs a CLIP model")
    templates = _template_strings(templates)
    _check_classnames_fit(backbone, classnames, templates)
    w = encode_texts(backbone, list(classnames), templates, cache_dir=cache_dir, progress=progress)
    w = torch.as_tensor(w, dtype=torch.float32).to(device)
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # renormalise defensively: exact unit rows
    import hashlib

    prompts = hashlib.sha256(json.dumps([list(classnames), templates]).encode()).hexdigest()[:16]
    key = {"model": backbone.name, "pretrained": backbone.pretrained, "num_classes": len(classnames),
           "num_templates": len(templates), "prompts_sha256": prompts,
           "weights": getattr(backbone, "cache_key", None)}
    return ZeroShotClassifier(weights=w, logit_scale=float(backbone.logit_scale), classnames=list(classnames), key=key)


def _check_classnames_fit(backbone: Any, classnames: Sequence[str], templates: Sequence[str]) -> None:
    """Refuse class names whose prompts the text tower would cut to its context (two such names can get one
    embedding, and a cut name is not the class the user asked for)."""
    from visae.text import context_length, texts_that_do_not_fit

    bad = texts_that_do_not_fit(backbone.tokenizer, list(classnames), templates)
    if bad:
        ctx = context_length(backbone.tokenizer)
        raise ZeroShotError(
            f"{len(bad)} class name(s) do not fit {backbone.name}'s text context of {ctx} tokens with the templates "
            f"(the tokenizer would cut them): {bad}; shorten them or use shorter templates")


# ----------------------------------------------------------------------------- checks


def _parse_name(name: str, pretrained: str | None) -> tuple[str, str | None]:
    from visae.backbones import parse_backbone_name

    return parse_backbone_name(name, pretrained)


def check_source(source: dict[str, Any], model: str, pretrained: str | None, where: str = "shard set",
                 random_init: bool = False, require_final: bool = True) -> None:
    """Refuse a shard set that is not ``model``'s final image embedding (names the offending field).

    ``require_final=False`` checks only the model and weights (activations of a residual layer,
    scored through the splice)."""
    if not source.get("model"):
        raise ZeroShotError(f"{where}: manifest source has no 'model'; cannot check it holds {model}'s image embeddings")
    src_model, src_pre = _parse_name(str(source["model"]), source.get("pretrained"))
    model, pretrained = _parse_name(model, pretrained)
    if src_model != model:
        raise ZeroShotError(f"{where}: activations come from model {src_model!r} (manifest source.model) but the "
                            f"classifier is {model!r}; zero-shot needs the same model's image and text towers")
    if bool(source.get("random_init", False)) != bool(random_init):
        raise ZeroShotError(f"{where}: source.random_init is {bool(source.get('random_init', False))} but the "
                            f"classifier's backbone has random_init={bool(random_init)}; their weights differ")
    if not random_init and same_weights(None if src_pre is None else str(src_pre),
                                        None if pretrained is None else str(pretrained)) is False:
        raise ZeroShotError(f"{where}: activations come from {src_model} weights {src_pre!r} (source.pretrained) "
                            f"but the classifier uses {pretrained!r}")
    problem = final_embedding_problem(source) if require_final else None
    if problem:
        raise ZeroShotError(f"{where}: {problem}; only the pooled, projected image embedding lives in the text tower's "
                            "space. Extract without --layer to zero-shot score it")


def final_embedding_problem(source: dict[str, Any]) -> str | None:
    """Why the activations a manifest ``source`` describes are not one final (projected) image embedding per
    image, naming the field; None when they are. Zero-shot scoring and naming both need that space.

    Every field is checked on its own: ``layer`` must be absent or name the final embedding
    (``"final"``, ``"output"``, ...), ``token`` must be absent or the pooled one (``"cls"``, ``"pooled"``,
    ...; ``"patch"`` or ``"mean"`` rows are not the embedding whatever ``layer`` says) and ``read``
    absent or ``"image_embedding"``.
    """
    layer, token, read = source.get("layer"), source.get("token"), source.get("read")
    layer_l = layer.lower() if isinstance(layer, str) else layer
    token_l = token.lower() if isinstance(token, str) else token
    if layer_l not in _FINAL_LAYERS:
        return f"activations are from layer {layer!r} (source.layer), not the final image embedding"
    if token_l not in _FINAL_TOKENS:
        return f"activations use token {token!r} (source.token), not the pooled image embedding"
    if read is not None and read != "image_embedding":
        return f"activations are {read!r} (source.read), not the final image embedding"
    return None


def _auto_benchmark(ss: ShardSet, label_column: str) -> str:
    src = ss.source
    kind = str(src.get("dataset_kind", "")).lower()
    if kind == "toyworld":
        from visae.world2 import is_world2_shards

        return "world2" if is_world2_shards(ss) else "toy"
    if kind == "imagenet":
        return "imagenet"
    text = " ".join(str(src.get(k, "")) for k in ("dataset", "images", "benchmark", "model")).lower()
    if "toy" in text:
        return "toy"
    names = ss.label_names.get(label_column)
    if "imagenet" in text or (names is not None and len(names) == 1000):
        return "imagenet"
    raise ZeroShotError(f"{ss.path}: cannot tell the zero-shot benchmark from the manifest source {src!r}; "
                        "pass --benchmark imagenet|toy|world2|files")


# ----------------------------------------------------------------------------- scoring


class _Acc:
    """Running sums for one set of logits: top-k hits, cross-entropy, KL to the clean logits."""

    def __init__(self, shape: tuple[int, ...], ks: Sequence[int], device):
        self.ks = tuple(ks)
        self.hits = {k: torch.zeros(shape, dtype=torch.float64, device=device) for k in self.ks}
        # against reference hits (the clean embeddings' on the same examples): right there and wrong here (lost),
        # wrong there and right here (gained): the paired comparison's discordant counts
        self.lost = {k: torch.zeros(shape, dtype=torch.float64, device=device) for k in self.ks}
        self.gained = {k: torch.zeros(shape, dtype=torch.float64, device=device) for k in self.ks}
        self.ce = torch.zeros(shape, dtype=torch.float64, device=device)
        self.kl = torch.zeros(shape, dtype=torch.float64, device=device)
        self.last_hits: dict[int, torch.Tensor] = {}

    def add(self, logits: torch.Tensor, labels: torch.Tensor, clean_logp: torch.Tensor | None = None,
            want_logp: bool = False, ref_hits: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
        """logits [..., B, C]; clean_logp [B, C] (for the KL); ref_hits {k: bool [B]} (for the discordant counts)
        -> log-probabilities when asked for. The batch's hits {k: bool [..., B]} are left in ``last_hits``."""
        self.last_hits = topk_hits(logits, labels, self.ks)
        for k, hit in self.last_hits.items():
            self.hits[k] += hit.sum(-1)
            if ref_hits is not None:
                lost, gained = discordant(ref_hits[k], hit)
                self.lost[k] += lost
                self.gained[k] += gained
        if clean_logp is None and not want_logp:
            # fused log-softmax + NLL: no [B, C] log-probability tensor
            flat = logits.reshape(-1, logits.shape[-1])
            self.ce += torch.nn.functional.cross_entropy(
                flat, labels.repeat(flat.shape[0] // labels.shape[0]), reduction="none"
            ).view(logits.shape[:-1]).double().sum(-1)
            return None
        logp = torch.log_softmax(logits, dim=-1)
        self.ce -= logp.gather(-1, labels.expand(*logp.shape[:-1]).unsqueeze(-1)).squeeze(-1).double().sum(-1)
        if clean_logp is not None:
            self.kl += (clean_logp.exp() * (clean_logp - logp)).sum(-1).double().sum(-1)
        return logp


def _view_rows(data: ShardSet | ShardView) -> tuple[ShardSet, list[np.ndarray | None]]:
    """Per shard, the rows to score (None = all of them)."""
    if isinstance(data, ShardSet):
        return data, [None] * data.num_shards
    ss = data.shards
    shard, row = ss.locate(data.index)
    order = np.argsort(shard, kind="stable")
    shard, row = shard[order], row[order]
    bounds = np.searchsorted(shard, np.arange(ss.num_shards + 1))
    return ss, [np.sort(row[bounds[i]:bounds[i + 1]]) for i in range(ss.num_shards)]


def _shard_columns(ss: ShardSet, i: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Only the metadata columns we need (ids of a big set would cost far more than the labels)."""
    f = ss.path / f"{ss.manifest['shards'][i]['name']}.meta.npz"
    try:
        with np.load(f, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise ShardError(f"{f}: metadata column(s) {missing} missing; has {sorted(z.files)}")
            return {k: z[k] for k in keys}
    except ShardError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ShardError(f"{f}: cannot read metadata ({e})") from None


def iter_labelled_batches(data: ShardSet | ShardView, batch_size: int, label_column: str = "label"
                          ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stream (unit rows [B, d] float32, norms [B] float32, labels [B] int64), one shard at a time."""
    ss, rows = _view_rows(data)
    check_label_column(ss, label_column)
    for i in range(ss.num_shards):
        sel = rows[i]
        if sel is not None and sel.size == 0:
            continue
        meta = _shard_columns(ss, i, ("norm", label_column))
        mm = ss.shard_acts(i)
        n = len(mm) if sel is None else sel.size
        for start in range(0, n, batch_size):
            if sel is None:
                idx = slice(start, min(start + batch_size, n))
                acts = np.array(mm[idx], dtype=np.float32)  # a copy: torch wants writable memory
            else:
                idx = sel[start:start + batch_size]
                acts = mm[idx].astype(np.float32)
            yield acts, meta["norm"][idx].astype(np.float32), meta[label_column][idx].astype(np.int64)
        del mm


def _sae_forward(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, d] raw -> (x_hat [S, B, d], f [S, B, d_sae]) whatever the stack size."""
    x_hat, f = sae(x)
    if x_hat.dim() == 2:
        x_hat, f = x_hat.unsqueeze(0), f.unsqueeze(0)
    return x_hat, f


def check_label_names(ss: ShardSet, label_column: str, classnames: Sequence[str]) -> None:
    """Refuse a shard set whose manifest names its labels (``label_names[label_column]``) otherwise than the benchmark
    ``classnames``: another number of classes, or the same classes in another order (label i would be scored against
    another class's text). Cheap (the manifest only): commands run it before any work. A set that names no labels
    passes (its labels are checked against the class count while scored).

    Raises:
        ZeroShotError: naming the shard set, the field and both counts or the first label that differs.
    """
    names = ss.label_names.get(label_column)
    C = len(classnames)
    if names is not None and len(names) not in (0, C):
        raise ZeroShotError(f"{ss.path}: manifest label_names[{label_column!r}] has {len(names)} classes but the "
                            f"zero-shot benchmark has {C}")
    if names and list(names) != list(classnames) and sorted(names) == sorted(classnames):
        bad = next(i for i, (a, b) in enumerate(zip(names, classnames)) if a != b)
        raise ZeroShotError(f"{ss.path}: label {bad} is {names[bad]!r} in manifest label_names[{label_column!r}] "
                            f"but {classnames[bad]!r} in the zero-shot benchmark: same classes, different order")


def evaluate(data: ShardSet | ShardView, classifier: ZeroShotClassifier | None, sae: Any = None, *,
             label_column: str = "label", batch_size: int = 8192, ks: Sequence[int] = (1, 5),
             device: str | torch.device = "cpu", progress: bool = False, sae_chunk_elems: int = 1 << 25
             ) -> dict[str, Any]:
    """Zero-shot accuracy of ``data``'s embeddings and, with ``sae`` (S >= 1 stacked members), of its reconstructions.

    data: a shard set or a view of one (e.g. the held-out split). classifier: None scores
    only the SAE (L0, explained variance, dead fraction, MSE), for activations that have no
    zero-shot classifier (a residual-stream layer).

    Returns a JSON-able dict: ``clean`` {top1, top5, loss} (with a classifier), and when an
    SAE is given ``recon``, one dict per member: top1, top5, loss, kl_to_clean,
    delta_top1/5 (recon - clean), lost_top1/5 and gained_top1/5 (examples right on the clean
    embeddings and wrong on the reconstruction, and the reverse: delta = (gained - lost) / n,
    and its paired standard error follows from them, :func:`visae.select.drop_standard_error`)
    with a classifier; l0, explained_variance, mse,
    dead_fraction always. With a classifier, rows whose label is -1 are skipped (counted in
    ``n_unlabelled``) and every metric is over the labelled rows.
    """
    ss = data if isinstance(data, ShardSet) else data.shards
    if classifier is None and sae is None:
        raise ZeroShotError("evaluate: nothing to do (no classifier and no SAE)")
    dev = torch.device(device)
    C = 0
    if classifier is not None:
        if ss.d != classifier.weights.shape[1]:
            raise ZeroShotError(f"{ss.path}: activations have d={ss.d} but the classifier's text embeddings have "
                                f"D={classifier.weights.shape[1]}; not the same model's embedding space")
        C = classifier.num_classes
        check_label_names(ss, label_column, classifier.classnames)
        ks = tuple(k for k in ks if k <= C) or (1,)
        classifier = ZeroShotClassifier(classifier.weights.to(dev), classifier.logit_scale, classifier.classnames,
                                        classifier.key)
        clean = _Acc((), ks, dev)
    S = 0
    if sae is not None:
        if sae.d_in != ss.d:
            raise ZeroShotError(f"SAE has d_in={sae.d_in} but {ss.path} has d={ss.d}")
        S = int(sae.n_models)
        sae_unit = getattr(sae.cfg, "input_normalization", "unit_norm") == "unit_norm"
        fired = torch.zeros(S, sae.d_sae, dtype=torch.bool, device=dev)
        l0_sum = torch.zeros(S, dtype=torch.float64, device=dev)
        sse = torch.zeros(S, dtype=torch.float64, device=dev)
        rec = _Acc((S,), ks, dev) if classifier is not None else None
        # rows per SAE sub-batch so that the codes [S, b, d_sae] stay under sae_chunk_elems floats
        sub = max(16, sae_chunk_elems // max(1, S * sae.d_sae))
        was_training = sae.training
        sae.eval()
    sum_x = torch.zeros(ss.d, dtype=torch.float64, device=dev)
    sum_sq = torch.zeros((), dtype=torch.float64, device=dev)
    n = n_unlab = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(data), unit="ex", desc="zero-shot" if classifier is not None else "evaluate",
                   leave=False, file=sys.stderr)
    column = label_column if classifier is not None else "label"
    with torch.inference_mode():
        for acts, norms, labels in iter_labelled_batches(data, batch_size, column):
            if bar is not None:
                bar.update(len(labels))
            if classifier is not None:
                keep = labels >= 0
                if not keep.all():
                    n_unlab += int((~keep).sum())
                    acts, norms, labels = acts[keep], norms[keep], labels[keep]
                if not len(labels):
                    continue
                if labels.max() >= C:
                    raise ZeroShotError(f"{ss.path}: label {int(labels.max())} in column {label_column!r} is out of "
                                        f"range for a {C}-class zero-shot benchmark")
            x = torch.from_numpy(acts).to(dev)
            y = torch.from_numpy(labels).to(dev)
            n += len(y)
            clean_logp = None
            if classifier is not None:
                clean_logp = clean.add(classifier.logits(x), y, want_logp=sae is not None)
                clean_hits = clean.last_hits
            if sae is None:
                continue
            nrm = torch.from_numpy(norms).to(dev)
            unit = x if ss.normalization == "unit_norm" else x / x.norm(dim=-1, keepdim=True)
            raw = x * nrm[:, None] if ss.normalization == "unit_norm" else x
            for s0 in range(0, len(y), sub):
                sl = slice(s0, s0 + sub)
                x_hat, f = _sae_forward(sae, raw[sl])  # [S, b, d], [S, b, d_sae]
                x_hat = x_hat.float()
                active = f != 0
                fired |= active.any(1)
                l0_sum += active.sum((1, 2)).double()
                # explained variance in the SAE's own input space (per-example unit norm or raw)
                target = unit[sl] if sae_unit else raw[sl]
                pred = x_hat / nrm[sl, None] if sae_unit else x_hat
                sse += ((pred - target) ** 2).sum((1, 2)).double()
                if rec is not None:
                    rec.add(classifier.logits(x_hat), y[sl], clean_logp[sl],
                            ref_hits={k: h[sl] for k, h in clean_hits.items()})
            target_all = unit if sae_unit else raw
            sum_x += target_all.double().sum(0)
            sum_sq += (target_all.double() ** 2).sum()
    if bar is not None:
        bar.close()
    if sae is not None:
        sae.train(was_training)
    if n == 0:
        if classifier is not None:
            raise ZeroShotError(f"{ss.path}: no labelled examples in column {label_column!r} (all -1); zero-shot "
                                "accuracy needs labels")
        raise ZeroShotError(f"{ss.path}: no examples to evaluate")
    out: dict[str, Any] = {"n": n}
    if classifier is not None:
        out.update({
            "n_unlabelled": n_unlab,
            "num_classes": C,
            "logit_scale": classifier.logit_scale,
            "tie_break": "lower class index",
            "clean": {**{f"top{k}": float(clean.hits[k]) / n for k in ks}, "loss": float(clean.ce) / n},
        })
    if sae is not None:
        total_var = float(sum_sq) - float((sum_x ** 2).sum()) / n
        members = []
        for s in range(S):
            m: dict[str, Any] = {}
            if rec is not None:
                m.update({f"top{k}": float(rec.hits[k][s]) / n for k in ks})
                m.update({"loss": float(rec.ce[s]) / n, "kl_to_clean": float(rec.kl[s]) / n})
                for k in ks:
                    m[f"delta_top{k}"] = m[f"top{k}"] - out["clean"][f"top{k}"]
                    # examples the clean embeddings get right and the reconstruction wrong, and the reverse: the
                    # paired standard error of delta is sqrt(lost + gained - (gained - lost)^2 / n) / n
                    m[f"lost_top{k}"] = int(rec.lost[k][s])
                    m[f"gained_top{k}"] = int(rec.gained[k][s])
            m.update({
                "l0": float(l0_sum[s]) / n,
                "explained_variance": 1.0 - float(sse[s]) / total_var if total_var > 0 else float("nan"),
                "mse": float(sse[s]) / (n * ss.d),
                "dead_fraction": 1.0 - float(fired[s].double().mean()),
            })
            members.append(m)
        out["recon"] = members
        out["ev_space"] = "unit_norm" if sae_unit else "raw"
    return out


# ----------------------------------------------------------------------------- the stage


def check_label_column(ss: ShardSet, label_column: str) -> None:
    """Raise ZeroShotError naming the shard set and its columns when ``label_column`` is not one of them
    (``label`` always is)."""
    if label_column != "label" and label_column not in ss.manifest["columns"]:
        raise ZeroShotError(f"{ss.path}: label column {label_column!r} not in the shard set; columns: "
                            f"['label', {', '.join(map(repr, ss.manifest['columns']))}]")


def _resolve_label_column(ss: ShardSet, explicit: str, bench_column: str | None) -> str:
    if explicit:
        return explicit
    if bench_column and bench_column in ss.manifest["columns"]:
        return bench_column
    return "label"


def default_text_cache() -> Path:
    """``$VISAE_TEXT_CACHE`` or ``~/.cache/visae/text`` (shared with naming)."""
    import os

    v = os.environ.get("VISAE_TEXT_CACHE")
    return Path(v) if v else Path.home() / ".cache" / "visae" / "text"


def classifier_for_shards(ss: ShardSet, *, model: str = "", pretrained: str | None = None, random_init: bool = False,
                          benchmark: str = "auto", label_column: str = "", classnames_file: str | None = None,
                          templates_file: str | None = None, text_cache: str | Path | None = None,
                          device: str = "cpu", progress: bool = False) -> tuple[ZeroShotClassifier, str, dict[str, Any]]:
    """The zero-shot classifier that fits shard set ``ss`` -> (classifier, label column, facts).

    The model defaults to the shard set's source (``manifest["source"]``) and is checked
    against it: same model, same weights, the final image embedding.
    """
    clf, column, facts, _ = _classifier_and_backbone(
        ss, model=model, pretrained=pretrained, random_init=random_init, benchmark=benchmark,
        label_column=label_column, classnames_file=classnames_file, templates_file=templates_file,
        text_cache=text_cache, device=device, progress=progress, final=True)
    return clf, column, facts


def resolve_benchmark(ss: ShardSet, benchmark: str, label_column: str, classnames_file: str | None,
                      templates_file: str | None) -> tuple[str, list[str], list[str], str]:
    """(benchmark, class names, templates, label column) with which ``ss`` is scored: ``"auto"`` resolved from the
    manifest, the label column from ``label_column`` or the benchmark's, and the manifest's label names checked
    against the classes (:func:`check_label_names`). Cheap (manifest and text files only): what scoring and a
    sweep's pre-flight both run before any model is loaded or any trial trained.

    Raises:
        ZeroShotError: the benchmark cannot be told or is unknown, its files are empty or not UTF-8, the label column
            is not in the shard set, or the label names do not fit its classes.
    """
    if benchmark == "auto":
        benchmark = _auto_benchmark(ss, label_column or "label")
    classnames, templates, bench_column = benchmark_classes(benchmark, classnames_file, templates_file)
    column = _resolve_label_column(ss, label_column, bench_column)
    check_label_column(ss, column)  # a typo'd --label_column: found here, not after scoring starts
    check_label_names(ss, column, classnames)
    return benchmark, classnames, templates, column


def _classifier_and_backbone(ss: ShardSet, *, model: str, pretrained: str | None, random_init: bool, benchmark: str,
                             label_column: str, classnames_file: str | None, templates_file: str | None,
                             text_cache: str | Path | None, device: str, progress: bool, final: bool
                             ) -> tuple[ZeroShotClassifier, str, dict[str, Any], Any]:
    """classifier_for_shards, also returning the loaded backbone; ``final=False``: ``ss`` holds a residual layer."""
    from visae.backbones import load_backbone

    src = ss.source
    if model:
        model, pretrained = _parse_name(model, pretrained)
    elif src.get("model"):
        model, pretrained = _parse_name(str(src["model"]), pretrained if pretrained is not None else src.get("pretrained"))
    else:
        raise ZeroShotError(f"{ss.path}: manifest source names no model; pass --model")
    random_init = bool(random_init or src.get("random_init", False))
    if pretrained is None and not random_init:
        pretrained = src.get("pretrained")
    check_source(src, model, pretrained, where=str(ss.path), random_init=random_init, require_final=final)
    benchmark, classnames, templates, column = resolve_benchmark(ss, benchmark, label_column, classnames_file,
                                                                 templates_file)
    load_pre = None if pretrained in (None, "shipped") else pretrained
    backbone = load_backbone(model, load_pre, random_init=random_init, device=device,
                             seed=int(src.get("seed", 0) or 0))
    if final and backbone.embed_dim != ss.d:
        raise ZeroShotError(f"{ss.path}: activations have d={ss.d} but {model}'s image embedding has "
                            f"{backbone.embed_dim} dimensions; not its final embedding")
    if not final and backbone.width != ss.d:
        raise ZeroShotError(f"{ss.path}: activations have d={ss.d} but {model}'s residual stream has width "
                            f"{backbone.width}; not its residual layer")
    if text_cache is None:
        text_cache = default_text_cache()
    clf = build_classifier(backbone, classnames, templates, cache_dir=text_cache, device=device, progress=progress)
    facts = {"model": model, "pretrained": backbone.pretrained, "random_init": random_init, "benchmark": benchmark,
             "label_column": column, "num_templates": len(templates)}
    return clf, column, facts, backbone


# ----------------------------------------------------------------------------- residual layers: through the splice


def residual_layer(source: dict[str, Any]) -> int | None:
    """The block index of a manifest ``source`` that records a residual-stream layer (``layer: 8``), else None."""
    layer = source.get("layer")
    if isinstance(layer, bool):
        return None
    if isinstance(layer, int):
        return layer
    if isinstance(layer, str) and layer.strip().lstrip("-").isdigit():
        return int(layer)
    return None


def _looks_like_file(tag: str) -> bool:
    if tag.startswith(("hf-hub:", "hf_hub:")):
        return False
    return "/" in tag or "\\" in tag or tag.lower().endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt"))


def same_weights(a: Any, b: Any) -> bool | None:
    """Whether two ``pretrained`` records (a shard set's or an SAE's ``source``, a classifier's ``--pretrained``) name
    the same weights: True, False, or None when it cannot be told. Tags compare by name as open_clip reads them
    (case and ``-`` / ``_`` ignored: ``LAION2B-S34B-B79K`` is ``laion2b_s34b_b79k``; ``hf-hub:org/name`` whole); two
    local checkpoint files by content (SHA-256 when both exist here, so a relative and an absolute path, a symlink or
    a copy are the same; else by file name, since a moved checkpoint keeps its name); a tag against a file (the
    ``shipped`` tag and the shipped file), or a side that records none, cannot be told."""
    if not isinstance(a, str) or not isinstance(b, str) or not a.strip() or not b.strip():
        return None
    a, b = a.strip(), b.strip()
    if a == b:
        return True
    fa, fb = _looks_like_file(a), _looks_like_file(b)
    if fa != fb:
        return None
    if not fa:
        ha, hb = (x.startswith(("hf-hub:", "hf_hub:")) for x in (a, b))
        if ha != hb:  # a hub repo against a tag: the same weights may be published under both
            return None
        if ha:
            return a.split(":", 1)[1] == b.split(":", 1)[1]
        return a.lower().replace("-", "_") == b.lower().replace("-", "_")
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.is_file() and pb.is_file():
        return pa.resolve() == pb.resolve() or (pa.stat().st_size == pb.stat().st_size
                                                and _file_digest(pa) == _file_digest(pb))
    return pa.name == pb.name


def _file_digest(path: Path) -> str:
    """SHA-256 of a checkpoint file, computed once per (file, size, modification time) in a process: one command
    compares the same checkpoint against several shard sets."""
    st = path.stat()
    return _digest_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    from visae.integrity import sha256_file

    return sha256_file(path)


def site_mismatch(trained_on: dict[str, Any], scored_on: dict[str, Any], used: str = "scored on") -> list[str]:
    """How the activations an SAE was trained on (``trained_on``: a ``source`` record, e.g. its cfg.json
    ``extra.shards.source``) differ from those it is asked to be scored on (``scored_on``: a shard set's
    ``source``): ``["layer: trained on the final embedding, scored on block 2", ...]``. Empty when they agree, and
    for whatever either side does not record plainly (an imported SAE's ``layer: "unknown"`` or guessed token
    ``"all"``; a negative block index without the resolved ``read`` record to compare): only a real difference is
    reported. Compared: model, random_init, the pretrained weights (:func:`same_weights`), layer (a block index or
    the final embedding) and, for a residual layer, token (cls / patch / mean). An SAE of the final embedding
    scored on a block's patch tokens (or the reverse) gave a number and no error. ``used``: how the messages say the
    second side is used (``"given"`` where nothing is scored)."""
    if not trained_on or not scored_on:
        return []
    out = []
    a, b = trained_on.get("model"), scored_on.get("model")
    if a and b and str(a) != str(b):
        out.append(f"model: trained on {a!r}, {used} {b!r}")
    ra, rb = trained_on.get("random_init"), scored_on.get("random_init")
    if isinstance(ra, bool) and isinstance(rb, bool) and ra != rb:
        out.append(f"random_init: trained on {ra}, {used} {rb}")
    elif ra is not True and rb is not True:
        pa, pb = trained_on.get("pretrained"), scored_on.get("pretrained")
        if same_weights(pa, pb) is False:
            out.append(f"pretrained: trained on {pa!r}, {used} {pb!r}")

    def site(src: dict[str, Any]) -> tuple[bool, int | None]:
        """(known, block): block None for the final embedding; known False for a record that does not say."""
        if "layer" not in src:
            return False, None
        layer = src.get("layer")
        if layer is None or (isinstance(layer, str) and layer.strip().lower() in _FINAL_LAYERS):
            return True, None
        return (True, residual_layer(src)) if residual_layer(src) is not None else (False, None)

    (ka, la), (kb, lb) = site(trained_on), site(scored_on)
    if not (ka and kb):
        return out
    if (la is None) != (lb is None):
        def say(x: int | None) -> str:
            return "the final embedding" if x is None else f"block {x}"

        out.append(f"layer: trained on {say(la)}, {used} {say(lb)}")
        return out
    if la is None:
        return out
    if la != lb:
        read_a, read_b = trained_on.get("read"), scored_on.get("read")
        if read_a and read_b:  # resolved records ("residual_after_block_11") settle -1 against 11
            if read_a != read_b:
                out.append(f"layer: trained on {read_a}, {used} {read_b}")
        elif (la >= 0) == (lb >= 0):  # two indices counted from the same end name other blocks
            out.append(f"layer: trained on block {la}, {used} block {lb}")
    ta, tb = trained_on.get("token"), scored_on.get("token")
    if ta in ("cls", "patch", "mean") and tb in ("cls", "patch", "mean") and ta != tb:
        out.append(f"token: trained on {ta!r}, {used} {tb!r}")
    return out


def sae_shards_mismatch(sae: Any, ss: Any) -> list[str]:
    """:func:`site_mismatch` of an SAE's recorded training activations (cfg.json ``extra``; a stacked SAE's first
    member) and a shard set's ``source``: what every command that runs an SAE over a shard set checks first."""
    from visae.splice import _sae_source

    one = sae.member(0) if getattr(sae, "n_models", 1) > 1 else sae
    return site_mismatch(_sae_source(one) or _sae_source(sae), getattr(ss, "source", None) or {})


def splice_problem(source: dict[str, Any], images: str | None = None) -> str | None:
    """Why the SAEs of activations described by manifest ``source`` cannot be zero-shot scored through the splice
    (naming the field), or None when they can. Cheap: no model is loaded and no image decoded.

    Needs: a residual layer (``source.layer`` a block index), a token the splice can put back
    (``cls`` or ``patch``; the mean of the patches has no inverse), a model with a text tower, and
    the images the rows came from (``source.dataset``, or ``images``) still on disk.
    """
    layer = residual_layer(source)
    if layer is None:
        return f"activations are not from a residual layer (source.layer is {source.get('layer')!r})"
    token = source.get("token")
    if token == "mean":
        return ("activations are the mean of the patch tokens (source.token 'mean'); the mean has no inverse, so an "
                "SAE on it cannot be spliced back into the model. Extract with --token cls or patch")
    if token not in ("cls", "patch", "all"):
        return f"source.token is {token!r}; the splice needs cls, patch or all"
    if source.get("has_text") is False:
        return f"model {source.get('model')!r} has no text tower (source.has_text false); zero-shot needs a CLIP model"
    root = images or source.get("dataset")
    if not root:
        return "source.dataset records no image source; pass --images (the images the shards were extracted from)"
    kind = str(source.get("dataset_kind") or "auto")
    if kind == "webdataset":
        from visae.images import _expand_tars

        try:
            if not _expand_tars(str(root)):
                return f"image source {root} (webdataset) has no tar files"
        except Exception as e:  # noqa: BLE001 - any listing failure is the reason
            return f"image source {root}: {e}"
    elif not Path(str(root)).exists():
        return (f"the images the shards were extracted from ({root}, source.dataset) are gone; spliced zero-shot "
                "needs them: pass --images")
    return None


class SplicedSelection:
    """Zero-shot scoring of residual-layer SAEs through the splice: the images behind a shard set's rows.

    Built by :func:`spliced_selection`. ``items`` are the distinct images of the selected rows (a
    patch row ``<id>#p<j>`` counts for image ``<id>``), ``labels [n]`` their class indices. The
    images are decoded and preprocessed again on every pass (nothing image-sized is kept in memory).
    :meth:`baseline` runs two passes (clean, mean-ablated; once), :meth:`score` one pass per SAE.
    """

    def __init__(self, backbone: Any, classifier: ZeroShotClassifier, items: list[Any], labels: np.ndarray,
                 layer: int, token: str, *, batch_size: int = 64, progress: bool = False, ks: Sequence[int] = (1, 5)):
        self.backbone, self.classifier, self.items, self.labels = backbone, classifier, items, labels
        self.layer, self.token, self.batch_size, self.progress = int(layer), str(token), int(batch_size), progress
        self.ks = tuple(k for k in ks if k <= classifier.num_classes) or (1,)
        self.skipped: dict[str, str] = {}
        self._base: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, desc: str = "") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images [B, 3, H, W], labels [B]) over the selection images; undecodable ones skipped (``skipped``)."""
        from visae.images import load_image

        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.items), unit="img", desc=desc or "spliced zero-shot", leave=False, file=sys.stderr)
        for s0 in range(0, len(self.items), self.batch_size):
            ims, labs = [], []
            for item, lab in zip(self.items[s0:s0 + self.batch_size], self.labels[s0:s0 + self.batch_size]):
                img, _, err = load_image(item)
                if img is None:
                    self.skipped[item.id] = err
                    continue
                ims.append(self.backbone.preprocess(img))
                labs.append(int(lab))
            if bar is not None:
                bar.update(min(self.batch_size, len(self.items) - s0))
            if ims:
                yield torch.stack(ims), torch.tensor(labs, dtype=torch.long)
        if bar is not None:
            bar.close()

    def _iter(self, desc: str) -> Any:
        outer = self

        class _Again:  # a re-iterable (the splice helpers may iterate more than once)
            def __iter__(self):
                return outer.batches(desc)

        return _Again()

    def baseline(self) -> dict[str, Any]:
        """Clean and mean-ablated accuracy (:func:`visae.splice.zeroshot_baseline`, computed once)."""
        if self._base is None:
            from visae.splice import zeroshot_baseline

            with torch.inference_mode():
                self._base = zeroshot_baseline(self.backbone, self._iter("zero-shot baseline (clean, ablated)"),
                                               self.classifier, layer=self.layer, token=self.token, ks=self.ks)
        return self._base

    def score(self, sae: Any, name: str = "") -> dict[str, Any]:
        """One SAE (one member) spliced in: ``{topK, delta_topK, lost_topK, gained_topK, accuracy_recovered}``
        (lost / gained: images right on the clean model and wrong spliced, and the reverse)."""
        from visae.splice import SpliceError, accuracy_recovered, spliced_topk

        base = self.baseline()
        disc: dict[int, tuple[int, int]] = {}
        try:
            with torch.inference_mode():
                acc = spliced_topk(self.backbone, sae, self._iter(f"spliced zero-shot {name}".strip()), self.classifier,
                                   ks=self.ks, layer=self.layer, token=self.token, ref_hits=base["clean_hits"],
                                   discordant=disc)
        except SpliceError as e:
            raise ZeroShotError(f"cannot splice SAE {name}: {e}".replace("  ", " ")) from None
        out: dict[str, Any] = {f"top{k}": acc[k] for k in self.ks}
        for k in self.ks:
            out[f"delta_top{k}"] = acc[k] - base["clean_topk"][k]
            if k in disc:  # images right clean and wrong spliced, and the reverse
                out[f"lost_top{k}"], out[f"gained_top{k}"] = disc[k]
        out["accuracy_recovered"] = accuracy_recovered(acc[1], base)
        return out

    def summary(self) -> dict[str, Any]:
        """The top-level result fields: n images, clean / ablated accuracy, how the baseline is made."""
        base = self.baseline()
        return {"n": base["n"], "n_images_skipped": len(self.skipped), "num_classes": self.classifier.num_classes,
                "logit_scale": self.classifier.logit_scale, "tie_break": "lower class index",
                "clean": {f"top{k}": v for k, v in base["clean_topk"].items()},
                "ablated": {f"top{k}": v for k, v in base["ablated_topk"].items()},
                "baseline": base["baseline"], "spliced": {"layer": self.layer, "token": self.token},
                "recovered_formula": "(spliced - ablated) / (clean - ablated), top-1"}


def selection_images(data: ShardSet | ShardView, label_column: str, images: str | None = None
                     ) -> tuple[list[Any], np.ndarray]:
    """The distinct images behind ``data``'s rows, in row order, with their labels: (items, labels [n] int64).

    Rows whose label is -1 are skipped. The image source is ``images`` or the manifest's
    ``source.dataset`` (kind ``source.dataset_kind``); an id the source no longer lists is an error.
    """
    from visae.images import open_source

    ss, rows = _view_rows(data)
    src = ss.source
    check_label_column(ss, label_column)
    ids: dict[str, int] = {}
    for i in range(ss.num_shards):
        sel = rows[i]
        if sel is not None and sel.size == 0:
            continue
        meta = _shard_columns(ss, i, ("id", label_column))
        rid, lab = meta["id"], meta[label_column]
        if sel is not None:
            rid, lab = rid[sel], lab[sel]
        for r, y in zip(rid.tolist(), lab.tolist()):
            if y < 0:
                continue
            base, sep, j = str(r).rpartition("#p")
            key = base if sep and j.isdigit() else str(r)
            ids.setdefault(key, int(y))
    root = images or src.get("dataset")
    kind = str(src.get("dataset_kind") or "auto") if not images else "auto"
    try:
        source = open_source(root, kind)
    except Exception as e:  # noqa: BLE001
        raise ZeroShotError(f"{ss.path}: cannot open the images the shards were extracted from ({root}): {e}") from None
    by_id = {it.id: it for it in source.items}
    missing = [k for k in ids if k not in by_id]
    if missing:
        raise ZeroShotError(f"{root}: {len(missing)} image(s) of {ss.path} are not in the image source (e.g. "
                            f"{missing[:3]}); is it the source the shards were extracted from?")
    return [by_id[k] for k in ids], np.fromiter(ids.values(), dtype=np.int64, count=len(ids))


def spliced_selection(data: ShardSet | ShardView, *, images: str | None = None, model: str = "",
                      pretrained: str | None = None, random_init: bool = False, benchmark: str = "auto",
                      label_column: str = "", classnames_file: str | None = None, templates_file: str | None = None,
                      text_cache: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
                      progress: bool = False) -> tuple[SplicedSelection, dict[str, Any]]:
    """A :class:`SplicedSelection` for the residual-layer shard set (or view) ``data`` -> (selection, facts).

    Checks everything cheap first (:func:`splice_problem`), then loads the model, builds the
    classifier (text cache), lists the images. Raises :class:`ZeroShotError`.
    """
    ss = data if isinstance(data, ShardSet) else data.shards
    problem = splice_problem(ss.source, images)
    if problem:
        raise ZeroShotError(f"{ss.path}: {problem}")
    clf, column, facts, bb = _classifier_and_backbone(
        ss, model=model, pretrained=pretrained, random_init=random_init, benchmark=benchmark,
        label_column=label_column, classnames_file=classnames_file, templates_file=templates_file,
        text_cache=text_cache, device=device, progress=progress, final=False)
    items, labels = selection_images(data, column, images)
    if not items:
        raise ZeroShotError(f"{ss.path}: no labelled rows in column {column!r}; zero-shot accuracy needs labels")
    if labels.max() >= clf.num_classes:
        raise ZeroShotError(f"{ss.path}: label {int(labels.max())} in column {column!r} is out of range for a "
                            f"{clf.num_classes}-class zero-shot benchmark")
    layer = bb.resolve_layer(int(residual_layer(ss.source)))
    sel = SplicedSelection(bb, clf, items, labels, layer, str(ss.source.get("token")), batch_size=batch_size,
                           progress=progress)
    facts = {**facts, "images": str(images or ss.source.get("dataset")), "n_images": len(items),
             "splice": {"layer": layer, "token": sel.token}}
    return sel, facts


def zeroshot(cfg: ZeroShotConfig) -> dict[str, Any]:
    """Run the evaluation that ``cfg`` describes; returns (and with ``cfg.out`` writes) the result dict.

    Raises ZeroShotError before any scoring when ``--sae`` was trained on other activations than ``--shards`` hold
    (:func:`site_mismatch`: model, random_init, pretrained weights, layer, token), and for shards or a classifier that
    cannot be scored.
    """
    if not cfg.shards:
        raise ZeroShotError("--shards is required: a labelled shard set of the model's final image embedding")
    if cfg.out:  # the result is one JSON file: checked before the evaluation, not after it
        from visae.atomic import check_output_path

        o = Path(cfg.out)
        if o.is_dir():
            raise ZeroShotError(f"--out {o} is a directory; give the result file's path (e.g. {o / 'zeroshot.json'})")
        check_output_path(o.parent, "visae zeroshot")  # a parent that is a file (the shared check)
    ss = ShardSet(cfg.shards)
    sae = None
    if cfg.sae:  # loaded before the model and the images: a bad SAE dir fails fast
        from visae.sae import load_sae

        sae = load_sae(cfg.sae, device=cfg.device)
        diffs = sae_shards_mismatch(sae, ss)  # other activations than these gave a number (the wrong rows' scores)
        if diffs:
            raise ZeroShotError(f"--sae {cfg.sae} was not trained on the activations of --shards {ss.path} "
                                f"({'; '.join(diffs)}): score it on a shard set of its own model, layer and token")
    if residual_layer(ss.source) is not None:
        return _zeroshot_spliced(cfg, ss, sae)
    clf, column, facts = classifier_for_shards(
        ss, random_init=cfg.random_init, device=cfg.device, progress=cfg.progress, **asdict(cfg.classifier))
    res = evaluate(ss, clf, sae, label_column=column, batch_size=cfg.batch_size, device=cfg.device,
                   progress=cfg.progress)
    res.update({**facts, **_recorded_paths(cfg)})
    if sae is not None and sae.n_models == 1:
        res["recon"] = res["recon"][0]
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg.out, json.dumps(res, indent=1))
    return res


def _recorded_paths(cfg: ZeroShotConfig) -> dict[str, Any]:
    """The result's ``shards``, ``sae`` and ``config``, file and directory arguments absolute (as typed, relative,
    they did not say which from elsewhere)."""
    from visae.config import absolute_paths

    rec = absolute_paths(asdict(cfg), ("shards", "images", "sae", "out", "classifier.classnames_file",
                                       "classifier.templates_file", "classifier.text_cache"),
                         if_file=("classifier.pretrained",))
    return {"shards": rec["shards"], "sae": rec["sae"], "config": rec}


def _zeroshot_spliced(cfg: ZeroShotConfig, ss: ShardSet, sae: Any) -> dict[str, Any]:
    """``visae zeroshot`` on residual-layer shards: the SAE (``sae``, loaded from ``cfg.sae``) spliced into the model
    over the shards' images."""
    if sae is None:
        problem = final_embedding_problem(ss.source)
        raise ZeroShotError(f"{ss.path}: {problem}; a residual layer has no zero-shot score of its own. Pass --sae to "
                            "score an SAE on it through the splice (the model with the SAE's reconstruction at that "
                            "block), or extract without --layer for the final image embedding")
    sel, facts = spliced_selection(ss, images=cfg.images, random_init=cfg.random_init, device=cfg.device,
                                   batch_size=cfg.image_batch_size, progress=cfg.progress, **asdict(cfg.classifier))
    from visae.splice import SpliceError, splice_target

    try:
        for m in range(sae.n_models):
            splice_target(sel.backbone, sae.member(m) if sae.n_models > 1 else sae, sel.layer, sel.token)
    except SpliceError as e:
        raise ZeroShotError(f"{cfg.sae}: {e}") from None
    stats = evaluate(ss, None, sae, batch_size=cfg.batch_size, device=cfg.device, progress=cfg.progress)
    members = []
    for m in range(sae.n_models):
        one = sae.member(m) if sae.n_models > 1 else sae
        members.append({**sel.score(one, f"member {m}" if sae.n_models > 1 else ""), **stats["recon"][m]})
    res = {**sel.summary(), "n_rows": stats["n"], "ev_space": stats["ev_space"], "recon": members,
           **facts, **_recorded_paths(cfg)}
    if sae.n_models == 1:
        res["recon"] = members[0]
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg.out, json.dumps(res, indent=1))
    return res


def _loss(m: dict[str, Any]) -> str:
    """``  loss X`` when the cross entropy was computed (not on the spliced path, which scores accuracy only)."""
    v = m.get("loss")
    return f"  loss {v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else ""


def format_result(res: dict[str, Any]) -> str:
    c = res["clean"]
    lines = [f"zero-shot on {res.get('shards', '?')} ({res['n']} labelled, {res['num_classes']} classes, "
             f"benchmark {res.get('benchmark', '?')}, logit scale {res['logit_scale']:.2f})",
             f"  clean          top1 {c['top1']:.4f}  top5 {c.get('top5', float('nan')):.4f}{_loss(c)}"]
    if "ablated" in res:
        a = res["ablated"]
        lines[0] += f", SAE spliced after block {res['splice']['layer']} ({res['splice']['token']} tokens)"
        lines.append(f"  ablated        top1 {a['top1']:.4f}  top5 {a.get('top5', float('nan')):.4f}  "
                     f"({res['baseline']})")
    recs = res.get("recon")
    if recs is not None:
        for i, r in enumerate(recs if isinstance(recs, list) else [recs]):
            tag = "reconstruction" if not isinstance(recs, list) else f"recon[{i}]"
            lines.append(f"  {tag:<14} top1 {r['top1']:.4f}  top5 {r.get('top5', float('nan')):.4f}{_loss(r)}"
                         f"  (delta top1 {r['delta_top1']:+.4f})  L0 {r['l0']:.1f}  EV {r['explained_variance']:.4f}"
                         f"  dead {r['dead_fraction']:.3f}")
            if "accuracy_recovered" in r:
                rec = r["accuracy_recovered"]
                lines.append(f"  {'':<14} accuracy recovered {'n/a (clean = ablated)' if rec is None else f'{rec:.4f}'}"
                             "  = (spliced - ablated) / (clean - ablated), top-1")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from visae.devices import resolve_device
    from visae.config import parse_config
    from visae.errors import report

    try:
        cfg = parse_config(ZeroShotConfig, argv, default_yaml=DEFAULT_YAML, prog="visae zeroshot")
        cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))  # 'auto' resolved; one this machine lacks refused
        res = zeroshot(cfg)
    except VisaeError as e:  # a bad flag, SAE, shard set or labels (exit 2; visae.errors)
        return report("visae zeroshot", e)
    print(format_result(res))
    if cfg.out:
        print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    from visae.cli import run_main

    sys.exit(run_main("python -m visae.zeroshot", main))
