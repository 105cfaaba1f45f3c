"""Concept bottleneck classifier: the FISTA solver against the optimality conditions, the path to a target sparsity,
interventions, the CLI, and the ground truth on the toy world's colour x shape classes with the shipped toy CLIP.

Ground truth (issue 14 item 1, on the current ``visae.toyworld`` world: its 48 colour x shape classes,
``colour_shape`` column; the richer world of issue 12 does not exist yet): an SAE trained by ``visae.train``
with the demo's recipe on 4,500 images, named with the demo's vocabulary; the CBM on named concepts only
reaches >= 95% of the clean linear probe's top-1 with <= 5 concepts per class (met), and in >= 80% of classes
its two largest weights are on latents named by the class's colour and shape words (not met: xfail). Removing a
class's top concept lowers that class's accuracy by >= 20 points while the other classes change by <= 2 points:
met for the other classes taken together, not in every class (xfail; measured figures in BENCHMARKS.md).
"""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch

from visae.cbm import (CBMConfig, CBMError, ConceptBottleneck, fit_cbm_path, fit_sparse_logistic, intervention_effects,
                       load_cbm, refit_on_support, top_weights_name_the_class, train_cbm)
from visae.shards import ShardWriter


def _blobs(n=600, L=12, C=3, seed=0):
    """Class c is mostly decided by feature c, weakly by feature C + c; the classes overlap (not separable)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    z = torch.rand(n, L, generator=g) * 1.5
    z[torch.arange(n), y] += 1.0
    z[torch.arange(n), C + y] += 0.3
    return z.double(), y


def test_fista_meets_the_lasso_optimality_conditions():
    """KKT of mean CE + lam |W|_1: grad_jk = -lam sign(W_jk) where W_jk != 0, |grad_jk| <= lam where W_jk == 0."""
    z, y = _blobs()
    lam = 0.02
    W, b, it = fit_sparse_logistic(z, y, 3, lam, max_iter=5000, tol=1e-12)
    logits = z @ W.T + b
    p = torch.softmax(logits, 1)
    p[torch.arange(len(y)), y] -= 1
    g = p.T @ z / len(y)
    gb = p.sum(0) / len(y)
    nz = W != 0
    assert 0 < int(nz.sum()) < W.numel()
    # tolerance: the solver's stopping point, far above float64 rounding (1e-16 * N terms)
    tol = 1e-6
    assert (g[nz] + lam * torch.sign(W[nz])).abs().max() < tol, (g[nz] + lam * torch.sign(W[nz])).abs().max()
    assert g[~nz].abs().max() <= lam + tol
    assert gb.abs().max() < tol
    # the deciding feature of each class carries its largest weight
    assert torch.equal(W.argmax(1), torch.arange(3))
    # nonneg: the same problem subject to W >= 0, where the unconstrained optimum uses negative evidence
    W_free, _, _ = fit_sparse_logistic(z, y, 3, 0.005, max_iter=3000)
    W_pos, b_pos, _ = fit_sparse_logistic(z, y, 3, 0.005, max_iter=3000, nonneg=True)
    assert (W_free < 0).any() and (W_pos >= 0).all() and (W_pos > 0).any()
    # KKT with the constraint: at W = 0 the gradient may only point into W >= 0 by at most lam
    p = torch.softmax(z @ W_pos.T + b_pos, 1)
    p[torch.arange(len(y)), y] -= 1
    g = p.T @ z / len(y)
    assert (-g[W_pos == 0]).max() <= 0.005 + 1e-5


def test_refit_keeps_the_support_and_removes_the_shrinkage():
    """The relaxed lasso's refit: W stays zero off the lasso's support, and on it the weights meet the stationarity
    condition of mean CE + l2/2 |W|^2 (gradient + l2 W = 0), with a lower cross entropy than the shrunken lasso
    weights; with nonneg, weights stay >= 0. A support of the wrong shape is refused."""
    z, y = _blobs(L=30)
    W, b, _ = fit_sparse_logistic(z, y, 3, 0.05, max_iter=3000, tol=1e-12)
    support = W != 0
    assert 0 < int(support.sum()) < W.numel()
    l2 = 1e-4
    Wr, br, _ = refit_on_support(z, y, W, b, l2=l2, max_iter=20000, tol=1e-13)
    assert not Wr[~support].any()
    ce = lambda W_, b_: float(torch.nn.functional.cross_entropy(z @ W_.T + b_, y))  # noqa: E731
    assert ce(Wr, br) < ce(W, b) - 1e-3, (ce(Wr, br), ce(W, b))
    p = torch.softmax(z @ Wr.T + br, 1)
    p[torch.arange(len(y)), y] -= 1
    g = p.T @ z / len(y) + l2 * Wr
    # the solver's stopping point (weight changes < 1e-13 a step) sets the tolerance, far above float64 rounding
    assert g[support].abs().max() < 1e-6, g[support].abs().max()
    assert (p.sum(0) / len(y)).abs().max() < 1e-6
    assert float(Wr[support].abs().mean()) > float(W[support].abs().mean())  # the L1 shrinkage is gone
    Wp, bp, _ = fit_sparse_logistic(z, y, 3, 0.005, max_iter=3000, nonneg=True)
    Wpr, _, _ = refit_on_support(z, y, Wp, bp, l2=l2, nonneg=True)
    assert (Wpr >= 0).all() and not Wpr[Wp == 0].any()
    with pytest.raises(CBMError, match="support must be"):
        fit_sparse_logistic(z, y, 3, 0.01, support=support[:, :5])


def test_centred_design_products_sparse_and_dense():
    """The solver's implicit centring: (z - 1 mu^T) w and (z - 1 mu^T)^T p without forming the centred matrix, on the
    sparse CSR path (density < 5%) and the dense one, equal the explicit products; the Lipschitz constant is that of
    the centred matrix, and it is smaller than the raw one for non-negative codes."""
    from visae.cbm import _Design, _lipschitz

    g = torch.Generator().manual_seed(1)
    N, L, C = 400, 60, 5
    z = torch.rand(N, L, generator=g, dtype=torch.float64) * (torch.rand(N, L, generator=g, dtype=torch.float64) < 0.03)
    w = torch.randn(L, C, generator=g, dtype=torch.float64)
    p = torch.randn(N, C, generator=g, dtype=torch.float64)
    mu = z.mean(0)
    zc = z - mu
    for dens in (0.05, 0.0):  # sparse CSR (measured density ~3%), then dense (no density is below 0)
        d = _Design(z, max_density=dens, mu=mu)
        assert d.sparse == (dens == 0.05)
        # float64 sums of n terms err by <= n eps sum|terms| (Higham 3.1); three such sums (z w, mu w, the explicit
        # (z - mu) w with its rounded entries) share the bound 3 n eps (|z| + |mu|) |w|
        eps = 2.0 ** -52
        bound_mm = 3 * L * eps * ((z.abs() + mu.abs()) @ w.abs()).max()
        bound_tmm = 3 * N * eps * ((z.abs() + mu.abs()).T @ p.abs()).max()
        assert (d.mm(w) - zc @ w).abs().max() <= bound_mm, ((d.mm(w) - zc @ w).abs().max(), bound_mm)
        assert (d.tmm(p) - zc.T @ p).abs().max() <= bound_tmm, ((d.tmm(p) - zc.T @ p).abs().max(), bound_tmm)
    true_c = 0.5 * float(torch.linalg.matrix_norm(zc, ord=2)) ** 2 / N
    true_raw = 0.5 * float(torch.linalg.matrix_norm(z, ord=2)) ** 2 / N
    lip = _lipschitz(z, iters=200, mu=mu)
    # power iteration: a Rayleigh quotient of (z - mu)^T (z - mu), so never above the largest eigenvalue (rounding
    # of N x L products aside), and close to it here (printed)
    print(f"power iteration {lip:.6g}, sigma_max^2/(2N) of the centred matrix {true_c:.6g}, of the raw one {true_raw:.6g}")
    assert lip <= true_c * (1 + 4 * N * L * 2.0 ** -52) + 1e-12  # + the 1e-12 _lipschitz adds
    assert true_c < true_raw  # non-negative codes: centring lowers the Lipschitz constant


def test_path_stops_at_the_target_and_elastic_net_is_denser():
    z, y = _blobs(L=30)
    fit = fit_cbm_path(z, y, 3, target=2.0, n_lambdas=12, bisect_steps=6)
    cpc = [r["concepts_per_class"] for r in fit["path"]]
    assert fit["concepts_per_class"] <= 2.0 and fit["concepts_per_class"] == max(c for c in cpc if c <= 2.0)
    assert any(c > 2.0 for c in cpc)  # the path went past the target and bisected back
    assert fit["path"][0]["concepts_per_class"] == 0  # lam_max: every weight zero
    W1, _, _ = fit_sparse_logistic(z, y, 3, 0.02, alpha=1.0, max_iter=2000)
    W2, _, _ = fit_sparse_logistic(z, y, 3, 0.02 / 0.5, alpha=0.5, max_iter=2000)  # same L1 weight, plus L2
    assert int((W2 != 0).sum()) >= int((W1 != 0).sum())
    assert float(W2.abs().max()) < float(W1.abs().max())  # L2 shrinks


def test_interventions_and_explanations():
    W = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    m = ConceptBottleneck(W=W, b=torch.zeros(2), latents=torch.tensor([7, 3, 9]), scale=torch.tensor([1.0, 2.0, 1.0]),
                          names=["red", "circle", "star"], classnames=["a", "b"])
    codes = torch.zeros(2, 10)
    codes[0, 7], codes[0, 3] = 1.0, 2.0  # class a: 2.0 vs b: 1.0
    codes[1, 3], codes[1, 9] = 4.0, 1.0  # b
    assert m.predict(codes).tolist() == [0, 1]
    assert m.predict(codes, remove=[7]).tolist() == [1, 1]  # without "red" example 0 goes to b
    assert m.predict(codes, clamp={7: 5.0}).tolist() == [0, 0]
    assert m.class_concepts(1) == [{"latent": 3, "name": "circle", "weight": 1.0},
                                   {"latent": 9, "name": "star", "weight": 0.5}]
    ex = m.explain(codes, top=1)
    assert ex[0]["pred_name"] == "a" and ex[0]["concepts"] == [{"latent": 7, "name": "red", "contribution": 2.0}]
    assert ex[1]["concepts"][0]["name"] == "circle" and ex[1]["concepts"][0]["contribution"] == 2.0
    with pytest.raises(CBMError, match="latent 5 is not one of"):
        m.predict(codes, remove=[5])
    # a name held by two latents: removing the concept by name removes both
    m2 = ConceptBottleneck(W=torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.5]]), b=torch.zeros(2),
                           latents=torch.tensor([7, 3, 9]), scale=torch.ones(3), names=["red", "red", "star"],
                           classnames=["a", "b"])
    codes2 = torch.zeros(1, 10)
    codes2[0, 7], codes2[0, 3], codes2[0, 9] = 1.0, 1.0, 1.0  # a: 2.0 vs b: 0.5
    assert m2.latents_named("red") == [7, 3]
    assert m2.predict(codes2, remove=[7]).tolist() == [0]  # one "red" latent removed: a 1.0 vs b 0.5
    assert m2.predict(codes2, remove=m2.latents_named("red")).tolist() == [1]
    with pytest.raises(CBMError, match="no concept of the CBM is named 'blue'"):
        m2.latents_named("blue")


def test_cbm_json_commits_the_other_files(tmp_path, monkeypatch):
    """cbm.json is written last and records the other files' SHA-256: a run killed before it leaves the earlier
    cbm.json beside new weights / explanations, which load_cbm refuses instead of mixing two runs; damage is named."""
    from pathlib import Path

    import visae.atomic
    from visae.cbm import load_cbm

    def model(sign):
        return ConceptBottleneck(W=sign * torch.tensor([[2.0, 0.0], [0.0, 1.0]]), b=torch.zeros(2),
                                 latents=torch.tensor([7, 3]), scale=torch.ones(2), names=["red", "circle"],
                                 classnames=["a", "b"])

    out = tmp_path / "cbm"
    model(1.0).save(out, {"note": "first"}, files={"examples.jsonl": b'{"index": 0}\n'})
    m, doc = load_cbm(out)
    assert doc["note"] == "first" and set(doc["files"]) == {"cbm.safetensors", "examples.jsonl"}
    assert torch.equal(m.W, model(1.0).W)
    first = (out / "cbm.json").read_bytes()
    real = visae.atomic.atomic_write_text

    def killed(path, text, *a, **k):
        if Path(path).name == "cbm.json":
            raise KeyboardInterrupt
        return real(path, text, *a, **k)

    monkeypatch.setattr(visae.atomic, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):  # the second run: its weights and examples written, killed before cbm.json
        model(-1.0).save(out, {"note": "second"}, files={"examples.jsonl": b'{"index": 1}\n'})
    monkeypatch.undo()
    assert (out / "cbm.json").read_bytes() == first
    with pytest.raises(CBMError, match=r"cbm.safetensors does not belong to it .*rerun visae cbm"):
        load_cbm(out)
    model(1.0).save(out, {"note": "third"})  # a finished run commits its own files again
    assert load_cbm(out)[1]["note"] == "third"
    model(1.0).save(out, {"note": "fourth"}, files={"examples.jsonl": b"{}\n"})
    (out / "examples.jsonl").unlink()  # explanations deleted on purpose: the model still loads
    assert load_cbm(out)[1]["note"] == "fourth"
    (out / "cbm.json").write_text("{")
    with pytest.raises(CBMError, match="cbm.json is not valid JSON"):
        load_cbm(out)


# ----------------------------------------------------------------------------- the toy world, once per module


# The toy world's CBM is built once per module (about 70 s of CPU on an idle core: 6,000 images sampled and embedded,
# the demo-recipe SAE, naming, the CBM path with 100 FISTA steps a point, the probe and zero-shot) and shared by the
# ground-truth tests and the command-line test. The figures are in BENCHMARKS.md.


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_world_embeddings):
    return _toy(tmp_path_factory.mktemp("cbm"), toy_world_embeddings, n_val=1500, num_epochs=None, max_iter=100)


def _toy(tmp, emb, *, n_val, num_epochs, max_iter):
    from visae import toyworld as tw
    from visae.demo import DemoConfig, toy_vocabulary
    from visae.config import load_yaml_config
    from visae.resources import config_yaml
    from visae.naming import NameConfig, name_concepts
    from visae.train import TrainConfig, train

    bb, world, source = emb["backbone"], emb["world"], emb["source"]  # conftest: 6,000 images of world seed 5000
    x = emb["x"].numpy()
    n = len(x)
    names = list(tw.FACTORS)
    dirs = {}
    for split, sl in (("train", slice(0, n - n_val)), ("val", slice(n - n_val, n))):
        dirs[split] = tmp / split
        with ShardWriter(dirs[split], d=x.shape[1], source=source, label_names={k: list(v) for k, v in tw.FACTORS.items()},
                         columns={k: "int64" for k in names}) as w:
            idx = np.arange(n)[sl]
            w.add(x[sl], ids=[f"{i:06d}" for i in idx], columns={k: world.factors[sl, i] for i, k in enumerate(names)})
    demo = load_yaml_config(DemoConfig, config_yaml("demo_toy.yaml"))  # the first toy world's demo
    sae_dir = train(TrainConfig(shards=str(dirs["train"]), out=str(tmp / "sae"), architecture=demo.sweep.train.architecture,
                                expansion_factor=max(demo.sweep.expansion_factors), lr=max(demo.sweep.lrs),
                                l1_coeff=min(demo.sweep.l1_coeffs), num_epochs=num_epochs or demo.sweep.train.num_epochs,
                                batch_size=demo.sweep.train.batch_size,
                                seed=demo.seed, progress=False, plot=False))
    vfile = tmp / "vocab.txt"
    vfile.write_text("\n".join(toy_vocabulary(demo.n_distractors)))
    concepts = name_concepts(NameConfig(sae=str(sae_dir), vocab=str(vfile), vocab_size=0, stopwords=False,
                                        subtract_mean=demo.naming.subtract_mean, out=str(tmp / "concepts"), text_cache=None),
                             backbone=bb)
    cfg = CBMConfig(sae=str(sae_dir), concepts=str(concepts), train_shards=str(dirs["train"]),
                    val_shards=str(dirs["val"]), label_column="colour_shape", out=str(tmp / "cbm"),
                    text_cache=str(tmp / "text_cache"), max_iter=max_iter,  # 100 FISTA steps a point: 98.2% measured
                    # the lasso's own weights: on this world, whose classes several redundant concepts separate, the
                    # refit (the default) gains 0.8 points (99.0%) but spreads each class's evidence over its ~5
                    # concepts, so removing the top one lowers the median class by 9.1 points instead of 30.7
                    # (BENCHMARKS.md, "Concept bottleneck classifier on the toy world"); the refit is tested on its own
                    # (test_refit_keeps_the_support_and_removes_the_shrinkage) and measured on world2
                    refit=False)
    res = train_cbm(cfg)
    return {"cfg": cfg, "res": res, "dirs": dirs, "sae": sae_dir, "concepts": concepts, "tmp": tmp}


def _top2_named_right(toy):
    """(fraction of classes passing, per-class rows) of :func:`visae.cbm.top_weights_name_the_class` on the toy CBM:
    a class "red square" passes when its two largest weights are on latents named "red" and "square" (or synonyms,
    ``recovery.name_matches``)."""
    from visae.recovery import name_matches

    model, _ = load_cbm(toy["cfg"].out)
    rows = top_weights_name_the_class(model, lambda cname: list(zip(("colour", "shape"), cname.split(" "))),
                                      lambda name, factor, value: name_matches(name, value))
    return float(np.mean([r["ok"] for r in rows])), rows


def _summary(toy):
    res = toy["res"]
    t = res["top1"]
    frac, rows = _top2_named_right(toy)
    return (f"CBM top-1 {t['cbm']:.3f}, linear probe {t['linear_probe']:.3f}, zero-shot {t['zero_shot']}, "
            f"{res['concepts_per_class']:.2f} concepts/class, {res['num_candidate_concepts']} named candidates; "
            f"top-2 = colour + shape in {frac:.2f} of classes; misses: {[(r['name'], r['top']) for r in rows if not r['ok']][:8]}")


def test_toy_world_accuracy_and_sparsity(toy):
    """>= 95% of the clean linear probe's top-1 with <= 5 concepts per class, named concepts only. Measured with SAE
    seeds 0 / 1 / 2 (2026-12-01, AVX512 machine): 0.985 / 0.985 / 0.988 x the probe (99.5 %), 4.92 / 4.69 / 4.77
    concepts per class; removing a class's top concept lowers the median class by 30.8 / 52.7 / 45.1 points, the
    other classes pooled by <= 0.27 (the intervention tests below)."""
    res = toy["res"]
    t = res["top1"]
    msg = _summary(toy)
    print(msg)
    assert res["num_classes"] == 48 and res["n_val"] == 1500
    assert res["concepts_per_class"] <= 5.0, msg
    assert t["cbm"] >= 0.95 * t["linear_probe"], msg
    assert t["zero_shot"] is not None and 0.0 < t["zero_shot"] <= 1.0, msg
    # every concept the CBM uses is a named latent
    assert all(x["name"] for c in res["classes"] for x in c["concepts"])


@pytest.mark.xfail(strict=True, reason="not met yet: with the demo-recipe SAE the CBM's largest weights sit on "
                                       "latents whose names are not the class's words (conjunction latents named "
                                       "'on the right', 'two', ...); measured 8% of classes, target 80%")
def test_toy_world_top_weights_are_the_class_words(toy):
    """In >= 80% of classes the two largest weights are on latents named by the class's colour and shape words."""
    frac, _ = _top2_named_right(toy)
    assert frac >= 0.8, _summary(toy)


