"""Sub-word inheritance (issue 12): do words a toy CLIP never saw take a world word's meaning through a shared BPE token?

The measurement (``visae.toyclip.subword_inheritance``) is checked three ways: its tokenisation, its pass rule on
a model whose embeddings are set by hand, and on the shipped first toy CLIP, whose inheritance the issue reports
("red" named "incurred": the text tower learnt only the world's words).
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from visae import toyclip as tc  # noqa: E402
from visae import toyworld as tw  # noqa: E402

VOCAB_20K = Path(__file__).resolve().parents[1].parent / "shared" / "vocab" / "20k.txt"


def _tokenizer():
    import open_clip

    tc.register()
    return open_clip.get_tokenizer(tc.MODEL_NAME)


def test_subword_tokens_share_the_end_of_word_piece():
    tok = _tokenizer()
    red, incurred, reddish, blue = tc.subword_tokens(tok, ["red", "incurred", "reddish", "blue"])
    assert len(red) == 1 and red <= incurred  # incur + red</w>
    assert len(incurred) == 2
    assert not (red & reddish)  # red (word-internal) + dish</w>: another token than red</w>
    assert not (red & blue)


class _HandModel(torch.nn.Module):
    """Images are one-hot in 4 dimensions by their label; a word's text embedding is set by hand (``vectors``)."""

    def __init__(self, tokenizer, vectors: dict[str, list[float]]):
        super().__init__()
        self.tok = tokenizer
        self.lookup = {tuple(tokenizer([w])[0].tolist()): torch.tensor(v, dtype=torch.float32) for w, v in vectors.items()}

    def encode_image(self, x):  # x: [B, 3, H, W] from images_to_tensor; the label is the red channel's mean bucket
        lab = (x[:, 0].mean((1, 2)) > 0).long()
        return F.one_hot(lab, 4).float()

    def encode_text(self, tokens):
        return torch.stack([self.lookup[tuple(t.tolist())] for t in tokens])


def test_pass_rule_against_the_median_distractor():
    """World word "red" (images of label 1) and "blue" (label 0); held-out words sharing red</w>: "incurred" set
    closer to red's concept direction than every distractor (fails), "whispered" set below their median (passes)."""
    tok = _tokenizer()
    images = np.zeros((8, 8, 8, 3), np.uint8)
    images[4:, :, :, 0] = 255  # images 4-7: label 1
    labels = np.array([0] * 4 + [1] * 4)
    # direction of "red" = unit(mean(one_hot 1) - mean(all)) = unit([-.5, .5, 0, 0])
    vec = {"red": [0, 1, 0, 0], "blue": [1, 0, 0, 0], "incurred": [-1, 1, 0.1, 0], "whispered": [1, -1, 0, 0.1],
           "apple": [0, 0, 1, 0], "table": [0, 0, 0, 1], "river": [0.2, 0, 1, 0]}
    model = _HandModel(tok, vec)
    held = ["incurred", "whispered", "apple", "table", "river", "red"]  # "red" itself is dropped (a world word)
    r = tc.subword_inheritance(model, tok, images, {"colour": (labels, ("blue", "red"))}, held)
    assert r["n_heldout"] == 5
    assert r["per_word"]["red"]["n"] == 2  # incurred, whispered
    assert r["per_word"]["red"]["no_closer"] == 1  # whispered
    assert r["n_pairs"] == 2 and r["fraction_no_closer"] == 0.5
    assert r["worst"][0]["heldout"] == "incurred" and r["worst"][0]["percentile"] == 1.0
    assert r["per_word"]["red"]["word_percentile"] == 1.0  # "red" itself is the closest word
    assert model.training  # the measurement puts the model in eval mode and back
    with pytest.raises(ValueError, match="labels"):
        tc.subword_inheritance(model, tok, images, {"colour": (labels[:3], ("blue", "red"))}, held)
    assert model.training  # also when it raises (a training loop that measures and catches carries on in train mode)


@pytest.mark.skipif(not VOCAB_20K.is_file(), reason="../shared/vocab/20k.txt not beside the repository")
def test_shipped_first_toy_clip_inherits():
    """The issue's fault, measured: with the shipped visae-toyclip (v1, trained on its world's words only) the 20k
    words that share a token with a world word ("incurred", "whispered", "configured" with red</w>) sit above the
    median distractor: fewer than half of them pass (measured: 0 of 7, with 400 and with 2,000 images of world 5000)."""
    model, _, tok = tc.create_toyclip(tc.TOYCLIP_WEIGHTS)
    world = tw.sample_world(400, 5000)
    seen: set[str] = set()
    for row in world.factors[:200]:
        for c in tw.caption_options(row):
            seen.update(c.text.lower().replace(",", " ").split())
    for b in tw.toy_classnames_and_templates().values():
        seen.update(w for c in b["classnames"] for w in c.split())
        for t in b["templates"]:
            seen.update(t.replace("{}", " ").split())
    held = [w.strip().lower() for w in VOCAB_20K.read_text(encoding="utf-8").splitlines() if w.strip()]
    held = [w for w in held if w not in seen]
    cols = {f: (world.factor(f), tw.FACTORS[f]) for f in ("shape", "colour", "size", "background")}
    r = tc.subword_inheritance(model, tok, world.images, cols, held)
    assert r["n_pairs"] >= 3
    assert "red" in r["per_word"] and r["per_word"]["red"]["no_closer"] == 0
    assert r["fraction_no_closer"] < 0.5
    # the world's words themselves name their concepts: each above 90 % of the distractors
    assert all(v["word_percentile"] >= 0.9 for v in r["per_word"].values())
