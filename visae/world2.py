"""A richer synthetic world (issue 12): many objects anywhere, at any size and rotation, ~1,000 named colours.

Compared with ``visae.toyworld`` (one object in one of three columns, 8 colours, 6 shapes),
a scene here has 1-4 objects, each with a continuous centre ``(cx, cy)`` (pixels, anywhere
with the object fully in frame), continuous radius (5-20 px) and rotation, optionally
overlapping (partial occlusion: later objects are drawn over earlier ones), and

    shape      23 shapes (circle, ellipse, semicircle, ring, crescent, heart, arrow, polygons
               by number of sides, stars by number of points, cross, chevron, ...)
    colour     a named colour of matplotlib (the XKCD colour-survey names and the CSS names
               not among them; their RGB is the drawn colour), grouped into the 11 basic colour
               terms (``colour_family``: a fixed HSV rule, ``family_of_rgb``)
    texture    10 textures of objects and of the background (plain striped dotted checked ...)
    size       small / medium / large (radius buckets), hpos / vpos (thirds of the frame),
    n_objects  one..four, relation (where the second object is relative to the main one)

Scenes are pure functions of ``(seed, index)``. Every object's exact bounding box (of its
full, unoccluded geometry, clipped to the frame) and visible mask are recorded; captions are
built from the factors (``caption_options``), with the factor values each asserts.

Two independent renderers draw the same scene: ``render_pil`` (PIL polygons at 2x, box-filtered:
the training renderer) and ``render_skimage`` (scikit-image rasterisation at 1x without
anti-aliasing, its own shape geometry and texture code): a model that learnt the concepts
scores both alike, one that learnt the renderer does not (issue 12).

On disk (``generate_world2(out_dir, n, seed)``, ``python -m visae.world2 --out DIR --n N``),
in the layout ``visae extract --source toyworld`` reads (docs/toyworld.md)::

    out_dir/world.json    {"format": "visae.toyworld2", "version": 2, "factors": {name: [value names]}, ...}
    out_dir/world.jsonl   {"id", "file", "mask", "factors": {name: int, -1 absent}, "objects": [...],
                           "background": {...}, "captions": [...]}
    out_dir/images/000123.png   out_dir/masks/000123.png  (uint8 label map: 0 background, k+1 object k)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from visae.atomic import atomic_write_bytes, atomic_write_text
from visae.toyworld import WorldError, read_world_json

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "IMAGE_SIZE", "SHAPES", "TEXTURES", "FAMILIES", "SIZES",
    "HPOS", "VPOS", "COUNTS", "RELATIONS", "FACTORS", "FACTOR_INDEX", "MAIN_FACTORS",
    "named_colours", "colour_families", "family_of_rgb", "rgb_to_lab", "Obj", "Scene", "sample_scene", "sample_scenes",
    "scene_factors", "object_box", "render_pil", "render_skimage", "Caption", "caption_options",
    "captions_for", "grounded_words", "classnames_and_templates", "World2", "sample_world2",
    "generate_world2", "World2Config", "main", "TextureStyle", "texture_style",
    "SHAPE_NAMES", "TEXTURE_NAMES", "SIZE_NAMES", "POSITION_NAMES", "FAMILY_SPELLINGS", "COLOUR_NAME_DELTA_E",
    "NAMED_FACTORS", "accepted_names", "name_matches", "has_naming_truth", "is_world2_shards",
]

FORMAT_NAME = "visae.toyworld2"
FORMAT_VERSION = 2  # 2: crosshatched a rhombic (60-degree) lattice, wavy 4 periods long (both renderers)
IMAGE_SIZE = 64
ABSENT = -1

SHAPES = ("circle", "ellipse", "semicircle", "ring", "crescent", "heart", "arrow", "triangle", "square",
          "rectangle", "diamond", "trapezoid", "parallelogram", "pentagon", "hexagon", "heptagon", "octagon",
          "cross", "chevron", "four-pointed star", "five-pointed star", "six-pointed star", "eight-pointed star")
TEXTURES = ("plain", "striped", "dotted", "checked", "gridded", "zigzag", "wavy", "speckled", "crosshatched",
            "gradient")
# The 11 basic colour terms of English (Berlin & Kay 1969).
FAMILIES = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey")
SIZES = ("small", "medium", "large")
SIZE_EDGES = (5.0, 9.0, 14.0, 20.0)  # radius (px) buckets: [5, 9) small, [9, 14) medium, [14, 20] large
HPOS = ("on the left", "in the centre", "on the right")
VPOS = ("at the top", "in the middle", "at the bottom")
COUNTS = ("one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
OCCLUDED = ("whole", "partly hidden")


def _name_ok(name: str) -> bool:
    return re.fullmatch(r"[a-z]+( [a-z]+)*", name) is not None


@lru_cache(maxsize=None)
def named_colours() -> tuple[tuple[str, ...], np.ndarray]:
    """(names, uint8 RGB ``[N, 3]``): matplotlib's XKCD survey colours (names of lower-case words only)
    followed by the CSS4 names that are not XKCD names; sorted by name within each group."""
    from matplotlib import colors as mcolors

    xk = {k[5:]: v for k, v in mcolors.XKCD_COLORS.items() if _name_ok(k[5:])}
    css = {k: v for k, v in mcolors.CSS4_COLORS.items() if _name_ok(k) and k not in xk}
    names = tuple(sorted(xk)) + tuple(sorted(css))
    hexes = [xk.get(n) or css[n] for n in names]
    rgb = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in hexes], np.uint8)
    return names, rgb


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8 or float 0-255, ``[..., 3]``) -> CIELAB (D65) ``[..., 3]`` (the standard sRGB formulas)."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def family_of_rgb(rgb: np.ndarray) -> np.ndarray:
    """Basic colour term (index into ``FAMILIES``) of uint8 RGB ``[N, 3]``: int64 ``[N]``.

    A fixed rule on HSV (hue H in degrees, saturation S, value V; written for this world, not a
    published model): V < 0.22 black; S < 0.15 (or S < 0.25 and V < 0.5) white (V > 0.88, S < 0.12) or
    grey; then by hue: red [340, 15) (pink when S < 0.55 and V > 0.7, brown when V < 0.45), orange
    [15, 42) (brown when V < 0.65 or S < 0.45 and V < 0.85; pink when pale), yellow [42, 68) (brown
    when V < 0.55), green [68, 165), blue [165, 255), purple [255, 290), pink [290, 340) (purple when
    V < 0.5). Cyan and teal count as blue (English has no basic term for them).
    """
    from matplotlib import colors as mcolors

    hsv = mcolors.rgb_to_hsv(np.asarray(rgb, np.float64).reshape(-1, 3) / 255.0)
    out = np.empty(len(hsv), np.int64)
    for i, (h, s, v) in enumerate(hsv):
        h = h * 360
        if v < 0.22:
            f = "black"
        elif s < 0.15 or (s < 0.25 and v < 0.5):
            f = "white" if v > 0.88 and s < 0.12 else "grey"
        elif h < 15 or h >= 340:
            f = "pink" if (s < 0.55 and v > 0.7) else ("brown" if v < 0.45 else "red")
        elif h < 42:
            f = "brown" if v < 0.65 or (s < 0.45 and v < 0.85) else ("pink" if s < 0.45 else "orange")
        elif h < 68:
            f = "brown" if v < 0.55 else "yellow"
        elif h < 165:
            f = "green"
        elif h < 255:
            f = "blue"
        elif h < 290:
            f = "purple"
        else:
            f = "purple" if v < 0.5 else "pink"
        out[i] = FAMILIES.index(f)
    return out


@lru_cache(maxsize=None)
def colour_families() -> np.ndarray:
    """int64 ``[N]``: the basic colour term (index into ``FAMILIES``) of every named colour (``family_of_rgb``)."""
    return family_of_rgb(named_colours()[1])


@lru_cache(maxsize=None)
def _by_family() -> tuple[np.ndarray, ...]:
    fam = colour_families()
    return tuple(np.flatnonzero(fam == f) for f in range(len(FAMILIES)))


def _colour_names() -> tuple[str, ...]:
    return named_colours()[0]


MAIN_FACTORS = ("shape", "colour_family", "texture", "size", "hpos", "vpos", "background")


def _factor_table() -> dict[str, tuple[str, ...]]:
    return {
        "shape": SHAPES,
        "colour_family": FAMILIES,
        "colour": _colour_names(),
        "texture": TEXTURES,
        "size": SIZES,
        "hpos": HPOS,
        "vpos": VPOS,
        "background": TEXTURES,
        "occluded": OCCLUDED,
        "n_objects": COUNTS,
        "relation": RELATIONS,
        "shape2": SHAPES,
        "colour_family2": FAMILIES,
        "colour2": _colour_names(),
        "family_shape": tuple(f"{c} {s}" for c in FAMILIES for s in SHAPES),
    }


FACTORS: dict[str, tuple[str, ...]] = _factor_table()
FACTOR_INDEX = {name: i for i, name in enumerate(FACTORS)}

# ----------------------------------------------------------------------------- geometry (renderer 1)


def _regular(n: int, phase: float = -math.pi / 2, r: float = 1.0) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(n: int, inner: float) -> list[tuple[float, float]]:
    return [((1.0 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + math.pi * k / n),
             (1.0 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + math.pi * k / n)) for k in range(2 * n)]


def _heart(m: int = 48) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * math.pi, m, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return list(zip((x / 17).tolist(), ((y + 2.5) / 17).tolist()))


def _shape_ops_raw(shape: str) -> list[tuple[list[tuple[float, float]], int]]:
    """Renderer 1's geometry: (polygon, fill 1 = paint / 0 = cut out) operations in unit coordinates."""
    circle = _regular(48)
    table: dict[str, list] = {
        "circle": [(circle, 1)],
        "ellipse": [([(x, 0.55 * y) for x, y in circle], 1)],
        "semicircle": [([(math.cos(math.pi + math.pi * k / 24), 0.45 + math.sin(math.pi + math.pi * k / 24))
                         for k in range(25)], 1)],
        "ring": [(circle, 1), (_regular(48, r=0.55), 0)],
        "crescent": [(circle, 1), ([(0.45 + 0.85 * x, -0.1 + 0.85 * y) for x, y in circle], 0)],
        "heart": [(_heart(), 1)],
        "arrow": [([(-1, -0.25), (0.15, -0.25), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.25), (-1, 0.25)], 1)],
        "triangle": [(_regular(3), 1)],
        "square": [(_regular(4, -math.pi / 4), 1)],
        "rectangle": [([(-1, -0.5), (1, -0.5), (1, 0.5), (-1, 0.5)], 1)],
        "diamond": [([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)], 1)],
        "trapezoid": [([(-1, 0.55), (1, 0.55), (0.45, -0.55), (-0.45, -0.55)], 1)],
        "parallelogram": [([(-1, 0.5), (0.4, 0.5), (1, -0.5), (-0.4, -0.5)], 1)],
        "pentagon": [(_regular(5), 1)],
        "hexagon": [(_regular(6), 1)],
        "heptagon": [(_regular(7), 1)],
        "octagon": [(_regular(8), 1)],
        "cross": [([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
                    (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)], 1)],
        "chevron": [([(-1, -0.65), (0, 0.05), (1, -0.65), (1, -0.05), (0, 0.65), (-1, -0.05)], 1)],
        "four-pointed star": [(_star(4, 0.38), 1)],
        "five-pointed star": [(_star(5, 0.42), 1)],
        "six-pointed star": [(_star(6, 0.5), 1)],
        "eight-pointed star": [(_star(8, 0.55), 1)],
    }
    if shape not in table:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return table[shape]