def _interventions(toy):
    """Per class c of the toy CBM: remove c's top concept (the latent of largest |weight| in row c, the first concept
    on c's class page) from every validation example and predict again. Returns rows (class, concept, own accuracy
    change, largest |change| of a class not using that latent, change of those classes' images pooled, users)."""
    from visae.recovery import collect_codes
    from visae.sae import load_sae
    from visae.shards import ShardSet

    model, doc = load_cbm(toy["cfg"].out)
    sae = load_sae(toy["sae"])
    val = ShardSet(toy["dirs"]["val"])
    rows, cols, vals = collect_codes(sae, val)
    codes = torch.zeros(len(val), sae.d_sae)
    codes[torch.from_numpy(rows), torch.from_numpy(cols)] = torch.from_numpy(vals).float()
    y = torch.from_numpy(val.metadata()["colour_shape"].astype(np.int64))
    # cbm.intervention_effects: accuracies as exact fractions of image counts, compared without rounding
    res = intervention_effects(model, codes, y)
    assert len(res) == len(doc["classnames"])  # every class has validation images and concepts
    return [{"class": r["name"], "concept": r["concepts"][0], "own": r["own"], "other_max": r["other_max"],
             "other_pooled": r["other_pooled"], "users": r["users"]} for r in res]


TWENTY, TWO = Fraction(20, 100), Fraction(2, 100)


