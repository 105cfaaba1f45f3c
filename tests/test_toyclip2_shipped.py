"""World2's shipped toy CLIP (``visae-toyclip2-reg4``, assets/toyclip/) against issue 12's targets for the shipped model.

What holds and what does not (measured here on 400 held-out single-object scenes of world seed 424242, which no
training or evaluation run used; the card's own 1,000-scene evaluation and BENCHMARKS.md agree):

- the card describes the file shipped (sha256, size <= 15 MB in fp16, the two stages' commands, seeds and training
  times, the world format it was trained on), for world2's model and for the one shipped before it (``visae-toyclip2``,
  whose targets were tested here until 2026-12-01 23:00 UTC and are not any more: its figures are in its card and
  assets/toyclip/README.md; the tests below judge world2's model);
- renderer 2 (scikit-image, other geometry): size 0.9125 and horizontal third 0.9125 (>= 0.90, met); colour family
  0.83, shape 0.725, texture 0.5425 (not met: strict xfails carrying these figures; ``visae-toyclip2``, without
  registers: 0.7925, 0.69, 0.3175);
- shifting every object by 4 px costs <= 3 points on each non-position factor (met; no factor lost more than 1.5);
- sub-word inheritance: 74.5 % of held-out words sharing a token with a world word (38 of 51 pairs) are no closer
  than the median distractor (target >= 55 %: met), and every scored world word stays above >= 99.8 % of the
  distractors on its own concept.

These weights are the best image tower trained so far (docs/toyclip_v2_recipe.md, section 17: 4 register tokens,
per-patch heads, 9,000 steps) with its text tower tuned alone by ``visae tune-toy-clip-text`` (section 18); shipped so
that the world2 demo runs without a training hour; the targets they miss stay open in issue 12.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from visae import toyclip as tc
from visae import world2 as w2

N, SEED = 400, 424242
VOCAB_20K = Path(__file__).resolve().parents[1].parent / "shared" / "vocab" / "20k.txt"

# Renderer-2 zero-shot on the 400 scenes, measured with these weights; the factors short of 0.90 are xfails.
_R2_MISSES = {"colour_family": 0.83, "shape": 0.725, "texture": 0.5425}


MODEL = tc.WORLD2_MODEL  # world2's toy CLIP, the one whose targets these are


@pytest.fixture(scope="module")
def shipped():
    """The shipped weights through the path every stage uses (``load_backbone(MODEL)``)."""
    from visae.backbones import load_backbone

    bb = load_backbone(MODEL)
    assert bb.pretrained == "shipped"
    return bb.model, bb.tokenizer


@pytest.fixture(scope="module")
def scenes():
    return w2.sample_scenes(N, SEED, max_objects=1, occlusion=0.0)


@pytest.mark.parametrize("model", tc.V2_MODELS)
def test_card_describes_the_shipped_file(model):
    """Both shipped v2 models (world2's and the one before it): each card names its file and how it was made."""
    card = json.loads(tc.SHIPPED_CARDS[model].read_text())
    data = tc.SHIPPED_WEIGHTS[model].read_bytes()
    assert card["model"] == model and card["world"] == "visae.world2"
    assert card["world_version"] == w2.FORMAT_VERSION  # trained on the scenes this visae draws
    assert card["sha256"] == hashlib.sha256(data).hexdigest() and card["bytes"] == len(data) <= 15 * 2**20
    # two stages: the v2 trainer (the image tower and the first text tower), then the text tower tuned alone
    base = card["base"]
    assert base["config"]["seed"] == 0 and base["command"].startswith("visae.toyclip.main_v2 ")
    assert base["train_seconds"] > 0 and base["steps"] == base["config"]["steps"]
    assert card["config"]["seed"] == 0 and card["command"].startswith("visae.toyclip_text.main ")
    assert card["config"]["init_sha256"] == base["sha256"] and card["config"]["direction_weight"] > 0
    assert card["train_seconds"] > 0 and card["steps"] == card["config"]["steps"]
    negs = tc.read_word_list(tc.SHIPPED_NEGATIVES[model])
    assert len(negs) == card["negatives"]["n"]
    # Training negatives are never words of the naming evaluation's list (issue 12 item 5).
    if VOCAB_20K.is_file():
        assert not set(negs) & set(tc.read_word_list(VOCAB_20K))


@pytest.fixture(scope="module")
def renderer2_scores(shipped, scenes):
    model, tok = shipped
    imgs, _, rows = w2._render_rows(scenes, "skimage", w2.IMAGE_SIZE)
    return tc.zero_shot_eval_v2(model, tok, imgs, rows)


@pytest.mark.parametrize("factor", [
    pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=f"not met yet (issue 12): renderer 2 {f} {_R2_MISSES[f]}"))
    if f in _R2_MISSES else f for f in ("colour_family", "shape", "texture", "size", "hpos")])
