"""Name SAE latents by matching their decoder directions to text embeddings of a vocabulary.

Discover-then-Name: an SAE trained on CLIP's final image embeddings has decoder directions
``W_dec[s, j, :]`` in CLIP's embedding space, where text embeddings live too. Each latent j
is named by the vocabulary words whose unit text embeddings have the highest cosine with its
unit decoder direction. We search exactly (faiss ``IndexFlatIP`` over unit vectors = cosine)
and report, per concept, scores a user can judge:

- ``score``: cosine between the direction and the chosen name's text embedding;
- ``margin``: top-1 minus top-2 cosine of the concept's own ranking (small = ambiguous);
- ``z``: (score - mean cosine over the vocabulary) / std of those cosines for this direction,
  computed exactly from the text embeddings' mean and covariance;
- ``alternatives``: the top-k words with cosines; ``rank``: where the chosen name sits in them;
- ``frequency`` and ``mean_activation`` (when active) from the top-images pass.

Options: subtract the mean text embedding from every word embedding before matching (then
renormalise; removes the component all words share), duplicates allowed (default: several
latents may be "green", e.g. a feature split by size) or one name per concept (greedy global
matching: pairs taken in decreasing score, each word used at most once, concepts that lose
their words search deeper), and a score threshold below which a concept is left unnamed. Dead latents (never active in the top-images pass) are left unnamed.

    python scripts/name_concepts.py --sae runs/best --out runs/concepts      # model from the SAE's cfg.json
    python scripts/name_concepts.py --sae DIR --model ViT-B-32 --pretrained laion2b_s34b_b79k \\
        --vocab ../shared/vocab/20k.txt --out DIR

Output (see docs/naming.md): ``concepts.json``, ``concepts.csv`` and, when the shard set is
known, ``top_images.npz`` (see :mod:`visae.topimages`).
"""

from __future__ import annotations

import dataclasses

import csv
import io
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from visae.atomic import atomic_write_text
from visae.integrity import sha256_bytes, sha256_file
from visae.config import ConfigError, absolute_paths, changed_settings, check_bounds, config_to_dict, parse_config
from visae.errors import VisaeError
from visae.resources import config_yaml

__all__ = [
    "NamingError",
    "NameConfig",
    "NEAR_DUPLICATE_COSINE",
    "near_duplicates",
    "VocabularyEmbedding",
    "embed_vocabulary",
    "STOPWORDS",
    "load_vocabulary",
    "decoder_directions",
    "check_embedding_space",
    "match_names",
    "NamingResult",
    "name_concepts",
    "read_concepts",
    "sae_weights_sha256",
    "recorded_sae_mismatch",
    "check_concepts_sae",
    "main",
]

log = logging.getLogger(__name__)

CONCEPTS_FORMAT = "visae.concepts"
CONCEPTS_VERSION = 1

# Words whose embeddings have a cosine above this are one name to the text tower (merged, see embed_vocabulary).
NEAR_DUPLICATE_COSINE = 1.0 - 1e-6

