"""A procedural image world whose concepts are known: the project's offline ground truth.

Every image shows one main object (and, in some images, a second, small one) drawn on a
grey background. Its factors and their values:

    shape       circle square triangle diamond star cross
    colour      red yellow green cyan blue purple pink brown
    size        small large
    position    on the left / in the centre / on the right   (horizontal third of the object)
    background  plain striped dotted
    n_objects   one two                                      (two: the main object is large,
                                                              the second small, elsewhere)
    shape2, colour2, position2                               (the second object; -1 if none)
    colour_shape  colour * 6 + shape                         (48 classes, the combined benchmark)

Everything is deterministic by seed: ``sample_factors(n, seed)`` draws the factors and
image ``i``'s pixels come from its own generator seeded by ``(seed, i)``, so any slice of
a world can be regenerated alone (and generation resumes after a kill).

On disk (``generate_world(out_dir, n, seed)``, see docs/toyworld.md)::

    out_dir/world.json    {"format": "visae.toyworld", "version": 1, "factors": {name: [value names]},
                           "seed": s, "n": n, "image_size": 64, "label": "colour_shape", ...}
    out_dir/world.jsonl   one line per image: {"id": "000123", "file": "images/000123.png",
                           "factors": {name: int, -1 = absent}, "captions": [...]}
    out_dir/images/000123.png

``toy_classnames_and_templates()`` gives the zero-shot benchmarks in ImageNet's form
(class names + prompt templates), one per factor plus the combined colour x shape one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from visae.atomic import atomic_write_bytes, atomic_write_text
from visae.errors import VisaeError

__all__ = [
    "WorldError",
    "read_world_json",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGE_SIZE",
    "SHAPES",
    "COLOURS",
    "COLOUR_RGB",
    "SIZES",
    "POSITIONS",
    "BACKGROUNDS",
    "FACTORS",
    "MAIN_FACTORS",
    "Caption",
    "ToyWorld",
    "sample_factors",
    "render",
    "render_batch",
    "object_box",
    "object_boxes",
    "sample_world",
    "caption_options",
    "captions_for",
    "toy_classnames_and_templates",
    "generate_world",
    "read_world",
    "ToyWorldConfig",
    "main",
]


class WorldError(VisaeError, ValueError, FileNotFoundError):
    """A world directory that is not the world asked for (another seed, size or format in ``--out``), not a world
    at all, or incomplete (exit status 2). Also a ``FileNotFoundError``, which a missing world.json raised before."""

FORMAT_NAME = "visae.toyworld"
FORMAT_VERSION = 1
IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
# No colour name starts with a vowel, so "a {} object" templates are always grammatical.
COLOURS = ("red", "yellow", "green", "cyan", "blue", "purple", "pink", "brown")
COLOUR_RGB = {
    "red": (220, 30, 30),
    "yellow": (240, 215, 20),
    "green": (40, 170, 50),
    "cyan": (20, 200, 215),
    "blue": (30, 60, 220),
    "purple": (130, 40, 190),
    "pink": (250, 120, 190),
    "brown": (135, 80, 35),
}
SIZES = ("small", "large")
POSITIONS = ("left", "centre", "right")
POSITION_PHRASES = ("on the left", "in the centre", "on the right")
BACKGROUNDS = ("plain", "striped", "dotted")
N_OBJECTS = ("one", "two")

MAIN_FACTORS = ("shape", "colour", "size", "position", "background")
FACTORS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
    "n_objects": N_OBJECTS,
    "shape2": SHAPES,
    "colour2": COLOURS,
    "position2": POSITIONS,
    "colour_shape": tuple(f"{c} {s}" for c in COLOURS for s in SHAPES),
}
FACTOR_INDEX = {name: i for i, name in enumerate(FACTORS)}
ABSENT = -1

# Geometry (pixels of the 64 x 64 image): object radius ranges and column centres.
_RADIUS = {"small": (6.5, 8.5), "large": (12.5, 14.5)}
_COLUMN_X = (16.0, 32.0, 48.0)
_SUPERSAMPLE = 2  # draw at 2x and box-filter down: smooth edges at small sizes


# ----------------------------------------------------------------------------- factors


def sample_factors(n: int, seed: int, two_object_fraction: float = 0.25) -> np.ndarray:
    """Factor labels of ``n`` images: int64 ``[n, len(FACTORS)]`` (columns in ``FACTORS`` order, -1 = absent).

    Raises ValueError for ``n`` < 0, ``seed`` < 0 or ``two_object_fraction`` outside [0, 1] (NaN included)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:  # numpy's SeedSequence said only "expected non-negative integer"
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= two_object_fraction <= 1.0:  # a fraction: outside [0, 1] (or NaN) it acted as 0 or 1
        raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xFAC7]))
    f = np.full((n, len(FACTORS)), ABSENT, np.int64)
    fi = FACTOR_INDEX
    f[:, fi["shape"]] = rng.integers(0, len(SHAPES), n)
    f[:, fi["colour"]] = rng.integers(0, len(COLOURS), n)
    f[:, fi["size"]] = rng.integers(0, len(SIZES), n)
    f[:, fi["position"]] = rng.integers(0, len(POSITIONS), n)
    f[:, fi["background"]] = rng.integers(0, len(BACKGROUNDS), n)
    two = rng.random(n) < two_object_fraction
    f[:, fi["n_objects"]] = two.astype(np.int64)
    # Two objects: the main one is large (so "the" object of the labels is the salient one),
    # the second is small, in another column, of another colour.
    f[two, fi["size"]] = SIZES.index("large")
    k = int(two.sum())
    f[two, fi["shape2"]] = rng.integers(0, len(SHAPES), k)
    f[two, fi["colour2"]] = (f[two, fi["colour"]] + rng.integers(1, len(COLOURS), k)) % len(COLOURS)
    f[two, fi["position2"]] = (f[two, fi["position"]] + rng.integers(1, len(POSITIONS), k)) % len(POSITIONS)
    f[:, fi["colour_shape"]] = f[:, fi["colour"]] * len(SHAPES) + f[:, fi["shape"]]
    return f


