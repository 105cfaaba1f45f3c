"""The toy world: deterministic by seed, and its labels say what the pixels show."""

import json

import numpy as np
import pytest

from visae import toyworld as tw
from visae import world2

FI = tw.FACTOR_INDEX
PALETTE = np.array([tw.COLOUR_RGB[c] for c in tw.COLOURS], np.float64)


@pytest.fixture(scope="module")
def world():
    return tw.sample_world(240, seed=7)


def _saturated(img: np.ndarray) -> np.ndarray:
    """Object pixels: the background is grey (saturation ~0), every object colour is saturated."""
    x = img.astype(np.float64)
    mx, mn = x.max(-1), x.min(-1)
    return (mx - mn) / np.maximum(mx, 1) > 0.35


def _nearest_colour(rgb: np.ndarray) -> np.ndarray:
    return np.linalg.norm(rgb[..., None, :] - PALETTE, axis=-1).argmin(-1)


def test_deterministic_by_seed(world):
    again = tw.sample_world(240, seed=7)
    assert np.array_equal(world.images, again.images)
    assert np.array_equal(world.factors, again.factors)
    other = tw.sample_world(240, seed=8)
    assert not np.array_equal(world.factors, other.factors)
    assert not np.array_equal(world.images, other.images)
    # Image i depends only on (seed, i): a slice rendered alone is the same image.
    assert np.array_equal(tw.render_batch(world.factors[100:110], seed=7, start=100), world.images[100:110])


def test_factor_values_all_occur(world):
    for name in tw.MAIN_FACTORS:
        vals = np.unique(world.factor(name))
        assert list(vals) == list(range(len(tw.FACTORS[name]))), name
    two = world.factor("n_objects") == 1
    assert 0.1 < two.mean() < 0.4
    assert (world.factor("shape2")[~two] == -1).all() and (world.factor("shape2")[two] >= 0).all()
    assert (world.factor("colour2")[two] != world.factor("colour")[two]).all()
    cs = world.factor("colour_shape")
    assert np.array_equal(cs, world.factor("colour") * len(tw.SHAPES) + world.factor("shape"))


def test_colour_labels_match_pixels(world):
    for i in np.flatnonzero(world.factor("n_objects") == 0):
        img = world.images[i]
        mask = _saturated(img)
        assert mask.sum() > 20, i
        got = _nearest_colour(img[mask].mean(0))
        assert got == world.factor("colour")[i], (i, tw.COLOURS[got], tw.COLOURS[world.factor("colour")[i]])


def test_second_object_has_its_colour(world):
    for i in np.flatnonzero(world.factor("n_objects") == 1):
        img = world.images[i]
        mask = _saturated(img)
        per_pixel = _nearest_colour(img[mask].astype(np.float64))
        counts = np.bincount(per_pixel, minlength=len(tw.COLOURS))
        main, second = world.factor("colour")[i], world.factor("colour2")[i]
        assert counts[main] > counts[second] > 5, (i, counts)


def test_position_and_size_labels_match_pixels(world):
    single = np.flatnonzero(world.factor("n_objects") == 0)
    areas = {0: [], 1: []}
    for i in single:
        mask = _saturated(world.images[i])
        ys, xs = np.nonzero(mask)
        cx = xs.mean()
        pos = world.factor("position")[i]
        # Columns are centred at x = 16, 32, 48 (of 64).
        assert {0: cx < 24, 1: 24 <= cx < 40, 2: cx >= 40}[pos], (i, cx, tw.POSITIONS[pos])
        # Extent (bounding box side) separates the sizes whatever the shape.
        areas[int(world.factor("size")[i])].append(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)
    assert max(areas[0]) < min(areas[1]), (max(areas[0]), min(areas[1]))


