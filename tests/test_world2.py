"""The richer world (issue 12): deterministic scenes whose factors, boxes and masks say what the pixels show,
drawn alike (in factors and object placement) by two independent renderers."""

import json
import math

import numpy as np
import pytest

from visae import world2 as w

FI = w.FACTOR_INDEX


@pytest.fixture(scope="module")
def world():
    return w.sample_world2(120, seed=7)


def test_vocabulary_and_factor_table():
    words = w.grounded_words()
    assert len(words) >= 500, len(words)
    assert len(w.SHAPES) >= 20 and len(set(w.SHAPES)) == len(w.SHAPES)
    assert len(w.TEXTURES) >= 8
    names, rgb = w.named_colours()
    assert len(names) == len(set(names)) == len(rgb)
    # Every basic colour term has named colours, and the basic terms' own XKCD colours fall in their family.
    fam = w.colour_families()
    assert (np.bincount(fam, minlength=len(w.FAMILIES)) > 0).all()
    for f in w.FAMILIES:
        assert w.FAMILIES[fam[names.index(f)]] == f, f
    # Near-synonyms of red share its family (the point of naming a latent "crimson").
    for n in ("crimson", "scarlet", "tomato"):
        assert w.FAMILIES[fam[names.index(n)]] == "red", n


def test_deterministic_by_seed(world):
    again = w.sample_world2(120, seed=7)
    assert np.array_equal(world.images, again.images) and np.array_equal(world.factors, again.factors)
    assert np.array_equal(world.labels, again.labels)
    other = w.sample_world2(120, seed=8)
    assert not np.array_equal(world.factors, other.factors)
    part = w.sample_world2(10, seed=7, start=50)  # scene i depends only on (seed, i)
    assert np.array_equal(part.images, world.images[50:60])


def test_factor_distribution(world):
    # Every count, size bucket and third occurs; the main object is the largest.
    for f, k in (("n_objects", 4), ("size", 3), ("hpos", 3), ("vpos", 3)):
        assert set(np.unique(world.factor(f))) == set(range(k)), f
    for sc in world.scenes:
        assert all(o.radius <= sc.objects[0].radius for o in sc.objects)


def test_masks_lie_in_boxes_and_objects_in_frame(world):
    n_checked = 0
    for sc, lab in zip(world.scenes, world.labels):
        ii, jj = np.mgrid[0:w.IMAGE_SIZE, 0:w.IMAGE_SIZE]
        for k, o in enumerate(sc.objects):
            x0, y0, x1, y1 = w.object_box(o)
            assert 0 <= x0 < x1 <= w.IMAGE_SIZE and 0 <= y0 < y1 <= w.IMAGE_SIZE
            # Objects are fully in frame: the box is not clipped (the shape fits its disc).
            assert o.radius <= o.cx <= w.IMAGE_SIZE - o.radius and o.radius <= o.cy <= w.IMAGE_SIZE - o.radius
            m = lab == k + 1
            # Pixel (i, j) covers [j, j + 1) x [i, i + 1): every mask pixel overlaps the box.
            bad = m & ~((jj + 1 > x0) & (jj < x1) & (ii + 1 > y0) & (ii < y1))
            assert not bad.any(), (k, o, np.argwhere(bad)[:5])
            n_checked += int(m.sum())
    assert n_checked > 0


def test_plain_objects_drawn_in_their_recorded_rgb():
    scenes = w.sample_scenes(150, seed=3)
    n_px = 0
    for sc in scenes:
        img, lab, cov, area = w.render_pil(sc, return_coverage=True)
        img2, lab2 = w.render_skimage(sc)
        assert img.dtype == np.uint8 and lab.shape == img.shape[:2]
        for k, o in enumerate(sc.objects):
            if w.TEXTURES[o.texture] != "plain":
                continue
            full = cov[k] == 1.0  # exactly: the mean of four 0/1 sub-pixels is 1 only when all are inside
            assert (img[full] == np.asarray(o.rgb, np.uint8)).all(), (k, o.rgb, np.unique(img[full], axis=0)[:4])
            assert (img2[lab2 == k + 1] == np.asarray(o.rgb, np.uint8)).all()
            n_px += int(full.sum())
            # Visible fraction: coverage sum over the unoccluded area, in [0, 1].
            assert 0 <= cov[k].sum() <= area[k] + 1e-3
    assert n_px > 500


