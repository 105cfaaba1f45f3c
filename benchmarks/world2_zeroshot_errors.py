"""Where does world2's toy CLIP miss the 0.90 zero-shot target? The errors of colour family, shape and texture.

    python benchmarks/world2_zeroshot_errors.py [--weights W.safetensors] [--n 1000] [--seed 1000] [--threads 2]

On ``--n`` held-out single-object scenes of world seed ``--seed`` (the toy CLIP cards' evaluation: 1,000 scenes of
seed 1000), drawn by both renderers (PIL and renderer 2, scikit-image), with the zero-shot classifiers of
``visae.world2.classnames_and_templates`` (issue 12, item 3):

  colour family  accuracy; for each error the CIEDE2000 distance from the object's named colour to the nearest named
                 colour of the *predicted* family (how far the answer is from being a colour of that family), and the
                 accuracy split by whether the object's colour lies within CIEDE2000 <= 10 (the issue's threshold for
                 an accepted colour name) of a named colour of another family: how much of the shortfall lies at the
                 world's family boundaries (``world2.family_of_rgb``, an HSV rule over the XKCD / CSS colours);
                 Also the ceiling that the training labels set: an ideal colour-only classifier trained on the
                 named colours' (nominal) families under the recipe's colour jitter of 12 (:func:`nominal_label_ceiling`);
  shape, texture accuracy by size bucket and the most confused pairs (both directions counted together);
  counts, relations (reported without a target): ``--n`` scenes of up to 4 objects (world seed ``--seed`` + 1, PIL):
                 zero-shot object count, and the relation of the second object to the first among the 4 captions
                 "a S2 {left of, right of, above, below} a S" with the true shapes (chance 0.25).

Figures are this model's on these scenes; a boundary-tolerant accuracy is reported beside the strict one as a
diagnosis, not as the target (the target is the strict accuracy).
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np
import torch


def nominal_label_ceiling(colour_idx: np.ndarray, jitter: float) -> float:
    """Accuracy on objects of named colours ``colour_idx`` [n] (drawn without jitter, as the held-out scenes are)
    of the ideal colour-only classifier trained on world2's *nominal* family labels with uniform per-channel RGB
    jitter ``jitter``: at a drawn colour x it answers the family with the most training mass there, the sum over the
    named colours c whose jitter box contains x of P(c) (family uniform, then colour uniform within it, as
    ``world2.sample_scene`` draws). With ``jitter`` 0 it is 1; with jitter, boxes of colours of other families cover a
    named colour near a family boundary and outweigh its own family there."""
    from visae import world2 as w2

    _, rgb = w2.named_colours()
    rgb, fam = rgb.astype(np.float64), w2.colour_families()
    F = len(w2.FAMILIES)
    prior = np.zeros(len(rgb))
    for f in range(F):
        members = np.flatnonzero(fam == f)
        prior[members] = 1.0 / F / len(members)
    right = np.zeros(len(rgb), bool)
    for i in np.unique(colour_idx):
        inbox = np.all(np.abs(rgb - rgb[i]) <= jitter, axis=1)
        mass = np.bincount(fam[inbox], weights=prior[inbox], minlength=F)
        right[i] = mass.argmax() == fam[i]
    return float(right[colour_idx].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=None, help="v2 toy CLIP weights (.safetensors); default: world2's shipped model")
    ap.add_argument("--model", default=None, help="architecture; default: the weights' metadata, or world2's model")
    ap.add_argument("--n", type=int, default=1000, help="held-out scenes")
    ap.add_argument("--seed", type=int, default=1000, help="world seed of the held-out scenes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from skimage.color import deltaE_ciede2000

    from visae import world2 as w2
    from visae.toyclip import WORLD2_MODEL, _class_embeddings, create_toyclip, encode_world_images, load_toyclip2, \
        recorded_model

    if a.weights:
        model, _, tok = create_toyclip(a.weights, model=a.model or recorded_model(a.weights) or WORLD2_MODEL)
    else:
        model, _, tok = load_toyclip2()
    model.eval()
    scenes = w2.sample_scenes(a.n, a.seed, max_objects=1, occlusion=0.0)
    _, rgb = w2.named_colours()
    lab, fam = w2.rgb_to_lab(rgb), w2.colour_families()
    bms = w2.classnames_and_templates()
    out: dict = {"n": a.n, "seed": a.seed, "weights": a.weights or "shipped"}
    for renderer in ("pil", "skimage"):
        imgs, _, rows = w2._render_rows(scenes, renderer, w2.IMAGE_SIZE)
        with torch.no_grad():
            img = encode_world_images(model, imgs)
        size = rows[:, w2.FACTOR_INDEX["size"]]
        res: dict = {}
        for fac in ("colour_family", "shape", "texture"):
            b = bms[fac]
            with torch.no_grad():
                pred = (img @ _class_embeddings(model, tok, b["classnames"], b["templates"]).T).argmax(1).numpy()
            y = rows[:, w2.FACTOR_INDEX[b["column"]]]
            err = np.nonzero(pred != y)[0]
            r = {"accuracy": round(float((pred == y).mean()), 4),
                 "by_size": {w2.SIZES[k]: round(float((pred[size == k] == y[size == k]).mean()), 4)
                             for k in range(len(w2.SIZES)) if (size == k).any()},
                 "errors": int(len(err))}
            pairs = collections.Counter(tuple(sorted((b["classnames"][y[i]], b["classnames"][pred[i]]))) for i in err)
            r["top_pairs"] = [[p[0], p[1], c] for p, c in pairs.most_common(8)]
            if fac == "colour_family":
                col = rows[:, w2.FACTOR_INDEX["colour"]]
                d = np.array([deltaE_ciede2000(lab[col[i]][None], lab[fam == pred[i]]).min() for i in err])
                near = np.array([deltaE_ciede2000(lab[c][None], lab[fam != fam[c]]).min() <= 10 for c in col])
                r.update({"errors_answer_within_dE10": int((d <= 10).sum()), "errors_answer_within_dE5": int((d <= 5).sum()),
                          "median_dE_of_errors": round(float(np.median(d)), 2) if len(d) else None,
                          "scenes_near_a_boundary": int(near.sum()),
                          "accuracy_near_a_boundary": round(float((pred[near] == y[near]).mean()), 4),
                          "accuracy_elsewhere": round(float((pred[~near] == y[~near]).mean()), 4) if (~near).any() else None,
                          "accuracy_boundary_tolerant": round(float(((pred == y).sum() + (d <= 10).sum()) / len(y)), 4),
                          "ceiling_nominal_labels_jitter12": round(nominal_label_ceiling(col, 12.0), 4)})
            res[fac] = r
            print(f"{renderer:8s} {fac:14s} accuracy {r['accuracy']:.3f}  by size "
                  + " / ".join(f"{v:.3f}" for v in r["by_size"].values())
                  + f"  errors {r['errors']}; most confused: "
                  + ", ".join(f"{p}/{q} {c}" for p, q, c in r["top_pairs"][:5]), flush=True)
            if fac == "colour_family":
                print(f"{'':8s} {'':14s} errors whose answer has a colour within dE 10 (5) of the object's: "
                      f"{r['errors_answer_within_dE10']} ({r['errors_answer_within_dE5']}) of {r['errors']}; scenes "
                      f"within dE 10 of another family: {r['scenes_near_a_boundary']} of {a.n}, accuracy there "
                      f"{r['accuracy_near_a_boundary']:.3f}, elsewhere {r['accuracy_elsewhere']}; boundary-tolerant "
                      f"accuracy {r['accuracy_boundary_tolerant']:.3f}; an ideal colour-only classifier trained on "
                      f"the nominal family labels with the recipe's colour jitter 12 scores "
                      f"{r['ceiling_nominal_labels_jitter12']:.3f} on these scenes", flush=True)
        out[renderer] = res
    # counts and relations (reported without a target, issue 12 item 3): scenes of up to 4 objects, 30 % occlusion
    # (the world's defaults), PIL. Relation: for each scene with a second object, its 4 captions "a S2 R a S" (R in
    # left of / right of / above / below, the true shapes) as the classes, chance 0.25.
    multi = w2.sample_scenes(a.n, a.seed + 1)
    imgs, _, rows = w2._render_rows(multi, "pil", w2.IMAGE_SIZE)
    with torch.no_grad():
        img = encode_world_images(model, imgs)
        b = bms["n_objects"]
        pred = (img @ _class_embeddings(model, tok, b["classnames"], b["templates"]).T).argmax(1).numpy()
    y = rows[:, w2.FACTOR_INDEX["n_objects"]]
    out["n_objects"] = {"accuracy": round(float((pred == y).mean()), 4), "n": int(len(y)), "chance": 1 / len(w2.COUNTS),
                        "by_count": {w2.COUNTS[k]: round(float((pred[y == k] == y[y == k]).mean()), 4)
                                     for k in range(len(w2.COUNTS)) if (y == k).any()}}
    rel = np.nonzero(rows[:, w2.FACTOR_INDEX["relation"]] != w2.ABSENT)[0]
    caps = [[f"{w2._a(w2.SHAPES[rows[i, w2.FACTOR_INDEX['shape2']]])} {r} {w2._a(w2.SHAPES[rows[i, w2.FACTOR_INDEX['shape']]])}"
             for r in w2.RELATIONS] for i in rel]
    uniq = sorted({c for cs in caps for c in cs})
    with torch.no_grad():
        emb = _class_embeddings(model, tok, uniq, ["{}"])
    at = {c: k for k, c in enumerate(uniq)}
    ok = [int((img[i] @ emb[[at[c] for c in cs]].T).argmax()) == rows[i, w2.FACTOR_INDEX["relation"]]
          for i, cs in zip(rel, caps)]
    out["relation"] = {"accuracy": round(float(np.mean(ok)), 4) if ok else None, "n": len(ok), "chance": 0.25}
    print(f"pil      n_objects      accuracy {out['n_objects']['accuracy']:.3f} (chance 0.25) by count "
          + " / ".join(f"{k} {v:.3f}" for k, v in out["n_objects"]["by_count"].items())
          + f"; relation accuracy {out['relation']['accuracy']} on {len(ok)} scenes with two or more objects "
          "(chance 0.25)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