@lru_cache(maxsize=None)
def _shape_ops(shape: str) -> tuple[tuple[np.ndarray, int], ...]:
    """Renderer 1's unit geometry, scaled so the painted polygons fit the unit disc exactly (radius = extent)."""
    ops = _shape_ops_raw(shape)
    ext = max(float(np.linalg.norm(np.asarray(p, np.float64), axis=1).max()) for p, fill in ops if fill)
    return tuple((np.asarray(p, np.float64) / ext, fill) for p, fill in ops)


def _place(pts: np.ndarray, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    x, y = pts[:, 0] * r, pts[:, 1] * r
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Obj:
    """One object: ``shape`` / ``texture`` index, ``colour`` (index into ``named_colours()``), drawn ``rgb``,
    centre ``(cx, cy)`` and ``radius`` in pixels of the 64 x 64 frame (the shape fits the disc of that
    radius), rotation ``angle`` (radians, counter-clockwise in image coordinates), texture ``period`` (px)
    and ``tex_angle`` (radians)."""

    shape: int
    colour: int
    rgb: tuple[int, int, int]
    texture: int
    cx: float
    cy: float
    radius: float
    angle: float
    period: float
    tex_angle: float


@dataclass(frozen=True)
class Scene:
    """Objects in drawing order (later ones over earlier ones; ``objects[0]`` is the main, largest one) on a
    background of texture ``background`` in grey ``bg_tone`` (0-255), texture period / angle; ``noise_seed``
    drives the speckled texture."""

    objects: tuple[Obj, ...]
    background: int
    bg_tone: int
    bg_period: float
    bg_angle: float
    noise_seed: int


def _scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x3D2]))


