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

from visae.config import config_to_dict, parse_config
from visae.resources import config_yaml
from visae.shards import atomic_write_text

__all__ = [
    "NamingError",
    "NameConfig",
    "STOPWORDS",
    "load_vocabulary",
    "decoder_directions",
    "check_embedding_space",
    "match_names",
    "NamingResult",
    "name_concepts",
    "read_concepts",
    "main",
]

log = logging.getLogger(__name__)

CONCEPTS_FORMAT = "visae.concepts"
CONCEPTS_VERSION = 1

# layer / token values that mean "the model's final (projected) image embedding"

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


class NamingError(ValueError):
    """The SAE, vocabulary or model cannot be used for naming (the message says which and why)."""


@dataclass(frozen=True)
class NameConfig:
    """Name every SAE latent by its decoder direction's nearest vocabulary words in CLIP space."""

    sae: str = field(default="", metadata={"help": "SAE directory (cfg.json + weights.safetensors)"})
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
    min_score: float = field(default=0.0, metadata={"help": "leave a concept unnamed when its best available cosine is below this"})
    skip_dead: bool = field(default=True, metadata={"help": "leave latents that never fire (in the shard set) unnamed"})
    shards: Optional[str] = field(default=None, metadata={
        "help": "shard set for activation statistics and top images; null: the one recorded in the SAE's cfg.json, if present"})
    n_top: int = field(default=16, metadata={"help": "top-activating images kept per concept"})
    n_random: int = field(default=8, metadata={"help": "random activating images kept per concept"})
    batch_size: int = field(default=4096, metadata={"help": "shard rows per SAE forward pass"})
    text_batch_size: int = field(default=256, metadata={"help": "prompts per text-tower forward pass"})
    text_cache: Optional[str] = field(default="~/.cache/visae/text", metadata={
        "help": "text-embedding cache directory (shared with zero-shot); null: $VISAE_TEXT_CACHE or none"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    seed: int = field(default=0, metadata={"help": "seed of the random activating-image sample"})
    out: str = field(default="concepts", metadata={"help": "output directory"})


# ----------------------------------------------------------------------------- vocabulary


def _is_wordlike(w: str) -> bool:
    return w.replace("-", "").replace(" ", "").isalpha() and w[0].isalpha() and w[-1].isalpha()


def load_vocabulary(path: str | Path | None = None, size: int = 20000, *, stopwords: bool = False,
                    alpha_only: bool = False, extra: Sequence[str] = ()) -> list[str]:
    """The naming vocabulary: distinct words in frequency (file) order.

    Args:
        path: word-list file (UTF-8, one word or phrase a line, blank lines ignored); None: wordfreq's
            ``size`` most frequent English words (bundled with the package, no download).
        size: keep the first ``size`` words before filtering (0 = all of the file).
        stopwords: drop :data:`STOPWORDS`.
        alpha_only: drop entries with characters other than letters, inner hyphens and spaces.
        extra: words appended (after filtering the list, not filtered themselves).
    """
    if path is None:
        import wordfreq

        if size <= 0:
            raise NamingError("vocab_size must be positive when the vocabulary comes from wordfreq")
        words = wordfreq.top_n_list("en", size)
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise NamingError(f"vocabulary file {p} does not exist (expected one word a line)")
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise NamingError(f"vocabulary file {p} is not UTF-8 text: {e}") from None
        words = [ln.strip() for ln in lines if ln.strip()]
        if size > 0:
            words = words[:size]
    if stopwords:
        words = [w for w in words if w.lower() not in STOPWORDS]
    if alpha_only:
        words = [w for w in words if _is_wordlike(w)]
    out = list(dict.fromkeys(list(words) + [str(w) for w in extra]))
    if not out:
        raise NamingError(f"vocabulary {path or 'wordfreq'} is empty after filtering")
    return out


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
            "with text embeddings. Pass --assume_embedding_space true (with --model) if it was")
    from visae.zeroshot import final_embedding_problem

    problem = final_embedding_problem(source)
    if problem:
        raise NamingError(
            f"{where}: the SAE's training {problem} (recorded in extra.shards.source); decoder directions outside "
            "the final image embedding are not in the text tower's space and cannot be named by text embeddings. "
            "Train on shards extracted without --layer")


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
    """Per concept j (arrays of length d_sae): chosen name (None = unnamed), its cosine, the margin, z, rank,
    and the top-k candidates ``cand_idx [d_sae, k]`` (word indices) with cosines ``cand_score``."""

    words: list[str]
    names: list[Optional[str]]
    score: np.ndarray
    margin: np.ndarray
    z: np.ndarray
    rank: np.ndarray
    cand_idx: np.ndarray
    cand_score: np.ndarray
    reason: list[str]

    def alternatives(self, j: int) -> list[dict[str, Any]]:
        return [{"name": self.words[int(i)], "score": float(s)} for i, s in zip(self.cand_idx[j], self.cand_score[j]) if i >= 0]


def _faiss_search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, idx


def match_names(
    directions: torch.Tensor,
    text_emb: torch.Tensor,
    words: Sequence[str],
    *,
    top_k: int = 5,
    unique: bool = True,
    min_score: float = 0.0,
    subtract_mean: bool = False,
    active: np.ndarray | None = None,
) -> NamingResult:
    """Match unit decoder directions ``[d_sae, D]`` to unit word embeddings ``text_emb [V, D]``.

    ``active [d_sae] bool``: latents allowed a name (others get reason "dead"). With ``unique`` a greedy
    global matching gives each word to at most one concept: candidate pairs are taken in decreasing
    cosine; a concept whose candidates were all taken searches deeper (doubling k) until it gets a free
    word or its best free word scores below ``min_score``.
    """
    import faiss

    words = list(words)
    if text_emb.shape[0] != len(words):
        raise NamingError(f"{text_emb.shape[0]} text embeddings for {len(words)} words")
    if directions.shape[1] != text_emb.shape[1]:
        raise NamingError(f"decoder directions have width {directions.shape[1]} but the text embeddings have "
                          f"{text_emb.shape[1]}: the SAE was not trained on this model's image embedding")
    T = F.normalize(text_emb.float(), dim=-1)
    if subtract_mean:
        T = F.normalize(T - T.mean(0, keepdim=True), dim=-1)
    Dn = F.normalize(directions.float(), dim=-1)
    n, V = Dn.shape[0], T.shape[0]
    T_np = T.numpy().astype(np.float32)
    D_np = Dn.numpy().astype(np.float32)
    index = faiss.IndexFlatIP(T_np.shape[1])
    index.add(T_np)

    k = max(1, min(top_k, V))
    cand_score, cand_idx = _faiss_search(index, D_np, max(k, min(2, V)))
    margin = cand_score[:, 0] - cand_score[:, 1] if cand_score.shape[1] > 1 else np.full(n, np.nan, np.float32)
    cand_score, cand_idx = cand_score[:, :k], cand_idx[:, :k]

    # z of a cosine against the direction's distribution over the vocabulary: mean d.mu, variance d^T C d.
    mu = T.mean(0).double()
    C = torch.cov(T.double().T, correction=0) if V > 1 else torch.zeros(T.shape[1], T.shape[1], dtype=torch.float64)
    Dd = Dn.double()
    mean_cos = (Dd @ mu).numpy()
    std_cos = torch.einsum("nd,de,ne->n", Dd, C, Dd).clamp_min(1e-24).sqrt().numpy()

    if active is None:
        active = np.ones(n, bool)
    active = np.asarray(active, bool)
    nonzero = Dn.norm(dim=1).numpy() > 0.5
    name_idx = np.full(n, -1, np.int64)
    name_score = np.full(n, np.nan, np.float64)
    reason = [""] * n
    for j in range(n):
        if not active[j]:
            reason[j] = "dead"
        elif not nonzero[j]:
            reason[j] = "zero decoder direction"

    eligible = active & nonzero
    if not unique:
        ok = eligible & (cand_score[:, 0] >= min_score)
        name_idx[ok] = cand_idx[ok, 0]
        name_score[ok] = cand_score[ok, 0]
    else:
        name_idx, name_score = _greedy_unique(index, D_np, np.flatnonzero(eligible), min_score, max(k, 8), V,
                                              name_idx, name_score)
    names: list[Optional[str]] = []
    rank = np.full(n, -1, np.int64)
    for j in range(n):
        w = int(name_idx[j])
        if w < 0:
            names.append(None)
            if not reason[j]:
                reason[j] = "below min_score" if (cand_score[j, 0] < min_score or not unique) else "words taken by better matches"
            continue
        names.append(words[w])
        hit = np.flatnonzero(cand_idx[j] == w)
        rank[j] = int(hit[0]) if hit.size else -1  # -1: chosen below the top-k list (unique matching)
    z = (name_score - mean_cos) / std_cos
    return NamingResult(words=words, names=names, score=name_score.astype(np.float64), margin=margin.astype(np.float64),
                        z=z, rank=rank, cand_idx=cand_idx.astype(np.int64), cand_score=cand_score.astype(np.float64),
                        reason=reason)


def _greedy_unique(index: Any, queries: np.ndarray, concepts: np.ndarray, min_score: float, depth: int, V: int,
                   name_idx: np.ndarray, name_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact global greedy matching: (concept, word) pairs in decreasing cosine, each word and concept used once.

    Lazy: each concept walks down its own ranking (a heap holds every concept's best not-yet-tried word);
    a concept whose list runs out is searched again four times deeper. Stops per concept below ``min_score``.
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
        if -neg < min_score:
            continue  # this concept's best free word is below the threshold: unnamed
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


def name_concepts(cfg: NameConfig, *, backbone: Any = None, sae: Any = None) -> Path:
    """Run the naming stage; returns the output directory (concepts.json, concepts.csv[, top_images.npz])."""
    from visae.sae import load_sae
    from visae.text import encode_texts

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
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    words = load_vocabulary(cfg.vocab, cfg.vocab_size, stopwords=cfg.stopwords, alpha_only=cfg.alpha_only)
    cache = Path(cfg.text_cache).expanduser() if cfg.text_cache else None
    emb = encode_texts(backbone, words, list(cfg.templates) or None, cache_dir=cache, batch_size=cfg.text_batch_size,
                       progress=True)
    if emb.shape[1] != sae.d_in:
        raise NamingError(f"{where}: d_in={sae.d_in} but {backbone.name}'s text embeddings have width {emb.shape[1]}")

    stats = None
    shards_path = _shards_path(cfg, sae)
    if shards_path is not None:
        from visae.topimages import compute_top_images

        member_sae = sae.member(cfg.member) if sae.n_models > 1 else sae
        stats = compute_top_images(member_sae, shards_path, n_top=cfg.n_top, n_random=cfg.n_random,
                                   batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device)
        stats.save(out / "top_images.npz")
    active = (stats.count > 0) if (stats is not None and cfg.skip_dead) else None
    res = match_names(decoder_directions(sae, cfg.member), emb, words, top_k=cfg.top_k, unique=cfg.unique_names,
                      min_score=cfg.min_score, subtract_mean=cfg.subtract_mean, active=active)
    write_concepts(out, res, cfg, backbone, stats, source)
    return out


def write_concepts(out: Path, res: NamingResult, cfg: NameConfig, backbone: Any, stats: Any, source: Any) -> None:
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
    doc = {
        "format": CONCEPTS_FORMAT,
        "version": CONCEPTS_VERSION,
        "sae": str(cfg.sae),
        "member": cfg.member,
        "model": {"name": backbone.name, "pretrained": backbone.pretrained, "random_init": bool(getattr(backbone, "random_init", False))},
        "shard_source": source,
        "vocabulary": {"source": cfg.vocab or "wordfreq:en", "size": len(res.words)},
        "num_concepts": n,
        "num_named": int(sum(x is not None for x in res.names)),
        "top_images": "top_images.npz" if stats is not None else None,
        "config": config_to_dict(cfg),
        "concepts": concepts,
    }
    atomic_write_text(out / "concepts.json", json.dumps(doc, indent=1, ensure_ascii=False))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["latent", "name", "score", "margin", "z", "frequency", "mean_activation", "alternatives"])
    for c in concepts:
        alts = ";".join(f"{a['name']}:{a['score']:.4f}" for a in c["alternatives"] if a["score"] is not None)
        w.writerow([c["latent"], c["name"] or "", _csv(c["score"]), _csv(c["margin"]), _csv(c["z"]),
                    _csv(c["frequency"]), _csv(c["mean_activation"]), alts])
    atomic_write_text(out / "concepts.csv", buf.getvalue())


def _csv(x: Any) -> str:
    return "" if x is None else f"{x:.6g}"


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
    cfg = parse_config(NameConfig, argv, default_yaml=config_yaml("naming.yaml"), prog="visae name")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = name_concepts(cfg)
    except NamingError as e:
        print(f"visae name: error: {e}", file=sys.stderr)
        return 2
    doc = read_concepts(out)
    print(f"named {doc['num_named']} of {doc['num_concepts']} concepts -> {out / 'concepts.json'}, {out / 'concepts.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