def test_two_renderers_agree_on_factors_and_placement():
    kw = dict(max_objects=1, occlusion=0.0)
    a = w.sample_world2(80, seed=11, **kw)
    b = w.sample_world2(80, seed=11, renderer="skimage", **kw)
    keep = [i for i in range(len(w.FACTORS)) if list(w.FACTORS)[i] != "occluded"]  # only renderer 1 measures occlusion
    assert np.array_equal(a.factors[:, keep], b.factors[:, keep])
    # Same object, same place, other geometry: the masks overlap (IoU >= 0.5; a shift by half the
    # radius of a disc already gives IoU < 0.5), and the pixels differ (another drawing).
    for i in range(80):
        m1, m2 = a.labels[i] == 1, b.labels[i] == 1
        iou = (m1 & m2).sum() / max(1, (m1 | m2).sum())
        assert iou >= 0.5, (i, w.SHAPES[a.scenes[i].objects[0].shape], iou)
    assert (a.images != b.images).any(axis=-1).mean() > 0.2


def test_captions_assert_true_factors(world):
    for row in world.factors[:40]:
        opts = w.caption_options(row)
        assert all(c.matches(row) for c in opts)
        for c in opts:  # changing an asserted factor makes the caption false
            k, v = c.constraints[0]
            other = row.copy()
            other[FI[k]] = (v + 1) % len(w.FACTORS[k])
            assert not c.matches(other)
        assert w.captions_for(row)[0] == opts[0].text


def test_captions_fit_the_toy_clip_context(world):
    from visae import toyclip

    import open_clip

    toyclip.register()
    tok = open_clip.get_tokenizer(toyclip.MODEL_NAME)
    assert tok.context_length == 16

    def n_tokens(text):  # BPE tokens plus start and end (open_clip truncates silently past the context)
        return len(tok.encode(text)) + 2

    # CLIP's BPE encodes word by word, so a caption is longest when every factor takes its longest value:
    # the captions of that row bound every caption of the world.
    longest = np.zeros(len(w.FACTORS), np.int64)
    for name, vals in w.FACTORS.items():
        longest[FI[name]] = max(range(len(vals)), key=lambda v: n_tokens(vals[v]))
    longest[FI["occluded"]] = 1
    longest[FI["family_shape"]] = longest[FI["colour_family"]] * len(w.SHAPES) + longest[FI["shape"]]
    texts = [c.text for c in w.caption_options(longest)]
    texts += [c.text for row in world.factors[:30] for c in w.caption_options(row)]
    n = np.array([n_tokens(x) for x in texts])
    assert n.max() <= tok.context_length, [x for x, k in zip(texts, n) if k > tok.context_length][:3]


def test_on_disk_layout_read_by_the_extractor(tmp_path):
    from PIL import Image

    from visae.images import open_source

    out = w.generate_world2(tmp_path / "w", 12, seed=2, chunk=5, progress=False)
    meta = json.loads((out / "world.json").read_text())
    recs = [json.loads(x) for x in (out / "world.jsonl").read_text().splitlines()]
    assert meta["format"] == "visae.toyworld2" and len(recs) == 12
    mem = w.sample_world2(12, seed=2)
    for i, r in enumerate(recs):
        assert np.array_equal(np.asarray(Image.open(out / r["file"])), mem.images[i])
        assert np.array_equal(np.asarray(Image.open(out / r["mask"])), mem.labels[i])
        assert [r["factors"][k] for k in w.FACTORS] == mem.factors[i].tolist()
        assert len(r["objects"]) == len(mem.scenes[i].objects)
        assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(r["objects"][0]["box"], w.object_box(mem.scenes[i].objects[0])))
    src = open_source(str(out))
    assert src.kind == "toyworld" and len(src.items) == 12
    assert src.label_names["label"] == list(w.FACTORS["family_shape"])
    # Another seed in the same directory: refused before anything is written.
    before = (out / "world.jsonl").read_text()
    with pytest.raises(ValueError, match="seed"):
        w.generate_world2(out, 12, seed=3, progress=False)
    assert (out / "world.jsonl").read_text() == before
    # A directory of another format version (format 1 drew two textures otherwise): resuming it would mix drawings.
    meta = json.loads((out / "world.json").read_text())
    (out / "world.json").write_text(json.dumps({**meta, "version": w.FORMAT_VERSION - 1}))
    with pytest.raises(ValueError, match=f"version='{w.FORMAT_VERSION - 1}'"):
        w.generate_world2(out, 12, seed=2, progress=False)
    assert (out / "world.jsonl").read_text() == before