def _iv_summary(rows):
    own = [r["own"] for r in rows]
    return (f"own accuracy lowered by >= 20 points in {sum(o <= -TWENTY for o in own)}/{len(rows)} classes (median "
            f"{-100 * float(np.median([float(o) for o in own])):.1f} points); every class not using the removed latent "
            f"within 2 points in {sum(r['other_max'] <= TWO for r in rows)}/{len(rows)} (worst "
            f"{100 * float(max(r['other_max'] for r in rows)):.1f}); those classes pooled: worst "
            f"{100 * float(max(abs(r['other_pooled']) for r in rows)):.2f} points; short: "
            + "; ".join(f"{r['class']} {100 * float(r['own']):+.1f} ({r['concept']})" for r in rows if r["own"] > -TWENTY))


@pytest.fixture(scope="module")
def interventions(toy):
    return _interventions(toy)


def test_toy_world_intervention_leaves_the_classes_not_using_the_concept(interventions):
    """Removing a class's top concept changes the accuracy of the classes that do not use that latent, taken
    together (their validation images pooled), by <= 2 points; and the class's own accuracy drops by >= 20 points in
    the median class (a guard, not the issue's target: that is per class, the xfail test below)."""
    msg = _iv_summary(interventions)
    print(msg)
    assert len(interventions) == 48
    for r in interventions:
        assert abs(r["other_pooled"]) <= TWO, (r, msg)
    assert np.median([float(r["own"]) for r in interventions]) <= -0.20, msg


