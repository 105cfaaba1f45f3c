"""Ground truth for patch heatmaps: does a patch-token SAE's concept fire on the object that has it?

On a synthetic-world shard set of patch tokens (``visae extract --source toyworld --layer L --token patch``:
ids ``<image id>#p<j>``, factor columns in the metadata) and an SAE trained on it, for every value of the
world's factors:

- **image-level AUROC** of every latent at detecting the value, the image's score being the maximum
  (or mean: ``image_score``) of the latent over the image's patches, the score the site ranks images
  by (``visae.topimages``). For the *object factors* (colour, shape, ...) an image is a positive when
  *any* of its objects has the value: a colour latent fires on the red object's patches whichever object
  is red; on the first world, counting an image with a small red second object as a negative of "red"
  would cap every red latent's AUROC near 1 - 0.25 / 8 / (7 / 8) = 0.96 however well it localises.
  Other factors (size, position, background, ...) use their column as it is.
- **heat mass in the box**, for every (object value, latent) with AUROC >= ``auroc_at``: over the
  latent's top images as the site shows them (``compute_top_images``, the same streaming pass and the
  same per-patch heatmaps ``top_heat``), the share of the heat that lies on the boxes of the objects
  that have the value, area-weighted: a patch's heat counts by the fraction of the patch's area inside
  the union of those boxes (a patch half inside counts half; exact for continuous boxes,
  :func:`box_coverage`), pooled over the top images (``in_box``). Also reported: the share on patches
  that touch a box at all (``touching``), the share of top images whose hottest patch touches one
  (``peak_on_box``), and, where the world records masks, the share on the objects' masks (``in_mask``:
  a patch's heat counts by the fraction of its pixels that the label map gives to those objects).

One code path for both synthetic worlds; what differs is a small per-world adapter, :class:`WorldObjects`
(built by :func:`world_objects`): for the shard set's images, every object's value of each object factor,
every object's box and, where recorded, a mask lookup.

- **toyworld** (``visae.toyworld``, the first world): 1-2 objects an image; object factors ``shape`` and
  ``colour`` (the columns of the main object and of the second, small one: ``shape2`` / ``colour2``); boxes
  replayed from the factors and the world seed (``toyworld.object_boxes``); no masks.
- **world2** (``visae.world2``): 1-4 objects an image, anywhere, any size and rotation, possibly occluded;
  object factors ``shape``, ``colour_family``, ``texture`` (and ``colour``, the ~1,000 named colours, when asked
  for). The shard columns hold only the main and the second object, so every object's values and box are read
  from the world directory's own record, ``world.jsonl``'s ``objects`` (each ``box`` is ``world2.object_box`` of
  the object: its full, unoccluded geometry, rounded to 1e-3 px), and masks from its label maps
  (``masks/<id>.png``: 0 background, k + 1 where object k covers most of the pixel). The directory is the one the
  shards were extracted from (``source.dataset``; ``world_dir`` overrides it); its seed and the shards' factor
  columns are checked against the record before any SAE work.

Shard sets of neither world are refused (``PatchRecoveryError``, a ``ValueError``, naming the missing columns).

    visae patch-recovery --sae runs/sae_patch --shards runs/world2_patches/layer_1 --out patch_recovery.json

Background values fire on patches of background, which overlap no object: right, and not part of the heat
criterion (it is about the objects' colour and shape); their AUROC is reported like every other value's.

Issue 14 item 2's criterion: at least 5 object values (colour and shape among them) with a latent of
AUROC >= 0.95 whose area-weighted heat mass in the box is >= 0.8 (``summary["passing"]``); the mask share
is reported beside it, not part of it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch

from visae.errors import VisaeError
from visae.shards import ShardSet

__all__ = ["OBJECT_FACTORS", "WORLD2_OBJECT_FACTORS", "PatchRecoveryError", "WorldObjects", "world_objects",
           "box_coverage", "image_scores", "heat_in_boxes", "patch_recovery", "format_patch_recovery",
           "PatchRecoveryConfig", "main"]

OBJECT_FACTORS = ("shape", "colour")  # the first world's (visae.toyworld)
WORLD2_OBJECT_FACTORS = ("shape", "colour_family", "colour", "texture")  # world2's; "colour" only when asked for


class PatchRecoveryError(VisaeError, ValueError):
    """Bad input to patch-level recovery: not a patch-token set, a set of neither synthetic world, a world record
    missing or unlike the shards, an unknown factor; the message names the file / field and what was expected.
    A usage error on the command line (exit status 2), as zeroshot's refusals of such input are."""

    exit_code = 2