def sample_scene(rng: np.random.Generator | int, *, max_objects: int = 4, occlusion: float = 0.3,
                 colour_jitter: float = 0.0, image_size: int = IMAGE_SIZE) -> Scene:
    """One random scene. ``occlusion``: probability that objects may overlap (centres at least 0.4 of
    the sum of radii apart instead of the full sum); ``colour_jitter``: uniform per-channel RGB jitter
    (0-255 units) added to each named colour (0: the drawn colour is exactly the named colour).

    Raises:
        ValueError: ``max_objects`` outside [1, 4], ``occlusion`` outside [0, 1], ``colour_jitter`` < 0 or
            ``image_size`` < 1 (NaN included: each was taken silently, as no jitter or a probability of 0 or 1).
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    if not 1 <= max_objects <= len(COUNTS):
        raise ValueError(f"max_objects must be in [1, {len(COUNTS)}], got {max_objects}")
    if not 0.0 <= occlusion <= 1.0:
        raise ValueError(f"occlusion must be a probability in [0, 1], got {occlusion}")
    if not colour_jitter >= 0.0:
        raise ValueError(f"colour_jitter must be >= 0 (RGB units; 0: none), got {colour_jitter}")
    if not image_size >= 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    names, rgb_tab = named_colours()
    by_family = _by_family()
    scale = image_size / IMAGE_SIZE
    n = int(rng.integers(1, max_objects + 1))
    # Radii: the main object's first, the others no larger (so the main object is the largest).
    radii = [float(rng.uniform(SIZE_EDGES[0], SIZE_EDGES[-1]))]
    for _ in range(n - 1):
        radii.append(float(rng.uniform(SIZE_EDGES[0], min(radii[0], 12.0))))
    overlap = bool(rng.random() < occlusion)
    min_sep = 0.4 if overlap else 1.0
    placed: list[tuple[float, float, float]] = []
    for j, r in enumerate(radii):
        for _attempt in range(50):
            if j == 0:  # the main object: its horizontal / vertical thirds uniform, then a place within them
                cx, cy = (float(rng.uniform(max(r, t * IMAGE_SIZE / 3), min(IMAGE_SIZE - r, (t + 1) * IMAGE_SIZE / 3 - 1e-6)))
                          for t in rng.integers(0, 3, 2))
            else:
                cx, cy = (float(v) for v in rng.uniform(r, IMAGE_SIZE - r, 2))
            if all(math.hypot(cx - x, cy - y) >= min_sep * (r + rr) for x, y, rr in placed):
                break
        else:
            break  # no room: fewer objects
        placed.append((cx, cy, r))
    objs = []
    for cx, cy, r in placed:
        f = int(rng.integers(len(FAMILIES)))
        ci = int(rng.choice(by_family[f]))
        base = rgb_tab[ci].astype(np.float64)
        if colour_jitter > 0:
            base = base + rng.uniform(-colour_jitter, colour_jitter, 3)
        rgb = tuple(int(v) for v in np.clip(np.rint(base), 0, 255))
        objs.append(Obj(int(rng.integers(len(SHAPES))), ci, rgb, int(rng.integers(len(TEXTURES))),
                        cx * scale, cy * scale, r * scale, float(rng.uniform(0, 2 * math.pi)),
                        float(rng.uniform(3.0, 5.0)) * scale, float(rng.uniform(0, math.pi))))
    # Background grey far enough (CIE76 >= 25) from every object colour to be told apart.
    labs = rgb_to_lab(np.array([o.rgb for o in objs], np.float64))
    tone = int(rng.integers(60, 200))
    for _attempt in range(30):
        if np.linalg.norm(labs - rgb_to_lab(np.array([tone] * 3, np.float64)), axis=1).min() >= 25:
            break
        tone = int(rng.integers(40, 220))
    return Scene(tuple(objs), int(rng.integers(len(TEXTURES))), tone, float(rng.uniform(4.0, 7.0)) * scale,
                 float(rng.uniform(0, math.pi)), int(rng.integers(2**31)))


def sample_scenes(n: int, seed: int, start: int = 0, **kw: Any) -> list[Scene]:
    """Scenes ``start .. start + n - 1`` of world ``seed`` (scene i depends only on (seed, i)).

    Raises ValueError for ``n`` < 0 (it gave no scenes), ``start`` or ``seed`` < 0, and as :func:`sample_scene` for
    ``kw``."""
    if n < 0 or start < 0 or seed < 0:
        raise ValueError(f"n, start and seed must be >= 0, got n={n}, start={start}, seed={seed}")
    return [sample_scene(_scene_rng(seed, i), **kw) for i in range(start, start + n)]


def object_box(o: Obj, image_size: int = IMAGE_SIZE) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` in pixels (continuous; pixel (i, j) covers [j, j+1) x [i, i+1)) of the object's
    full geometry (renderer 1's painted polygons, before occlusion), clipped to the frame."""
    pts = np.concatenate([_place(p, o.cx, o.cy, o.radius, o.angle) for p, fill in _shape_ops(SHAPES[o.shape]) if fill])
    lo, hi = np.clip(pts.min(0), 0, image_size), np.clip(pts.max(0), 0, image_size)
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _size_bucket(r: float, image_size: int) -> int:
    r = r * IMAGE_SIZE / image_size
    return int(np.clip(np.searchsorted(SIZE_EDGES[1:-1], r, side="right"), 0, len(SIZES) - 1))