def test_second_renderer_scores_each_coarse_factor_at_least_090(renderer2_scores, factor):
    assert renderer2_scores[factor] >= 0.90, renderer2_scores


def test_a_4px_shift_costs_at_most_3_points(shipped, scenes):
    """Every object moved 4 px in a random direction (staying in frame): the same scenes, the PIL renderer."""
    model, tok = shipped
    ang = np.random.default_rng(0).uniform(0, 2 * math.pi, len(scenes))
    moved = [tc.shift_scene(s, 4 * math.cos(a), 4 * math.sin(a)) for s, a in zip(scenes, ang)]
    imgs, _, rows = w2._render_rows(scenes, "pil", w2.IMAGE_SIZE)
    imgs_m, _, rows_m = w2._render_rows(moved, "pil", w2.IMAGE_SIZE)
    factors = [b for b in tc.V2_COARSE if b not in ("hpos", "vpos")]
    base = tc.zero_shot_eval_v2(model, tok, imgs, rows, factors)
    after = tc.zero_shot_eval_v2(model, tok, imgs_m, rows_m, factors)
    # The model is not chance-level on them (else any shift is free): measured 0.675-0.995.
    assert min(base.values()) > 0.5 and base["shape"] > 0.7, base
    cost = {f: base[f] - after[f] for f in factors}
    assert max(cost.values()) <= 0.03, cost


def test_held_out_words_do_not_inherit_a_world_words_meaning(shipped):
    """Issue 12's inheritance target (>= 55 % of the held-out words sharing a token with a world word no closer to its
    concept than the median distractor), and every scored world word still above >= 95 % of the distractors on its
    own concept, or the text stage would have bought the first by losing the words naming needs: a run without the
    stage's anchor term left rectangle, heptagon and trapezoid below 95-99.9 % of them. Measured on these scenes:
    74.5 % of 51 pairs; the 10 scored world words (red, 5 shapes, 3 textures, large) 0.998-1.0 (``visae-toyclip2``:
    crosshatched 0.67 and large 0.77, then reported, not asserted)."""
    if not VOCAB_20K.is_file():
        pytest.skip(f"{VOCAB_20K} (the naming list) is not beside the checkout")
    model, tok = shipped
    r = tc.inheritance_eval_v2(model, tok, SEED, N, tc.read_word_list(VOCAB_20K),
                              tc.read_word_list(tc.SHIPPED_NEGATIVES[MODEL]))
    assert r["n_pairs"] >= 20, r["n_pairs"]
    assert r["fraction_no_closer"] >= 0.55, {k: r[k] for k in ("fraction_no_closer", "n_pairs")}
    own = {w: v["word_percentile"] for w, v in r["per_word"].items()}
    named = set(w2.FACTORS["colour_family"]) | set(w2.FACTORS["shape"])
    assert len(own) >= 8 and sum(w in named for w in own) >= 4 and min(own.values()) >= 0.95, own