def factors_to_dict(row: Sequence[int]) -> dict[str, int]:
    return {name: int(row[i]) for i, name in enumerate(FACTORS)}


def factors_from_dict(d: dict[str, Any]) -> np.ndarray:
    """One row ``[len(FACTORS)]`` from ``{name: int | value name}``; missing factors are absent (-1)."""
    row = np.full(len(FACTORS), ABSENT, np.int64)
    for name, v in d.items():
        if name not in FACTOR_INDEX:
            raise ValueError(f"unknown factor {name!r}; known: {list(FACTORS)}")
        if isinstance(v, str):
            if v not in FACTORS[name]:
                raise ValueError(f"factor {name!r}: unknown value {v!r}; known: {list(FACTORS[name])}")
            v = FACTORS[name].index(v)
        row[FACTOR_INDEX[name]] = int(v)
    if row[FACTOR_INDEX["n_objects"]] == ABSENT:
        row[FACTOR_INDEX["n_objects"]] = 1 if row[FACTOR_INDEX["shape2"]] != ABSENT else 0
    if row[FACTOR_INDEX["colour"]] != ABSENT and row[FACTOR_INDEX["shape"]] != ABSENT:
        row[FACTOR_INDEX["colour_shape"]] = row[FACTOR_INDEX["colour"]] * len(SHAPES) + row[FACTOR_INDEX["shape"]]
    return row


