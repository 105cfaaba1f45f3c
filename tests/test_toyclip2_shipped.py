"""The shipped v2 toy CLIP (``visae-toyclip2``, assets/toyclip/) against issue 12's targets for the shipped model.

What holds and what does not (measured here on 400 held-out single-object scenes of world seed 424242, which no
training or evaluation run used; the card's own 1,000-scene evaluation and BENCHMARKS.md agree):

- the card describes the file shipped (sha256, size <= 15 MB in fp16, the two stages' commands, seeds and training
  times, the world format it was trained on);
- renderer 2 (scikit-image, other geometry): horizontal third 0.95 and size 0.925 (>= 0.90, met); colour family
  0.7925, shape 0.69, texture 0.3175 (not met: strict xfails carrying these figures);
- shifting every object by 4 px costs <= 3 points on each non-position factor (met; no factor lost more than 0.25);
- sub-word inheritance: 76.5 % of held-out words sharing a token with a world word (39 of 51 pairs) are no closer
  than the median distractor (target >= 55 %: met since the text tower's stage with the direction penalty; the
  image tower alone 17.6 %).

These weights are the best image tower trained so far (docs/toyclip_v2_recipe.md, section 12: world format 2, 6,500
steps) with its text tower tuned alone by ``visae tune-toy-clip-text`` (section 15); shipped so that the world2 demo
runs without a training hour; the targets they miss stay open in issue 12.
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
_R2_MISSES = {"colour_family": 0.7925, "shape": 0.69, "texture": 0.3175}


@pytest.fixture(scope="module")
def shipped():
    """The shipped weights through the path every stage uses (``load_backbone("visae-toyclip2")``)."""
    from visae.backbones import load_backbone

    bb = load_backbone("visae-toyclip2")
    assert bb.pretrained == "shipped"
    return bb.model, bb.tokenizer


@pytest.fixture(scope="module")
def scenes():
    return w2.sample_scenes(N, SEED, max_objects=1, occlusion=0.0)


def test_card_describes_the_shipped_file():
    card = json.loads(tc.TOYCLIP2_CARD.read_text())
    data = tc.TOYCLIP2_WEIGHTS.read_bytes()
    assert card["model"] == tc.MODEL_NAME_V2 and card["world"] == "visae.world2"
    assert card["world_version"] == w2.FORMAT_VERSION  # trained on the scenes this visae draws
    assert card["sha256"] == hashlib.sha256(data).hexdigest() and card["bytes"] == len(data) <= 15 * 2**20
    # two stages: the v2 trainer (the image tower and the first text tower), then the text tower tuned alone
    base = card["base"]
    assert base["config"]["seed"] == 0 and base["command"].startswith("visae.toyclip.main_v2 ")
    assert base["train_seconds"] > 0 and base["steps"] == base["config"]["steps"]
    assert card["config"]["seed"] == 0 and card["command"].startswith("visae.toyclip_text.main ")
    assert card["config"]["init_sha256"] == base["sha256"] and card["config"]["direction_weight"] > 0
    assert card["train_seconds"] > 0 and card["steps"] == card["config"]["steps"]
    negs = tc.read_word_list(tc.TOYCLIP2_NEGATIVES)
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
    # The model is not chance-level on them (else any shift is free): measured 0.375-0.965.
    assert min(base.values()) > 0.3 and base["shape"] > 0.7, base
    cost = {f: base[f] - after[f] for f in factors}
    assert max(cost.values()) <= 0.03, cost


def test_held_out_words_do_not_inherit_a_world_words_meaning(shipped):
    """Issue 12's inheritance target (>= 55 % of the held-out words sharing a token with a world word no closer to its
    concept than the median distractor), and the colour-family and shape words among the scored world words still above
    >= 95 % of the distractors on their own concepts, or the text stage would have bought the first by losing the
    words naming needs: a run without the stage's anchor term left rectangle, heptagon and trapezoid below 95-99.9 %
    of them. Measured on these scenes: 76.5 % of 51 pairs; red 0.998, heptagon, parallelogram, rectangle, semicircle,
    trapezoid 1.0. Texture and size words are reported, not asserted (their directions are the least fixed by 400
    scenes and weak with the first text tower too): gridded 0.999, speckled 1.0, crosshatched 0.67, large 0.77
    (first text tower, card's 1,000 scenes: crosshatched 0.05, large 0.88)."""
    if not VOCAB_20K.is_file():
        pytest.skip(f"{VOCAB_20K} (the naming list) is not beside the checkout")
    model, tok = shipped
    r = tc.inheritance_eval_v2(model, tok, SEED, N, tc.read_word_list(VOCAB_20K), tc.read_word_list(tc.TOYCLIP2_NEGATIVES))
    assert r["n_pairs"] >= 20, r["n_pairs"]
    assert r["fraction_no_closer"] >= 0.55, {k: r[k] for k in ("fraction_no_closer", "n_pairs")}
    own = {w: v["word_percentile"] for w, v in r["per_word"].items()}
    kept = {w: p for w, p in own.items() if w in set(w2.FACTORS["colour_family"]) | set(w2.FACTORS["shape"])}
    assert len(kept) >= 4 and min(kept.values()) >= 0.95, own
