"""Stage 2 of the visae-toyclip2 recipe: tune the text tower alone so that unseen words stop inheriting world words.

Why (issue 12, item 3; docs/toyclip_v2_recipe.md, section 13): the text tower of a CLIP trained on the world's ~600
words reads a word it never saw by the sub-word (BPE) tokens it shares with a world word. "configured" tokenises as
``configu`` + ``red</w>``, its prefix token was never trained (its embedding is still the random initialisation), and
the word embeds next to "red": naming with a real vocabulary then calls the red latent "configured". Random
negatives (words from wordfreq, true of no image) do not teach this away: few of them share a token with a world
word, and none has an untrained token.

What: the image tower (and the logit scale) of a trained v2 model stays frozen, bit for bit, so every image-side
result (SAE training, concept recovery's AUROC, patch heatmaps, probes) is unchanged; the text tower is trained on
image embeddings cached once, with the base run's loss (:func:`visae.toyclip.multi_positive_clip_loss` over the
batch's true captions, one concept caption per coarse value, and random negatives), plus two kinds of negatives,
both true of no image:

* **hard negatives** (:func:`hard_negative_words`): wordfreq words outside the world and outside the naming list
  that share a BPE token with a world word ("endured", "hologram"), drawn evenly over the shared tokens;
* **token negatives** (:func:`token_negatives`): a world word's tokens with random BPE tokens before or after them,
  one token replaced by a random one, or a proper part of the word alone ("gram" of "parallelogram"); random
  tokens are mostly never trained, as the held-out words' rare prefixes are.

And the direction penalty (``direction_weight``, :class:`_DirectionPenalty`): each drawn hard negative, as a bare
word, is pushed below the median of bare random words on the concept direction of every world word it shares a token
with, while an anchor holds the world's naming vocabulary at the base model's bare-text embeddings (without it the
push takes the world's own words along with their tokens).

The naming list (``negatives_exclude``, the 20k list) stays out of every negative, so the inheritance and naming
evaluations remain on words the model never saw (:func:`visae.toyclip.inheritance_eval_v2`). A development split of
the wordfreq candidates (``dev_fraction``, :func:`is_dev_word`) is never trained on either: inheritance measured on it
chooses a recipe without spending the naming list.

Measured on the stage-1 weights (docs/toyclip_v2_recipe.md, sections 13 and 15): without the penalty inheritance
15.7 % -> 27.5 % of 51 pairs; with it (the defaults) 76.5 % (target 55 %), 52.5 % on the development words, zero-shot
within 1.3 points on both renderers, the demo's naming and selection where they were. The shipped ``visae-toyclip2``
is that run's output. World2's model since, ``visae-toyclip2-reg4``, is this stage with ``--steps 2000`` on the
register tower (section 18: 80.4 % of the 51 pairs, 74.5 % of the development words, zero-shot within 1 point).

Output: fp16 weights with a card that nests the base model's card (its command, seed, training time), this stage's
command, config, seed and time, the words it trained on (``negatives.txt``, the base run's negatives included), and
the evaluation of :func:`visae.toyclip.evaluate_v2` and :func:`visae.toyclip.inheritance_eval_v2`. Resumable from
``<out>/checkpoint.pt``; deterministic given the seed and thread count.

    visae tune-toy-clip-text --init runs/toyclip2/visae-toyclip2.safetensors --out runs/toyclip2_text
"""

from __future__ import annotations

import dataclasses

import collections
import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from visae import toyclip as tc
from visae.atomic import OutputPathError, atomic_write_text, check_output_path, output_lock
from visae.config import ConfigError
from visae.resources import config_yaml

__all__ = ["TextTuneConfig", "candidate_words", "is_dev_word", "hard_negative_words", "token_negatives",
           "world_token_sequences", "tune_text_tower", "main"]