# ----------------------------------------------------------------------------- rendering


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape of 'radius' r (None for the circle, drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Equilateral, pointing up, centred on its centroid.
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        t = r * 0.33
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _background(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey background [size, size, 3] uint8: plain (faint noise), striped or dotted."""
    tone = float(rng.uniform(90, 200))
    img = np.full((size, size), tone, np.float32)
    if kind == "plain":
        pass
    elif kind in ("striped", "dotted"):
        other = tone + (45.0 if tone < 145 else -45.0)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        if kind == "striped":
            period = float(rng.uniform(5.0, 8.0)) * _SUPERSAMPLE
            angle = float(rng.choice([0.0, 0.5, 0.25, 0.75])) * math.pi
            u = xx * math.cos(angle) + yy * math.sin(angle) + float(rng.uniform(0, period))
            img = np.where((u % period) < period / 2, other, tone).astype(np.float32)
        else:
            step = float(rng.uniform(5.5, 7.5)) * _SUPERSAMPLE
            ox, oy = rng.uniform(0, step, 2)
            dx = ((xx + ox) % step) - step / 2
            dy = ((yy + oy) % step) - step / 2
            rad = 1.3 * _SUPERSAMPLE
            img = np.where(dx * dx + dy * dy <= rad * rad, other, tone).astype(np.float32)
    else:
        raise ValueError(f"unknown background {kind!r}; known: {BACKGROUNDS}")
    img = img + rng.normal(0, 3.0, img.shape).astype(np.float32)
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _object_colour(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.asarray(COLOUR_RGB[colour], np.float32)
    jit = rng.uniform(-18, 18, 3) + rng.uniform(-15, 15)  # per channel + brightness
    return tuple(int(v) for v in np.clip(base + jit, 0, 255))


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], cx: float, cy: float, r: float) -> None:
    s = _SUPERSAMPLE
    poly = _shape_polygon(shape, cx * s, cy * s, r * s)
    if poly is None:
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=colour)
    else:
        draw.polygon(poly, fill=colour)


def _object_place(position: int, size: str, rng: np.random.Generator, img_size: int) -> tuple[float, float, float]:
    lo, hi = _RADIUS[size]
    r = float(rng.uniform(lo, hi)) * img_size / IMAGE_SIZE
    cx = (_COLUMN_X[position] + float(rng.uniform(-2.0, 2.0))) * img_size / IMAGE_SIZE
    margin = r + 1.0
    cy = float(rng.uniform(margin, img_size - margin))
    return cx, cy, r


def _check_row(row: np.ndarray) -> None:
    """A factor row must have one entry per factor and valid main-factor values (ValueError otherwise)."""
    if row.shape != (len(FACTORS),):
        raise ValueError(f"factors row must have {len(FACTORS)} entries ({list(FACTORS)}), got shape {row.shape}")
    for name in MAIN_FACTORS:
        v = int(row[FACTOR_INDEX[name]])
        if not 0 <= v < len(FACTORS[name]):
            raise ValueError(f"factor {name!r} must be in [0, {len(FACTORS[name])}), got {v}")


def render(factors: dict[str, Any] | Sequence[int] | np.ndarray, rng: np.random.Generator | int | None = None,
           image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw one image of the given factors (``{name: int | value name}`` or a row in ``FACTORS`` order).

    ``rng`` (a Generator or int seed) drives the nuisance variation: tones, stripe angle,
    exact radius, colour jitter, vertical position. Returns an RGB ``PIL.Image`` of
    ``image_size`` x ``image_size``. Raises ValueError for ``image_size`` < 1 or a bad factor row.
    """
    if not image_size >= 1:  # 0 or negative failed inside numpy ("high - low < 0", "negative dimensions")
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    row = factors_from_dict(factors) if isinstance(factors, dict) else np.asarray(factors, np.int64)
    _check_row(row)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    bg, objects = _scene(row, rng, image_size)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    for shape, colour, cx, cy, r in objects:
        _draw_object(draw, shape, colour, cx, cy, r)
    return img.reduce(_SUPERSAMPLE)


def _scene(row: np.ndarray, rng: np.random.Generator, image_size: int
           ) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int], float, float, float]]]:
    """The random draws of one image, in the renderer's order: the supersampled background, then
    per object (main first) its place and colour: ``(background [2H, 2W, 3], [(shape, rgb, cx, cy, r)])``.
    ``render`` draws exactly this; ``object_boxes`` replays it for the geometry."""
    fi = FACTOR_INDEX
    bg = _background(BACKGROUNDS[row[fi["background"]]], rng, image_size * _SUPERSAMPLE)
    cx, cy, r = _object_place(int(row[fi["position"]]), SIZES[row[fi["size"]]], rng, image_size)
    objects = [(SHAPES[row[fi["shape"]]], _object_colour(COLOURS[row[fi["colour"]]], rng), cx, cy, r)]
    if row[fi["shape2"]] != ABSENT:
        cx2, cy2, r2 = _object_place(int(row[fi["position2"]]), "small", rng, image_size)
        objects.append((SHAPES[row[fi["shape2"]]], _object_colour(COLOURS[row[fi["colour2"]]], rng), cx2, cy2, r2))
    return bg, objects


def _image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x1A6E]))