def test_shape_labels_match_pixels(world):
    """Fill ratio of the bounding box and vertical balance tell the shapes apart."""
    big = np.flatnonzero((world.factor("n_objects") == 0) & (world.factor("size") == 1))
    seen = set()
    for i in big:
        mask = _saturated(world.images[i])
        ys, xs = np.nonzero(mask)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        fill = mask.sum() / (h * w)
        mid = (ys.max() + ys.min()) / 2
        bottom_heavy = (ys > mid).sum() / max(1, (ys < mid).sum())
        shape = tw.SHAPES[world.factor("shape")[i]]
        seen.add(shape)
        if shape == "square":
            assert fill > 0.9, (i, fill)
        elif shape == "circle":
            assert 0.7 < fill < 0.86, (i, fill)
        elif shape == "triangle":
            assert bottom_heavy > 1.8 and fill < 0.62, (i, fill, bottom_heavy)
        elif shape == "diamond":
            assert fill < 0.62 and 0.8 < bottom_heavy < 1.25, (i, fill, bottom_heavy)
        elif shape == "star":
            assert fill < 0.5, (i, fill)
        elif shape == "cross":
            # The centre row and column are full, the bounding-box corners empty.
            cy, cx = int(round(ys.mean())), int(round(xs.mean()))
            assert mask[cy, xs.min():xs.max() + 1].mean() > 0.9 and mask[ys.min():ys.max() + 1, cx].mean() > 0.9
            assert not mask[ys.min(), xs.min()] and not mask[ys.max(), xs.max()]
    assert seen == set(tw.SHAPES)


def test_background_labels_match_pixels(world):
    spread = {0: [], 1: [], 2: []}
    for i in np.flatnonzero(world.factor("n_objects") == 0):
        img = world.images[i].astype(np.float64)
        # Rows far from the object: the bare background.
        mask = _saturated(world.images[i])
        rows = ~mask.any(1)
        grey = img[rows].mean(-1)
        spread[int(world.factor("background")[i])].append(grey.std())
    assert max(spread[0]) < 6 < min(spread[1]) and 6 < min(spread[2]), {k: (min(v), max(v)) for k, v in spread.items()}


def test_captions_are_true_of_their_image(world):
    for i in range(40):
        row = world.factors[i]
        opts = tw.caption_options(row)
        assert all(c.matches(row) for c in opts)
        caps = world.captions(i)
        full = caps[0]
        for name in ("shape", "colour", "size", "background"):
            assert tw.FACTORS[name][row[FI[name]]] in full, (full, name)
        assert any(c == f"something {tw.COLOURS[row[FI['colour']]]}" for c in caps)
        assert f"a {tw.SHAPES[row[FI['shape']]]}" in caps
    # A caption about another colour is false of the image.
    row = world.factors[0].copy()
    cap = tw.caption_options(row)[12]  # "a {colour} object"
    row[FI["colour"]] = (row[FI["colour"]] + 1) % len(tw.COLOURS)
    assert not cap.matches(row)


def test_benchmarks_in_imagenet_form():
    b = tw.toy_classnames_and_templates()
    assert {"colour", "shape", "colour_shape"} <= set(b)
    for spec in b.values():
        assert spec["column"] in tw.FACTORS
        assert len(spec["classnames"]) == len(tw.FACTORS[spec["column"]])
        assert spec["templates"] and all("{}" in t for t in spec["templates"])
    assert len(b["colour_shape"]["classnames"]) == 48


def test_render_from_names_and_bad_input():
    img = tw.render({"shape": "star", "colour": "blue", "size": "large", "position": "right", "background": "plain"}, rng=0)
    assert img.size == (64, 64) and img.mode == "RGB"
    a = np.asarray(img)
    assert _nearest_colour(a[_saturated(a)].mean(0)) == tw.COLOURS.index("blue")
    with pytest.raises(ValueError, match="unknown value"):
        tw.render({"shape": "hexagon", "colour": "blue", "size": "large", "position": "right", "background": "plain"})
    with pytest.raises(ValueError, match="colour"):
        tw.render({"shape": "star", "size": "large", "position": "right", "background": "plain"})


