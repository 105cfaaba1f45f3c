"""Ground truth for patch heatmaps: does a patch-token SAE's concept fire on the object that has it?

On a toy-world shard set of patch tokens (``visae extract --source toyworld --layer L --token patch``:
ids ``<image id>#p<j>``, factor columns in the metadata) and an SAE trained on it, for every value of
the world's factors:

- **image-level AUROC** of every latent at detecting the value, the image's score being the maximum
  (or mean: ``image_score``) of the latent over the image's patches, the score the site ranks images
  by (``visae.topimages``). For the object factors (``shape``, ``colour``) an image is a positive when
  *any* of its objects has the value (the main one or the second, small one: ``colour2`` / ``shape2``):
  a colour latent fires on the red object's patches whichever object is red; counting an image with a
  small red second object as a negative of "red" would cap every red latent's AUROC near
  1 - 0.25 / 8 / (7 / 8) = 0.96 however well it localises. Other factors use their column as it is.
- **heat mass in the box**, for every (object value, latent) with AUROC >= ``auroc_at``: over the
  latent's top images as the site shows them (``compute_top_images``, the same streaming pass and the
  same per-patch heatmaps ``top_heat``), the share of the heat that lies on the boxes of the objects
  that have the value (``toyworld.object_boxes``, replayed from the factors and the world seed),
  area-weighted: a patch's heat counts by the fraction of the patch's area inside the boxes (a patch
  half inside counts half), pooled over the top images. Also reported: the share on patches that
  touch a box at all (``heat_touching``) and the share of top images whose hottest patch touches one
  (``peak_on_box``).

Background values (plain / striped / dotted) fire on patches of background, which overlap no object:
right, and not part of the heat criterion (it is about the object's colour and shape); their AUROC is
reported like every other value's.

Issue 14 item 2's criterion: at least 5 object values (colour and shape among them) with a latent of
AUROC >= 0.95 whose area-weighted heat mass in the box is >= 0.8 (``summary["passing"]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from visae.shards import ShardSet

__all__ = ["OBJECT_FACTORS", "box_coverage", "image_scores", "heat_in_boxes", "patch_recovery", "format_patch_recovery"]

OBJECT_FACTORS = ("shape", "colour")


def box_coverage(boxes: np.ndarray, grid: Sequence[int], image_size: int) -> np.ndarray:
    """Fraction of each patch's area inside the union of boxes.

    Args:
        boxes: int [n, K, 4] pixel boxes ``(x0, y0, x1, y1)`` (``toyworld.object_box``: columns x0 .. x1-1,
            rows y0 .. y1-1); a box whose x0 is -1 is absent.
        grid: (rows, cols) of the patch grid; the image is ``image_size`` pixels square and divides into it.

    Returns:
        float64 [n, rows * cols], row-major patch order (the order of ``<id>#p<j>`` rows).
    """
    boxes = np.asarray(boxes, np.int64)
    R, C = int(grid[0]), int(grid[1])
    if R <= 0 or C <= 0 or image_size % R or image_size % C:
        raise ValueError(f"patch grid {R}x{C} does not divide a {image_size}-pixel image")
    mask = np.zeros((len(boxes), image_size, image_size), bool)
    for i, bs in enumerate(boxes):
        for x0, y0, x1, y1 in bs:
            if x0 >= 0:
                mask[i, y0:y1, x0:x1] = True
    ph, pw = image_size // R, image_size // C
    return mask.reshape(len(boxes), R, ph, C, pw).mean((2, 4)).reshape(len(boxes), R * C)


def image_scores(sae: Any, shards: ShardSet, *, image_score: str = "max", batch_size: int = 8192,
                 device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every image's score for every latent on a patch-token shard set.

    Rows are fed as stored (like ``compute_top_images``). Returns ``(scores [n_images, d_sae] float32,
    image [N] int64: the image number of each row, first [n_images] int64: each image's first row)``.
    Memory O(n_images * d_sae): meant for toy-world sets, not ImageNet.
    """
    from visae.topimages import patch_layout

    layout = patch_layout(shards.metadata()["id"])
    if layout is None:
        raise ValueError(f"{shards.path}: not a patch-token shard set (ids '<image>#p<j>' expected)")
    img = layout[0]
    first = np.flatnonzero(np.r_[True, img[1:] != img[:-1]])
    n = len(first)
    S = torch.zeros(n, int(sae.d_sae))
    cnt = torch.zeros(n, 1)
    with torch.no_grad():
        for b in shards.sequential_batches(batch_size):
            f = sae.encode(torch.from_numpy(np.ascontiguousarray(b.acts, np.float32)).to(device)).float().clamp_min(0).cpu()
            g = torch.from_numpy(img[b.index])
            if image_score == "max":
                S.scatter_reduce_(0, g[:, None].expand_as(f), f, "amax")
            elif image_score == "mean":
                S.index_add_(0, g, f)
                cnt.index_add_(0, g, torch.ones(len(g), 1))
            else:
                raise ValueError(f"image_score={image_score!r}: expected 'max' or 'mean'")
    if image_score == "mean":
        S /= cnt.clamp_min(1)
    return S.numpy(), img, first


def heat_in_boxes(heat: np.ndarray, coverage: np.ndarray) -> dict[str, float]:
    """Heat of some images ``heat [m, P]`` (>= 0) against box coverage ``coverage [m, P]`` (``box_coverage``):
    ``{"in_box": area-weighted share of the pooled heat inside the boxes, "touching": share on patches
    with any overlap, "peak_on_box": share of images whose hottest patch overlaps a box, "images": m}``
    (NaN shares when there is no heat)."""
    heat = np.asarray(heat, np.float64)
    tot = heat.sum()
    if len(heat) == 0 or tot <= 0:
        return {"in_box": float("nan"), "touching": float("nan"), "peak_on_box": float("nan"), "images": len(heat)}
    peak = heat.argmax(1)
    return {"in_box": float((heat * coverage).sum() / tot), "touching": float((heat * (coverage > 0)).sum() / tot),
            "peak_on_box": float((coverage[np.arange(len(heat)), peak] > 0).mean()), "images": len(heat)}


def patch_recovery(sae: Any, shards: str | Path | ShardSet, *, world_seed: int | None = None,
                   factors: Sequence[str] = ("shape", "colour", "size", "position", "background"),
                   object_factors: Sequence[str] = OBJECT_FACTORS, auroc_at: float = 0.95, heat_at: float = 0.8,
                   n_top: int = 16, image_score: str = "max", top_images: Any = None) -> dict[str, Any]:
    """Image-level AUROC of every (latent, value) and, for object values, the heat mass in the object's box.

    Args:
        sae: a single SAE (or its directory) trained on ``shards``' patch tokens.
        shards: a toy-world patch-token shard set (factor columns, ids ``<world image index>#p<j>``).
        world_seed: the world's seed (default: the shard set's ``source.dataset_info.world_seed``).
        top_images: a ``TopImages`` of this SAE and set (else computed with ``n_top`` and ``image_score``).

    Returns ``{"values": [per value: factor, value, n_pos, best_latent, auroc, n_latents_at (latents with
    AUROC >= auroc_at), and for object values with such latents: latent (the one with the most heat in the
    box), latent_auroc, in_box, touching, peak_on_box, images, passes], "summary": {...}}``.

    Raises:
        ValueError: not a patch-token set, a factor column missing, no world seed recorded and none given.
    """
    from visae import toyworld as tw
    from visae.recovery import sparse_auroc
    from visae.topimages import compute_top_images

    if isinstance(sae, (str, Path)):
        from visae.sae import load_sae

        sae = load_sae(sae)
    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    from visae.world2 import is_world2_shards

    if is_world2_shards(ss):
        raise ValueError(f"{ss.path}: patch-level recovery reads the first toy world's scenes (visae.toyworld); these "
                         "shards are of world2 (visae.world2), which it does not support yet")
    meta = ss.metadata()
    need = set(factors) | {f + "2" for f in object_factors} | set(tw.FACTORS)
    missing = sorted(c for c in need if c not in meta)
    if missing:
        raise ValueError(f"{ss.path}: factor columns {missing} missing (a toy-world shard set is expected)")
    if world_seed is None:
        world_seed = ((ss.source or {}).get("dataset_info") or {}).get("world_seed")
        if world_seed is None:
            raise ValueError(f"{ss.path}: the source records no world seed; pass world_seed")
    S, img, first = image_scores(sae, ss, image_score=image_score)
    n = len(first)
    fr = np.stack([np.asarray(meta[f])[first] for f in tw.FACTORS], 1)  # [n, F] factor rows of the images
    world_index = np.asarray([int(str(meta["id"][k]).rpartition("#p")[0]) for k in first], np.int64)
    labels, info = [], []
    for fac in factors:
        col = fr[:, tw.FACTOR_INDEX[fac]]
        for v, vn in enumerate(tw.FACTORS[fac]):
            lab = col == v
            if fac in object_factors:
                lab = lab | (fr[:, tw.FACTOR_INDEX[fac + "2"]] == v)
            labels.append(lab)
            info.append((fac, v, vn))
    L = np.stack(labels, 1)
    r, c = np.nonzero(S > 0)
    auc = sparse_auroc(r, c, S[r, c], L, int(sae.d_sae))  # [d_sae, V]
    ti = top_images if top_images is not None else compute_top_images(sae, ss, n_top=n_top, n_random=0, progress=False,
                                                                         image_score=image_score)
    grid = tuple(int(g) for g in ti.patch_grid)
    size = int((ss.source or {}).get("image_size", [tw.IMAGE_SIZE])[0])
    boxes = np.concatenate([tw.object_boxes(fr[i:i + 1], world_seed, start=int(world_index[i]), image_size=size)
                            for i in range(n)])  # [n, 2, 4]
    out = []
    for k, (fac, v, vn) in enumerate(info):
        a = auc[:, k]
        if np.isnan(a).all():
            continue
        best = int(np.nanargmax(a))
        at = np.flatnonzero(a >= auroc_at)
        rec: dict[str, Any] = {"factor": fac, "value": vn, "n_pos": int(L[:, k].sum()), "best_latent": best,
                               "auroc": float(a[best]), "n_latents_at": int(len(at))}
        if fac in object_factors and len(at):
            results = []
            for j in at:
                ok = ti.top_index[j] >= 0
                im = img[ti.top_index[j][ok]]
                match = np.stack([fr[im, tw.FACTOR_INDEX[fac]] == v, fr[im, tw.FACTOR_INDEX[fac + "2"]] == v], 1)
                bx = np.where(match[:, :, None], boxes[im], -1)  # only the objects that have the value
                h = heat_in_boxes(ti.top_heat[j][ok].astype(np.float64), box_coverage(bx, grid, size))
                results.append((h["in_box"] if h["in_box"] == h["in_box"] else -1.0, int(j), h))
            _, j, h = max(results)
            rec.update(latent=j, latent_auroc=float(a[j]), **h, passes=bool(h["in_box"] >= heat_at))
        out.append(rec)
    passing = [f'{r_["factor"]}={r_["value"]}' for r_ in out if r_.get("passes")]
    summary = {"n_images": n, "d_sae": int(sae.d_sae), "image_score": image_score, "auroc_at": auroc_at,
               "heat_at": heat_at, "n_top": int(ti.top_index.shape[1]), "passing": passing,
               "passing_factors": sorted({p.split("=")[0] for p in passing}),
               "values_at": [f'{r_["factor"]}={r_["value"]}' for r_ in out if r_["n_latents_at"]]}
    return {"values": out, "summary": summary}


def format_patch_recovery(res: dict[str, Any]) -> str:
    """A plain-text table of a ``patch_recovery`` result."""
    lines = ["factor      value      best AUROC  latents>=at  heat in box  touching  peak on box  passes"]
    for r in res["values"]:
        heat = (f'{r["in_box"]:11.3f}  {r["touching"]:8.3f}  {r["peak_on_box"]:11.3f}  {"yes" if r["passes"] else "no"}'
                if "in_box" in r else f'{"":11}  {"":8}  {"":11}  -')
        lines.append(f'{r["factor"]:<11} {r["value"]:<10} {r["auroc"]:10.3f}  {r["n_latents_at"]:11d}  {heat}')
    s = res["summary"]
    lines.append(f'passing ({len(s["passing"])}): {", ".join(s["passing"]) or "none"}')
    return "\n".join(lines)