def test_texture_styles_change_drawings_only():
    """style_jitter draws each scene's textures in its own TextureStyle: pixels of textured regions change, the
    geometry (label maps, coverage) and every factor do not; the same scene always gets the same style; plain
    scenes are untouched; jitter 0 is the canonical look."""
    import dataclasses as dc

    scenes = w.sample_scenes(40, 11, max_objects=3, occlusion=0.3)
    base, jit = w._render_rows(scenes, "pil", 64), w._render_rows(scenes, "pil", 64, style_jitter=1.0)
    assert np.array_equal(base[1], jit[1]) and np.array_equal(base[2], jit[2])
    assert np.array_equal(jit[0], w._render_rows(scenes, "pil", 64, style_jitter=1.0)[0])
    textured = [i for i, s in enumerate(scenes) if s.background != 0 or any(o.texture != 0 for o in s.objects)]
    assert len(textured) > 30 and sum(not np.array_equal(base[0][i], jit[0][i]) for i in textured) >= 0.9 * len(textured)
    plain = [dc.replace(s, background=0, objects=tuple(dc.replace(o, texture=0) for o in s.objects)) for s in scenes[:5]]
    assert np.array_equal(w._render_rows(plain, "pil", 64)[0], w._render_rows(plain, "pil", 64, style_jitter=1.0)[0])
    _, _, cov0, _ = w.render_pil(scenes[0], return_coverage=True)
    _, _, cov1, _ = w.render_pil(scenes[0], return_coverage=True, style_jitter=0.7)
    assert np.array_equal(cov0, cov1)
    assert w.texture_style(scenes[0], 0.0) == w.TextureStyle()
    for s in scenes:
        st = w.texture_style(s, 1.0)
        assert 0.3 <= st.duty <= 0.7 and 0.2 <= st.dot <= 0.4 and 0.5 <= st.line <= 1.6 and 0.35 <= st.wave <= 0.65
        assert 0.23 <= st.speckle <= 0.47 and st.speckle_cell in (1, 2, 3) and 25 <= st.bg_contrast <= 65
        assert 0.65 <= st.obj_contrast <= 1.35
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            w.texture_style(scenes[0], bad)
    with pytest.raises(ValueError, match="renderer 1"):
        w._render_rows(scenes[:1], "skimage", 64, style_jitter=0.5)


