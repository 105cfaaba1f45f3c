"""The concept bottleneck classifier on world2 (issue 14 item 1): the judging helpers (``top_weights_name_the_class``
with world2's naming truth, ``intervention_effects``) on hand-set models. The measured figures on world2's 253
colour-family x shape classes with the v2 toy CLIP: BENCHMARKS.md, "Concept bottleneck classifier on world2 (issue 14)"
(``benchmarks/bench_cbm_world2.py``).
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from visae import world2
from visae.cbm import CBMError, ConceptBottleneck, intervention_effects, top_weights_name_the_class


def _class_values(name):
    family, shape = name.split(" ", 1)
    return [("colour_family", family), ("shape", shape)]


def test_top_weights_judged_with_world2_naming_truth():
    """A class passes when its two largest |weights| name its colour family (a family word or a named colour of that
    family, "crimson" for red) and its shape (a synonym, "star" for any n-pointed star); a third concept does not
    count, a class with one concept fails, and a name that is a whole named colour is judged as that colour only."""
    classnames = ["red four-pointed star", "blue circle", "green square", "grey ring"]
    names = ["crimson", "star", "on the left", "circle", "blue", "green", "blue green", "square", "hoop"]
    W = torch.zeros(4, len(names))
    W[0, 0], W[0, 1], W[0, 2] = 2.0, -1.5, 0.3  # crimson + star: right (a negative weight counts by |weight|)
    W[1, 2], W[1, 3], W[1, 4] = 2.0, 1.5, 1.0  # "on the left" + circle: blue is only third -> wrong
    W[2, 6], W[2, 7] = 2.0, 1.0  # "blue green" + square: a whole named colour is judged by its RGB, not its words
    W[3, 8] = 1.0  # one concept: fails whatever its name
    m = ConceptBottleneck(W=W, b=torch.zeros(4), latents=torch.arange(len(names)), scale=torch.ones(len(names)),
                          names=names, classnames=classnames)
    got = top_weights_name_the_class(m, _class_values, world2.name_matches, k=2)
    assert [g["top"] for g in got] == [["crimson", "star"], ["on the left", "circle"], ["blue green", "square"], ["hoop"]]
    assert got[0]["ok"] and got[0]["named"] == {"colour_family": True, "shape": True}
    assert not got[1]["ok"] and got[1]["named"] == {"colour_family": False, "shape": True}
    # "blue green" is a named colour (XKCD) of the blue family by its RGB: it names blue, not green, though it has
    # the word green
    assert world2.name_matches("blue green", "colour_family", "blue")
    assert not got[2]["ok"] and got[2]["named"] == {"colour_family": False, "shape": True}
    assert not got[3]["ok"] and got[3]["named"] == {"colour_family": False, "shape": True}


def test_intervention_effects_counts_images_exactly():
    """Three classes, each decided by its own latent, class C also by latent 5 (class B's); class C is the default
    (largest bias). Every figure is an exact fraction of image counts, worked out by hand below."""
    W = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 1.0, 2.5]])
    m = ConceptBottleneck(W=W, b=torch.tensor([0.0, 0.1, 0.2]), latents=torch.tensor([4, 5, 6]), scale=torch.ones(3),
                          names=["a", "b", "c"], classnames=["A", "B", "C"])
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    codes = torch.zeros(len(y), 8)
    codes[0, 4] = codes[1, 4] = 1.0  # A: 3 vs C 0.2
    codes[2:5, 5] = 1.0  # B: 3.1 vs C 1.2
    codes[5, 6] = 1.5  # C
    codes[6, 6], codes[6, 5] = 1.0, 0.8  # C 3.5 vs B 2.5
    codes[7, 4], codes[7, 6] = 0.5, 1.0  # an A image taken by C: A 1.5 vs C 2.7
    assert m.predict(codes).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]  # base accuracy: A 2/3, B 1, C 1
    rows = {r["name"]: r for r in intervention_effects(m, codes, y)}
    # A without latent 4: its three images go to C (A 0 of 3); no other class uses latent 4 and none changes
    a = rows["A"]
    assert (a["own"], a["other_max"], a["other_pooled"], a["users"], a["n"]) == (Fraction(-2, 3), 0, 0, 1, 3)
    assert a["concepts"] == ["a"] and a["latents"] == [4]
    # B without latent 5: B's images go to C (bias 0.2 > 0.1); C uses latent 5 too, so only A is an 'other'
    b = rows["B"]
    assert (b["own"], b["other_max"], b["other_pooled"], b["users"]) == (Fraction(-1), 0, 0, 2)
    # C without latent 6: image 5 keeps C (the bias), image 6 goes to B (2.5 vs 1.0); image 7 comes back to A
    # (1.5 vs 0.2): A's accuracy rises by 1/3, and A's and B's six images pooled by 1/6
    c = rows["C"]
    assert (c["own"], c["other_max"], c["other_pooled"], c["users"]) == (Fraction(-1, 2), Fraction(1, 3), Fraction(1, 6), 1)
    two = {r["name"]: r for r in intervention_effects(m, codes, y, n_remove=2)}
    assert two["C"]["latents"] == [6, 5] and two["C"]["users"] == 2  # B uses latent 5
    with pytest.raises(CBMError, match="codes must be"):
        intervention_effects(m, codes, y[:3])