def object_box(shape: str, cx: float, cy: float, r: float, image_size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` of one drawn object: the shape's continuous extent (its polygon's
    vertices, or the circle's bounding square) rounded out to whole pixels and clipped to the image.

    Pixel ``(i, j)`` (row, column) covers ``[j, j + 1) x [i, i + 1)``; the box holds columns ``x0 .. x1 - 1``
    and rows ``y0 .. y1 - 1``. Every pixel the renderer changes lies in it, and each side is within one
    pixel of a changed pixel (``tests/test_toyworld.py`` checks both against rendered images).
    """
    poly = _shape_polygon(shape, cx, cy, r)
    if poly is None:
        lo_x, lo_y, hi_x, hi_y = cx - r, cy - r, cx + r, cy + r
    else:
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        lo_x, lo_y, hi_x, hi_y = min(xs), min(ys), max(xs), max(ys)
    clip = lambda v: min(max(v, 0), image_size)  # noqa: E731
    return (clip(math.floor(lo_x)), clip(math.floor(lo_y)), clip(math.ceil(hi_x)), clip(math.ceil(hi_y)))


def _check_start_seed(start: int, seed: int) -> None:
    """ValueError unless ``start`` (the first image's index) and ``seed`` (the world's) are >= 0."""
    if start < 0 or seed < 0:
        raise ValueError(f"start and seed must be >= 0 (the first image's index, the world's seed), got start={start}, "
                         f"seed={seed}")


def object_boxes(factors: np.ndarray, seed: int, start: int = 0, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boxes of the objects of images ``start .. start + n - 1`` of world ``seed`` (``factors [n, F]``,
    their factor rows): int64 ``[n, 2, 4]``, ``[:, 0]`` the main object, ``[:, 1]`` the second one
    (all -1 when there is none); each box ``(x0, y0, x1, y1)`` in pixels as ``object_box`` defines it.

    A pure function of the recorded factors and the world seed: it replays the renderer's random draws
    for each image (``_scene``, the same code ``render`` draws from) without drawing. A world on disk:
    ``object_boxes(factors, world.json's seed)`` with the factor rows of ``world.jsonl`` in id order.
    Cost: about the background of each image (~1 ms).
    """
    f = np.asarray(factors, np.int64)
    _check_start_seed(start, seed)
    if f.ndim != 2 or f.shape[1] != len(FACTORS):
        raise ValueError(f"factors must be [n, {len(FACTORS)}] ({list(FACTORS)}), got shape {f.shape}")
    for i, row in enumerate(f):
        try:
            _check_row(row)
        except ValueError as e:
            raise ValueError(f"factors row {i} (image {start + i}): {e}") from None
    out = np.full((len(f), 2, 4), ABSENT, np.int64)
    for i, row in enumerate(f):
        _, objects = _scene(row, _image_rng(seed, start + i), image_size)
        for k, (shape, _, cx, cy, r) in enumerate(objects):
            out[i, k] = object_box(shape, cx, cy, r, image_size)
    return out


def render_batch(factors: np.ndarray, seed: int, start: int = 0, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Images of factor rows ``factors [n, F]`` (image ``start + i`` of world ``seed``): uint8 ``[n, H, W, 3]``.

    Raises ValueError for ``start`` or ``seed`` < 0, ``image_size`` < 1 (:func:`render`) and for a bad factor row."""
    _check_start_seed(start, seed)
    if not image_size >= 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    out = np.empty((len(factors), image_size, image_size, 3), np.uint8)
    for i, row in enumerate(factors):
        out[i] = np.asarray(render(row, _image_rng(seed, start + i), image_size))
    return out


# ----------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class Caption:
    """A caption and the factor values it asserts (``{factor: value index}``): it is true of
    every image whose factors agree on those keys."""

    text: str
    constraints: tuple[tuple[str, int], ...]

    def matches(self, row: Sequence[int]) -> bool:
        return all(int(row[FACTOR_INDEX[k]]) == v for k, v in self.constraints)


def caption_options(row: Sequence[int]) -> list[Caption]:
    """Every caption the world uses for an image with factors ``row``: full and partial ones.

    Includes the zero-shot prompt phrasings (``toy_classnames_and_templates``), as web
    captions include "a photo of ..." ones.
    """
    fi = FACTOR_INDEX
    sh, co, si, po, bg = (int(row[fi[k]]) for k in MAIN_FACTORS)
    S, C, Z, P, B = SHAPES[sh], COLOURS[co], SIZES[si], POSITION_PHRASES[po], BACKGROUNDS[bg]
    c_sh, c_co, c_si, c_po, c_bg = ("shape", sh), ("colour", co), ("size", si), ("position", po), ("background", bg)
    opts = [
        Caption(f"a {Z} {C} {S} on a {B} background", (c_si, c_co, c_sh, c_bg)),
        Caption(f"a {Z} {C} {S} {P}", (c_si, c_co, c_sh, c_po)),
        Caption(f"a {C} {S} {P} on a {B} background", (c_co, c_sh, c_po, c_bg)),
        Caption(f"a {Z} {C} {S}", (c_si, c_co, c_sh)),
        Caption(f"a {C} {S}", (c_co, c_sh)),
        Caption(f"a photo of a {C} {S}", (c_co, c_sh)),
        Caption(f"a {C} {S} on a {B} background", (c_co, c_sh, c_bg)),
        Caption(f"a {S}", (c_sh,)),
        Caption(f"a photo of a {S}", (c_sh,)),
        Caption(f"a {Z} {S}", (c_si, c_sh)),
        Caption(f"a {S} {P}", (c_sh, c_po)),
        Caption(f"something {C}", (c_co,)),
        Caption(f"a {C} object", (c_co,)),
        Caption(f"a photo of a {C} object", (c_co,)),
        Caption(f"a {Z} object", (c_si,)),
        Caption(f"a photo of a {Z} object", (c_si,)),
        Caption(f"something {Z} and {C}", (c_si, c_co)),
        Caption(f"an object {P}", (c_po,)),
        Caption(f"something {P}", (c_po,)),
        Caption(f"a {B} background", (c_bg,)),
        Caption(f"a photo with a {B} background", (c_bg,)),
        Caption(f"something on a {B} background", (c_bg,)),
    ]
    if row[fi["shape2"]] != ABSENT:
        S2, C2 = SHAPES[int(row[fi["shape2"]])], COLOURS[int(row[fi["colour2"]])]
        c2 = (("shape2", int(row[fi["shape2"]])), ("colour2", int(row[fi["colour2"]])))
        opts += [
            Caption(f"a {C} {S} and a small {C2} {S2}", (c_co, c_sh) + c2),
            Caption(f"a large {C} {S} and a small {C2} {S2} on a {B} background", (c_co, c_sh, c_bg) + c2),
            Caption(f"two objects, a {C} {S} and a {C2} {S2}", (c_co, c_sh) + c2),
            Caption("two objects", (("n_objects", 1),)),
        ]
    else:
        opts.append(Caption(f"a single {C} {S}", (c_co, c_sh, ("n_objects", 0))))
    return opts


# The captions written to world.jsonl: one full, the rest partial (indices into caption_options).
_LISTED = (0, 2, 4, 7, 11, 14, 19)


def captions_for(row: Sequence[int]) -> list[str]:
    """The natural captions recorded for an image: full first, then partial ones."""
    opts = caption_options(row)
    out = [opts[i].text for i in _LISTED]
    if row[FACTOR_INDEX["shape2"]] != ABSENT:
        out.insert(0, opts[-3].text)
    return out


def toy_classnames_and_templates() -> dict[str, dict[str, Any]]:
    """Zero-shot benchmarks of the toy world in ImageNet's form.

    Returns ``{benchmark: {"column": factor name (the label column in world.jsonl / shards),
    "classnames": [...], "templates": ["... {} ...", ...]}}``. A class's text embedding is
    the mean over templates of ``template.format(classname)`` (as for ImageNet).
    """
    return {
        "colour": {"column": "colour", "classnames": list(COLOURS),
                   "templates": ["a photo of a {} object", "a {} object", "something {}"]},
        "shape": {"column": "shape", "classnames": list(SHAPES), "templates": ["a photo of a {}", "a {}"]},
        "size": {"column": "size", "classnames": list(SIZES),
                 "templates": ["a photo of a {} object", "a {} object"]},
        "position": {"column": "position", "classnames": list(POSITION_PHRASES),
                     "templates": ["an object {}", "something {}"]},
        "background": {"column": "background", "classnames": list(BACKGROUNDS),
                       "templates": ["a {} background", "a photo with a {} background", "something on a {} background"]},
        "colour_shape": {"column": "colour_shape", "classnames": list(FACTORS["colour_shape"]),
                         "templates": ["a photo of a {}", "a {}"]},
    }


# ----------------------------------------------------------------------------- in memory


@dataclass
class ToyWorld:
    """An in-memory world: ``images`` uint8 ``[n, H, W, 3]``, ``factors`` int64 ``[n, F]``."""

    images: np.ndarray
    factors: np.ndarray
    seed: int

    def __len__(self) -> int:
        return len(self.factors)

    def factor(self, name: str) -> np.ndarray:
        """Labels of one factor: int64 [n] (-1 = absent)."""
        return self.factors[:, FACTOR_INDEX[name]]

    def pil(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i], "RGB")

    def captions(self, i: int) -> list[str]:
        return captions_for(self.factors[i])


def sample_world(n: int, seed: int, two_object_fraction: float = 0.25, image_size: int = IMAGE_SIZE,
                 progress: bool = False) -> ToyWorld:
    """``n`` images of world ``seed`` in memory (the same images ``generate_world`` writes)."""
    f = sample_factors(n, seed, two_object_fraction)
    if progress:
        from tqdm import tqdm

        imgs = np.empty((n, image_size, image_size, 3), np.uint8)
        for start in tqdm(range(0, n, 1000), desc=f"toyworld seed {seed}", unit_scale=1000, unit="img"):
            imgs[start:start + 1000] = render_batch(f[start:start + 1000], seed, start, image_size)
    else:
        imgs = render_batch(f, seed, 0, image_size)
    return ToyWorld(imgs, f, int(seed))


# ----------------------------------------------------------------------------- on disk


def _png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _replace_bytes(path: Path, data: bytes) -> None:
    """Temp file + rename, without fsync: a killed process leaves no partial image. (An fsync per
    image tripled the time of writing a world; images are a pure function of (seed, index), and
    world.jsonl, which is fsync'd, only lists a chunk once all its images are written.)"""
    atomic_write_bytes(path, data, fsync=False)


def _write_chunk(task: tuple[str, np.ndarray, int, int, int]) -> list[str]:
    """Render images ``start ..`` of world ``seed`` from their factor rows, write them under ``out`` (each file
    atomically) and return their ``world.jsonl`` lines (a worker task of :func:`generate_world`)."""
    out_s, rows, seed, start, image_size = task
    out = Path(out_s)
    imgs = render_batch(rows, seed, start, image_size)
    lines = []
    for j, row in enumerate(rows):
        name = f"{start + j:06d}"
        _replace_bytes(out / "images" / f"{name}.png", _png_bytes(Image.fromarray(imgs[j], "RGB")))
        lines.append(json.dumps({"id": name, "file": f"images/{name}.png",
                                 "factors": factors_to_dict(row), "captions": captions_for(row)}))
    return lines


def generate_world(out_dir: str | Path, n: int, seed: int = 0, *, two_object_fraction: float = 0.25,
                   image_size: int = IMAGE_SIZE, chunk: int = 1000, progress: bool = True, workers: int = 1) -> Path:
    """Write ``n`` images of world ``seed`` to ``out_dir`` (images/, world.json, world.jsonl).

    Resumable: images are written in chunks of ``chunk`` and ``world.jsonl`` is extended
    (atomically rewritten) after each chunk, in order, so a rerun after a kill continues after the
    last recorded image. An existing world with other (seed, n, ...) is an error.
    ``workers``: processes rendering chunks in parallel (1: this process only; 0: one per CPU core;
    :mod:`visae.workers`; from a script, ``workers > 1`` needs the ``if __name__ == "__main__":`` guard); the files
    written are byte-identical whatever the number.
    Returns ``out_dir``.

    Raises:
        ValueError: ``n``, ``two_object_fraction``, ``image_size``, ``chunk`` or ``workers`` out of range (before
            anything is written), or ``out_dir`` holding another world.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:  # failed inside numpy after world.json was written
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= two_object_fraction <= 1.0:  # a fraction: outside [0, 1] it acted as 0 or 1
        raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
    if image_size < 1 or chunk < 1:
        raise ValueError(f"image_size and chunk must be >= 1, got {image_size} and {chunk}")
    from visae.workers import record_chunks, resolve_workers, resume_prefix

    workers = resolve_workers(workers)
    out = Path(out_dir)
    from visae.atomic import check_output_path

    check_output_path(out, "the world generator")  # a file at --out: exit 2, not a bare 'Not a directory'
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "factors": {k: list(v) for k, v in FACTORS.items()},
        "main_factors": list(MAIN_FACTORS),
        "seed": int(seed),
        "n": int(n),
        "image_size": int(image_size),
        "two_object_fraction": float(two_object_fraction),
        "label": "colour_shape",
        "absent": ABSENT,
        "benchmarks": toy_classnames_and_templates(),
    }
    wj = out / "world.json"
    if wj.exists():
        old = read_world_json(wj)
        for k in ("seed", "n", "image_size", "two_object_fraction", "factors"):
            if old.get(k) != meta[k]:
                raise WorldError(f"{wj}: existing world has {k}={old.get(k)!r}, asked for {meta[k]!r}; "
                                 "use another out_dir or delete it")
    else:
        atomic_write_text(wj, json.dumps(meta, indent=1))
    jl = out / "world.jsonl"
    lines = resume_prefix(jl, n, chunk)
    f = sample_factors(n, seed, two_object_fraction)
    tasks = [(str(out), f[start:start + chunk], int(seed), start, int(image_size))
             for start in range(len(lines), n, chunk)]
    record_chunks(jl, lines, _write_chunk, tasks, workers, progress, f"toyworld -> {out}")
    return out


def read_world_json(path: str | Path) -> dict[str, Any]:
    """A world directory's ``world.json`` (either world's) as a dict. Raises WorldError naming the file when it is
    not JSON or not a mapping (a damaged file: the generation is rerun into a new directory, or it is deleted)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorldError(f"{path} is damaged ({e}); delete it or use another out_dir") from None
    if not isinstance(doc, dict):
        raise WorldError(f"{path}: expected a JSON object, got {type(doc).__name__}; delete it or use another out_dir")
    return doc


def read_world(world_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(world.json, list of world.jsonl records) of a generated world; checks it is complete."""
    d = Path(world_dir)
    wj, jl = d / "world.json", d / "world.jsonl"
    if not wj.is_file() or not jl.is_file():
        raise WorldError(f"{d} is not a toy world: world.json and world.jsonl are expected (visae toyworld --out {d})")
    meta = read_world_json(wj)
    try:
        recs = [json.loads(line) for line in jl.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise WorldError(f"{jl} is damaged (line {e.lineno}: {e.msg}); rerun the generation into a new directory") from None
    if len(recs) != meta.get("n"):
        raise WorldError(f"{jl}: {len(recs)} records but world.json says n={meta['n']} (incomplete: rerun generation)")
    return meta, recs


# ----------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class ToyWorldConfig:
    """Generate images of the synthetic world with their factor labels and captions."""

    out: str = field(default="runs/toyworld", metadata={"help": "output directory (images/, world.json, world.jsonl)"})
    n: int = field(default=2000, metadata={"help": "number of images"})
    seed: int = field(default=0, metadata={"help": "world seed (factors and pixels are deterministic given it)"})
    two_object_fraction: float = field(default=0.25, metadata={"help": "fraction of images with a second, small object"})
    image_size: int = field(default=IMAGE_SIZE, metadata={"help": "image side in pixels"})
    workers: int = field(default=0, metadata={
        "help": "processes rendering chunks of images in parallel (0: one per CPU core; the files are the same "
                "whatever the number)"})

    def __post_init__(self) -> None:
        from visae.config import check_bounds

        check_bounds(self, {"n": (0, None), "seed": (0, None), "image_size": (1, None),
                            "two_object_fraction": (0.0, 1.0), "workers": (0, None)}, {"workers": "(0: one per CPU core)"})


def main(argv: list[str] | None = None) -> int:
    from visae.config import parse_config
    from visae.resources import config_yaml

    from visae.errors import VisaeError, report

    try:
        cfg = parse_config(ToyWorldConfig, argv, default_yaml=config_yaml("toyworld.yaml"), prog="visae toyworld")
        out = generate_world(cfg.out, cfg.n, cfg.seed, two_object_fraction=cfg.two_object_fraction,
                             image_size=cfg.image_size, workers=cfg.workers)
    except VisaeError as e:  # a bad flag, another world in --out (named with what differs): one line
        return report("visae toyworld", e)
    from visae.config import absolute_paths

    # out recorded absolute (as every stage records its paths): the record says which directory from anywhere
    atomic_write_text(out / "config.json", json.dumps(absolute_paths(dataclasses.asdict(cfg), ("out",)), indent=1))
    print(f"wrote {cfg.n} images to {out}")
    return 0