@pytest.mark.xfail(strict=True, reason="not met in every class (issue 14): removing the top concept lowers the class's "
                                       "accuracy by >= 20 points in 37 of 48 classes and leaves every other class "
                                       "within 2 points in 34 of 48 (worst 5.9 points: 2 of ~34 images); the short "
                                       "classes spread their evidence over several concepts of similar weight "
                                       "(BENCHMARKS.md)")
def test_toy_world_intervention_removes_one_class(interventions):
    """Issue 14's target, per class: removing a class's top concept lowers that class's accuracy by >= 20 points
    while every class not using that concept changes by <= 2 points (classes sharing the latent are excluded:
    removing a concept is meant to hit every class that uses it)."""
    msg = _iv_summary(interventions)
    for r in interventions:
        assert r["own"] <= -TWENTY, msg
        assert r["other_max"] <= TWO, msg


def test_cli_and_errors(toy, tmp_path, capsys, monkeypatch):
    import os

    from visae.cli import main

    cfg = toy["cfg"]
    out = tmp_path / "cbm"
    monkeypatch.chdir(tmp_path)  # relative paths on the command line: the record holds them absolute
    rc = main(["cbm", "--sae", os.path.relpath(cfg.sae), "--concepts", cfg.concepts, "--train_shards", cfg.train_shards,
               "--val_shards", cfg.val_shards, "--label_column", "colour_shape", "--target_concepts_per_class", "2",
               "--no_zero_shot", "--max_iter", "30", "--n_lambdas", "6", "--bisect_steps", "2", "--out", "cbm"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "concepts per class" in text and "linear probe" in text
    doc = json.loads((out / "cbm.json").read_text())
    assert doc["sae"] == doc["config"]["sae"] == os.path.abspath(cfg.sae) and doc["config"]["out"] == str(out)
    assert doc["concepts_per_class"] <= 2.0 and doc["top1"]["zero_shot"] is None
    # the default refit ran on the path's support and is recorded with the lasso's accuracy beside it
    assert doc["refit"]["done"] and doc["refit"]["l2"] == 1e-4 and doc["refit"]["iterations"] >= 1
    assert doc["top1"]["cbm"] == doc["refit"]["val_top1"]["refit"] and "before the refit" in text
    lines = (out / "examples.jsonl").read_text().splitlines()
    assert len(lines) == 200 and json.loads(lines[0])["concepts"]
    # bad input: named errors, nothing written
    bad = tmp_path / "bad"
    assert main(["cbm", "--sae", cfg.sae, "--train_shards", cfg.train_shards, "--val_shards", cfg.val_shards,
                 "--label_column", "colour_shape", "--out", str(bad)]) == 2
    assert "needs --concepts" in capsys.readouterr().err
    assert main(["cbm", "--sae", cfg.sae, "--concepts", cfg.concepts, "--train_shards", cfg.train_shards,
                 "--val_shards", cfg.val_shards, "--label_column", "nope", "--out", str(bad)]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    assert main(["cbm", "--sae", cfg.sae, "--concepts", cfg.concepts, "--train_shards", cfg.train_shards,
                 "--val_shards", cfg.val_shards, "--label_column", "colour_shape", "--refit_l2", "-1", "--out", str(bad)]) == 2
    assert "refit_l2" in capsys.readouterr().err
    assert main(["cbm", "--sae", cfg.sae, "--concepts", cfg.concepts, "--train_shards", cfg.train_shards,
                 "--val_shards", cfg.val_shards, "--label_column", "colour_shape", "--n_lambdas", "1",
                 "--out", str(bad)]) == 2  # one path point is lam_max: a CBM of no concept, reported as a result
    assert "n_lambdas must be >= 2" in capsys.readouterr().err
    assert not bad.exists()


def test_names_of_another_sae_are_refused_before_any_work(toy, tmp_path, capsys, caplog):
    """The newcomer's report: `visae cbm` and `visae browse` took a naming result made for another SAE of the same size
    and showed its names on this SAE's latents. Names are tied to the SAE by its weights' SHA-256 (concepts.json
    ``sae_weights_sha256``): another SAE (the same one with its decoder negated) is refused by cbm, browse and
    recovery, naming the file, before anything is written; a copy of the same SAE (as a sweep's best/) is accepted;
    the same shard set for training and validation is warned about."""
    import shutil

    from visae.browse import BrowseConfig, build_site
    from visae.cli import main
    from visae.naming import NameConfig, NamingError, check_concepts_sae, read_concepts, sae_weights_sha256
    from visae.recovery import concept_recovery
    from visae.sae import load_sae

    cfg = toy["cfg"]
    doc = read_concepts(cfg.concepts)
    assert doc["sae_weights_sha256"] == sae_weights_sha256(cfg.sae) is not None
    other = load_sae(cfg.sae)
    with torch.no_grad():
        other.W_dec.neg_()
    other.save(tmp_path / "other")
    assert sae_weights_sha256(tmp_path / "other") != doc["sae_weights_sha256"]
    bad = tmp_path / "bad"
    assert main(["cbm", "--sae", str(tmp_path / "other"), "--concepts", cfg.concepts, "--train_shards", cfg.train_shards,
                 "--val_shards", cfg.val_shards, "--label_column", "colour_shape", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"--concepts {cfg.concepts}" in err and "names the latents of another SAE" in err
    assert "--concepts: --concepts" not in err  # the flag named once
    with pytest.raises(NamingError, match="names the latents of another SAE"):
        build_site(BrowseConfig(concepts=cfg.concepts, out=str(bad), naming=NameConfig(sae=str(tmp_path / "other"))))
    with pytest.raises(NamingError, match="names the latents of another SAE"):
        concept_recovery(str(tmp_path / "other"), toy["dirs"]["val"], concepts=cfg.concepts)
    with pytest.raises(NamingError, match="names member 0 of its SAE, but member 1"):
        check_concepts_sae(doc, cfg.sae, 1, "x")
    assert not bad.exists()
    copy = shutil.copytree(cfg.sae, tmp_path / "copy")
    check_concepts_sae(doc, copy, 0, "x")  # the same weights elsewhere: accepted
    small = CBMConfig(sae=str(copy), concepts=cfg.concepts, train_shards=cfg.train_shards, val_shards=cfg.train_shards,
                      label_column="colour_shape", zero_shot=False, max_iter=30, n_lambdas=4, bisect_steps=1,
                      target_concepts_per_class=2.0, refit=False, out=str(tmp_path / "same"))
    with pytest.warns(UserWarning, match="same shard set"):
        res = train_cbm(small)
    # the CBM records the SAE's digest too: browse --cbm refuses it beside another SAE, takes it beside a copy
    from visae.browse import read_site_cbm

    assert res["sae_weights_sha256"] == doc["sae_weights_sha256"]
    read_site_cbm(small.out, None, 0, cfg.sae)
    with pytest.raises(CBMError, match="a CBM of another SAE"):
        read_site_cbm(small.out, None, 0, tmp_path / "other")
    # a rerun into the same directory with other settings says what changed before it replaces the CBM
    import dataclasses
    import logging

    with caplog.at_level(logging.WARNING, logger="visae.cbm"), pytest.warns(UserWarning, match="same shard set"):
        train_cbm(dataclasses.replace(small, target_concepts_per_class=1.0, n_lambdas=3))
    msgs = [r.getMessage() for r in caplog.records if "holds a CBM made with other settings" in r.getMessage()]
    assert len(msgs) == 1 and "target_concepts_per_class: 2.0 -> 1.0" in msgs[0] and "n_lambdas: 4 -> 3" in msgs[0], msgs


def test_train_and_val_sets_must_name_their_classes_alike(toy, tmp_path):
    """A validation set whose manifest names the classes otherwise than the training set's (other classes, or the same
    in another order) is refused before any work: label i would be one class in training and another in validation.
    A set that names none is taken as meaning the other's classes, with a warning (the newcomer's report: a training
    set without names and a validation set with 1,000 ImageNet names passed without a word)."""
    import shutil

    cfg = toy["cfg"]
    for kind in ("reversed", "none"):
        val = shutil.copytree(cfg.val_shards, tmp_path / f"val_{kind}")
        man = json.loads((val / "manifest.json").read_text())
        names = man["label_names"]["colour_shape"]
        if kind == "reversed":
            man["label_names"]["colour_shape"] = names[::-1]
        else:
            del man["label_names"]["colour_shape"]
        (val / "manifest.json").write_text(json.dumps(man))
        small = CBMConfig(sae=cfg.sae, concepts=cfg.concepts, train_shards=cfg.train_shards, val_shards=str(val),
                          label_column="colour_shape", zero_shot=False, max_iter=30, n_lambdas=4, bisect_steps=1,
                          target_concepts_per_class=2.0, refit=False, out=str(tmp_path / f"cbm_{kind}"))
        if kind == "reversed":
            with pytest.raises(CBMError, match=f"name their 'colour_shape' labels otherwise .*label 0 is {names[0]!r} "
                                               f"vs {names[-1]!r}"):
                train_cbm(small)
            assert not (tmp_path / "cbm_reversed").exists()
        else:
            with pytest.warns(UserWarning, match="only the training set names its 'colour_shape' labels"):
                res = train_cbm(small)
            assert res["classes"][0]["name"] == names[0]