def _third(v: float, image_size: int) -> int:
    return int(min(2, max(0, v * 3 // image_size)))


def _relation(a: Obj, b: Obj) -> int:
    """Where ``b`` is relative to ``a``: left of / right of (|dx| >= |dy|) or above / below."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return RELATIONS.index("left of" if dx < 0 else "right of")
    return RELATIONS.index("above" if dy < 0 else "below")


def scene_factors(scene: Scene, visible_fraction: Sequence[float] | None = None,
                  image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The factor row (int64 ``[len(FACTORS)]``, -1 = absent) of a scene: main object = ``objects[0]``;
    ``occluded`` needs the main object's rendered ``visible_fraction`` (< 0.9: partly hidden)."""
    row = np.full(len(FACTORS), ABSENT, np.int64)
    fi, fam = FACTOR_INDEX, colour_families()
    o = scene.objects[0]
    row[fi["shape"]], row[fi["colour"]], row[fi["colour_family"]] = o.shape, o.colour, fam[o.colour]
    row[fi["texture"]], row[fi["size"]] = o.texture, _size_bucket(o.radius, image_size)
    row[fi["hpos"]], row[fi["vpos"]] = _third(o.cx, image_size), _third(o.cy, image_size)
    row[fi["background"]] = scene.background
    row[fi["n_objects"]] = len(scene.objects) - 1
    if visible_fraction is not None:
        row[fi["occluded"]] = int(visible_fraction[0] < 0.9)
    if len(scene.objects) > 1:
        b = scene.objects[1]
        row[fi["relation"]] = _relation(o, b)
        row[fi["shape2"]], row[fi["colour2"]], row[fi["colour_family2"]] = b.shape, b.colour, fam[b.colour]
    row[fi["family_shape"]] = row[fi["colour_family"]] * len(SHAPES) + row[fi["shape"]]
    return row


# ----------------------------------------------------------------------------- textures (renderer 1)


@dataclass(frozen=True)
class TextureStyle:
    """How renderer 1 draws the ten texture kinds; the defaults are the world's canonical look.

    ``duty``: fraction of a period in the second tone (striped, zigzag, wavy); ``dot``: dot radius / period;
    ``line``: multiplier of the gridded (0.25 period) and crosshatched (0.2 period) line widths; ``wave``: wavy
    amplitude / period; ``speckle``: probability of a speckle cell, ``speckle_cell``: its side (px);
    ``bg_contrast``: grey levels between a background's two tones; ``obj_contrast``: how far an object's
    second tone is from its colour (1: :func:`_second_tone`). Training with per-scene styles
    (:func:`texture_style`, ``render_pil(..., style_jitter=)``) teaches texture *kinds* rather than one
    drawing of each, so that they transfer to renderer 2 (which draws them with its own formulas).
    """

    duty: float = 0.5
    dot: float = 0.3
    line: float = 1.0
    wave: float = 0.5
    speckle: float = 0.35
    speckle_cell: int = 2
    bg_contrast: float = 45.0
    obj_contrast: float = 1.0


def texture_style(scene: "Scene", jitter: float) -> TextureStyle:
    """The scene's drawing style: the canonical :class:`TextureStyle` for ``jitter == 0``; otherwise each field
    drawn uniformly (from the scene's ``noise_seed``, so a scene always gets the same style) within ``jitter``
    times its range: duty 0.5 +- 0.2, dot 0.3 +- 0.1, line x [1 - 0.5, 1 + 0.6], wave 0.5 +- 0.15, speckle
    0.35 +- 0.12, speckle_cell 1-3 px (for jitter >= 0.5), bg_contrast 45 +- 20, obj_contrast 1 +- 0.35.

    Raises:
        ValueError: ``jitter`` outside [0, 1].
    """
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"style jitter must be in [0, 1], got {jitter}")
    if jitter == 0.0:
        return TextureStyle()
    g = np.random.default_rng(np.random.SeedSequence([int(scene.noise_seed), 0x57])).uniform(-1.0, 1.0, 8) * jitter
    return TextureStyle(duty=0.5 + 0.2 * g[0], dot=0.3 + 0.1 * g[1], line=1.0 + (0.6 if g[2] > 0 else 0.5) * g[2],
                        wave=0.5 + 0.15 * g[3], speckle=0.35 + 0.12 * g[4],
                        speckle_cell=int(np.clip(np.rint(2 + g[5] / jitter), 1, 3)) if jitter >= 0.5 else 2,
                        bg_contrast=45.0 + 20.0 * g[6], obj_contrast=1.0 + 0.35 * g[7])


_CANONICAL = TextureStyle()
_COS60, _SIN60 = 0.5, math.sqrt(3) / 2


def _texture_pattern(kind: int, xx: np.ndarray, yy: np.ndarray, period: float, angle: float, size: float,
                     noise_seed: int, style: TextureStyle = _CANONICAL) -> np.ndarray:
    """Pattern in [0, 1] on pixel coordinates ``xx, yy`` (1 = the texture's second tone), drawn in ``style``."""
    name = TEXTURES[kind]
    c, s = math.cos(angle), math.sin(angle)
    u, v = xx * c + yy * s, -xx * s + yy * c
    if name == "plain":
        return np.zeros_like(xx)
    if name == "striped":
        return ((u % period) < period * style.duty).astype(np.float32)
    if name == "dotted":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        return (du * du + dv * dv <= (style.dot * period) ** 2).astype(np.float32)
    if name == "checked":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if name == "gridded":
        w = max(1.0, 0.25 * style.line * period)
        return (((u % period) < w) | ((v % period) < w)).astype(np.float32)
    if name == "zigzag":
        tri = np.abs(((u / period) % 2) - 1) * period
        return (((v + tri) % period) < period * style.duty).astype(np.float32)
    if name == "wavy":
        # a gentle wave 4 periods long: at 2 periods (its first drawing) it was a rounded zigzag (13 % of pixels apart)
        return (((v + style.wave * period * np.sin(2 * math.pi * u / (4 * period))) % period) < period * style.duty).astype(np.float32)
    if name == "speckled":
        g = np.random.default_rng(noise_seed)
        c = style.speckle_cell
        cells = g.random((int(size) // c + 2, int(size) // c + 2)) < style.speckle
        return cells[(yy // c).astype(int) % cells.shape[0], (xx // c).astype(int) % cells.shape[1]].astype(np.float32)
    if name == "crosshatched":
        # two line families 60 degrees apart (a rhombic lattice): at 90 degrees (its first drawing) it was gridded
        # turned 45 degrees, which the world's random angle made the same texture
        w = max(1.0, 0.2 * style.line * period)
        d2 = u * _COS60 + v * _SIN60
        return (((u % period) < w) | ((d2 % period) < w)).astype(np.float32)
    if name == "gradient":
        return np.clip((u - u.min()) / max(1e-6, float(u.max() - u.min())), 0, 1).astype(np.float32)
    raise ValueError(f"unknown texture index {kind}")


def _second_tone(rgb: np.ndarray) -> np.ndarray:
    """The texture's other tone: darker for light colours, lighter for dark ones."""
    lum = float(rgb @ np.array([0.299, 0.587, 0.114]))
    return rgb * 0.5 if lum >= 90 else rgb + (255 - rgb) * 0.45


# ----------------------------------------------------------------------------- renderer 1: PIL


_SS = 2


def _box2(a: np.ndarray) -> np.ndarray:
    """2 x 2 box filter (mean of each 2 x 2 block) of ``[2H, 2W, ...]`` float32 -> ``[H, W, ...]``."""
    return (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) * np.float32(0.25)


def render_pil(scene: Scene, image_size: int = IMAGE_SIZE, return_coverage: bool = False, style_jitter: float = 0.0):
    """Renderer 1 (training): PIL polygons at 2x, textures, composited in order, box-filtered to 1x.
    ``style_jitter`` > 0 draws the textures in the scene's own :func:`texture_style` (training augmentation;
    geometry, colours and so every factor, mask and coverage are unchanged); 0: the canonical look.

    Returns ``(image uint8 [H, W, 3], labels uint8 [H, W])``: ``labels`` is 0 for background and k + 1
    where object k covers most of the pixel (ties: the upper object); with ``return_coverage`` also
    ``coverage float32 [K, H, W]``, each object's visible fraction of every pixel (1: fully covered), and
    ``area float64 [K]``, each object's unoccluded area in pixels (its visible fraction: coverage sum / area).
    Untextured ("plain") objects are drawn in exactly their ``rgb`` wherever their coverage is 1.
    """
    S = image_size * _SS
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    xx, yy = (xx + 0.5) / _SS, (yy + 0.5) / _SS  # sub-pixel centres, in 1x pixel units
    style = texture_style(scene, style_jitter)
    bg = np.float32(scene.bg_tone)
    t = _texture_pattern(scene.background, xx, yy, scene.bg_period, scene.bg_angle, S, scene.noise_seed, style)
    other = bg + (style.bg_contrast if bg < 128 else -style.bg_contrast)
    img = (bg * (1 - t) + other * t)[:, :, None].repeat(3, 2)
    owner = np.zeros((S, S), np.int32)  # 0 background, k + 1 object k (topmost)
    areas: list[float] = []
    for k, o in enumerate(scene.objects):
        # Work in the object's bounding box (in 2x pixels) only.
        x0 = max(0, int(math.floor((o.cx - o.radius) * _SS)) - 1)
        y0 = max(0, int(math.floor((o.cy - o.radius) * _SS)) - 1)
        x1 = min(S, int(math.ceil((o.cx + o.radius) * _SS)) + 1)
        y1 = min(S, int(math.ceil((o.cy + o.radius) * _SS)) + 1)
        if x1 <= x0 or y1 <= y0:
            areas.append(0.0)
            continue
        m = Image.new("L", (x1 - x0, y1 - y0), 0)
        d = ImageDraw.Draw(m)
        for poly, fill in _shape_ops(SHAPES[o.shape]):
            p = _place(poly, o.cx, o.cy, o.radius, o.angle) * _SS - np.array([x0, y0])
            d.polygon([tuple(v) for v in p.tolist()], fill=255 * fill)
        mask = np.asarray(m) > 0
        rgb = np.asarray(o.rgb, np.float32)
        if TEXTURES[o.texture] == "plain":
            col = np.broadcast_to(rgb, mask.shape + (3,))
        else:
            cx_, cy_ = xx[y0:y1, x0:x1], yy[y0:y1, x0:x1]
            tt = _texture_pattern(o.texture, cx_ - o.cx, cy_ - o.cy, o.period, o.tex_angle, S, scene.noise_seed + k + 1, style)
            tone2 = _second_tone(rgb)
            if style.obj_contrast != 1.0:
                tone2 = np.clip(rgb + style.obj_contrast * (tone2 - rgb), 0.0, 255.0).astype(np.float32)
            col = rgb * (1 - tt[:, :, None]) + tone2 * tt[:, :, None]
        img[y0:y1, x0:x1][mask] = col[mask]
        owner[y0:y1, x0:x1][mask] = k + 1
        areas.append(float(mask.sum()) / _SS**2)
    out = np.rint(_box2(img)).astype(np.uint8)
    K = len(scene.objects)
    cov = np.stack([_box2((owner == k + 1).astype(np.float32)) for k in range(K)]) if K else np.zeros((0, image_size, image_size), np.float32)
    bgcov = 1.0 - cov.sum(0)
    # Label: the largest coverage; ties go to the upper object (reverse order + argmax's first maximum).
    stack = np.concatenate([bgcov[None], cov[::-1]])
    a = stack.argmax(0)
    labels = np.where(a == 0, 0, K - a + 1).astype(np.uint8)
    return (out, labels, cov, np.asarray(areas)) if return_coverage else (out, labels)


# ----------------------------------------------------------------------------- renderer 2: scikit-image


def _alt_geometry(shape: str, cx: float, cy: float, r: float, angle: float):
    """Renderer 2's own geometry: list of (kind, params, fill); kinds "poly" (vertices [n, 2] x, y),
    "ellipse" (cx, cy, rx, ry, angle). Proportions differ from renderer 1's (other star depths, arm
    widths, a heart made of two discs and a triangle, ...)."""
    def poly(pts, fill=1):
        return ("poly", _place(np.asarray(pts, np.float64), cx, cy, r, angle), fill)

    def ell(ox, oy, rx, ry, fill=1):
        c, s = math.cos(angle), math.sin(angle)
        return ("ellipse", (cx + r * (c * ox - s * oy), cy + r * (s * ox + c * oy), r * rx, r * ry, angle), fill)

    def reg(n, ph=-math.pi / 2, rr=0.97):
        return [(rr * math.cos(ph + 2 * math.pi * k / n), rr * math.sin(ph + 2 * math.pi * k / n)) for k in range(n)]

    def star(n, inner):
        return [((0.97 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + math.pi * k / n),
                 (0.97 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + math.pi * k / n)) for k in range(2 * n)]

    a = np.linspace(math.pi, 2 * math.pi, 40)
    g = {
        "circle": [ell(0, 0, 0.97, 0.97)],
        "ellipse": [ell(0, 0, 0.97, 0.6)],
        "semicircle": [poly(list(zip(0.97 * np.cos(a), 0.42 + 0.97 * np.sin(a))))],
        "ring": [ell(0, 0, 0.97, 0.97), ell(0, 0, 0.6, 0.6, 0)],
        "crescent": [ell(0, 0, 0.97, 0.97), ell(0.4, -0.15, 0.8, 0.8, 0)],
        "heart": [ell(-0.42, -0.3, 0.5, 0.5), ell(0.42, -0.3, 0.5, 0.5), poly([(-0.9, -0.1), (0.9, -0.1), (0, 0.95)])],
        "arrow": [poly([(-0.97, -0.2), (0.2, -0.2), (0.2, -0.55), (0.97, 0), (0.2, 0.55), (0.2, 0.2), (-0.97, 0.2)])],
        "triangle": [poly(reg(3))],
        "square": [poly(reg(4, -math.pi / 4))],
        "rectangle": [poly([(-0.9, -0.42), (0.9, -0.42), (0.9, 0.42), (-0.9, 0.42)])],
        "diamond": [poly([(0, -0.97), (0.55, 0), (0, 0.97), (-0.55, 0)])],
        "trapezoid": [poly([(-0.9, 0.5), (0.9, 0.5), (0.5, -0.5), (-0.5, -0.5)])],
        "parallelogram": [poly([(-0.95, 0.45), (0.35, 0.45), (0.95, -0.45), (-0.35, -0.45)])],
        "pentagon": [poly(reg(5))], "hexagon": [poly(reg(6))], "heptagon": [poly(reg(7))], "octagon": [poly(reg(8))],
        "cross": [poly([(-0.25, -0.95), (0.25, -0.95), (0.25, 0.95), (-0.25, 0.95)]),
                  poly([(-0.95, -0.25), (0.95, -0.25), (0.95, 0.25), (-0.95, 0.25)])],
        "chevron": [poly([(-0.95, -0.55), (0, 0.1), (0.95, -0.55), (0.95, 0.05), (0, 0.7), (-0.95, 0.05)])],
        "four-pointed star": [poly(star(4, 0.42))],
        "five-pointed star": [poly(star(5, 0.47))],
        "six-pointed star": [poly(star(6, 0.55))],
        "eight-pointed star": [poly(star(8, 0.6))],
    }
    return g[shape]


def _alt_pattern(kind: int, xx: np.ndarray, yy: np.ndarray, period: float, angle: float, seed: int) -> np.ndarray:
    """Renderer 2's textures: the same ten kinds, written another way (sine thresholds, other widths)."""
    name = TEXTURES[kind]
    c, s = math.cos(angle), math.sin(angle)
    u, v = xx * c + yy * s, -xx * s + yy * c
    w = 2 * math.pi / period
    if name == "plain":
        return np.zeros_like(xx)
    if name == "striped":
        return (np.sin(w * u) > 0).astype(np.float32)
    if name == "dotted":
        return ((np.cos(w * u) > 0.55) & (np.cos(w * v) > 0.55)).astype(np.float32)
    if name == "checked":
        return ((np.sin(w * u / 2) * np.sin(w * v / 2)) > 0).astype(np.float32)
    if name == "gridded":
        return ((np.cos(w * u) > 0.8) | (np.cos(w * v) > 0.8)).astype(np.float32)
    if name == "zigzag":
        return (np.sin(w * (v + np.abs(((u / period) % 2) - 1) * period * 0.8)) > 0).astype(np.float32)
    if name == "wavy":
        return (np.sin(w * (v + 0.45 * period * np.sin(w * u / 4))) > 0).astype(np.float32)
    if name == "speckled":
        return (np.random.default_rng(seed).random(xx.shape) < 0.3).astype(np.float32)
    if name == "crosshatched":
        return ((np.cos(w * u) > 0.75) | (np.cos(w * (u * _COS60 + v * _SIN60)) > 0.75)).astype(np.float32)
    if name == "gradient":
        return np.clip((v - v.min()) / max(1e-6, float(v.max() - v.min())), 0, 1).astype(np.float32)
    raise ValueError(f"unknown texture index {kind}")


def render_skimage(scene: Scene, image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Renderer 2 (for tests of robustness): scikit-image rasterisation (``skimage.draw.polygon`` /
    ``ellipse``) at 1x, no anti-aliasing, renderer 2's geometry and textures. Returns ``(image uint8
    [H, W, 3], labels uint8 [H, W])`` (0 background, k + 1 object k; pixels whose centre is inside)."""
    from skimage import draw

    H = W = image_size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    t = _alt_pattern(scene.background, xx, yy, scene.bg_period, scene.bg_angle, scene.noise_seed)
    bg = np.float32(scene.bg_tone)
    img = (bg * (1 - t) + (bg + (40.0 if bg < 128 else -40.0)) * t)[:, :, None].repeat(3, 2)
    labels = np.zeros((H, W), np.uint8)
    for k, o in enumerate(scene.objects):
        mask = np.zeros((H, W), bool)
        for kind, p, fill in _alt_geometry(SHAPES[o.shape], o.cx, o.cy, o.radius, o.angle):
            if kind == "poly":  # skimage's coordinates are pixel centres: shift by half a pixel
                rr, cc = draw.polygon(p[:, 1] - 0.5, p[:, 0] - 0.5, shape=(H, W))
            else:
                ex, ey, rx, ry, ang = p
                rr, cc = draw.ellipse(ey - 0.5, ex - 0.5, ry, rx, shape=(H, W), rotation=-ang)
            mask[rr, cc] = bool(fill)
        rgb = np.asarray(o.rgb, np.float32)
        if TEXTURES[o.texture] == "plain":
            col = np.broadcast_to(rgb, (H, W, 3))
        else:
            tt = _alt_pattern(o.texture, xx - o.cx, yy - o.cy, o.period * 1.1, o.tex_angle, scene.noise_seed + k + 1)
            # the second tone: darker for light colours, lighter for dark ones (its own formula, not renderer 1's;
            # until 2026-11-30 a light colour's second tone was 0.9 x its colour, a texture too faint to see)
            second = rgb * 0.45 if rgb.mean() >= 90 else rgb + (255 - rgb) * 0.5
            col = rgb * (1 - tt[:, :, None]) + second * tt[:, :, None]
        img[mask] = col[mask]
        labels[mask] = k + 1
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


# ----------------------------------------------------------------------------- naming truth

# The words that name a factor value right (issue 12, item 5). Written down before the first measurement of naming
# on this world and not tuned to it: the value's own word, its plural / adjective forms and the common synonyms an
# English speaker would accept. The n-pointed stars accept "star": one word cannot say how many points.
_STAR = ("star", "stars", "starry", "starlike", "asterisk")
SHAPE_NAMES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "circles", "circular", "round", "disc", "disk", "discs", "disks"),
    "ellipse": ("ellipse", "ellipses", "elliptical", "elliptic", "oval", "ovals"),
    "semicircle": ("semicircle", "semicircles", "semicircular", "half-circle"),
    "ring": ("ring", "rings", "annulus", "donut", "doughnut", "hoop", "hoops"),
    "crescent": ("crescent", "crescents", "moon"),
    "heart": ("heart", "hearts"),
    "arrow": ("arrow", "arrows", "arrowhead"),
    "triangle": ("triangle", "triangles", "triangular"),
    "square": ("square", "squares"),
    "rectangle": ("rectangle", "rectangles", "rectangular", "oblong"),
    "diamond": ("diamond", "diamonds", "rhombus", "lozenge"),
    "trapezoid": ("trapezoid", "trapezoids", "trapezium", "trapezoidal"),
    "parallelogram": ("parallelogram", "parallelograms", "rhomboid"),
    "pentagon": ("pentagon", "pentagons", "pentagonal"),
    "hexagon": ("hexagon", "hexagons", "hexagonal"),
    "heptagon": ("heptagon", "heptagons", "heptagonal"),
    "octagon": ("octagon", "octagons", "octagonal"),
    "cross": ("cross", "crosses", "plus"),
    "chevron": ("chevron", "chevrons"),
    "four-pointed star": _STAR, "five-pointed star": _STAR, "six-pointed star": _STAR, "eight-pointed star": _STAR,
}
TEXTURE_NAMES: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "blank", "solid", "uniform", "flat"),
    "striped": ("striped", "stripes", "stripe", "stripy", "striping", "lines", "lined", "banded"),
    "dotted": ("dotted", "dots", "dot", "polka", "spotted", "spots", "dotty"),
    "checked": ("checked", "checkered", "chequered", "checkerboard", "checks", "check", "plaid", "tartan"),
    "gridded": ("gridded", "grid", "grids", "lattice", "mesh", "gridlines"),
    "zigzag": ("zigzag", "zigzags", "zig-zag"),
    "wavy": ("wavy", "waves", "wave", "undulating", "rippled", "ripples"),
    "speckled": ("speckled", "speckles", "speckle", "flecked", "mottled", "grainy", "freckled"),
    "crosshatched": ("crosshatched", "crosshatch", "crosshatching", "hatched", "hatching"),
    "gradient": ("gradient", "gradients", "gradation", "ombre", "shaded", "shading"),
}
SIZE_NAMES: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "little", "smaller", "smallest", "mini"),
    "medium": ("medium", "midsize", "moderate"),
    "large": ("large", "big", "huge", "larger", "largest", "bigger", "biggest"),
}
POSITION_NAMES: dict[str, tuple[str, ...]] = {
    "on the left": ("left", "leftmost", "left-hand"),
    "in the centre": ("centre", "center", "central", "centred", "centered", "middle"),
    "on the right": ("right", "rightmost", "right-hand"),
    "at the top": ("top", "upper", "topmost", "above"),
    "in the middle": ("middle", "centre", "center", "central", "midway"),
    "at the bottom": ("bottom", "lower", "bottommost", "below"),
}
FAMILY_SPELLINGS: dict[str, tuple[str, ...]] = {"grey": ("gray",), "purple": ("violet",)}
COLOUR_NAME_DELTA_E = 10.0  # CIEDE2000 radius within which a named colour names a colour right


def _family_names(family: str) -> frozenset[str]:
    """The family word, its spellings, and every named colour whose family (``family_of_rgb``) is ``family``."""
    names, fam = named_colours()[0], colour_families()
    k = FAMILIES.index(family)
    return frozenset({family, *FAMILY_SPELLINGS.get(family, ())} | {n for n, f in zip(names, fam) if f == k})


# the factors (their first-object form) that have a naming truth; world2's others (n_objects, relation, occluded,
# family_shape) have none here
NAMED_FACTORS = ("colour_family", "colour", "shape", "texture", "background", "size", "hpos", "vpos")


def _first_object_form(factor: str) -> str:
    """``"shape2"`` -> ``"shape"`` (the second object's factors end in 2)."""
    return factor[:-1] if factor.endswith("2") else factor


def has_naming_truth(factor: str) -> bool:
    """Whether ``factor`` (or its second-object form, e.g. ``shape2``) has a naming truth (:data:`NAMED_FACTORS`)."""
    return _first_object_form(factor) in NAMED_FACTORS


def is_world2_shards(shards: Any) -> bool:
    """Whether a :class:`visae.shards.ShardSet` was extracted from a world2 directory: its source records world2's
    format (``dataset_info.world_format``), or, for shards extracted before the source recorded it, it has world2's
    ``family_shape`` column."""
    info = (shards.source or {}).get("dataset_info") or {}
    return info.get("world_format") == FORMAT_NAME or "family_shape" in shards.manifest.get("columns", {})


@lru_cache(maxsize=None)
def accepted_names(factor: str, value: str) -> frozenset[str]:
    """The names (lower case; words or whole multi-word names) that name ``value`` of ``factor`` right.

    Shapes, textures (objects' and backgrounds'), sizes and positions: the tables above. Colour families:
    the family word and every named colour of that family (``family_of_rgb`` of its RGB: "crimson" names red).
    Fine colours: every named colour within CIEDE2000 ``COLOUR_NAME_DELTA_E`` of the value's RGB (needs
    scikit-image). Cached: one set per (factor, value).

    Raises:
        KeyError: a factor without a naming truth (not in :data:`NAMED_FACTORS`, nor its '2' form) or a value
            the factor does not have.
    """
    base = _first_object_form(factor)
    if not has_naming_truth(factor):
        raise KeyError(f"no naming truth for factor {factor!r}; known: {', '.join(NAMED_FACTORS)} (and their '2' "
                       "second-object forms)")
    if value not in FACTORS[base]:
        raise KeyError(f"{value!r} is not a value of world2's factor {factor!r}")
    if base == "colour_family":
        return _family_names(value)
    if base == "colour":
        names = named_colours()[0]
        return frozenset(n for n, ok in zip(names, _near_colours(names.index(value))) if ok)
    table = {"shape": SHAPE_NAMES, "texture": TEXTURE_NAMES, "background": TEXTURE_NAMES, "size": SIZE_NAMES,
             "hpos": POSITION_NAMES, "vpos": POSITION_NAMES}[base]
    return frozenset(table[value])


def _near_colours(i: int) -> np.ndarray:
    try:
        from skimage.color import deltaE_ciede2000
    except ImportError as e:  # pragma: no cover - scikit-image is in the test extra
        raise ImportError("naming truth for fine colours needs scikit-image (pip install scikit-image)") from e
    lab = rgb_to_lab(named_colours()[1])
    return deltaE_ciede2000(lab[i][None], lab) <= COLOUR_NAME_DELTA_E


@lru_cache(maxsize=None)
def _whole_terms() -> frozenset[str]:
    """Every name the naming truth knows as a whole: the named colours and every table's entries."""
    tables = (SHAPE_NAMES, TEXTURE_NAMES, SIZE_NAMES, POSITION_NAMES)
    return frozenset(named_colours()[0]) | frozenset(n for t in tables for ns in t.values() for n in ns) | set(FAMILIES)


def name_matches(name: str | None, factor: str, value: str) -> bool:
    """Whether a concept name names ``value`` of ``factor`` right (:func:`accepted_names`).

    A name the naming truth knows as a whole (a named colour such as "blue green", a table entry such as
    "half-circle") is judged as that term only: "blue green" names the family of its RGB, not blue and green both.
    Any other name is right when one of its words (hyphenated words also split) is an accepted name ("dark
    crimson" names red). ``None`` / empty: False.
    """
    if not name:
        return False
    ok = accepted_names(factor, value)
    low = " ".join(name.lower().split())
    if low in _whole_terms():
        return low in ok
    words = set(re.findall(r"[a-z]+(?:-[a-z]+)*", low))
    words |= {p for w in list(words) for p in w.split("-")}
    return bool(words & ok)


# ----------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class Caption:
    """A caption and the factor values it asserts (``((factor, value index), ...)``): true of every
    image whose factor row agrees on those."""

    text: str
    constraints: tuple[tuple[str, int], ...]

    def matches(self, row: Sequence[int]) -> bool:
        return all(int(row[FACTOR_INDEX[k]]) == v for k, v in self.constraints)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def caption_options(row: Sequence[int]) -> list[Caption]:
    """Every caption the world uses for an image with factor row ``row`` (full and partial ones)."""
    fi = FACTOR_INDEX
    g = {k: int(row[fi[k]]) for k in FACTORS}
    names = _colour_names()
    S, F, C = SHAPES[g["shape"]], FAMILIES[g["colour_family"]], names[g["colour"]]
    T, Z, H, V, B = TEXTURES[g["texture"]], SIZES[g["size"]], HPOS[g["hpos"]], VPOS[g["vpos"]], TEXTURES[g["background"]]
    sh, fa, co, te = ("shape", g["shape"]), ("colour_family", g["colour_family"]), ("colour", g["colour"]), ("texture", g["texture"])
    si, hp, vp, bg = ("size", g["size"]), ("hpos", g["hpos"]), ("vpos", g["vpos"]), ("background", g["background"])
    opts = [
        Caption(f"{_a(C)} {S}", (co, sh)),
        Caption(f"a photo of {_a(C)} {S}", (co, sh)),
        Caption(f"{_a(F)} {S}", (fa, sh)),
        Caption(f"{_a(Z)} {F} {S}", (si, fa, sh)),
        Caption(f"{_a(F)} {T} {S}", (fa, te, sh)),
        Caption(f"{_a(F)} {S} {H}", (fa, sh, hp)),
        Caption(f"{_a(F)} {S} {V}", (fa, sh, vp)),
        Caption(f"{_a(F)} {S} on {_a(B)} background", (fa, sh, bg)),
        Caption(f"{_a(S)}", (sh,)),
        Caption(f"a photo of {_a(S)}", (sh,)),
        Caption(f"something {F}", (fa,)),
        Caption(f"{_a(F)} object", (fa,)),
        Caption(f"something {C}", (co,)),
        Caption(f"{_a(C)} object", (co,)),
        Caption(f"{_a(T)} object", (te,)),
        Caption(f"{_a(Z)} object", (si,)),
        Caption(f"an object {H}", (hp,)),
        Caption(f"an object {V}", (vp,)),
        Caption(f"{_a(B)} background", (bg,)),
        Caption(f"something on {_a(B)} background", (bg,)),
    ]
    n = g["n_objects"]
    opts.append(Caption("one object" if n == 0 else f"{COUNTS[n]} objects", (("n_objects", n),)))
    if g["occluded"] == 1:
        opts.append(Caption(f"a partly hidden {S}", (sh, ("occluded", 1))))
    if g["relation"] != ABSENT:
        S2, F2 = SHAPES[g["shape2"]], FAMILIES[g["colour_family2"]]
        rel = ("relation", g["relation"])
        R = RELATIONS[g["relation"]]
        opts += [Caption(f"{_a(F2)} {S2} {R} {_a(F)} {S}", (("colour_family2", g["colour_family2"]), ("shape2", g["shape2"]), rel, fa, sh)),
                 Caption(f"{_a(S2)} {R} {_a(S)}", (("shape2", g["shape2"]), rel, sh))]
    return opts


_LISTED = (0, 3, 4, 5, 8, 10, 14, 18, 20)


def captions_for(row: Sequence[int]) -> list[str]:
    """The captions recorded for an image (world.jsonl): fine-colour one first, then others."""
    opts = caption_options(row)
    out = [opts[i].text for i in _LISTED]
    if int(row[FACTOR_INDEX["relation"]]) != ABSENT:
        out.append(opts[-2].text)
    return out


def grounded_words() -> dict[str, list[tuple[str, int]]]:
    """Every term of the world's vocabulary and the factor values it names: ``{term: [(factor, value)]}``.
    Terms are colour names (many of several words, e.g. "dark sky blue"), basic colour terms, shapes,
    textures, sizes, positions, counts and relations."""
    out: dict[str, list[tuple[str, int]]] = {}
    for fac in ("colour", "colour_family", "shape", "texture", "size", "hpos", "vpos", "n_objects", "relation"):
        for v, name in enumerate(FACTORS[fac]):
            out.setdefault(name, []).append((fac, v))
    return out


def classnames_and_templates() -> dict[str, dict[str, Any]]:
    """Zero-shot benchmarks of this world in ImageNet's form: ``{benchmark: {"column", "classnames",
    "templates"}}`` for the coarse factors, the fine colour names and family x shape (253 classes)."""
    obj = ["a photo of {} object", "{} object"]
    return {
        "colour_family": {"column": "colour_family", "classnames": list(FAMILIES), "templates": ["something {}", "a {} object"]},
        "colour": {"column": "colour", "classnames": list(_colour_names()), "templates": ["something {}", "a {} object"]},
        "shape": {"column": "shape", "classnames": list(SHAPES), "templates": ["a photo of a {}", "a {}"]},
        "texture": {"column": "texture", "classnames": list(TEXTURES), "templates": ["a {} object"]},
        "size": {"column": "size", "classnames": list(SIZES), "templates": ["a {} object"]},
        "hpos": {"column": "hpos", "classnames": list(HPOS), "templates": ["an object {}"]},
        "vpos": {"column": "vpos", "classnames": list(VPOS), "templates": ["an object {}"]},
        "background": {"column": "background", "classnames": list(TEXTURES),
                       "templates": ["a {} background", "something on a {} background"]},
        "n_objects": {"column": "n_objects", "classnames": ["one object"] + [f"{c} objects" for c in COUNTS[1:]],
                      "templates": ["{}"]},
        "family_shape": {"column": "family_shape", "classnames": list(FACTORS["family_shape"]),
                         "templates": ["a photo of a {}", "a {}"]},
        "_object_templates": {"column": "", "classnames": [], "templates": obj},
    }


# ----------------------------------------------------------------------------- in memory / on disk


@dataclass
class World2:
    """In memory: ``images`` uint8 ``[n, H, W, 3]``, ``labels`` uint8 ``[n, H, W]`` (object label maps),
    ``factors`` int64 ``[n, F]``, ``scenes`` (the continuous truth)."""

    images: np.ndarray
    labels: np.ndarray
    factors: np.ndarray
    scenes: list[Scene]
    seed: int

    def __len__(self) -> int:
        return len(self.factors)

    def factor(self, name: str) -> np.ndarray:
        return self.factors[:, FACTOR_INDEX[name]]


def _render_rows(scenes: Sequence[Scene], renderer: str, image_size: int, style_jitter: float = 0.0):
    """Images ``[n, S, S, 3]``, label maps ``[n, S, S]`` and factor rows ``[n, F]`` of ``scenes`` drawn by
    ``renderer`` (``style_jitter``: renderer 1's per-scene texture styles, :func:`texture_style`)."""
    if style_jitter and renderer != "pil":
        raise ValueError(f"style_jitter is renderer 1's ('pil') augmentation, not {renderer!r}'s")
    imgs = np.empty((len(scenes), image_size, image_size, 3), np.uint8)
    labs = np.empty((len(scenes), image_size, image_size), np.uint8)
    rows = np.empty((len(scenes), len(FACTORS)), np.int64)
    for i, sc in enumerate(scenes):
        if renderer == "pil":
            imgs[i], labs[i], cov, area = render_pil(sc, image_size, return_coverage=True, style_jitter=style_jitter)
            rows[i] = scene_factors(sc, cov.sum((1, 2)) / np.maximum(area, 1e-9), image_size)
        elif renderer == "skimage":
            imgs[i], labs[i] = render_skimage(sc, image_size)
            rows[i] = scene_factors(sc, None, image_size)
        else:
            raise ValueError(f"renderer must be 'pil' or 'skimage', got {renderer!r}")
    return imgs, labs, rows


def sample_world2(n: int, seed: int, *, renderer: str = "pil", start: int = 0, image_size: int = IMAGE_SIZE,
                  **scene_kw: Any) -> World2:
    """Scenes ``start .. start + n - 1`` of world ``seed`` drawn by ``renderer`` ("pil": the training
    renderer; "skimage": the independent one). ``scene_kw`` go to ``sample_scene``."""
    scenes = sample_scenes(n, seed, start, image_size=image_size, **scene_kw)
    imgs, labs, rows = _render_rows(scenes, renderer, image_size)
    return World2(imgs, labs, rows, scenes, int(seed))


def _png(arr: np.ndarray, mode: str) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _record(i: int, sc: Scene, row: np.ndarray, labels: np.ndarray, image_size: int) -> dict[str, Any]:
    names = _colour_names()
    fam = colour_families()
    objs = []
    for k, o in enumerate(sc.objects):
        m = labels == k + 1
        objs.append({"shape": SHAPES[o.shape], "colour": names[o.colour], "colour_family": FAMILIES[fam[o.colour]],
                     "rgb": list(o.rgb), "texture": TEXTURES[o.texture], "cx": round(o.cx, 3), "cy": round(o.cy, 3),
                     "radius": round(o.radius, 3), "angle": round(o.angle, 4),
                     "box": [round(v, 3) for v in object_box(o, image_size)], "mask_pixels": int(m.sum())})
    name = f"{i:06d}"
    return {"id": name, "file": f"images/{name}.png", "mask": f"masks/{name}.png",
            "factors": {k: int(row[j]) for j, k in enumerate(FACTORS)}, "objects": objs,
            "background": {"texture": TEXTURES[sc.background], "tone": sc.bg_tone},
            "captions": captions_for(row)}


def _write_chunk(task: tuple[str, int, int, int, int, float, int]) -> list[str]:
    """Render scenes ``start .. stop - 1`` of world ``seed``, write their images and masks under ``out`` (each
    file atomically) and return their ``world.jsonl`` lines (a worker task of :func:`generate_world2`)."""
    out_s, start, stop, seed, max_objects, occlusion, image_size = task
    out = Path(out_s)
    scenes = sample_scenes(stop - start, seed, start, max_objects=max_objects, occlusion=occlusion, image_size=image_size)
    imgs, labs, rows = _render_rows(scenes, "pil", image_size)
    lines = []
    for j, i in enumerate(range(start, stop)):
        atomic_write_bytes(out / "images" / f"{i:06d}.png", _png(imgs[j], "RGB"), fsync=False)
        atomic_write_bytes(out / "masks" / f"{i:06d}.png", _png(labs[j], "L"), fsync=False)
        lines.append(json.dumps(_record(i, scenes[j], rows[j], labs[j], image_size)))
    return lines


def generate_world2(out_dir: str | Path, n: int, seed: int = 0, *, max_objects: int = 4, occlusion: float = 0.3,
                    image_size: int = IMAGE_SIZE, chunk: int = 500, progress: bool = True, workers: int = 1) -> Path:
    """Write ``n`` scenes of world ``seed`` to ``out_dir`` (images/, masks/, world.json, world.jsonl).

    Resumable as ``visae.toyworld.generate_world``: chunks of ``chunk`` images, ``world.jsonl``
    atomically extended after each, in order; an existing world with other settings is an error (before any
    write). ``workers``: processes rendering chunks in parallel (1: this process only; 0: one per CPU core;
    :mod:`visae.workers`; from a script, ``workers > 1`` needs the ``if __name__ == "__main__":`` guard); the files
    written are byte-identical whatever the number.

    Raises:
        ValueError: ``n``, ``chunk``, ``max_objects``, ``occlusion``, ``image_size`` or ``workers`` out of range
            (before anything is written), or ``out_dir`` holding another world.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:  # failed inside numpy after world.json was written
        raise ValueError(f"seed must be >= 0, got {seed}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not 1 <= max_objects <= len(COUNTS):
        raise ValueError(f"max_objects must be in [1, {len(COUNTS)}], got {max_objects}")
    if not 0.0 <= occlusion <= 1.0:  # a probability: outside [0, 1] it acted as 0 or 1
        raise ValueError(f"occlusion must be a probability in [0, 1], got {occlusion}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    from visae.workers import record_chunks, resolve_workers, resume_prefix

    workers = resolve_workers(workers)
    out = Path(out_dir)
    from visae.atomic import check_output_path

    check_output_path(out, "the world generator")  # a file at --out: exit 2, not a bare 'Not a directory'
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "factors": {k: list(v) for k, v in FACTORS.items()},
            "main_factors": list(MAIN_FACTORS), "seed": int(seed), "n": int(n), "image_size": int(image_size),
            "max_objects": int(max_objects), "occlusion": float(occlusion), "label": "family_shape", "absent": ABSENT,
            "renderer": "pil", "benchmarks": {k: v for k, v in classnames_and_templates().items() if not k.startswith("_")}}
    wj = out / "world.json"
    if wj.exists():
        old = read_world_json(wj)
        for k in ("format", "version", "seed", "n", "image_size", "max_objects", "occlusion", "factors"):
            if old.get(k) != meta[k]:
                raise WorldError(f"{wj}: existing world has {k}={str(old.get(k))[:80]!r}, asked for "
                                 f"{str(meta[k])[:80]!r}; use another out_dir or delete it")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if not wj.exists():
        atomic_write_text(wj, json.dumps(meta, indent=1))
    jl = out / "world.jsonl"
    lines = resume_prefix(jl, n, chunk)
    tasks = [(str(out), start, min(start + chunk, n), int(seed), int(max_objects), float(occlusion), int(image_size))
             for start in range(len(lines), n, chunk)]
    record_chunks(jl, lines, _write_chunk, tasks, workers, progress, f"world2 -> {out}")
    return out


@dataclass(frozen=True)
class World2Config:
    """Generate images of the richer synthetic world (issue 12) with factors, boxes, masks and captions."""

    out: str = field(default="runs/world2", metadata={"help": "output directory (images/, masks/, world.json, world.jsonl)"})
    n: int = field(default=2000, metadata={"help": "number of images"})
    seed: int = field(default=0, metadata={"help": "world seed (scenes and pixels are deterministic given it)"})
    max_objects: int = field(default=4, metadata={"help": "objects per image: 1 .. max_objects (at most 4)"})
    occlusion: float = field(default=0.3, metadata={"help": "probability that a scene's objects may overlap"})
    image_size: int = field(default=IMAGE_SIZE, metadata={"help": "image side in pixels"})
    workers: int = field(default=0, metadata={
        "help": "processes rendering chunks of images in parallel (0: one per CPU core; the files are the same "
                "whatever the number)"})

    def __post_init__(self) -> None:
        from visae.config import check_bounds

        check_bounds(self, {"n": (0, None), "seed": (0, None), "max_objects": (1, len(COUNTS)), "occlusion": (0.0, 1.0),
                            "image_size": (1, None), "workers": (0, None)}, {"workers": "(0: one per CPU core)"})


def main(argv: list[str] | None = None) -> int:
    from visae.config import parse_config
    from visae.resources import config_yaml

    from visae.errors import VisaeError, report

    try:
        cfg = parse_config(World2Config, argv, default_yaml=config_yaml("world2.yaml"), prog="python -m visae.world2")
        out = generate_world2(cfg.out, cfg.n, cfg.seed, max_objects=cfg.max_objects, occlusion=cfg.occlusion,
                              image_size=cfg.image_size, workers=cfg.workers)
    except VisaeError as e:  # a bad flag, another world in --out (named with what differs): one line
        return report("python -m visae.world2", e)
    from visae.config import absolute_paths

    # out recorded absolute (as every stage records its paths): the record says which directory from anywhere
    atomic_write_text(out / "config.json", json.dumps(absolute_paths(dataclasses.asdict(cfg), ("out",)), indent=1))
    print(f"wrote {cfg.n} images to {out}")
    return 0


if __name__ == "__main__":
    from visae.cli import run_main

    sys.exit(run_main("python -m visae.world2", main))