@dataclass(frozen=True)
class TextTuneConfig:
    """Tune the text tower of a trained visae-toyclip2 (or its register variant visae-toyclip2-reg4) against sub-word
    inheritance (image tower frozen; the tuned model keeps its base's architecture)."""

    out: str = field(default="runs/toyclip2_text", metadata={
        "help": "run directory: config.json, checkpoint.pt, log.jsonl, negatives.txt, dev_words.txt, metrics.json (the card)"})
    init: str = field(default="runs/toyclip2/visae-toyclip2.safetensors", metadata={
        "help": "the trained v2 weights (fp16 .safetensors) with their card (.json) beside them, as the v2 trainer "
                "exports them; the card's world settings draw the image pool"})
    export: str = field(default="", metadata={"help": "fp16 weights out (.safetensors, card .json beside); empty: <out>/<the base card's model>.safetensors, e.g. <out>/visae-toyclip2.safetensors"})
    seed: int = field(default=0, metadata={"help": "seed of the batches, the captions and the negatives"})
    n_pool: int = field(default=20000, metadata={
        "help": "the base run's first N training scenes (its world seed and settings) whose image embeddings are "
                "cached; above the base's n_train they are scenes of the same world it never trained on"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=128, metadata={"help": "images (and captions) per step"})
    lr: float = field(default=5e-4, metadata={"help": "peak AdamW learning rate (cosine decay to 0)"})
    warmup: int = field(default=20, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay on matrices"})
    single_object_fraction: float = field(default=0.5, metadata={"help": "fraction of each batch from single-object scenes"})
    negatives_per_step: int = field(default=64, metadata={"help": "captions of random negative words a step (visae.toyclip.negative_words)"})
    n_negative_words: int = field(default=5000, metadata={"help": "size of the random negative word pool"})
    hard_negatives_per_step: int = field(default=64, metadata={"help": "captions of hard negative words a step (hard_negative_words)"})
    hard_candidates: int = field(default=200000, metadata={
        "help": "hard negatives and development words are drawn from wordfreq's N most frequent English words (less "
                "the naming list: with the 20k list, N must be well above 20,000)"})
    token_negatives_per_step: int = field(default=128, metadata={"help": "token negatives a step (token_negatives)"})
    direction_weight: float = field(default=10.0, metadata={
        "help": "weight of the direction penalty (0: off; needs hard_negatives_per_step and negatives_per_step > 0): "
                "each hard negative, as a bare word, pushed below the random words' median cosine with the concept "
                "direction of every world word it shares a token with"})
    direction_margin: float = field(default=0.05, metadata={
        "help": "direction penalty: how far below the random words' median cosine a hard negative must lie "
                "(squared hinge; in [0, 1])"})
    anchor_weight: float = field(default=100.0, metadata={
        "help": "with the direction penalty: weight of the anchor, the squared distance of the world's naming "
                "vocabulary's bare-text embeddings from the base model's (0: no anchor)"})
    anchors_per_step: int = field(default=128, metadata={"help": "anchor entries (of the world's naming vocabulary) "
                                                                 "a step (>= 1; unused at anchor_weight 0)"})
    dev_fraction: float = field(default=0.2, metadata={
        "help": "share of the hard-negative candidates (by a hash of the word) kept out of training as a development "
                "set: the inheritance measured on them chooses a recipe without looking at the naming list's words"})
    negatives_exclude: str = field(default="../shared/vocab/20k.txt", metadata={
        "help": "word list kept out of every negative (the naming evaluation's distractors; required)"})
    eval_seed: int = field(default=1000, metadata={"help": "seed of the held-out single-object scenes of the final evaluation"})
    eval_n: int = field(default=1000, metadata={"help": "held-out images of the final evaluation (each renderer)"})
    checkpoint_every: int = field(default=100, metadata={"help": "save a resumable checkpoint every N steps"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads (0: torch's default)"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    resume: bool = field(default=True, metadata={"help": "continue from <out>/checkpoint.pt when it exists"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})

    def __post_init__(self) -> None:
        from visae.devices import check_device

        check_device(self.device, "TextTuneConfig.device")
        from visae.config import check_bounds

        check_bounds(self, {
            "n_pool": (1, None), "steps": (1, None), "batch_size": (1, None), "lr": (0.0, None), "warmup": (0, None),
            "weight_decay": (0.0, None), "single_object_fraction": (0.0, 1.0), "negatives_per_step": (0, None),
            "n_negative_words": (1, None), "hard_negatives_per_step": (0, None), "hard_candidates": (1, None),
            "token_negatives_per_step": (0, None), "dev_fraction": (0.0, 0.9), "direction_weight": (0.0, None),
            "direction_margin": (0.0, 1.0), "anchor_weight": (0.0, None), "anchors_per_step": (1, None), "eval_n": (1, None), "checkpoint_every": (1, None),
            "threads": (0, None), "seed": (0, None), "eval_seed": (0, None)})
        if self.direction_weight > 0 and not (self.hard_negatives_per_step and self.negatives_per_step):
            raise ConfigError("TextTuneConfig.direction_weight > 0 pushes hard negatives below random ones: it needs "
                              f"hard_negatives_per_step > 0 and negatives_per_step > 0 (got {self.hard_negatives_per_step} "
                              f"and {self.negatives_per_step})")
        if not self.negatives_exclude:
            raise ConfigError("TextTuneConfig.negatives_exclude is empty: the naming list must be kept out of the "
                              "negatives (and is the inheritance evaluation's unseen words)")


# --------------------------------------------------------------------------------------------- negatives


world_token_sequences = tc.token_sequences  # each word's BPE token ids in order (specials and padding dropped)
candidate_words = tc.candidate_words  # the pool of training negatives, shared with the base run's


def is_dev_word(word: str, fraction: float) -> bool:
    """Whether ``word`` falls in the development split of the given size (a fixed hash of the word, not Python's
    salted ``hash``: the same words on every machine and run)."""
    return zlib.crc32(word.encode("utf-8")) % 10000 < round(fraction * 10000)


def hard_negative_words(tokenizer, exclude: set[str], n_candidates: int = 200000,
                        dev_fraction: float = 0.0) -> dict[int, list[str]]:
    """Hard negatives: the :func:`candidate_words` (outside ``exclude`` and the world) that share a BPE token with a
    world word and are not development words (:func:`is_dev_word`), grouped by that token: ``{token id: [words]}``
    (a word with two shared tokens is in both lists; tokens in increasing id order, words in frequency order).
    Raises ConfigError if none is left (too small ``n_candidates``)."""
    world_tokens = set().union(*map(set, world_token_sequences(tokenizer, sorted(tc.world2_words()))))
    cand = [x for x in candidate_words(exclude, n_candidates) if not is_dev_word(x, dev_fraction)]
    if not cand:
        raise ConfigError(f"hard negatives: none of wordfreq's {n_candidates} most frequent words is left once the "
                          f"naming list ({len(exclude)} words), the world's words and the development split are taken "
                          "out; raise --hard_candidates (default 200000)")
    by_tok: dict[int, list[str]] = collections.defaultdict(list)
    for w, toks in zip(cand, tc.subword_tokens(tokenizer, cand)):
        for t in sorted(toks & world_tokens):
            by_tok[t].append(w)
    if not by_tok:
        raise ConfigError(f"hard negatives: none of the {len(cand)} candidate words (wordfreq's {n_candidates} most "
                          "frequent, less the naming list, the world's words and the development split) shares a token "
                          "with a world word; raise --hard_candidates (default 200000)")
    return dict(sorted(by_tok.items()))


def token_negatives(world_seqs: Sequence[Sequence[int]], k: int, rng: np.random.Generator, *, context: int,
                    sot: int, eot: int, vocab_size: int, forbidden: Sequence[Sequence[int]] = ()) -> torch.Tensor:
    """``k`` token-level negatives ``[k, context]`` (int64, zero-padded like the tokenizer's output): each takes a
    random world word's token sequence (``world_seqs``) and, with equal chance, puts 1-2 random BPE tokens (ids in
    ``[1, vocab_size)`` other than ``sot`` / ``eot``) before it, after it, in place of one of its tokens, or keeps a
    proper contiguous part of it alone (a one-token word: random tokens before it instead). A draw that spells a world
    word's own sequence, or one of ``forbidden`` (the token sequences of the naming list and the development words,
    which must stay unseen: "gram" is a part of "parallelogram" and a word of the 20k list), is drawn again. Raises
    ``ValueError`` on an empty world or a ``context`` under 3."""
    if not world_seqs or any(len(s) == 0 for s in world_seqs):
        raise ValueError("token_negatives: every world word needs at least one token")
    if context < 3:
        raise ValueError(f"token_negatives: context {context} < 3 (start, one token, end)")
    taken = {tuple(s) for s in world_seqs} | {tuple(s) for s in forbidden}
    out = torch.zeros(k, context, dtype=torch.long)

    def rand_tokens(n: int) -> list[int]:
        toks = []
        while len(toks) < n:
            t = int(rng.integers(1, vocab_size))
            if t not in (sot, eot):
                toks.append(t)
        return toks

    for i in range(k):
        while True:
            w = list(world_seqs[int(rng.integers(len(world_seqs)))])
            mode = int(rng.integers(4))
            r = rand_tokens(int(rng.integers(1, 3)))
            if mode == 3 and len(w) > 1:  # a proper contiguous part alone
                a = int(rng.integers(len(w)))
                b = int(rng.integers(a + 1, len(w) + 1))
                if (a, b) == (0, len(w)):
                    b -= 1
                seq = w[a:b]
            elif mode == 1:
                seq = w + r
            elif mode == 2 and len(w) > 1:
                j = int(rng.integers(len(w)))
                seq = w[:j] + r[:1] + w[j + 1:]
            else:
                seq = r + w
            seq = seq[:context - 2]
            if tuple(seq) not in taken:
                break
        row = [sot, *seq, eot]
        out[i, :len(row)] = torch.tensor(row)
    return out


# --------------------------------------------------------------------------------------------- training


def _base_card(init: Path) -> dict[str, Any]:
    """The base model's card (``<init>.json``), checked against the weights. Raises ConfigError (a usage error)."""
    card_path = init.with_suffix(".json")
    if init.is_dir():
        raise ConfigError(f"init: {init} is a directory; expected the v2 trainer's fp16 .safetensors export")
    if not init.is_file():
        raise ConfigError(f"init: weights {init} not found (expected the v2 trainer's fp16 .safetensors export)")
    if not card_path.is_file():
        raise ConfigError(f"init: {init} has no card {card_path} (the v2 trainer writes it beside the weights; "
                          "its world settings draw the image pool)")
    try:
        card = json.loads(card_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"init: card {card_path} is not JSON ({e})") from None
    if not isinstance(card, dict) or not card.get("sha256"):
        raise ConfigError(f"init: card {card_path} has no sha256 of its weights (expected the v2 trainer's card)")
    if card.get("model") not in tc.V2_MODELS or card.get("world") != "visae.world2":
        raise ConfigError(f"init: {card_path} is a card of model {card.get('model')!r} on {card.get('world')!r}; "
                          f"expected one of {list(tc.V2_MODELS)} on 'visae.world2'")
    if card["sha256"] != tc._file_sha256(init):
        raise ConfigError(f"init: {init} does not match its card {card_path} (sha256 differs)")
    return card


def _base_negatives(init: Path, card: dict[str, Any], naming: Sequence[str]) -> list[str]:
    """The base run's negative words: the file beside the weights (shipped layout ``<stem>.negatives.txt``, run layout
    ``negatives.txt``), else drawn again from the base config (:func:`visae.toyclip.negative_words` is seeded)."""
    for p in (init.with_suffix(".negatives.txt"), init.parent / "negatives.txt"):
        if p.is_file():
            return tc.read_word_list(p, "base negatives")
    c = card.get("config", {})
    if not c.get("negatives_per_step"):
        return []
    return tc.negative_words(naming, seed=int(c.get("seed", 0)), n=int(c.get("n_negative_words", 5000)))


def _pool_scenes(card: dict[str, Any], n_pool: int) -> tuple[list[Any], float]:
    """The base run's first ``n_pool`` training scenes (its seed and world settings; drawn, not rendered) and its
    texture style jitter. A base that is itself this stage's output (its card nests its own ``base``): the settings
    of the v2 training run at the root of the chain."""
    from visae import world2 as w2

    while isinstance(card.get("base"), dict):  # a card of this stage: the world settings are its base trainer's
        card = card["base"]
    c = card.get("config", {})
    kw = dict(max_objects=int(c.get("max_objects", 4)), occlusion=float(c.get("occlusion", 0.3)),
              colour_jitter=float(c.get("colour_jitter", 12.0)))
    return w2.sample_scenes(n_pool, int(c.get("seed", 0)), **kw), float(c.get("texture_style_jitter", 0.0))


def _image_pool(model, scenes: Sequence[Any], jitter: float, progress: bool) -> tuple[torch.Tensor, np.ndarray]:
    """Unit image embeddings ``[n, D]`` of ``scenes`` (PIL renderer, texture style ``jitter``; image tower in eval
    mode) and their factor rows ``[n, F]``."""
    from tqdm import tqdm

    from visae import world2 as w2

    embs, rows = [], []
    for s0 in tqdm(range(0, len(scenes), 1000), desc="image pool", disable=not progress):
        imgs, _, fac = w2._render_rows(scenes[s0:s0 + 1000], "pil", w2.IMAGE_SIZE, style_jitter=jitter)
        embs.append(F.normalize(tc.encode_world_images(model, imgs), dim=-1))
        rows.append(fac)
    return torch.cat(embs), np.concatenate(rows)


class _DirectionPenalty:
    """The direction penalty of ``TextTuneConfig.direction_weight``: bare hard negatives below bare random negatives,
    the world's naming vocabulary held where the base model put it.

    Built once from the pool's single-object embeddings ``emb`` ``[n, D]`` and factor rows ``factors`` ``[n, F]``:
    the concept direction ``d_w`` of every world word (:func:`visae.toyclip.concept_directions` over
    :data:`visae.toyclip.INHERITANCE_FACTORS`, as the inheritance evaluation defines them, but from training scenes),
    for each hard word the world words it shares a BPE token with, and the base model's bare-text embeddings of the
    anchor entries (the demo's world2 naming vocabulary without distractors, :func:`visae.demo.world2_vocabulary`:
    value words, background phrases, fine colour names). A call embeds the drawn hard words ``words``, random negatives
    ``ref`` and the anchor entries ``anchor_idx`` as bare text (as the naming stage embeds a vocabulary) and returns
    two scalar tensors:

    * push: ``mean over (h, w) sharing a token of relu(cos(t_h, d_w) - median_r cos(t_r, d_w) + margin)^2`` (the
      medians detached; 0 when no drawn word shares a token with a direction's word);
    * anchor: ``mean over the anchor entries a of ||t_a - t_a(base)||^2`` (``base`` from
      :meth:`anchor_embeddings` of the init weights; 0 and not embedded when ``anchor_idx`` is empty): the push moves the shared tokens, and
      without the anchor it takes the world's own words along. Two earlier forms: none (a first run left "rectangle"
      below 99.9 % of the distractors) and a hinge keeping each world word above the random words on its own direction
      (inheritance 80 %, but shape latents of the demo's SAEs were then named by colour names and background phrases:
      the words kept their rank among distractors, not among the world's other words).
    """

    def __init__(self, tokenizer, emb: torch.Tensor, factors: np.ndarray, hard_words: Sequence[str],
                 anchors: Sequence[str], base: torch.Tensor, device: str):
        from visae import world2 as w2

        cols = {f: (factors[:, w2.FACTOR_INDEX[f]], w2.FACTORS[f]) for f in tc.INHERITANCE_FACTORS}
        dirs = tc.concept_directions(emb.double(), cols)
        self.words = sorted(dirs)
        self.dirs = torch.stack([dirs[w] for w in self.words]).float().to(device)  # [n_w, D]
        toks = tc.subword_tokens(tokenizer, self.words)
        self.shares = {h: [j for j, t in enumerate(toks) if t & th]
                       for h, th in zip(hard_words, tc.subword_tokens(tokenizer, list(hard_words)))}
        self.tokenizer = tokenizer
        self.anchors = list(anchors)
        self.base = base.to(device)  # [n_a, D]: the base model's unit bare-text embeddings of the anchors
        if len(self.base) != len(self.anchors):
            raise ValueError(f"_DirectionPenalty: {len(self.base)} base embeddings for {len(self.anchors)} anchors")

    @staticmethod
    @torch.no_grad()
    def anchor_embeddings(model, tokenizer, device: str) -> tuple[list[str], torch.Tensor]:
        """The anchor entries (the demo's world2 naming vocabulary without distractors) and ``model``'s unit
        bare-text embeddings of them ``[n_a, D]``; taken from the base weights before a checkpoint is loaded, so a
        resumed run anchors to the same targets as an uninterrupted one."""
        from visae.demo import world2_vocabulary

        anchors = world2_vocabulary(0)
        was = model.training
        model.eval()
        base = torch.cat([F.normalize(model.encode_text(tokenizer(anchors[i:i + 512]).to(device)), dim=-1)
                          for i in range(0, len(anchors), 512)])
        model.train(was)
        return anchors, base

    def __call__(self, model, words: Sequence[str], ref: Sequence[str], anchor_idx: Sequence[int], margin: float,
                 device: str) -> tuple[torch.Tensor, torch.Tensor]:
        n_h, n_r = len(words), len(ref)
        anchors = [self.anchors[int(i)] for i in anchor_idx]
        e = F.normalize(model.encode_text(self.tokenizer(list(words) + list(ref) + anchors).to(device)), dim=-1)
        cos = e[:n_h + n_r] @ self.dirs.T  # [n_h + n_r, n_w]
        mask = torch.zeros(n_h, len(self.words), dtype=torch.bool, device=device)
        for i, h in enumerate(words):
            mask[i, self.shares.get(h, [])] = True
        # torch's median of an even count is the lower middle value (the inheritance measure's np.median averages
        # the two): a difference of one rank among the random words, immaterial to a hinge with a margin
        gap = F.relu(cos[:n_h] - cos[n_h:].detach().median(0).values + margin)[mask]
        push = gap.pow(2).mean() if gap.numel() else cos.sum() * 0.0
        drift = e[n_h + n_r:] - self.base[torch.as_tensor(list(anchor_idx), dtype=torch.long, device=device)]
        anchor = drift.pow(2).sum(-1).mean() if len(anchors) else e.sum() * 0.0
        return push, anchor


def _freeze_image_side(model) -> None:
    """Freeze the image tower and the logit scale (and bias): only the text tower trains."""
    for n, p in model.named_parameters():
        p.requires_grad_(not (n.startswith("visual.") or n.startswith("logit_")))


def tune_text_tower(cfg: TextTuneConfig, argv: Sequence[str] | None = None, *, stop_after: int | None = None) -> Path | None:
    """Run the stage (module docstring); returns the exported fp16 weights (card ``.json`` beside), or None when
    ``stop_after`` steps of this call ended it early (tests of resumption).

    A rerun of a finished run (checkpoint at ``steps``, its export and card in place) re-derives its word lists and
    returns the export without rendering, training or evaluating. The run holds ``out``'s writer lock (:func:`visae.atomic.output_lock`).

    Raises:
        ConfigError (a usage error, exit status 2; a ValueError): ``init``, its card or the ``negatives_exclude`` list
            is missing; the card is not a v2 card, does not match the weights, or is of another world format;
            ``out`` is a file; ``export`` is ``init`` or lies below a file; the pool holds fewer single-object
            scenes than a batch takes; no hard negative is left (``hard_candidates`` too small); a checkpoint in
            ``out`` was made with another config or base. All before anything is written.
        OutputLockedError: another process writes ``out``.
        RuntimeError: the exported image tower differs from the base's (it must stay frozen).
    """
    from safetensors.torch import load_file
    from tqdm import tqdm

    from visae import world2 as w2
    from visae.metrics import json_safe

    t_start, cpu_start = time.time(), time.process_time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    # inputs first: nothing is written before they are read and checked
    init = Path(cfg.init).resolve()
    base = _base_card(init)
    if base.get("world_version", 1) != w2.FORMAT_VERSION:
        raise ConfigError(f"init: {init} was trained on world format {base.get('world_version', 1)}, this visae draws "
                          f"format {w2.FORMAT_VERSION} (visae.world2.FORMAT_VERSION)")
    if not Path(cfg.negatives_exclude).is_file():
        raise ConfigError(f"negatives_exclude: word list {cfg.negatives_exclude} not found (expected one word a line, "
                          "e.g. ../shared/vocab/20k.txt)")
    out = Path(cfg.out)
    arch = base["model"]  # the base's architecture (visae-toyclip2 or its register variant): the tuned model's too
    export = Path(cfg.export) if cfg.export else out / f"{arch}.safetensors"
    try:  # out, or a parent of it, is a file (or a dangling link)
        check_output_path(out, "visae tune-toy-clip-text")
    except OutputPathError as e:
        raise ConfigError(f"out: {e}; expected a run directory (made if missing)") from None
    if export.resolve() == init:
        raise ConfigError(f"export: {export} is the base's weights file (init): the tuned model would overwrite its base")
    if any(q.exists() and not q.is_dir() for q in export.resolve().parents):
        raise ConfigError(f"export: a parent of {export} is a file; expected a directory to write the weights into")
    naming = tc.read_word_list(cfg.negatives_exclude, "negatives_exclude: word list")
    model, _, tokenizer = tc.create_toyclip(init, device=cfg.device, model=arch)
    model.eval()
    _freeze_image_side(model)
    anchors = _DirectionPenalty.anchor_embeddings(model, tokenizer, cfg.device) if cfg.direction_weight > 0 else None
    base_negs = _base_negatives(init, base, naming)
    negs = tc.negative_words(naming, seed=cfg.seed, n=cfg.n_negative_words) if cfg.negatives_per_step else []
    hard_by_tok = (hard_negative_words(tokenizer, set(naming), cfg.hard_candidates, cfg.dev_fraction)
                   if cfg.hard_negatives_per_step else {})
    hard_tokens = list(hard_by_tok)
    hard_words = sorted({w for ws in hard_by_tok.values() for w in ws})
    world_seqs = world_token_sequences(tokenizer, sorted(tc.world2_words()))
    context = int(tokenizer(["x"]).shape[1])
    vocab_size = int(model.token_embedding.num_embeddings)
    seen = sorted(set(base_negs) | set(negs) | set(hard_words))
    # development words: never trained on, outside the naming list (inheritance on them is the recipe's own check)
    dev = [w for w in candidate_words(set(naming) | set(seen), cfg.hard_candidates) if is_dev_word(w, cfg.dev_fraction)]
    unseen = world_token_sequences(tokenizer, sorted(set(naming) | set(dev)))  # no token negative may spell one

    # the pool's scenes are drawn (not rendered) first: too few single-object scenes is refused before any work
    scenes, jitter = _pool_scenes(base, cfg.n_pool)
    n_single = sum(len(sc.objects) == 1 for sc in scenes)
    if cfg.direction_weight > 0 and n_single == 0:
        raise ConfigError(f"n_pool: no single-object scene among the base run's first {cfg.n_pool} training scenes: "
                          "the direction penalty takes its concept directions from them; raise n_pool")
    if cfg.single_object_fraction > 0 and n_single < cfg.batch_size:
        raise ConfigError(f"n_pool: only {n_single} single-object scenes among the base run's first {cfg.n_pool} "
                          f"training scenes, fewer than batch_size={cfg.batch_size} (single_object_fraction "
                          f"{cfg.single_object_fraction:g}); raise n_pool or lower batch_size")

    with output_lock(out, "visae tune-toy-clip-text"):
        cfg_dict = tc._config_record(cfg)
        cfg_dict["init"] = str(init)
        cfg_dict["init_sha256"] = tc._file_sha256(init)

        # the trainers' decay rule (matrices decay), over the trainable (text tower's) parameters only
        opt = torch.optim.AdamW(tc._param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        ckpt = out / "checkpoint.pt"
        step, train_seconds = tc._resume(ckpt, cfg, cfg_dict, model, None, opt, world_version=w2.FORMAT_VERSION)
        # written once the checkpoint's config is accepted: a refused rerun leaves the run's record as it was
        atomic_write_text(out / "config.json", json.dumps(cfg_dict, indent=1))
        atomic_write_text(out / "negatives.txt", "".join(x + "\n" for x in seen))
        atomic_write_text(out / "dev_words.txt", "".join(x + "\n" for x in dev))

        if step >= cfg.steps and export.is_file() and export.with_suffix(".json").is_file():
            done = json.loads(export.with_suffix(".json").read_text())
            if done.get("sha256") == tc._file_sha256(export) and done.get("config", {}).get("init_sha256") == cfg_dict["init_sha256"]:
                print(f"visae tune-toy-clip-text: {export} is this run's finished export ({cfg.steps} steps); nothing to do",
                      file=sys.stderr)
                return export
        t_data = time.time()
        with torch.no_grad():
            emb, factors = _image_pool(model, scenes, jitter, cfg.progress)
        data_seconds = time.time() - t_data
        single = np.flatnonzero(factors[:, w2.FACTOR_INDEX["n_objects"]] == 0)
        batch_cfg = SimpleNamespace(batch_size=cfg.batch_size, curriculum_steps=0,
                                    single_object_fraction=cfg.single_object_fraction)
        sampler = tc._CaptionSamplerV2(tokenizer)
        n_f = len(w2.FACTORS)
        penalty = (_DirectionPenalty(tokenizer, emb[single], factors[single], hard_words, *anchors, cfg.device)
                   if anchors is not None else None)
        model.train()
        model.visual.eval()
        scale = model.logit_scale.detach().exp()
        log = tc._StepLog(out / "log.jsonl", tqdm(total=cfg.steps, initial=step, desc="toy CLIP v2 text tower",
                                                  disable=not cfg.progress), train_seconds)

        def save_ckpt() -> None:
            tc._atomic_torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                                   "train_seconds": log.train_seconds, "config": cfg_dict,
                                   "world_version": w2.FORMAT_VERSION}, ckpt)

        while step < cfg.steps:
            if log.stop_here(stop_after):
                return None
            rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, step, 0x7E47]))
            idx = tc._v2_batch_indices(step, batch_cfg, len(emb), single, rng)
            fac = factors[idx]
            for grp in opt.param_groups:
                grp["lr"] = tc._lr_at(step, cfg)
            tokens, cons, _ = sampler(fac, rng)
            parts_t, parts_c = [tokens], [cons]
            t2, c2, _ = sampler.concept_captions(rng)
            parts_t.append(t2)
            parts_c.append(c2)
            if negs:
                t3, c3, _ = sampler.negatives(negs, cfg.negatives_per_step, n_f, rng)
                parts_t.append(t3)
                parts_c.append(c3)
            if hard_tokens:  # evenly over the shared tokens, then a word of that token
                words = [hard_by_tok[hard_tokens[int(i)]][int(rng.integers(len(hard_by_tok[hard_tokens[int(i)]])))]
                         for i in rng.integers(len(hard_tokens), size=cfg.hard_negatives_per_step)]
                t4, c4, _ = sampler.negatives(words, len(words), n_f, rng)
                parts_t.append(t4)
                parts_c.append(c4)
            if cfg.token_negatives_per_step:
                t5 = token_negatives(world_seqs, cfg.token_negatives_per_step, rng, context=context,
                                     sot=int(tokenizer.sot_token_id), eot=int(tokenizer.eot_token_id), vocab_size=vocab_size,
                                     forbidden=unseen)
                c5 = np.full((len(t5), n_f), sampler.UNCONSTRAINED, np.int64)
                c5[:, 0] = -3  # a value no factor takes: true of no image
                parts_t.append(t5)
                parts_c.append(c5)
            tokens, cons = torch.cat(parts_t), np.concatenate(parts_c)
            pos = tc._positives(fac, cons).to(cfg.device)
            uniq, inv = torch.unique(tokens, dim=0, return_inverse=True)
            txt = F.normalize(model.encode_text(uniq.to(cfg.device)), dim=-1)[inv.to(cfg.device)]
            loss = tc.multi_positive_clip_loss(emb[idx].to(cfg.device), txt, scale, pos)
            pen = None
            if penalty is not None:
                ref = [negs[int(i)] for i in rng.integers(len(negs), size=cfg.negatives_per_step)]
                anchor_idx = (rng.choice(len(penalty.anchors), min(cfg.anchors_per_step, len(penalty.anchors)), replace=False)
                              if cfg.anchor_weight > 0 else [])
                pen = penalty(model, words, ref, anchor_idx, cfg.direction_margin, cfg.device)
                loss = loss + cfg.direction_weight * pen[0] + cfg.anchor_weight * pen[1]
            tc._check_loss_finite(loss, step, ckpt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            rec = {"step": step, "loss": round(float(loss.detach()), 5), "lr": tc._lr_at(step - 1, cfg),
                   "wall": round(time.time() - t_start, 1), "cpu": round(time.process_time() - cpu_start, 1)}
            if pen is not None:
                rec["direction_push"], rec["direction_anchor"] = (float(f"{float(x.detach()):.4g}") for x in pen)
            log.end_step(rec, step, cfg.steps, cfg.checkpoint_every, save_ckpt)
        train_seconds = log.finish()

        model.eval()
        # before anything is exported: the image side must be the base's, bit for bit (the fp16 file it was loaded from)
        before, now = load_file(str(init)), model.state_dict()
        changed = [k for k in before if (k.startswith("visual.") or k.startswith("logit_"))
                   and not torch.equal(before[k], now[k].to(before[k].dtype))]
        if changed:
            raise RuntimeError(f"the image tower changed in {len(changed)} tensors ({changed[:3]}...): it must stay frozen")
        tc.export_fp16(model, export, arch)
        shipped, _, _ = tc.create_toyclip(export, model=arch)
        metrics = tc.evaluate_v2(shipped, tokenizer, cfg.eval_seed, cfg.eval_n)
        metrics["subword_inheritance"] = tc.inheritance_eval_v2(shipped, tokenizer, cfg.eval_seed, cfg.eval_n, naming, seen)
        if dev:
            metrics["subword_inheritance_dev"] = tc.inheritance_eval_v2(shipped, tokenizer, cfg.eval_seed, cfg.eval_n, dev, seen)
        card = {
            "model": arch, "version": 2, "world": "visae.world2", "world_version": w2.FORMAT_VERSION,
            **tc._run_record(export, "visae.toyclip_text.main " + " ".join(argv if argv is not None else sys.argv[1:]),
                             t_start, cpu_start),
            "stage": "text tower (visae.toyclip_text): image tower frozen, bit for bit the base's",
            "config": cfg_dict, "base": base,
            "dev_words": {"file": "dev_words.txt", "n": len(dev)},
            "negatives": {"file": "negatives.txt", "n": len(seen), "base": len(base_negs), "random": len(negs),
                          "hard": len(hard_words), "hard_tokens": len(hard_tokens)},
            "steps": cfg.steps, "train_seconds": round(train_seconds, 1), "data_seconds": round(data_seconds, 1),
            "evaluation": metrics,
        }
        tc._write_card(card, export, out)
        print(json.dumps(json_safe({"weights": str(export), "train_seconds": card["train_seconds"],
                                    "inheritance": metrics["subword_inheritance"]["fraction_no_closer"],
                                    "inheritance_dev": metrics.get("subword_inheritance_dev", {}).get("fraction_no_closer")}),
                         indent=1))
        return export


def main(argv: list[str] | None = None) -> int:
    """``visae tune-toy-clip-text --init W --out DIR`` (options: configs/toy_clip_v2_text.yaml)."""
    from visae.devices import resolve_device
    from visae.config import parse_config

    from visae.errors import VisaeError, report

    try:
        cfg = parse_config(TextTuneConfig, argv, default_yaml=config_yaml("toy_clip_v2_text.yaml"), prog="visae tune-toy-clip-text")
        cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))  # 'auto' resolved; one this machine lacks refused
        tune_text_tower(cfg, argv)
    except VisaeError as e:
        return report("visae tune-toy-clip-text", e)
    return 0


if __name__ == "__main__":
    from visae.cli import run_main

    sys.exit(run_main("python -m visae.toyclip_text", main))