def test_generate_world_on_disk_and_resume(tmp_path):
    out = tw.generate_world(tmp_path / "w", n=25, seed=3, chunk=10, progress=False)
    meta, recs = tw.read_world(out)
    assert meta["n"] == 25 and meta["seed"] == 3 and set(meta["factors"]) == set(tw.FACTORS)
    assert [r["file"] for r in recs[:2]] == ["images/000000.png", "images/000001.png"]
    mem = tw.sample_world(25, seed=3)
    from PIL import Image

    for i in (0, 13, 24):
        r = recs[i]
        assert np.array_equal(np.asarray(Image.open(out / r["file"])), mem.images[i])
        assert r["factors"] == tw.factors_to_dict(mem.factors[i])
        assert r["captions"] == mem.captions(i)
    # A kill after the first chunk: world.jsonl holds 10 lines; the rerun completes it identically.
    full = (out / "world.jsonl").read_text()
    (out / "world.jsonl").write_text("".join(full.splitlines(keepends=True)[:13]))  # mid-chunk too
    (out / "images" / "000020.png").unlink()
    tw.generate_world(out, n=25, seed=3, chunk=10, progress=False)
    assert (out / "world.jsonl").read_text() == full
    assert (out / "images" / "000020.png").is_file()
    with pytest.raises(ValueError, match="seed"):
        tw.generate_world(out, n=25, seed=4, progress=False)
    with pytest.raises(FileNotFoundError, match="world.json"):
        tw.read_world(tmp_path / "nothing")


def test_a_complete_world_with_a_short_last_chunk_renders_nothing_on_rerun(tmp_path, monkeypatch):
    """n = 23 in chunks of 10: the last chunk (3 images) is whole at n. The first world re-rendered and rewrote it
    on every rerun of a complete world (world2 did not); now neither renders anything."""
    from visae import world2

    def no_render(task):
        raise AssertionError(f"a complete world rendered a chunk again: {task[:1]}")

    for mod, gen in ((tw, tw.generate_world), (world2, world2.generate_world2)):
        out = gen(tmp_path / mod.__name__, 23, seed=2, chunk=10, progress=False)
        before = (out / "world.jsonl").read_text()
        with monkeypatch.context() as m:
            m.setattr(mod, "_write_chunk", no_render)
            gen(out, 23, seed=2, chunk=10, progress=False)
        assert (out / "world.jsonl").read_text() == before


def test_worker_processes_write_the_same_bytes_and_bad_settings_are_refused_before_any_write(tmp_path):
    """generate_world(workers=2) writes byte for byte what one process writes (resumed mid-chunk too); settings
    out of range were taken silently (two_object_fraction 1.5 acted as 1) and are refused before any write."""
    def tree(d):
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    ref = tree(tw.generate_world(tmp_path / "one", n=23, seed=6, chunk=10, progress=False, workers=1))
    out = tw.generate_world(tmp_path / "two", n=23, seed=6, chunk=10, progress=False, workers=2)
    assert tree(out) == ref and len(ref) == 2 + 23
    (out / "world.jsonl").write_text("".join(ref["world.jsonl"].decode().splitlines(keepends=True)[:7]))
    tw.generate_world(out, n=23, seed=6, chunk=10, progress=False, workers=2)
    assert tree(out) == ref
    for kw, msg in (({"two_object_fraction": 1.5}, "two_object_fraction"), ({"workers": -1}, "workers"),
                    ({"n": -3}, "n must be")):
        with pytest.raises(ValueError, match=msg):
            tw.generate_world(tmp_path / "bad", **{"n": 3, **kw})
        assert not (tmp_path / "bad").exists()
    assert tw.main(["--out", str(tmp_path / "bad"), "--two_object_fraction", "-0.1"]) == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("call, name", [
    (lambda: tw.sample_factors(10, 0, two_object_fraction=1.5), "two_object_fraction"),  # was: every image two
    (lambda: tw.sample_factors(10, 0, two_object_fraction=-0.2), "two_object_fraction"),  # was: none
    (lambda: tw.sample_factors(10, 0, two_object_fraction=float("nan")), "two_object_fraction"),  # was: none
    (lambda: tw.sample_world(2, 0, image_size=0), "image_size"),  # was: "high - low < 0" from numpy
    (lambda: tw.render(tw.sample_factors(1, 0)[0], 0, image_size=-3), "image_size"),
    (lambda: tw.render_batch(tw.sample_factors(1, 0), 0, start=-1), "start"),  # was: a SeedSequence error
    (lambda: tw.object_boxes(tw.sample_factors(1, 0), 0, start=-1), "start"),
    (lambda: tw.sample_factors(3, -1), "seed must be >= 0"),  # was: numpy's "expected non-negative integer"
    (lambda: tw.render_batch(tw.sample_factors(1, 0), -1), "seed"),
    (lambda: tw.generate_world("never_written", 2, seed=-1), "seed must be >= 0")])  # was: after world.json