def test_naming_truth_tables_and_colour_rules():
    """Issue 12 item 5's naming truth, fixed before measuring: the value's word and its synonyms; for colour
    families every named colour of the family; for fine colours every named colour within CIEDE2000 10."""
    assert w.name_matches("crimson", "colour_family", "red") and w.name_matches("navy", "colour_family", "blue")
    assert w.name_matches("Gray", "colour_family", "grey") and w.name_matches("dark sky blue", "colour_family", "blue")
    assert not w.name_matches("incurred", "colour_family", "red") and not w.name_matches("crimson", "colour_family", "blue")
    assert w.name_matches("ovals", "shape", "ellipse") and w.name_matches("starry", "shape", "six-pointed star")
    assert not w.name_matches("circle", "shape", "ellipse") and not w.name_matches(None, "shape", "circle")
    assert w.name_matches("checkerboard", "background", "checked") and w.name_matches("center", "hpos", "in the centre")
    assert w.name_matches("upper", "vpos", "at the top") and not w.name_matches("top", "vpos", "at the bottom")
    assert w.name_matches("big", "size", "large") and w.name_matches("red", "colour_family2", "red")
    # a whole known term is judged as that term only: a named colour names its own family, not each word's
    fam = dict(zip(w.named_colours()[0], w.colour_families()))
    assert [w.FAMILIES[fam["blue green"]]] == [f for f in w.FAMILIES if w.name_matches("blue green", "colour_family", f)]
    assert not w.name_matches("half-circle", "shape", "circle") and w.name_matches("half-circle", "shape", "semicircle")
    assert w.name_matches("dark crimson", "colour_family", "red")  # not a named colour: judged by its words
    # every value of every main factor has its own word among its accepted names, and the tables cover the world
    for f in w.MAIN_FACTORS:
        for v in w.FACTORS[f]:
            assert any(w.name_matches(n, f, v) for n in (v, *v.split())), (f, v)
    assert set(w.SHAPE_NAMES) == set(w.SHAPES) and set(w.TEXTURE_NAMES) == set(w.TEXTURES)
    # every named colour is one of its family's names; families do not share a name
    names, fam = w.named_colours()[0], w.colour_families()
    for n, k in zip(names, fam):
        assert n in w.accepted_names("colour_family", w.FAMILIES[k])
    for a in w.FAMILIES:
        for b in w.FAMILIES:
            if a < b:
                assert not (w.accepted_names("colour_family", a) & w.accepted_names("colour_family", b)), (a, b)
    pytest.importorskip("skimage")
    assert w.name_matches("scarlet", "colour", "red") and not w.name_matches("navy", "colour", "red")
    near = w.accepted_names("colour", "red")
    assert "red" in near and all(w.accepted_names("colour", n) >= {"red"} for n in near)  # CIEDE2000 is symmetric
    with pytest.raises(KeyError, match="no naming truth for factor 'relation'"):
        w.accepted_names("relation", "above")


def test_second_renderer_draws_textures_as_visibly_as_the_first():
    """Renderer 2's object textures were once 0.9 x the colour for light colours (median luminance spread inside a
    textured object 8 against renderer 1's 32): a texture target on renderer 2 could not be met by any model. The
    spread inside textured objects is now of the same order (measured 37.6 vs 32.0 on 400 scenes)."""
    pytest.importorskip("skimage")
    lum = np.array([0.299, 0.587, 0.114])
    spread1, spread2 = [], []
    for sc in w.sample_scenes(80, 1000, max_objects=1):
        if w.TEXTURES[sc.objects[0].texture] in ("plain", "gradient"):
            continue
        img2, lab2 = w.render_skimage(sc)
        inside = lab2 == 1
        spread1.append((w.render_pil(sc)[0].astype(np.float64) @ lum)[inside].std())
        spread2.append((img2.astype(np.float64) @ lum)[inside].std())
    assert len(spread1) >= 40
    assert 0.7 < np.median(spread2) / np.median(spread1) < 1.5, (np.median(spread1), np.median(spread2))


def test_naming_truth_refuses_an_unknown_value_with_keyerror():
    """accepted_names documents KeyError for a value the factor lacks; colours and colour families raised ValueError
    (a list's index) and tables a bare KeyError."""
    for fac in ("colour_family", "colour2", "shape"):
        with pytest.raises(KeyError, match=f"'no such' is not a value of world2's factor '{fac}'"):
            w.accepted_names(fac, "no such")


