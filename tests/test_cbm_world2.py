"""The concept bottleneck classifier on world2 (issue 14 item 1): the judging helpers (``top_weights_name_the_class``
with world2's naming truth, ``intervention_effects``) on hand-set models, and the ground truth on world2's 253
colour-family x shape classes with the shipped v2 toy CLIP.

Ground truth (``test_world2_cbm_*``): the session's world2 demo (conftest.world2_demo_dir: 10,000 single-object scenes
of world seed 5000, world2's shipped model ``visae-toyclip2-reg4``) split 7,000 / 3,000; a Matryoshka SAE (BatchTopK
k 8, 768 latents, 40 epochs, seed 0) trained on the 7,000 and named as the demo names (world2's words and the
20k list, each word embedded as "a {}"); ``visae cbm`` on the named concepts, lasso path to 5 concepts per class, then the refit on them. Measured
with SAE seeds 0 / 1 / 2 (BENCHMARKS.md, "Concept bottleneck classifier on world2"; AMD EPYC machine, 2026-12-01):
CBM 60.2 / 55.6 / 61.1 % against a probe of 56.0 % (1.08 / 0.99 / 1.09 x), the lasso's own weights 57.4 / 53.4 /
59.8 %; two largest weights on the class's family and shape words in 73.9 / 75.1 / 74.3 % of classes (2026-12-02,
with the demo's "a {}" template; 63 / 59 / 61 % named with bare words; misses: shapes the model confuses in text,
e.g. red parallelogram -> cherry red, diamond, and the square's latent named "posix"); removing a class's top concept lowers it by
>= 20 points in 221 / 217 / 229 of 253 classes, and the other classes' pooled accuracy by at most 1.2 / 1.0 / 0.9
points. With ``visae-toyclip2`` (world2's model before): 1.01 / 0.97 / 0.89 x the probe, top-2 44-53 %, 187-210
classes, the other classes 2.7-3.7 points. Asserted: the issue's >= 0.95 x the probe (measured 0.99-1.09) and
guards that hold for every measured seed with a margin (the refit >= 0.5 points above the lasso, the median class >= 20 points lower without its top
concept; >= 90 % of the classes at >= 20 % accuracy >= 20 points lower, measured 96-98 %: a class under 20 % cannot
lose 20 points; the other classes' pooled accuracy within the issue's 2 points for every intervention). Not
asserted: the 80 % top-2 and the every-class intervention targets (strict xfails).
"""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
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


N_TRAIN, SAE_SEED = 7000, 0


@pytest.fixture(scope="module")
def world2_cbm(world2_demo_dir, tmp_path_factory):
    """The session's world2 demo split 7,000 / 3,000, a Matryoshka SAE on the 7,000, its names, the CBM (module
    docstring). ~55 s of CPU: SAE 13-22 s, naming 6 s, CBM with probe and zero-shot 25-33 s."""
    from visae.cbm import CBMConfig, concept_features, load_cbm, train_cbm
    from visae.naming import NameConfig, name_concepts
    from visae.sae import load_sae
    from visae.shards import ShardSet, subset_shard_set
    from visae.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("cbm_w2")
    demo = world2_demo_dir
    src = ShardSet(demo / "shards")
    train_ss = subset_shard_set(src, np.arange(N_TRAIN), tmp / "train")
    val_ss = subset_shard_set(src, np.arange(N_TRAIN, len(src)), tmp / "val")
    sae_dir = train(TrainConfig(shards=str(train_ss.path), out=str(tmp / "sae"), architecture="matryoshka", k=8,
                                expansion_factor=8, lr=2e-3, l1_warmup_steps=0, resample_every=0, num_epochs=40,
                                batch_size=256, seed=SAE_SEED, device="cpu", progress=False, plot=False))
    # named as the demo names (its vocabulary and prompt templates, "a {}")
    templates = tuple(json.loads((demo / "concepts" / "concepts.json").read_text())["config"]["templates"])
    concepts = name_concepts(NameConfig(sae=str(sae_dir), vocab=str(demo / "vocab.txt"), vocab_size=0, stopwords=False,
                                        templates=templates,
                                        shards=str(train_ss.path), out=str(tmp / "concepts"),
                                        text_cache=str(demo / "text_cache"), progress=False))
    cfg = CBMConfig(sae=str(sae_dir), concepts=str(concepts), train_shards=str(train_ss.path),
                    val_shards=str(val_ss.path), label_column="family_shape", max_iter=100,
                    text_cache=str(demo / "text_cache"), out=str(tmp / "cbm"))
    res = train_cbm(cfg)
    model, _ = load_cbm(cfg.out)
    codes, y, _ = concept_features(load_sae(str(sae_dir)), val_ss, "family_shape")
    return {"res": res, "model": model, "codes": codes, "y": y}


def _summary(w):
    t, r = w["res"]["top1"], w["res"]["refit"]
    return (f"CBM {t['cbm']:.4f} (lasso {r['val_top1']['lasso']:.4f}), probe {t['linear_probe']:.4f}, zero-shot "
            f"{t['zero_shot']}, {w['res']['concepts_per_class']:.2f} concepts per class of "
            f"{w['res']['num_candidate_concepts']} named")