def test_the_samplers_refuse_a_negative_or_nan_parameter_naming_it(call, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=name):
        call()
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_cli(tmp_path):
    assert tw.main(["--out", str(tmp_path / "c"), "--n", "5", "--seed", "1"]) == 0
    meta = json.loads((tmp_path / "c" / "world.json").read_text())
    assert meta["n"] == 5 and len((tmp_path / "c" / "world.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize("main", [tw.main, world2.main], ids=["toyworld", "world2"])
def test_both_world_commands_record_out_as_an_absolute_path(tmp_path, monkeypatch, main):
    """config.json recorded --out as typed (relative): it did not say which directory once read from elsewhere
    (the demo records its paths absolute)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    assert main(["--out", "sub/../w", "--n", "2", "--workers", "1"]) == 0
    rec = json.loads((tmp_path / "w" / "config.json").read_text())
    assert rec["out"] == str(tmp_path / "w") and rec["n"] == 2, rec


def test_cli_another_world_in_out_is_one_line_exit_2(tmp_path, capsys):
    """Another seed in an existing world's directory was a ValueError traceback from both worlds' commands."""
    from visae import world2

    for main, n in ((tw.main, "5"), (world2.main, "3")):
        out = tmp_path / main.__module__
        assert main(["--out", str(out), "--n", n, "--seed", "1", "--workers", "1"]) == 0
        capsys.readouterr()
        assert main(["--out", str(out), "--n", n, "--seed", "2", "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "existing world has seed=" in err and len(err.splitlines()) == 1, err


def test_object_boxes_enclose_exactly_the_drawn_pixels():
    """``object_boxes`` replays the renderer's draws from (factors, seed) alone: every pixel the objects
    changed (the background is exactly grey, R = G = B, also after the 2x box filter; no object colour
    can be grey: its channels differ by more than the jitter) lies in an object's box, and on
    single-object images each side of the box is within one pixel of a changed pixel (the box is the
    shape's continuous extent rounded out to whole pixels, which adds less than one pixel)."""
    seed = 23
    f = tw.sample_factors(400, seed, two_object_fraction=0.5)
    imgs = tw.render_batch(f, seed)
    boxes = tw.object_boxes(f, seed)
    assert boxes.shape == (400, 2, 4) and boxes.dtype == np.int64
    two = f[:, FI["shape2"]] != tw.ABSENT
    assert ((boxes[:, 1] == tw.ABSENT).all(1) == ~two).all()
    assert (boxes[:, 0, :2] >= 0).all() and (boxes[:, 0, 2:] <= tw.IMAGE_SIZE).all()
    assert (boxes[:, :, 2] > boxes[:, :, 0])[:, 0].all() and (boxes[:, :, 3] > boxes[:, :, 1])[:, 0].all()
    a = imgs.astype(np.int64)
    changed = ~((a[..., 0] == a[..., 1]) & (a[..., 1] == a[..., 2]))  # [n, H, W]
    for i in range(len(f)):
        inside = np.zeros(changed.shape[1:], bool)
        for x0, y0, x1, y1 in boxes[i]:
            if x0 != tw.ABSENT:
                inside[y0:y1, x0:x1] = True
        out = changed[i] & ~inside
        assert not out.any(), f"image {i}: {int(out.sum())} changed pixels outside the boxes {boxes[i].tolist()}"
        if not two[i]:
            ys, xs = np.nonzero(changed[i])
            x0, y0, x1, y1 = boxes[i, 0]
            slack = (xs.min() - x0, ys.min() - y0, x1 - 1 - xs.max(), y1 - 1 - ys.max())
            assert max(slack) <= 1, f"image {i}: box {boxes[i, 0].tolist()} is loose by {slack} px"
    # a slice replayed alone gives the same boxes (image start + i of the world), and the main box's
    # centre lies in the object's labelled column third
    assert np.array_equal(tw.object_boxes(f[100:120], seed, start=100), boxes[100:120])
    cx = (boxes[:, 0, 0] + boxes[:, 0, 2]) / 2
    assert np.array_equal(np.clip((cx // (tw.IMAGE_SIZE / 3)).astype(int), 0, 2), f[:, FI["position"]])
    with pytest.raises(ValueError, match="row 1"):
        bad = f[:3].copy()
        bad[1, FI["shape"]] = 9
        tw.object_boxes(bad, seed)