def _tree_bytes(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_worker_processes_write_the_same_bytes_in_order_and_a_failed_chunk_records_nothing_after_it(tmp_path, capsys):
    """generate_world2(workers=2) (the demo's world stage) writes byte for byte what one process writes; world.jsonl
    only ever lists whole chunks in order: a chunk that fails in a worker (here an image path taken by a directory)
    leaves the chunks before it recorded and none after it, whichever finished; a rerun completes it the same."""
    ref = w.generate_world2(tmp_path / "one", 13, seed=4, chunk=5, progress=False, workers=1)
    par = w.generate_world2(tmp_path / "two", 13, seed=4, chunk=5, progress=True, workers=2)
    assert "3/3" in capsys.readouterr().err  # the progress bar counts the chunks
    a, b = _tree_bytes(ref), _tree_bytes(par)
    assert len(a) == 2 + 2 * 13 and sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    broken = tmp_path / "broken"
    (broken / "images" / "000007.png").mkdir(parents=True)  # chunk 1 (images 5-9) cannot write its image 7
    with pytest.raises(OSError, match="000007.png"):
        w.generate_world2(broken, 13, seed=4, chunk=5, progress=False, workers=2)
    assert (broken / "world.jsonl").read_text() == "\n".join(a["world.jsonl"].decode().splitlines()[:5]) + "\n"
    (broken / "images" / "000007.png").rmdir()
    w.generate_world2(broken, 13, seed=4, chunk=5, progress=False, workers=2)
    c = _tree_bytes(broken)
    assert sorted(c) == sorted(a) and [k for k in a if a[k] != c[k]] == []


def test_bad_world_settings_are_refused_before_anything_is_written(tmp_path):
    """Out-of-range settings were taken silently (occlusion -1 acted as 0, 7 as 1) or failed in the first chunk
    after world.json was written (max_objects 5)."""
    from visae.config import ConfigError

    for kw, msg in (({"occlusion": -0.5}, "occlusion"), ({"occlusion": 7.0}, "occlusion"), ({"seed": -1}, "seed"),
                    ({"max_objects": 5}, "max_objects"), ({"workers": -1}, "workers"), ({"chunk": 0}, "chunk")):
        with pytest.raises(ValueError, match=msg):
            w.generate_world2(tmp_path / "w", 3, **kw)
        assert not (tmp_path / "w").exists()
    for kw in ({"n": -1}, {"seed": -1}, {"max_objects": 0}, {"occlusion": 1.5}, {"image_size": 0}, {"workers": -2}):
        with pytest.raises(ConfigError, match=f"World2Config.{next(iter(kw))} = "):
            w.World2Config(**kw)


@pytest.mark.parametrize("kw, name", [
    ({"colour_jitter": -5.0}, "colour_jitter"), ({"colour_jitter": math.nan}, "colour_jitter"),  # were: no jitter
    ({"occlusion": 2.0}, "occlusion"), ({"occlusion": -1.0}, "occlusion"), ({"occlusion": math.nan}, "occlusion"),
    ({"image_size": 0}, "image_size"), ({"n": -2}, "n, start and seed"), ({"start": -1}, "n, start and seed"),
    ({"seed": -1}, "n, start and seed")])  # was: numpy's "expected non-negative integer"
def test_the_scene_samplers_refuse_a_negative_or_nan_parameter_naming_it(kw, name):
    """sample_scene took each silently (a negative or NaN colour_jitter as no jitter, occlusion outside [0, 1] as a
    probability of 0 or 1, image_size 0 as a zero scale); sample_scenes(n < 0) gave no scenes."""
    n, seed = kw.pop("n", 2), kw.pop("seed", 0)
    with pytest.raises(ValueError, match=name):
        w.sample_scenes(n, seed, **kw)


def test_ctrl_c_stops_the_workers_at_once_and_leaves_whole_chunks_recorded(tmp_path):
    """Ctrl-C (SIGINT to the process group, workers included) during python -m visae.world2 --workers 2: the command
    stops within seconds (no further chunk starts), world.jsonl lists whole chunks in order and no temporary file
    is left behind (a rerun completes such a world: the failed-chunk test above)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "w"
    cmd = [sys.executable, "-m", "visae.world2", "--out", str(out), "--n", "4000", "--seed", "3", "--workers", "2"]
    # a shell's background job ignores SIGINT and its children inherit that: restore the default
    p = subprocess.Popen(cmd, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while not (out / "world.jsonl").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert p.poll() is None, "finished before the first chunk was seen: " + p.stderr.read().decode()[-2000:]
        os.killpg(p.pid, signal.SIGINT)
        t = time.time()
        rc = p.wait(timeout=60)
        stopped = time.time() - t
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    lines = (out / "world.jsonl").read_text().splitlines()
    assert rc == 130 and 0 < len(lines) < 4000 and len(lines) % 500 == 0, (rc, len(lines))
    err = p.stderr.read().decode()
    assert "Traceback" not in err and "python -m visae.world2: interrupted" in err, err[-2000:]  # one line, as visae's
    assert [json.loads(x)["id"] for x in lines] == [f"{i:06d}" for i in range(len(lines))]
    assert stopped < 30, stopped  # not the rest of the world (the chunks handed over were interrupted too)
    files = list((out / "images").iterdir())
    assert not [f for f in files if f.name.endswith(".tmp")]
    # besides the recorded chunks only the (at most 2) chunks the workers held: with every chunk handed over at
    # once, one queued chunk more ran to its end after Ctrl-C (measured: 2,500 images for 1,000 recorded)
    assert len(files) <= len(lines) + 2 * 500, (len(files), len(lines))


def test_a_script_without_the_main_guard_gets_a_clear_error_from_the_worker_pool(tmp_path):
    """A script that asks for 2 workers at its top level (no ``if __name__ == "__main__":``): each spawned worker re-runs
    it, fails to start a pool of its own and dies; the script gets WorkerStartError naming the guard, not a bare
    BrokenProcessPool."""
    import subprocess
    import sys

    script = tmp_path / "noguard.py"
    script.write_text("import math\nfrom visae.workers import map_in_order\n"
                      "print(list(map_in_order(math.sqrt, [1.0, 4.0, 9.0], 2)))\n")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "WorkerStartError" in r.stderr and 'if __name__ == "__main__":' in r.stderr, r.stderr[-2000:]
    guarded = tmp_path / "guard.py"
    guarded.write_text("import math\nfrom visae.workers import map_in_order\nif __name__ == '__main__':\n"
                       "    print(list(map_in_order(math.sqrt, [1.0, 4.0, 9.0], 2)))\n")
    r = subprocess.run([sys.executable, str(guarded)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[1.0, 2.0, 3.0]", r.stderr[-2000:]


def _least_difference(a: int, b: int, renderer: int, period: float = 4.0, n: int = 60) -> float:
    """The least fraction of pixels (an n x n grid at 2x sampling) where texture kinds ``a`` and ``b`` differ, over the
    world's own variation of a drawing: rotation (15-degree steps, 45 and 90 included) and translation (0.5 px steps
    over a period); the canonical patterns of renderer 1 (PIL) or 2 (scikit-image) at one period."""
    def pattern(kind, xx, yy, angle):
        if renderer == 1:
            return w._texture_pattern(kind, xx, yy, period, angle, n, 7) > 0.5
        return w._alt_pattern(kind, xx, yy, period, angle, 7) > 0.5

    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / 2
    ref = pattern(a, xx, yy, 0.3)
    best = 1.0
    for dang in np.radians(np.arange(0, 180, 15)):
        for dx in np.arange(0.0, period, 0.5):
            for dy in np.arange(0.0, period, 0.5):
                best = min(best, float(np.mean(ref != pattern(b, xx + dx, yy + dy, 0.3 + dang))))
    return best


_LATTICES_AND_LINES = ("striped", "dotted", "checked", "gridded", "zigzag", "wavy", "crosshatched")
_PAIRS = [(x, y) for i, x in enumerate(_LATTICES_AND_LINES) for y in _LATTICES_AND_LINES[i + 1:]]


@pytest.mark.parametrize("renderer", [1, 2])
@pytest.mark.parametrize("a,b", _PAIRS)
def test_texture_kinds_differ_under_the_worlds_rotation_and_translation(a, b, renderer):
    """Two texture kinds are two concepts only if no rotation and translation (which the world applies to every
    drawing) turns one into the other: at least 10% of the pixels differ for every pair of line / lattice kinds, in
    both renderers. World format 1 failed it: crosshatched was gridded turned 45 degrees (0.000 apart) and wavy a
    rounded zigzag (0.11); with format 2's rhombic crosshatched and 4-period wavy the closest pairs are 0.26 apart in
    renderer 1 (striped / dotted; gridded / crosshatched 0.28, zigzag / wavy 0.33) and 0.28 in renderer 2."""
    d = _least_difference(w.TEXTURES.index(a), w.TEXTURES.index(b), renderer)
    assert d >= 0.10, (a, b, renderer, d)