# English function words: useless as concept names. Short on purpose: content words stay.
STOPWORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been before being below
between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers
herself him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more
most mustn't my myself no nor not of off on once only or other ought our ours ourselves out over own same
shan't she she'd she'll she's should shouldn't so some such than that that's the their theirs them
themselves then there there's these they they'd they'll they're they've this those through to too under
until up very was wasn't we we'd we'll we're we've were weren't what what's when when's where where's which
while who who's whom why why's will with won't would wouldn't you you'd you'll you're you've your yours
yourself yourselves also just may might must shall upon yet however whether either neither etc
""".split())


class NamingError(VisaeError, ValueError):
    """The SAE, vocabulary or model cannot be used for naming (the message says which and why)."""


@dataclass(frozen=True)
class NameConfig:
    """Name every SAE latent by its decoder direction's nearest vocabulary words in CLIP space."""

    sae: str = field(default="", metadata={"help": "SAE directory (cfg.json + weights.safetensors)", "required": True})
    member: int = field(default=0, metadata={"help": "which member of a stacked SAE to name"})
    model: Optional[str] = field(default=None, metadata={
        "help": "backbone whose text tower embeds the words; null: the model recorded in the SAE's shard source"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "pretrained tag or checkpoint; null: from the shard source"})
    random_init: Optional[bool] = field(default=None, metadata={
        "help": "random-init backbone (tests only); null: as recorded in the shard source"})
    assume_embedding_space: bool = field(default=False, metadata={
        "help": "name an SAE whose cfg.json records no shard source, trusting it was trained on --model's final image embedding"})
    vocab: Optional[str] = field(default=None, metadata={
        "help": "word-list file, one word a line; null: the most frequent English words from wordfreq"})
    vocab_size: int = field(default=20000, metadata={"help": "use the first N words (0: the whole file)"})
    stopwords: bool = field(default=True, metadata={"help": "drop English function words (the, of, ...)"})
    alpha_only: bool = field(default=True, metadata={
        "help": "drop words that are not letters (inner hyphens / spaces allowed): numbers, it's, u.s"})
    templates: tuple[str, ...] = field(default=(), metadata={
        "help": "prompt templates with {} (e.g. 'a photo of a {}.'); a word's embedding is their mean; empty: the bare word"})
    subtract_mean: bool = field(default=False, metadata={
        "help": "subtract the mean word embedding from every word embedding (then renormalise) before matching"})
    top_k: int = field(default=5, metadata={"help": "name candidates kept per concept"})
    unique_names: bool = field(default=False, metadata={
        "help": "give each word to at most one concept (greedy by score); false: each concept gets its best word"})
    min_z: float = field(default=0.0, metadata={
        "help": "leave a concept unnamed when its best available word's z (how far its score stands out from the "
                "vocabulary's, in standard deviations) is below this; 0: every live latent is named (the best word "
                "never scores below the vocabulary's mean)"})
    min_score: Optional[float] = field(default=None, metadata={
        "help": "also leave a concept unnamed when its best available cosine is below this (null: no cosine "
                "threshold; cosines move with the offset all text embeddings share, see docs/naming.md)"})
    skip_dead: bool = field(default=True, metadata={"help": "leave latents that never fire (in the shard set) unnamed"})
    shards: Optional[str] = field(default=None, metadata={
        "help": "shard set for activation statistics and top images; null: the one recorded in the SAE's cfg.json, if present"})
    allow_other_shards: bool = field(default=False, metadata={
        "help": "accept a --shards set whose recorded provenance (model, pretrained tag, layer, token) differs from "
                "the one the SAE was trained on"})
    n_top: int = field(default=16, metadata={"help": "top-activating images kept per concept"})
    n_random: int = field(default=8, metadata={"help": "random activating images kept per concept"})
    batch_size: int = field(default=4096, metadata={"help": "shard rows per SAE forward pass"})
    text_batch_size: int = field(default=256, metadata={"help": "prompts per text-tower forward pass"})
    text_cache: Optional[str] = field(default="~/.cache/visae/text", metadata={
        "help": "text-embedding cache directory (shared with zero-shot); null: $VISAE_TEXT_CACHE or none"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    seed: int = field(default=0, metadata={"help": "seed of the random activating-image sample"})
    progress: bool = field(default=True, metadata={
        "help": "progress bars (stderr) for the text embeddings and the top-image pass; --no_progress: none"})
    out: str = field(default="concepts", metadata={"help": "output directory"})

    def __post_init__(self) -> None:
        from visae.devices import check_device

        check_device(self.device, "NameConfig.device")
        from visae.text import template_problem

        for t in self.templates:  # they reached the text stage as a ValueError / IndexError traceback
            why = template_problem(t)
            if why:
                raise ConfigError(f"NameConfig.templates: {why}")

        for f in ("min_z", "min_score"):
            v = getattr(self, f)
            if v is not None and math.isnan(v):
                raise ConfigError(f"NameConfig.{f} is NaN; give a number")
        # counts and sizes: out of range they were taken silently (top_k 0 or -1 kept 1 candidate, a negative
        # n_top / n_random kept none, a negative vocab_size the whole file) or failed after the text embeddings
        check_bounds(self, {"top_k": (1, None), "n_top": (0, None), "n_random": (0, None), "batch_size": (1, None),
                            "text_batch_size": (1, None), "vocab_size": (0, None), "member": (0, None)})


# ----------------------------------------------------------------------------- vocabulary


def _is_wordlike(w: str) -> bool:
    return w.replace("-", "").replace(" ", "").isalpha() and w[0].isalpha() and w[-1].isalpha()


def load_vocabulary(path: str | Path | None = None, size: int = 20000, *, stopwords: bool = False,
                    alpha_only: bool = False, extra: Sequence[str] = (), dropped: dict[str, int] | None = None
                    ) -> list[str]:
    """The naming vocabulary: distinct words in frequency (file) order.

    Args:
        path: word-list file (UTF-8, one word or phrase a line, blank lines ignored); None: wordfreq's
            ``size`` most frequent English words (bundled with the package, no download).
        size: keep the first ``size`` words before filtering (0 = all of the file).
        stopwords: drop :data:`STOPWORDS`.
        alpha_only: drop entries with characters other than letters, inner hyphens and spaces.
        extra: words appended (after filtering the list, not filtered themselves).
        dropped: a dict filled with how many entries each filter removed (``stopwords``, ``not_wordlike``,
            ``duplicates``), after the ``size`` cut.

    Raises:
        NamingError: the file is missing, a directory or not UTF-8; nothing is left after filtering.
    """
    if path is None:
        import wordfreq

        if size <= 0:
            raise NamingError("vocab_size must be positive when the vocabulary comes from wordfreq")
        words = wordfreq.top_n_list("en", size)
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            what = "is a directory, not a file" if p.is_dir() else "does not exist"
            raise NamingError(f"vocabulary file {p} {what} (expected one word a line)")
        try:
            lines = p.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of the first word
        except UnicodeDecodeError as e:
            raise NamingError(f"vocabulary file {p} is not UTF-8 text: {e}") from None
        words = [ln.strip() for ln in lines if ln.strip()]
        if size > 0:
            words = words[:size]
    n0 = len(words)
    if stopwords:
        words = [w for w in words if w.lower() not in STOPWORDS]
    n1 = len(words)
    if alpha_only:
        words = [w for w in words if _is_wordlike(w)]
    n2 = len(words) + len(extra)
    out = list(dict.fromkeys(list(words) + [str(w) for w in extra]))
    if dropped is not None:
        dropped.update(stopwords=n0 - n1, not_wordlike=n1 - (n2 - len(extra)), duplicates=n2 - len(out))
    if not out:
        raise NamingError(f"vocabulary {path or 'wordfreq'} is empty after filtering: of its {n0} entries "
                          f"{n0 - n1} are stopwords (--no_stopwords keeps them) and {n1 - (n2 - len(extra))} not "
                          "word-like (--no_alpha_only keeps them)")
    return out


def near_duplicates(emb: torch.Tensor, threshold: float = NEAR_DUPLICATE_COSINE, block: int = 512) -> dict[int, list[int]]:
    """Rows of ``emb [V, D]`` that the text tower does not tell apart: ``{kept row: [merged rows]}``.

    Rows are taken in order; each row not merged yet keeps every later row whose cosine with it exceeds
    ``threshold`` (so no two kept rows are above it). Exact: a blocked float32 ``X X^T`` finds the candidate
    pairs with a margin of ``4 D 2^-24`` (twice the float32 rounding bound of a dot product of D terms of
    unit rows, |error| <= D u), and each candidate's cosine is recomputed in float64.
    """
    V, D = emb.shape
    if V < 2:
        return {}
    X = F.normalize(emb.float(), dim=-1)
    X64 = F.normalize(emb.double(), dim=-1)
    cand_thr = threshold - 4.0 * D * 2.0 ** -24
    pairs: list[tuple[int, int]] = []
    for i0 in range(0, V, block):
        S = X[i0:i0 + block] @ X[i0:].T  # [b, V - i0]: this block against itself and every later row
        r, c = torch.nonzero(S > cand_thr, as_tuple=True)
        r, c = r + i0, c + i0
        later = c > r
        r, c = r[later], c[later]
        if r.numel():
            ok = (X64[r] * X64[c]).sum(1) > threshold
            pairs += list(zip(r[ok].tolist(), c[ok].tolist()))
    groups: dict[int, list[int]] = {}
    merged: set[int] = set()
    for r, c in sorted(pairs):
        if r in merged or c in merged:
            continue
        groups.setdefault(r, []).append(c)
        merged.add(c)
    return groups


@dataclass
class VocabularyEmbedding:
    """A vocabulary as the text tower sees it: ``words`` and their unit embeddings ``emb [V, D]``, after
    dropping the entries that do not fit the context (``too_long``) and merging entries with one embedding
    (``merged``: kept word -> the words merged into it)."""

    words: list[str]
    emb: torch.Tensor
    too_long: list[str]
    merged: dict[str, list[str]]


def embed_vocabulary(backbone: Any, words: Sequence[str], templates: Sequence[str] | None = None, *,
                     cache_dir: str | Path | None = None, batch_size: int = 256, progress: bool = False,
                     threshold: float = NEAR_DUPLICATE_COSINE) -> VocabularyEmbedding:
    """Embed a naming vocabulary so that every name is one the text tower can represent, and no two names share
    an embedding.

    1. Entries some prompt of which does not fit the text context (:func:`visae.text.texts_that_do_not_fit`;
       16 tokens for the toy CLIP, 77 for CLIP) would be cut by the tokenizer, and entries that differ only
       after the cut get identical embeddings: they are dropped with a warning listing them.
    2. The rest are embedded (:func:`visae.text.encode_texts`, cached).
    3. Entries whose embeddings have cosine > ``threshold`` (default 1 - 1e-6) with an earlier entry (the
       same tokens after the tokenizer's cleaning, e.g. "Apple" / "apple") are merged into the earlier one
       with a warning listing them (:func:`near_duplicates`): a tie at margin 0 between two names is not a name.

    Raises:
        NamingError: no entry fits the context.
    """
    from visae.text import context_length, encode_texts, texts_that_do_not_fit

    words = list(dict.fromkeys(str(w) for w in words))
    tpl = list(templates) if templates else None
    too_long = texts_that_do_not_fit(backbone.tokenizer, words, tpl)
    name = getattr(backbone, "name", "the model")
    if too_long:
        log.warning("vocabulary: %d of %d entries do not fit %s's text context of %d tokens%s and are dropped (the "
                    "tokenizer would cut them, and entries that differ after the cut would get one embedding): %s",
                    len(too_long), len(words), name, context_length(backbone.tokenizer),
                    " with the templates" if tpl else "", too_long)
        drop = set(too_long)
        words = [w for w in words if w not in drop]
    if not words:
        raise NamingError(f"no vocabulary entry fits {name}'s text context of {context_length(backbone.tokenizer)} tokens")
    emb = encode_texts(backbone, words, tpl, cache_dir=cache_dir, batch_size=batch_size, progress=progress)
    groups = near_duplicates(emb, threshold)
    merged: dict[str, list[str]] = {}
    if groups:
        merged = {words[i]: [words[j] for j in js] for i, js in groups.items()}
        gone = {j for js in groups.values() for j in js}
        log.warning("vocabulary: %d entries have an embedding with cosine > %.7g to an earlier entry (the text tower "
                    "does not tell them apart) and are merged into it (kept <- merged): %s", len(gone), threshold,
                    "; ".join(f"{k} <- {', '.join(v)}" for k, v in merged.items()))
        keep = [i for i in range(len(words)) if i not in gone]
        words, emb = [words[i] for i in keep], emb[keep]
    return VocabularyEmbedding(words=words, emb=emb, too_long=too_long, merged=merged)


# ----------------------------------------------------------------------------- SAE side


def _member_extra(sae: Any, member: int) -> dict[str, Any]:
    extra = dict(getattr(sae, "extra", {}) or {})
    members = extra.get("members")
    if isinstance(members, list) and members:
        return dict(members[member] or {})
    return extra


def shard_source(sae: Any, member: int = 0) -> dict[str, Any] | None:
    """The ``source`` of the shard set the SAE was trained on (from cfg.json ``extra``), or None."""
    extra = _member_extra(sae, member)
    shards = extra.get("shards")
    if isinstance(shards, dict) and isinstance(shards.get("source"), dict):
        return shards["source"]
    if isinstance(extra.get("source"), dict):
        return extra["source"]
    return None


def check_embedding_space(source: dict[str, Any] | None, where: str, assume: bool = False) -> None:
    """Refuse an SAE whose inputs were not the model's final image embedding (the only space text lives in)."""
    if source is None:
        if assume:
            return
        raise NamingError(
            f"{where}: cfg.json records no shard source (extra.shards.source), so it is unknown whether the SAE was "
            "trained on a CLIP model's final image embedding, the only space where decoder directions can be compared "
            "with text embeddings. Pass --assume_embedding_space (with --model) if it was")
    from visae.zeroshot import final_embedding_problem

    problem = final_embedding_problem(source)
    if problem:
        raise NamingError(
            f"{where}: the SAE's training {problem} (recorded in extra.shards.source); decoder directions outside "
            "the final image embedding are not in the text tower's space and cannot be named by text embeddings "
            "(a name would be the nearest word to an unrelated vector). visae name refuses such SAEs (residual "
            "layers, imported SAELens / saev ones included); naming through the splice is not implemented. "
            "Inspect them with visae browse (top images), score them spliced into the model with visae zeroshot "
            "--sae, or train on shards extracted without --layer to name them (docs/naming.md)")


def decoder_directions(sae: Any, member: int = 0) -> torch.Tensor:
    """Unit decoder directions of one member: [d_sae, d_in] float32 (zero rows stay zero)."""
    W = sae.W_dec.detach()
    if W.ndim == 3:
        if not 0 <= member < W.shape[0]:
            raise NamingError(f"member {member} out of range: the SAE stack has {W.shape[0]} members")
        W = W[member]
    return F.normalize(W.float().cpu(), dim=-1)


# ----------------------------------------------------------------------------- matching


@dataclass
class NamingResult:
    """Per concept j (arrays of length d_sae): chosen name (None = unnamed), its score (the cosine for unit text
    embeddings), the margin, z, rank, and the top-k candidates ``cand_idx [d_sae, k]`` (word indices) with
    scores ``cand_score``; and the decision's thresholds (``min_z``, ``min_score``)."""

    words: list[str]
    names: list[Optional[str]]
    score: np.ndarray
    margin: np.ndarray
    z: np.ndarray
    rank: np.ndarray
    cand_idx: np.ndarray
    cand_score: np.ndarray
    reason: list[str]
    min_z: float = 0.0
    min_score: Optional[float] = None

    def alternatives(self, j: int) -> list[dict[str, Any]]:
        return [{"name": self.words[int(i)], "score": float(s)} for i, s in zip(self.cand_idx[j], self.cand_score[j]) if i >= 0]


def _faiss_search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, idx


def _moments(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and (population) covariance [D, D] of the rows of R [V, D], float64."""
    R = R.double()
    mu = R.mean(0)
    C = torch.cov(R.T, correction=0) if R.shape[0] > 1 else torch.zeros(R.shape[1], R.shape[1], dtype=torch.float64)
    return mu, C


def _score_moments(d: torch.Tensor, mu: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over the vocabulary of the scores ``R d`` of each direction d [n, D]: d.mu, sqrt(d^T C d)."""
    d = d.double()
    return d @ mu, torch.einsum("nd,de,ne->n", d, C, d).clamp_min(1e-24).sqrt()


def match_names(
    directions: torch.Tensor,
    text_emb: torch.Tensor,
    words: Sequence[str],
    *,
    top_k: int = 5,
    unique: bool = True,
    min_z: float = 0.0,
    min_score: Optional[float] = None,
    subtract_mean: bool = False,
    active: np.ndarray | None = None,
) -> NamingResult:
    """Match decoder directions ``[d_sae, D]`` (any scale) to word embeddings ``text_emb [V, D]``.

    ``text_emb`` is used as given (:func:`visae.text.encode_texts` gives unit rows). Ranking: the word
    vectors are centred, ``R_w = t_w - mean(t)`` (with ``subtract_mean`` also renormalised,
    ``R_w = (t_w - mean(t)) / |t_w - mean(t)|``), and each unit direction d ranks the words by
    ``d . R_w``. Without ``subtract_mean`` that is the order of ``d . t_w`` (the cosine for unit rows):
    centring shifts every word's score by the same ``d . mean(t)``, and it makes the ranking, the margin
    and z exactly independent of any vector added to every word embedding.

    Decision (the default is independent of that offset): a concept is named when its best (free) word's
    ``z = (d.R_w - mean_v d.R_v) / std_v d.R_v`` (over the vocabulary, exact from R's mean and covariance)
    is at least ``min_z`` (default 0: every live latent is named, as in Discover-then-Name (Rao et
    al., ECCV 2024: each concept gets its closest word), since the best word never scores below the vocabulary's mean; in the unique matching
    a concept pushed to a word below the mean is left unnamed). ``min_score`` (off by default) also requires the reported score
    (``d . t_w``, or the cosine with ``R_w`` under ``subtract_mean``) to reach it; without
    ``subtract_mean`` that score includes ``d . mean(t)``, the same for every word, so it depends on the
    direction's angle to the mean text embedding, not on the word.

    ``active [d_sae] bool``: latents allowed a name (others get reason "dead"). With ``unique`` a greedy
    global matching gives each word to at most one concept: candidate pairs are taken in decreasing
    score; a concept whose candidates were all taken searches deeper until it gets a free word or its best
    free word falls below its threshold.

    Raises:
        NamingError: embeddings and words disagree in number, or directions and embeddings in width, or
            ``top_k < 1``.
    """
    import faiss

    if top_k < 1:  # it was taken as 1
        raise NamingError(f"top_k = {top_k}: expected >= 1 name candidates per concept")
    words = list(words)
    if text_emb.shape[0] != len(words):
        raise NamingError(f"{text_emb.shape[0]} text embeddings for {len(words)} words")
    if directions.shape[1] != text_emb.shape[1]:
        raise NamingError(f"decoder directions have width {directions.shape[1]} but the text embeddings have "
                          f"{text_emb.shape[1]}: the SAE was not trained on this model's image embedding")
    E = text_emb.double()
    mean_t = E.mean(0)
    R = E - mean_t  # float64: a vector added to every row cancels here up to float64 rounding
    if subtract_mean:
        R = F.normalize(R, dim=-1)
    Dn = F.normalize(directions.double(), dim=-1)
    n, V = Dn.shape[0], R.shape[0]
    # reported score = ranking score + offset: d.t_w without subtract_mean, the cosine with R_w with it
    offset = (Dn @ mean_t).numpy() if not subtract_mean else np.zeros(n)
    R_np = np.ascontiguousarray(R.numpy().astype(np.float32))
    D_np = np.ascontiguousarray(Dn.numpy().astype(np.float32))
    index = faiss.IndexFlatIP(R_np.shape[1])
    index.add(R_np)

    k = max(1, min(top_k, V))
    cand_s, cand_idx = _faiss_search(index, D_np, max(k, min(2, V)))
    cand_s = cand_s.astype(np.float64)
    margin = cand_s[:, 0] - cand_s[:, 1] if cand_s.shape[1] > 1 else np.full(n, np.nan)
    cand_s, cand_idx = cand_s[:, :k], cand_idx[:, :k]

    mu, C = _moments(R)
    m_t, s_t = _score_moments(Dn, mu, C)
    mean_s, std_s = m_t.numpy(), s_t.numpy()
    min_z_used = float(min_z)
    # per-concept threshold on the ranking score: z >= min_z and (optionally) score >= min_score
    thr = mean_s + min_z_used * std_s if math.isfinite(min_z_used) else np.full(n, -np.inf if min_z_used < 0 else np.inf)
    if min_score is not None:
        thr = np.maximum(thr, float(min_score) - offset)

    if active is None:
        active = np.ones(n, bool)
    active = np.asarray(active, bool)
    nonzero = Dn.norm(dim=1).numpy() > 0.5  # F.normalize leaves a zero row zero
    name_idx = np.full(n, -1, np.int64)
    name_s = np.full(n, np.nan, np.float64)
    reason = [""] * n
    for j in range(n):
        if not active[j]:
            reason[j] = "dead"
        elif not nonzero[j]:
            reason[j] = "zero decoder direction"

    eligible = active & nonzero
    if not unique:
        ok = eligible & (cand_s[:, 0] >= thr)
        name_idx[ok] = cand_idx[ok, 0]
        name_s[ok] = cand_s[ok, 0]
    else:
        name_idx, name_s = _greedy_unique(index, D_np, np.flatnonzero(eligible), thr, max(k, 8), V, name_idx, name_s)
    names: list[Optional[str]] = []
    rank = np.full(n, -1, np.int64)
    best_z = (cand_s[:, 0] - mean_s) / std_s
    for j in range(n):
        w = int(name_idx[j])
        if w < 0:
            names.append(None)
            if not reason[j]:
                if cand_s[j, 0] < thr[j]:
                    reason[j] = "below min_z" if best_z[j] < min_z_used else "below min_score"
                else:
                    reason[j] = "words taken by better matches"
            continue
        names.append(words[w])
        hit = np.flatnonzero(cand_idx[j] == w)
        rank[j] = int(hit[0]) if hit.size else -1  # -1: chosen below the top-k list (unique matching)
    z = (name_s - mean_s) / std_s
    return NamingResult(words=words, names=names, score=name_s + offset, margin=margin, z=z, rank=rank,
                        cand_idx=cand_idx.astype(np.int64), cand_score=cand_s + offset[:, None], reason=reason,
                        min_z=min_z_used, min_score=min_score)


def _greedy_unique(index: Any, queries: np.ndarray, concepts: np.ndarray, thr: np.ndarray, depth: int, V: int,
                   name_idx: np.ndarray, name_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact global greedy matching: (concept, word) pairs in decreasing score, each word and concept used once.

    Lazy: each concept walks down its own ranking (a heap holds every concept's best not-yet-tried word);
    a concept whose list runs out is searched again four times deeper. Stops per concept below its
    threshold ``thr[c]``.
    """
    import heapq

    if concepts.size == 0:
        return name_idx, name_score
    depth = min(depth, V)
    s, i = _faiss_search(index, queries[concepts], depth)
    lists = {int(c): (s[r], i[r]) for r, c in enumerate(concepts)}
    pos = {int(c): 0 for c in concepts}
    heap = [(-float(lists[int(c)][0][0]), int(c)) for c in concepts]
    heapq.heapify(heap)
    used = np.zeros(V, bool)
    while heap:
        neg, c = heapq.heappop(heap)
        if -neg < thr[c]:
            continue  # this concept's best free word is below its threshold: unnamed
        sc, ix = lists[c]
        w = int(ix[pos[c]])
        if w >= 0 and not used[w]:
            used[w] = True
            name_idx[c], name_score[c] = w, sc[pos[c]]
            continue
        pos[c] += 1
        if pos[c] >= len(ix):
            if len(ix) >= V:
                continue  # every word is taken
            d = min(len(ix) * 4, V)
            s2, i2 = _faiss_search(index, queries[c:c + 1], d)
            lists[c] = (s2[0], i2[0])
            sc, ix = lists[c]
        heapq.heappush(heap, (-float(sc[pos[c]]), c))
    return name_idx, name_score


# ----------------------------------------------------------------------------- the stage


def _resolve_model(cfg: NameConfig, source: dict[str, Any] | None, where: str) -> tuple[str, Optional[str], bool, int]:
    from visae.backbones import parse_backbone_name
    from visae.zeroshot import same_weights

    seed = int((source or {}).get("seed", 0) or 0)
    if cfg.model is None:
        if not source or not source.get("model"):
            raise NamingError(f"{where}: no --model given and the SAE's shard source records no model")
        name, pre = parse_backbone_name(str(source["model"]), cfg.pretrained or source.get("pretrained"))
    else:
        name, pre = parse_backbone_name(cfg.model, cfg.pretrained)
        if source and source.get("model"):
            src_name, src_pre = parse_backbone_name(str(source["model"]), source.get("pretrained"))
            if src_name != name:
                raise NamingError(f"{where}: the SAE was trained on {src_name!r} image embeddings (extra.shards.source.model) "
                                  f"but --model is {name!r}; text embeddings of another model live in another space")
            if pre is None:
                pre = src_pre
            elif not bool(source.get("random_init", False)) and same_weights(src_pre, pre) is False:
                raise NamingError(f"{where}: the SAE was trained on {src_name} image embeddings of weights {src_pre!r} "
                                  f"(extra.shards.source.pretrained) but --pretrained is {pre!r}; text embeddings of "
                                  "other weights live in another space")
    rand = cfg.random_init if cfg.random_init is not None else bool((source or {}).get("random_init", False))
    return name, pre, rand, seed


def _shards_path(cfg: NameConfig, sae: Any) -> Optional[Path]:
    if cfg.shards:
        return Path(cfg.shards)
    info = _member_extra(sae, cfg.member).get("shards")
    if isinstance(info, dict) and info.get("path") and (Path(info["path"]) / "manifest.json").is_file():
        return Path(info["path"])
    return None


def _fmt(x: float) -> Any:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 6)


def check_shards_for_sae(ss: Any, source: dict[str, Any] | None, where: str, allow_other: bool = False) -> None:
    """A shard set given for an SAE must hold activations of what the SAE was trained on.

    Compares the shard manifest's ``source`` with the SAE's recorded training source by the check every
    command that runs an SAE over a shard set makes (:func:`visae.zeroshot.site_mismatch`: model, random_init,
    pretrained weights, layer, token). Raises NamingError on a difference unless ``allow_other``; warns when
    either side records no model (an artifact from another tool: provenance unknown).
    """
    import warnings

    from visae.zeroshot import site_mismatch

    got = getattr(ss, "source", None) or {}
    if not (source or {}).get("model") or not got.get("model"):
        warnings.warn(f"{where}: the provenance of shard set {ss.path} or of the SAE's training data is unknown "
                      "(not recorded, e.g. made by another tool): it cannot be checked that they match", UserWarning,
                      stacklevel=3)
        return
    diffs = site_mismatch(source, got, used="given")
    if diffs and not allow_other:
        raise NamingError(f"{where}: shard set {ss.path} holds activations of something else than the SAE was trained "
                          f"on ({'; '.join(diffs)}); pass the right --shards, or --allow_other_shards to use it anyway")


def _open_shards_for(cfg: NameConfig, sae: Any, source: dict[str, Any] | None, where: str) -> Any:
    """The shard set for the statistics (None when none is known), checked: complete, its width, its provenance."""
    from visae.shards import ShardError, ShardSet

    shards_path = _shards_path(cfg, sae)
    if shards_path is None:
        return None
    try:
        ss = ShardSet(shards_path)
    except ShardError as e:
        raise NamingError(f"--shards: {e}") from None
    if ss.d != sae.d_in:
        raise NamingError(f"{where}: shard set {ss.path} has activations of width d={ss.d} but the SAE has "
                          f"d_in={sae.d_in} (activations of another model or layer)")
    check_shards_for_sae(ss, source, where, allow_other=cfg.allow_other_shards)
    return ss


def name_concepts(cfg: NameConfig, *, backbone: Any = None, sae: Any = None) -> Path:
    """Run the naming stage; returns the output directory (concepts.json, concepts.csv[, top_images.npz]).

    Holds the lock of ``cfg.out`` while it runs. The files are committed as one step:
    ``top_images.npz`` is written, the earlier run's ``concepts.csv`` removed, then ``concepts.json`` (the commit
    point, recording the SHA-256 of the top-images file it belongs to, which ``TopImages.load`` checks, and of the
    CSV), then ``concepts.csv`` from it. A run killed in between never pairs one run's concepts with another's
    images, and never leaves one run's table beside another's ``concepts.json`` (it left the new CSV beside the
    old record: now at most no CSV, until the rerun).
    """
    from visae.atomic import output_lock

    with output_lock(cfg.out, "visae name"):
        return _name_concepts(cfg, backbone=backbone, sae=sae)


def _name_concepts(cfg: NameConfig, *, backbone: Any = None, sae: Any = None) -> Path:
    from visae.sae import load_sae

    if not cfg.sae and sae is None:
        raise NamingError("--sae is required: an SAE directory (cfg.json + weights.safetensors)")
    where = f"SAE {cfg.sae}"
    if sae is None:
        sae = load_sae(cfg.sae, device=cfg.device)
    if not 0 <= cfg.member < sae.n_models:
        raise NamingError(f"{where}: member {cfg.member} out of range (stack of {sae.n_models})")
    source = shard_source(sae, cfg.member)
    check_embedding_space(source, where, assume=cfg.assume_embedding_space)
    if backbone is None:
        from visae.backbones import load_backbone

        name, pre, rand, seed = _resolve_model(cfg, source, where)
        if source is None and cfg.model is None:
            raise NamingError(f"{where}: pass --model (the SAE records no shard source)")
        backbone = load_backbone(name, pre, random_init=rand, device=cfg.device, seed=seed)
    if not getattr(backbone, "has_text", False):
        raise NamingError(f"backbone {backbone.name!r} has no text tower; naming needs a CLIP model")
    ss = _open_shards_for(cfg, sae, source, where)  # checked before any expensive work
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    dropped: dict[str, int] = {}
    words = load_vocabulary(cfg.vocab, cfg.vocab_size, stopwords=cfg.stopwords, alpha_only=cfg.alpha_only,
                            dropped=dropped)
    if any(dropped.values()):
        log.info("vocabulary %s: %d words kept; dropped %d stopwords (--stopwords), %d not word-like (--alpha_only), "
                 "%d duplicates", cfg.vocab or "wordfreq:en", len(words), dropped["stopwords"],
                 dropped["not_wordlike"], dropped["duplicates"])
    cache = Path(cfg.text_cache).expanduser() if cfg.text_cache else None
    vocab = embed_vocabulary(backbone, words, list(cfg.templates) or None, cache_dir=cache,
                             batch_size=cfg.text_batch_size, progress=cfg.progress)
    emb = vocab.emb
    if emb.shape[1] != sae.d_in:
        raise NamingError(f"{where}: d_in={sae.d_in} but {backbone.name}'s text embeddings have width {emb.shape[1]}")

    stats = None
    if ss is not None:
        from visae.shards import ShardError
        from visae.topimages import compute_top_images

        member_sae = sae.member(cfg.member) if sae.n_models > 1 else sae
        try:
            stats = compute_top_images(member_sae, ss, n_top=cfg.n_top, n_random=cfg.n_random,
                                       batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device,
                                       progress=cfg.progress)
        except ShardError as e:
            raise NamingError(str(e)) from None
        stats.save(out / "top_images.npz")
    active = (stats.count > 0) if (stats is not None and cfg.skip_dead) else None
    res = match_names(decoder_directions(sae, cfg.member), emb, vocab.words, top_k=cfg.top_k, unique=cfg.unique_names,
                      min_z=cfg.min_z, min_score=cfg.min_score, subtract_mean=cfg.subtract_mean, active=active)
    _note_replaced(out, cfg)  # said once the run is past every check, just before it writes
    write_concepts(out, res, cfg, backbone, stats, source, vocab, dropped)
    return out


def write_concepts(out: Path, res: NamingResult, cfg: NameConfig, backbone: Any, stats: Any, source: Any,
                   vocab: Optional[VocabularyEmbedding] = None, dropped: Optional[dict[str, int]] = None) -> None:
    n = len(res.names)
    concepts = []
    for j in range(n):
        concepts.append({
            "latent": j,
            "name": res.names[j],
            "score": _fmt(res.score[j]),
            "margin": _fmt(res.margin[j]),
            "z": _fmt(res.z[j]),
            "rank": int(res.rank[j]),
            "alternatives": [{"name": a["name"], "score": _fmt(a["score"])} for a in res.alternatives(j)],
            "frequency": None if stats is None else _fmt(stats.frequency[j]),
            "mean_activation": None if stats is None else _fmt(stats.mean_activation[j]),
            "unnamed_reason": res.reason[j] if res.names[j] is None else None,
        })
    # file and directory arguments recorded absolute: as typed (relative) they did not say which from elsewhere
    rec = absolute_paths(config_to_dict(cfg), ("sae", "vocab", "shards", "text_cache", "out"), if_file=("pretrained",))
    doc = {
        "format": CONCEPTS_FORMAT,
        "version": CONCEPTS_VERSION,
        "sae": rec["sae"],
        # which SAE these names belong to, whatever directory it is copied to (sweep/best/ is a copy of a trial)
        "sae_weights_sha256": sae_weights_sha256(cfg.sae) if cfg.sae else None,
        "member": cfg.member,
        "model": {"name": backbone.name, "pretrained": backbone.pretrained, "random_init": bool(getattr(backbone, "random_init", False))},
        "shard_source": source,
        "vocabulary": {"source": rec["vocab"] or "wordfreq:en", "size": len(res.words), "dropped": dropped or {},
                       "too_long": list(vocab.too_long) if vocab is not None else [],
                       "merged": dict(vocab.merged) if vocab is not None else {}},
        "decision": {"min_z": res.min_z if math.isfinite(res.min_z) else str(res.min_z), "min_score": res.min_score},
        "num_concepts": n,
        "num_named": int(sum(x is not None for x in res.names)),
        "top_images": "top_images.npz" if stats is not None else None,
        # the commit record: which top-images file this concepts.json belongs to (TopImages.load checks it)
        "top_images_file": ({"name": "top_images.npz", "sha256": sha256_file(out / "top_images.npz")}
                            if stats is not None and (out / "top_images.npz").is_file() else None),
        "config": rec,
        "concepts": concepts,
    }
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["latent", "name", "score", "margin", "z", "frequency", "mean_activation", "alternatives"])
    for c in concepts:
        alts = ";".join(f"{a['name']}:{a['score']:.4f}" for a in c["alternatives"] if a["score"] is not None)
        w.writerow([c["latent"], c["name"] or "", _csv(c["score"]), _csv(c["margin"]), _csv(c["z"]),
                    _csv(c["frequency"]), _csv(c["mean_activation"]), alts])
    (out / "concepts.csv").unlink(missing_ok=True)  # the earlier run's table goes before the new record is committed
    doc["csv_file"] = {"name": "concepts.csv", "sha256": sha256_bytes(buf.getvalue().encode("utf-8"))}
    atomic_write_text(out / "concepts.json", json.dumps(doc, indent=1, ensure_ascii=False))  # the commit point
    atomic_write_text(out / "concepts.csv", buf.getvalue())  # its table, from the committed record: killed here, none


def _csv(x: Any) -> str:
    return "" if x is None else f"{x:.6g}"


_RUN_ONLY = ("batch_size", "text_batch_size", "device", "progress", "text_cache")  # how it ran, not what it named


def _note_replaced(out: Path, cfg: NameConfig) -> None:
    """Say (a logged warning) that ``out`` holds a naming made with other settings, which this run replaces: a rerun
    with another vocabulary, SAE or threshold otherwise swapped the earlier names without a word."""
    new = absolute_paths(config_to_dict(cfg), ("sae", "vocab", "shards", "text_cache", "out"), if_file=("pretrained",))
    diffs = changed_settings(out / "concepts.json", new, _RUN_ONLY)
    if diffs:
        log.warning("%s holds a naming made with other settings; replacing it (%s)", out / "concepts.json",
                    "; ".join(diffs))


def sae_weights_sha256(sae_dir: str | Path) -> str | None:
    """The SHA-256 of ``sae_dir``'s weights file as its ``cfg.json`` records it (``checksums``, docs/sae_format.md),
    or None: not a local SAE directory, or one written without checksums (another tool's)."""
    try:
        doc = json.loads((Path(str(sae_dir)) / "cfg.json").read_text())
        digest = doc["checksums"]["weights.safetensors"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) else None


def recorded_sae_mismatch(doc: dict[str, Any], sae_dir: str | Path | None, where: str,
                          warn: bool = True) -> str | None:
    """Whether a record made for an SAE (``doc``: concepts.json, cbm.json, with ``sae`` and ``sae_weights_sha256``)
    belongs to another SAE than ``sae_dir``: ``"of another SAE (<its path>, weights sha256 ...), not of <sae_dir>
    (...)"`` when the recorded weights digest differs from ``sae_dir``'s (``"of an earlier SAE at <sae_dir> (its
    weights changed since ...)"`` when the recorded path is ``sae_dir`` itself), else None. A copy of the same SAE (a
    sweep's ``best/``) has the same digest. What cannot be decided is logged (``warn``; ``where`` names the record):
    a digest recorded but none to compare (``sae_dir`` not a local visae SAE with checksums), or an older record with
    no digest whose ``sae`` path differs (the SAE may have been moved)."""
    if sae_dir is None or not str(sae_dir):
        return None
    rec, got = doc.get("sae_weights_sha256"), sae_weights_sha256(sae_dir)
    if rec and got and rec != got:
        if doc.get("sae") and Path(str(doc["sae"])).resolve() == Path(str(sae_dir)).resolve():
            # the same path, other weights: a sweep's best/ re-selected, an SAE retrained in place
            return (f"of an earlier SAE at {sae_dir} (its weights changed since: sha256 {rec[:12]}... then, "
                    f"{got[:12]}... now)")
        return f"of another SAE ({doc.get('sae')}, weights sha256 {rec[:12]}...), not of {sae_dir} (weights sha256 {got[:12]}...)"
    if warn and rec and not got:
        log.warning("%s records the weights digest of its SAE; %s has none to compare it with (not a local visae SAE "
                    "directory with checksums): not checked", where, sae_dir)
    if warn and not rec and doc.get("sae") and Path(str(doc["sae"])).resolve() != Path(str(sae_dir)).resolve():
        log.warning("%s was made for the SAE %s (no weights digest recorded to compare); using it for %s", where,
                    doc["sae"], sae_dir)
    return None


def check_concepts_sae(doc: dict[str, Any], sae_dir: str | Path | None, member: int, where: str) -> None:
    """Refuse a naming result (``concepts.json`` read by :func:`read_concepts`) made for another SAE than the one a
    command was given (``--sae sae_dir``, member ``member``): its names would be shown on, or used for, the other
    SAE's latents. The SAE is known by its weights' SHA-256 (:func:`recorded_sae_mismatch`). ``where``: the file,
    for the message.

    Raises NamingError naming ``where``, the recorded SAE and the given one, when the digests differ or ``member`` is
    not the recorded member.
    """
    if int(doc.get("member") or 0) != int(member):
        raise NamingError(f"{where}: names member {doc.get('member')} of its SAE, but member {member} is asked for")
    other = recorded_sae_mismatch(doc, sae_dir, where)
    if other:
        raise NamingError(f"{where}: names the latents {other}; pass the SAE it was made for, or name this one "
                          "(visae name)")


def read_concepts(path: str | Path) -> dict[str, Any]:
    """Load ``concepts.json`` (a file or the directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "concepts.json"
    if not p.is_file():
        raise NamingError(f"{p} does not exist (run `visae name` first)")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise NamingError(f"{p} is not valid JSON: {e}") from None
    if doc.get("format") != CONCEPTS_FORMAT:
        raise NamingError(f"{p}: field 'format' is {doc.get('format')!r}, expected {CONCEPTS_FORMAT!r}")
    return doc


def main(argv: list[str] | None = None) -> int:
    from visae.devices import resolve_device
    from visae.errors import VisaeError, report

    try:
        cfg = parse_config(NameConfig, argv, default_yaml=config_yaml("naming.yaml"), prog="visae name")
        cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))  # 'auto' resolved; one this machine lacks refused
        out = name_concepts(cfg)
    except VisaeError as e:  # a bad flag, SAE, shard set or vocabulary (exit 2; visae.errors)
        return report("visae name", e)
    doc = read_concepts(out)
    print(f"named {doc['num_named']} of {doc['num_concepts']} concepts -> {out / 'concepts.json'}, {out / 'concepts.csv'}")
    return 0


if __name__ == "__main__":
    from visae.cli import run_main

    sys.exit(run_main("python -m visae.naming", main))