def test_world2_cbm_accuracy_against_the_probe(world2_cbm):
    """<= 5 concepts per class, named concepts only; the issue's >= 0.95 x the clean probe (measured 0.99-1.09 over SAE
    seeds; with ``visae-toyclip2`` 0.89-1.01, when this was a 0.80 guard); the refit on the lasso's concepts >= 0.5 points (15 of the 3,000 images) above the
    lasso's own weights (measured +2.8 / +2.3 / +1.3; with ``visae-toyclip2`` +5.1 to +8.3, when the guard was 2 points)."""
    res = world2_cbm["res"]
    t = res["top1"]
    msg = _summary(world2_cbm)
    print(msg)
    assert res["num_classes"] == 253 and res["n_val"] == 3000
    assert res["concepts_per_class"] <= 5.0, msg
    assert all(x["name"] for c in res["classes"] for x in c["concepts"])
    assert t["cbm"] >= 0.95 * t["linear_probe"], msg
    assert t["cbm"] >= res["refit"]["val_top1"]["lasso"] + 0.005, msg
    assert 0.40 <= t["zero_shot"] <= 0.85, msg  # the benchmark of issue 12 item 2 on these 3,000 scenes


def _top2(model):
    return top_weights_name_the_class(model, _class_values, world2.name_matches, k=2)


@pytest.mark.xfail(strict=True, reason="not met (issue 14): the two largest weights name the class's family and shape "
                                       "in 74-75 % of classes over SAE seeds 0-2 (target 80 %; bare-word names: "
                                       "59-63 %); shapes the model confuses in text (parallelogram / diamond, heptagon "
                                       "/ octagon) and the square's latent named 'posix'")
def test_world2_cbm_top_weights_are_the_class_words(world2_cbm):
    got = _top2(world2_cbm["model"])
    frac = float(np.mean([g["ok"] for g in got]))
    assert frac >= 0.8, f"{frac:.3f} of classes; misses {[(g['name'], g['top']) for g in got if not g['ok']][:10]}"


@pytest.fixture(scope="module")
def world2_interventions(world2_cbm):
    """Per class: its top concept removed from every validation image (``intervention_effects``), computed once."""
    return intervention_effects(world2_cbm["model"], world2_cbm["codes"], world2_cbm["y"])


def test_world2_cbm_intervention_lowers_the_median_class(world2_interventions):
    """Removing each class's top concept lowers the median class by >= 20 points (measured 56-63 over SAE seeds), a
    guard, not the issue's per-class target (below); the other classes' pooled accuracy moves by <= 2 points (issue 14:
    "other classes change by <= 2 points"; measured at most 0.9-1.2 over SAE seeds 0-2; pooled over each
    intervention's other classes' validation images, about 12 a class)."""
    rows = world2_interventions
    own = [float(r["own"]) for r in rows]
    pooled = max(abs(float(r["other_pooled"])) for r in rows)
    print(f"own accuracy >= 20 points lower in {sum(o <= -0.2 for o in own)} of {len(own)} classes, median "
          f"{-100 * np.median(own):.1f} points; other classes pooled: worst {100 * pooled:.2f} points")
    assert len(rows) == 253
    assert np.median(own) <= -0.20
    assert pooled <= 0.02, pooled


def test_world2_cbm_intervention_where_a_drop_of_20_points_is_possible(world2_cbm, world2_interventions):
    """A class the CBM gets right in fewer than 20 % of its validation images cannot lose 20 points. Among the
    classes it gets right in >= 20 %, removing the top concept lowers >= 90 % of them by >= 20 points: measured on the
    AMD EPYC machine of 2026-12-01 with SAE seeds 0 / 1 / 2: 221 of 229, 217 of 225, 229 of 233 (96-98 %); the classes
    under 20 % (24 / 28 / 20) are every failure of the per-class target but 4-8 (the strict xfail below)."""
    m, codes, y = world2_cbm["model"], world2_cbm["codes"], world2_cbm["y"]
    ok = m.predict(codes) == y
    base = {r["class"]: Fraction(int(ok[y == r["class"]].sum()), r["n"]) for r in world2_interventions}
    feasible = [r for r in world2_interventions if base[r["class"]] >= Fraction(20, 100)]
    hit = [r for r in feasible if r["own"] <= Fraction(-20, 100)]
    short = [(r["name"], float(base[r["class"]]), float(r["own"]), r["concepts"]) for r in feasible if r not in hit]
    print(f"{len(hit)} of {len(feasible)} classes at >= 20 % lose >= 20 points; short: {short}")
    assert len(feasible) >= 150 and len(hit) >= 0.9 * len(feasible), short


@pytest.mark.xfail(strict=True, reason="not met in every class (issue 14): 217-229 of 253 classes over SAE seeds 0-2; "
                                       "20-28 classes are below 20 % accuracy, where a 20-point drop is impossible")
def test_world2_cbm_intervention_removes_every_class(world2_interventions):
    rows = world2_interventions
    assert all(r["own"] <= Fraction(-20, 100) for r in rows)