def box_coverage(boxes: np.ndarray, grid: Sequence[int], image_size: int) -> np.ndarray:
    """Fraction of each patch's area inside the union of boxes, exact for continuous boxes.

    Args:
        boxes: [n, K, 4] pixel boxes ``(x0, y0, x1, y1)``, integer or continuous, pixel ``(i, j)`` covering
            ``[j, j+1) x [i, i+1)`` (``toyworld.object_box``: columns x0 .. x1-1, rows y0 .. y1-1;
            ``world2.object_box``: continuous); a box whose x0 is negative (-1) is absent; boxes are clipped
            to the frame.
        grid: (rows, cols) of the patch grid; the image is ``image_size`` pixels square and divides into it.

    Returns:
        float64 [n, rows * cols], row-major patch order (the order of ``<id>#p<j>`` rows). The union is cut
        into the cells between every box and patch edge (coordinate compression), each cell counted once;
        integer boxes give exact fractions.

    Raises:
        PatchRecoveryError: the grid does not divide the image.
    """
    boxes = np.asarray(boxes, np.float64)
    R, C = int(grid[0]), int(grid[1])
    if R <= 0 or C <= 0 or image_size % R or image_size % C:
        raise PatchRecoveryError(f"patch grid {R}x{C} does not divide a {image_size}-pixel image")
    ph, pw = image_size // R, image_size // C
    ex, ey = np.arange(C + 1, dtype=np.float64) * pw, np.arange(R + 1, dtype=np.float64) * ph
    out = np.zeros((len(boxes), R * C))
    for i, bs in enumerate(boxes):
        bs = np.clip(bs[bs[:, 0] >= 0], 0, image_size)
        bs = bs[(bs[:, 2] > bs[:, 0]) & (bs[:, 3] > bs[:, 1])]
        if not len(bs):
            continue
        xs, ys = np.unique(np.r_[ex, bs[:, 0], bs[:, 2]]), np.unique(np.r_[ey, bs[:, 1], bs[:, 3]])
        cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2  # cell centres: a cell is inside a box or outside
        inside = ((bs[:, 0, None, None] <= cx) & (cx < bs[:, 2, None, None])
                  & (bs[:, 1, None, None] <= cy[:, None]) & (cy[:, None] < bs[:, 3, None, None])).any(0)  # [ny, nx]
        area = np.diff(ys)[:, None] * np.diff(xs)[None, :] * inside
        patch = (cy // ph).astype(np.int64)[:, None] * C + (cx // pw).astype(np.int64)[None, :]
        np.add.at(out[i], patch.ravel(), area.ravel())
    return out / (ph * pw)


@dataclass(frozen=True)
class WorldObjects:
    """A synthetic world's truth about the ``n`` images of a patch-token shard set (built by :func:`world_objects`).

    Attributes:
        world: ``"toyworld"`` or ``"world2"``.
        factor_names: factor -> its value names (the world's table), for every factor it can score.
        object_factors: the factors each object carries (an image is a positive of a value when any of its objects
            has it; the heat is measured against those objects' boxes).
        default_factors: the factors ``patch_recovery`` scores by default (the world's main factors).
        values: factor -> int64 ``[n, K]``: for an object factor each object's value (K objects at most; -1 where
            image i has no object k), for any other factor the image's column (``[n, 1]``).
        boxes: float64 ``[n, K, 4]``: each object's box ``(x0, y0, x1, y1)`` in pixels of the world's image
            (``image_size`` square), -1 where absent.
        image_size: the side of the world's images in pixels (the frame of ``boxes``).
        image_ids: the images' ids ``[n]`` (the ``<image id>`` of ``<image id>#p<j>``), in image-number order.
        mask_coverage: None (no masks recorded) or ``f(images int [m], select bool [m, K], grid) -> float64 [m, P]``:
            the fraction of each patch's pixels that the world's label maps give to the selected objects.
    """

    world: str
    factor_names: dict[str, tuple[str, ...]]
    object_factors: tuple[str, ...]
    default_factors: tuple[str, ...]
    values: dict[str, np.ndarray]
    boxes: np.ndarray
    image_size: int
    image_ids: tuple[str, ...]
    mask_coverage: Callable[[np.ndarray, np.ndarray, Sequence[int]], np.ndarray] | None = field(default=None, repr=False)


def _patch_rows(ss: ShardSet, ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(image [N] int64: the image number of each row, first [n_images] int64: each image's first row)`` of a
    patch-token shard set from its row ids ``<image id>#p<j>``; PatchRecoveryError if the ids are not of that form."""
    from visae.topimages import patch_layout

    layout = patch_layout(ids)
    if layout is None:
        raise PatchRecoveryError(f"{ss.path}: not a patch-token shard set (ids '<image>#p<j>' expected)")
    img = layout[0]
    return img, np.flatnonzero(np.r_[True, img[1:] != img[:-1]])


def _image_firsts(ss: ShardSet, meta: Any) -> tuple[np.ndarray, list[str]]:
    """First row of each image and the images' ids (``<image id>`` of ``<image id>#p<j>``)."""
    first = _patch_rows(ss, meta["id"])[1]
    return first, [str(meta["id"][k]).rpartition("#p")[0] for k in first]


def _toyworld_objects(ss: ShardSet, meta: Any, world_seed: int | None) -> WorldObjects:
    """The first world's adapter: object values from the columns (main object, ``<factor>2``: the second one),
    boxes replayed from the factor rows and the world seed (``toyworld.object_boxes``)."""
    from visae import toyworld as tw

    missing = sorted(c for c in tw.FACTORS if c not in meta)
    if missing:
        raise PatchRecoveryError(f"{ss.path}: factor columns {missing} missing (a shard set of a synthetic world, visae.toyworld "
                         "or visae.world2, is expected)")
    if world_seed is None:
        world_seed = ((ss.source or {}).get("dataset_info") or {}).get("world_seed")
        if world_seed is None:
            raise PatchRecoveryError(f"{ss.path}: the source records no world seed; pass world_seed")
    first, ids = _image_firsts(ss, meta)
    fr = np.stack([np.asarray(meta[f])[first] for f in tw.FACTORS], 1).astype(np.int64)  # [n, F] factor rows
    world_index = np.asarray([int(i) for i in ids], np.int64)
    size = int((ss.source or {}).get("image_size", [tw.IMAGE_SIZE])[0])
    boxes = np.concatenate([tw.object_boxes(fr[i:i + 1], int(world_seed), start=int(world_index[i]), image_size=size)
                            for i in range(len(first))]) if len(first) else np.zeros((0, 2, 4), np.int64)
    values = {f: fr[:, [tw.FACTOR_INDEX[f]]] for f in tw.FACTORS}
    for f in OBJECT_FACTORS:
        values[f] = fr[:, [tw.FACTOR_INDEX[f], tw.FACTOR_INDEX[f + "2"]]]
    return WorldObjects("toyworld", {f: tuple(v) for f, v in tw.FACTORS.items()}, OBJECT_FACTORS, tuple(tw.MAIN_FACTORS),
                        values, boxes.astype(np.float64), size, tuple(ids))


class _LabelMaps:
    """Mask coverage from a world2 directory's label maps (``masks/<id>.png``), read on first use and kept."""

    def __init__(self, paths: Sequence[Path], image_size: int):
        self.paths, self.size, self.cache = list(paths), int(image_size), {}

    def __call__(self, images: np.ndarray, select: np.ndarray, grid: Sequence[int]) -> np.ndarray:
        from PIL import Image

        R, C = int(grid[0]), int(grid[1])
        if R <= 0 or C <= 0 or self.size % R or self.size % C:
            raise PatchRecoveryError(f"patch grid {R}x{C} does not divide a {self.size}-pixel image")
        out = np.zeros((len(images), R * C))
        for t, (i, sel) in enumerate(zip(np.asarray(images).tolist(), np.asarray(select, bool))):
            if i not in self.cache:
                with Image.open(self.paths[i]) as im:
                    lab = np.asarray(im)
                if lab.shape != (self.size, self.size):
                    raise PatchRecoveryError(f"{self.paths[i]}: label map of shape {lab.shape}, expected ({self.size}, {self.size})")
                self.cache[i] = lab
            lab = self.cache[i]
            keep = np.zeros(max(int(lab.max()), len(sel)) + 1, bool)
            keep[1:len(sel) + 1] = sel  # label k + 1: object k
            out[t] = keep[lab].reshape(R, self.size // R, C, self.size // C).mean((1, 3)).reshape(-1)
        return out


def _world2_objects(ss: ShardSet, meta: Any, world_dir: str | Path | None) -> WorldObjects:
    """world2's adapter: every object's factors and box from the world directory's ``world.jsonl`` (``objects``),
    masks from its label maps; the directory's format and seed and the shards' factor columns are checked."""
    from visae import world2 as w2

    src = ss.source or {}
    info = src.get("dataset_info") or {}
    if world_dir is None:
        world_dir = src.get("dataset") or info.get("path")
        if not world_dir:
            raise PatchRecoveryError(f"{ss.path}: the source records no world directory (source.dataset); pass world_dir")
    root = Path(world_dir)
    wj, jl = root / "world.json", root / "world.jsonl"
    if not wj.is_file() or not jl.is_file():
        raise PatchRecoveryError(f"{root}: the world2 directory of {ss.path} is not there (world.json and world.jsonl "
                         "expected: every object's box is read from its record); pass world_dir")
    try:
        wmeta = json.loads(wj.read_text())
    except json.JSONDecodeError as e:
        raise PatchRecoveryError(f"{wj}: not valid JSON ({e})") from None
    if wmeta.get("format") != w2.FORMAT_NAME:
        raise PatchRecoveryError(f"{wj}: format {wmeta.get('format')!r}, expected {w2.FORMAT_NAME!r}")
    if info.get("world_seed") is not None and wmeta.get("seed") != info["world_seed"]:
        raise PatchRecoveryError(f"{wj}: world seed {wmeta.get('seed')}, but {ss.path} was extracted from world seed "
                         f"{info['world_seed']}: not the shards' world")
    size = int(wmeta.get("image_size", w2.IMAGE_SIZE))
    first, ids = _image_firsts(ss, meta)
    want, recs = set(ids), {}
    for ln, line in enumerate(jl.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rid = str(rec["id"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PatchRecoveryError(f"{jl} line {ln}: expected a JSON object with 'id' ({e})") from None
        if rid in want:
            recs[rid] = (ln, rec)
    missing = [i for i in ids if i not in recs]
    if missing:
        raise PatchRecoveryError(f"{jl}: no record of {len(missing)} image(s) of {ss.path}, e.g. {missing[:3]}")
    n = len(ids)
    K = max([len(recs[i][1].get("objects") or []) for i in ids] + [1])
    tables = {f: w2.FACTORS[f] for f in WORLD2_OBJECT_FACTORS}
    index = {f: {name: v for v, name in reversed(list(enumerate(names)))} for f, names in tables.items()}
    values = {f: np.full((n, K), -1, np.int64) for f in tables}
    boxes = np.full((n, K, 4), -1.0)
    masks: list[Path] = []
    for i, iid in enumerate(ids):
        ln, rec = recs[iid]
        for k, o in enumerate(rec.get("objects") or []):
            try:
                for f in tables:
                    values[f][i, k] = index[f][o[f]]
                box = np.asarray(o["box"], np.float64)
            except (KeyError, TypeError, ValueError) as e:
                raise PatchRecoveryError(f"{jl} line {ln}: object {k} needs {', '.join(tables)} (world2 value names) and "
                                 f"'box' [x0, y0, x1, y1] ({type(e).__name__}: {e})") from None
            if box.shape != (4,) or not np.isfinite(box).all():
                raise PatchRecoveryError(f"{jl} line {ln}: object {k}'s 'box' is {o['box']!r}, expected 4 numbers x0, y0, x1, y1")
            boxes[i, k] = box
        masks.append(root / str(rec.get("mask", f"masks/{iid}.png")))
    for f in w2.MAIN_FACTORS:  # the shards' columns must be this world's images
        if f not in meta:
            continue
        col = np.asarray(meta[f])[first]
        rec_col = np.asarray([int((recs[i][1].get("factors") or {}).get(f, -1)) for i in ids])
        bad = np.flatnonzero(col != rec_col)
        if len(bad):
            b = int(bad[0])
            raise PatchRecoveryError(f"{ss.path}: image {ids[b]!r} has {f}={int(col[b])} in the shards but {rec_col[b]} in {jl}: "
                             f"the shards are not of this world (pass world_dir)")
    for f in w2.FACTORS:
        if f not in tables and f in meta:
            values[f] = np.asarray(meta[f])[first].astype(np.int64)[:, None]
    mask_cov = _LabelMaps(masks, size) if all(m.is_file() for m in masks) else None
    return WorldObjects("world2", {f: tuple(v) for f, v in w2.FACTORS.items()}, WORLD2_OBJECT_FACTORS,
                        tuple(w2.MAIN_FACTORS), values, boxes, size, tuple(ids), mask_cov)


def world_objects(shards: str | Path | ShardSet, *, world_seed: int | None = None,
                  world_dir: str | Path | None = None) -> WorldObjects:
    """The per-world adapter of a synthetic-world patch-token shard set: :class:`WorldObjects` of its images.

    world2 shards (``world2.is_world2_shards``) read their world directory (``world_dir``, default the shards'
    ``source.dataset``); others must carry the first world's factor columns, and replay its boxes from the world
    seed (``world_seed``, default the source's ``dataset_info.world_seed``). Cheap: no SAE, no activations read.

    Raises:
        PatchRecoveryError: not a patch-token set; a shard set of neither world (columns named); no world seed (first world)
            or no world directory / a record missing or unlike the shards (world2).
    """
    from visae.world2 import is_world2_shards

    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    meta = ss.metadata()
    if is_world2_shards(ss):
        return _world2_objects(ss, meta, world_dir)
    return _toyworld_objects(ss, meta, world_seed)


def image_scores(sae: Any, shards: ShardSet, *, image_score: str = "max", batch_size: int = 8192,
                 device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every image's score for every latent on a patch-token shard set.

    Rows are fed as stored (like ``compute_top_images``). Returns ``(scores [n_images, d_sae] float32,
    image [N] int64: the image number of each row, first [n_images] int64: each image's first row)``.
    Memory O(n_images * d_sae): meant for toy-world sets, not ImageNet.
    """
    img, first = _patch_rows(shards, shards.metadata()["id"])
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
                raise PatchRecoveryError(f"image_score={image_score!r}: expected 'max' or 'mean'")
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
                   world_dir: str | Path | None = None, factors: Sequence[str] | None = None,
                   object_factors: Sequence[str] | None = None, auroc_at: float = 0.95, heat_at: float = 0.8,
                   n_top: int = 16, image_score: str = "max", top_images: Any = None) -> dict[str, Any]:
    """Image-level AUROC of every (latent, value) and, for object values, the heat mass in the objects' boxes.

    Args:
        sae: a single SAE (or its directory) trained on ``shards``' patch tokens.
        shards: a patch-token shard set of the first toy world or of world2 (factor columns, ids ``<image id>#p<j>``).
        world_seed: first world: its seed (default: the shard set's ``source.dataset_info.world_seed``).
        world_dir: world2: its directory (default: the shard set's ``source.dataset``).
        factors: the factors scored (default: the world's main factors: ``toyworld.MAIN_FACTORS`` /
            ``world2.MAIN_FACTORS``).
        object_factors: those of ``factors`` scored per object (any object's value makes a positive) and whose
            heat is measured (default: every factor of ``factors`` that the world records per object: first world
            ``shape``, ``colour``; world2 ``shape``, ``colour_family``, ``colour``, ``texture``).
        auroc_at / heat_at: the AUROC a latent needs to have its heat measured, the in-box share a value needs to pass.
        top_images: a ``TopImages`` of this SAE and set (else computed with ``n_top`` and ``image_score``).

    Returns ``{"values": [per value: factor, value, n_pos (images), best_latent, auroc, n_latents_at (latents with
    AUROC >= auroc_at), and for object values with such latents: latent (the one with the most heat in the box),
    latent_auroc, in_box, touching, peak_on_box, images, in_mask (world2: share of the heat on the objects' masks;
    absent without masks), passes (in_box >= heat_at), latents_at (those fields for every latent at auroc_at)],
    "summary": {world, n_images, d_sae, image_score, auroc_at, heat_at, n_top, object_factors, masks (bool),
    passing, passing_factors, values_at}}``. Shares are NaN where the top images have no heat.

    Raises:
        PatchRecoveryError (a ValueError): not a patch-token set, a shard set of neither world (factor columns missing), an unknown factor
            or an object factor the world does not record per object or that is not in ``factors``, no world seed /
            world directory (all before the SAE pass).
    """
    from visae.recovery import sparse_auroc
    from visae.topimages import compute_top_images

    if isinstance(sae, (str, Path)):
        from visae.sae import load_sae

        sae = load_sae(sae)
    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    W = world_objects(ss, world_seed=world_seed, world_dir=world_dir)
    factors = tuple(W.default_factors if factors is None else factors)
    unknown = [f for f in factors if f not in W.values]
    if unknown:
        raise PatchRecoveryError(f"{ss.path}: factor(s) {unknown} not among this {W.world} set's factors {sorted(W.values)}")
    if object_factors is None:
        object_factors = tuple(f for f in factors if f in W.object_factors)
    bad = [f for f in object_factors if f not in W.object_factors]
    if bad:
        raise PatchRecoveryError(f"object factor(s) {bad}: {W.world} records per object only {list(W.object_factors)}")
    unscored = [f for f in object_factors if f not in factors]
    if unscored:  # it was ignored silently
        raise PatchRecoveryError(f"object factor(s) {unscored} are not among the factors scored {list(factors)}: add "
                                 "them to factors")
    S, img, first = image_scores(sae, ss, image_score=image_score)
    n = len(first)
    labels, info = [], []
    for fac in factors:
        # [n, K] for the object factors asked for (any object's value), else [n, 1]: the image's column (an object
        # factor left out of object_factors: the main object's, objects[0])
        vals = W.values[fac] if fac in object_factors else W.values[fac][:, :1]
        for v, vn in enumerate(W.factor_names[fac]):
            labels.append((vals == v).any(1))
            info.append((fac, v, vn))
    L = np.stack(labels, 1)
    r, c = np.nonzero(S > 0)
    auc = sparse_auroc(r, c, S[r, c], L, int(sae.d_sae))  # [d_sae, V]
    ti = top_images if top_images is not None else compute_top_images(sae, ss, n_top=n_top, n_random=0, progress=False,
                                                                         image_score=image_score)
    grid = tuple(int(g) for g in ti.patch_grid)
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
                sel = W.values[fac][im] == v  # [m, K]: only the objects that have the value
                heat = ti.top_heat[j][ok].astype(np.float64)
                h: dict[str, Any] = heat_in_boxes(heat, box_coverage(np.where(sel[:, :, None], W.boxes[im], -1.0), grid,
                                                                     W.image_size))
                if W.mask_coverage is not None:
                    tot = heat.sum()
                    h["in_mask"] = float((heat * W.mask_coverage(im, sel, grid)).sum() / tot) if tot > 0 else float("nan")
                results.append((h["in_box"] if h["in_box"] == h["in_box"] else -1.0, int(j), h))
            _, j, h = max(results)
            rec.update(latent=j, latent_auroc=float(a[j]), **h, passes=bool(h["in_box"] >= heat_at),
                       latents_at=[{"latent": jj, "auroc": float(a[jj]), **hh} for _, jj, hh in sorted(results, key=lambda t: t[1])])
        out.append(rec)
    passing = [f'{r_["factor"]}={r_["value"]}' for r_ in out if r_.get("passes")]
    summary = {"world": W.world, "n_images": n, "d_sae": int(sae.d_sae), "image_score": image_score,
               "auroc_at": auroc_at, "heat_at": heat_at, "n_top": int(ti.top_index.shape[1]),
               "object_factors": list(object_factors), "masks": W.mask_coverage is not None, "passing": passing,
               "passing_factors": sorted({p.split("=")[0] for p in passing}),
               "values_at": [f'{r_["factor"]}={r_["value"]}' for r_ in out if r_["n_latents_at"]]}
    return {"values": out, "summary": summary}


def format_patch_recovery(res: dict[str, Any]) -> str:
    """A plain-text table of a ``patch_recovery`` result (the mask column only where the world records masks)."""
    masks = bool(res["summary"].get("masks"))
    lines = ["factor         value              best AUROC  latents>=at  heat in box  touching  peak on box"
             + ("  in mask" if masks else "") + "  passes"]
    for r in res["values"]:
        if "in_box" in r:
            heat = f'{r["in_box"]:11.3f}  {r["touching"]:8.3f}  {r["peak_on_box"]:11.3f}'
            heat += f'  {r["in_mask"]:7.3f}' if masks else ""
            heat += f'  {"yes" if r["passes"] else "no"}'
        else:
            heat = f'{"":11}  {"":8}  {"":11}' + (f'  {"":7}' if masks else "") + "  -"
        lines.append(f'{r["factor"]:<14} {r["value"]:<18} {r["auroc"]:10.3f}  {r["n_latents_at"]:11d}  {heat}')
    s = res["summary"]
    lines.append(f'passing ({len(s["passing"])}): {", ".join(s["passing"]) or "none"}')
    return "\n".join(lines)


@dataclass(frozen=True)
class PatchRecoveryConfig:
    """Patch-level ground truth of a patch-token SAE on a synthetic world (first world or world2): image-level AUROC
    of every latent per factor value, and the heat of the best latents in the matching objects' boxes (and masks)."""

    sae: str = field(default="", metadata={"help": "SAE directory (trained on the shards' patch tokens)", "required": True})
    shards: str = field(default="", metadata={"help": "patch-token shard set of a synthetic world (visae extract --source "
                                                      "toyworld --layer L --token patch)", "required": True})
    world_dir: Optional[str] = field(default=None, metadata={"help": "world2: its directory (default: the one the shards "
                                                                     "were extracted from, source.dataset)"})
    world_seed: Optional[int] = field(default=None, metadata={"help": "first world: its seed (default: the shards' "
                                                                      "source.dataset_info.world_seed)"})
    factors: tuple[str, ...] = field(default=(), metadata={"help": "factors to score; empty: the world's main factors"})
    object_factors: tuple[str, ...] = field(default=(), metadata={
        "help": "factors scored per object, with heat measured; empty: those of --factors the world records per object"})
    auroc_at: float = field(default=0.95, metadata={"help": "AUROC a latent needs to have its heat measured"})
    heat_at: float = field(default=0.8, metadata={"help": "area-weighted heat share in the boxes a value needs to pass"})
    n_top: int = field(default=16, metadata={"help": "top images per latent whose heatmaps are measured"})
    image_score: Literal["max", "mean"] = field(default="max", metadata={"help": "an image's score: max or mean over "
                                                                                  "its patches"})
    out: Optional[str] = field(default=None, metadata={"help": "write the result as JSON here (NaN shares as null)"})

    def __post_init__(self) -> None:
        from visae.config import check_bounds

        check_bounds(self, {"auroc_at": (0.0, 1.0), "heat_at": (0.0, 1.0), "n_top": (1, None)})


def main(argv: list[str] | None = None) -> int:
    """``visae patch-recovery``: print :func:`format_patch_recovery`'s table (and write the JSON with ``--out``)."""
    from visae.atomic import atomic_write_text
    from visae.config import parse_config
    from visae.errors import VisaeError, report
    from visae.metrics import json_safe

    try:
        cfg = parse_config(PatchRecoveryConfig, argv, prog="visae patch-recovery")
        res = patch_recovery(cfg.sae, cfg.shards, world_seed=cfg.world_seed, world_dir=cfg.world_dir,
                             factors=cfg.factors or None, object_factors=cfg.object_factors or None,
                             auroc_at=cfg.auroc_at, heat_at=cfg.heat_at, n_top=cfg.n_top, image_score=cfg.image_score)
    except VisaeError as e:  # a bad flag, --sae, --shards or world (exit 2; visae.errors)
        return report("visae patch-recovery", e)
    from visae.config import absolute_paths

    # file and directory arguments recorded absolute: as typed (relative) they did not say which from elsewhere
    res["config"] = absolute_paths(dataclasses.asdict(cfg), ("sae", "shards", "world_dir", "out"))
    if cfg.out:
        atomic_write_text(cfg.out, json.dumps(json_safe(res), indent=1, allow_nan=False))
    print(format_patch_recovery(res))
    return 0


if __name__ == "__main__":
    from visae.cli import run_main

    sys.exit(run_main("python -m visae.patch_recovery", main))
