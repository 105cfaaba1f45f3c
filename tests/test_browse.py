"""visae.browse: the static site, checked in a real headless browser (Debian's chromium).

The site is built from a planted SAE whose latents are named with known words, over a shard set
whose ids are image files on disk; it is served on 127.0.0.1 and loaded with chromium
(--dump-dom after the page's JS ran): the index lists the concepts, a search filters them,
and a concept page shows its images.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from visae.browse import BrowseConfig, build_site, serve
from visae.browse.site import histogram_svg
from visae.naming import NameConfig, load_vocabulary
from visae.sae import SAEConfig, build_sae
from visae.shards import ShardWriter
from visae.text import encode_texts

WORDS = ["cat", "ocean", "bicycle", "violin", "mountain", "pizza"]
COLOURS = [(220, 40, 40), (40, 90, 220), (40, 170, 60), (230, 200, 40), (150, 60, 180), (240, 130, 30)]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def run_chromium(url: str, tmp_path, *, screenshot: str | None = None, budget_ms: int = 4000) -> str:
    exe = _chromium()
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chrome-profile'}",
            f"--virtual-time-budget={budget_ms}"]
    if screenshot:
        args += [f"--screenshot={screenshot}", "--window-size=1280,900", "--hide-scrollbars"]
    else:
        args += ["--dump-dom"]
    r = subprocess.run(args + [url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _planted_site(tmp, words, rel_of, *, naming=None):
    """A planted SAE (latent i = word i's text embedding), images on disk named ``rel_of(i)``, shards whose
    ids are those images, and the site built from them; returns the site directory and its config."""
    from visae.backbones import load_backbone, register_tiny_clip

    bb = load_backbone(register_tiny_clip(), random_init=True)
    vocab = load_vocabulary(None, 1500, stopwords=True, alpha_only=True, extra=words)
    emb = encode_texts(bb, vocab)
    d = emb.shape[1]
    g = torch.Generator().manual_seed(0)
    sae = build_sae(SAEConfig(architecture="relu", d_in=d, d_sae=len(words) + 2, k=2), generator=g)
    rows = [vocab.index(w) for w in words]
    with torch.no_grad():
        sae.W_dec[0, : len(words)] = emb[rows]
        sae.W_enc[0] = sae.W_dec[0].T
        sae.b_enc.fill_(-0.5)
        sae.b_enc[0, -1] = -1e4  # dead
        sae.b_dec.zero_()
    images = tmp / "images"
    (images / "sub").mkdir(parents=True)
    x, ids = [], []
    for i in range(60):
        k = i % len(words)
        rel = rel_of(i)
        Image.new("RGB", (48, 40), COLOURS[k]).save(images / rel, format="PNG")
        ids.append(rel)
        x.append((emb[rows[k]] + 0.2 * torch.randn(d, generator=g)).numpy())
    x.append(emb[rows[0]].numpy())
    ids.append("moved/away.png")  # an id whose image does not exist any more
    source = {"model": "visae-tiny-test", "pretrained": None, "random_init": True, "seed": 0, "layer": None,
              "token": None, "dataset": str(images), "dataset_kind": "folder"}
    shards = tmp / "shards"
    with ShardWriter(shards, d=d, shard_size=16, source=source, label_names={"label": words}) as w:
        w.add(np.stack(x), ids=ids, labels=[i % len(words) for i in range(60)] + [-1])
    sae_dir = tmp / "sae"
    sae.save(sae_dir, extra={"shards": {"path": str(shards), "source": source}})
    vfile = tmp / "vocab.txt"
    vfile.write_text("\n".join(vocab))
    site = tmp / "site"
    naming = NameConfig(sae=str(sae_dir), vocab=str(vfile), text_cache=str(tmp / "cache"), n_top=6, n_random=3,
                        batch_size=16, **(naming or {}))
    cfg = BrowseConfig(out=str(site), thumb_size=64, naming=naming)
    build_site(cfg, backbone=bb)
    return site, cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browse")
    site, cfg = _planted_site(tmp, WORDS, lambda i: f"sub/img_{i:03d}.png" if i % 2 else f"img_{i:03d}.png")
    return {"site": site, "cfg": cfg, "tmp": tmp}


def test_site_files(world):
    site = world["site"]
    html = (site / "index.html").read_text()
    data = json.loads(re.search(r'<script id="concept-data" type="application/json">(.*?)</script>', html, re.S).group(1))
    names = [c["name"] for c in data["concepts"]]
    assert names[: len(WORDS)] == WORDS and names[-1] is None
    assert all(c["thumb"] and (site / c["thumb"]).is_file() for c in data["concepts"][: len(WORDS)])
    page = (site / "concepts" / "0.html").read_text()
    assert "cat" in page and page.count("<figure") == 6 + 3 and "<svg" in page
    assert "moved/away.png" in page and 'class="noimg"' in page  # unresolvable id shown as text
    for f in ("style.css", "index.js", "concept.js"):
        assert (site / "static" / f).is_file()
    assert not re.search(r'(src|href)="(https?:)?//', html + page)  # nothing from the network


def test_site_json_records_its_paths_absolute(world, monkeypatch):
    """site.json recorded --out, --concepts, --sae, ... as typed (relative): it did not say which from elsewhere."""
    from visae.backbones import load_backbone, register_tiny_clip

    tmp = world["tmp"]
    monkeypatch.chdir(tmp)
    cfg = BrowseConfig(out="site_rel", concepts="site/concepts_data", thumb_size=32,
                       naming=NameConfig(sae="sae", vocab="vocab.txt", text_cache="cache", n_top=6, n_random=3))
    build_site(cfg, backbone=load_backbone(register_tiny_clip(), random_init=True))
    info = json.loads((tmp / "site_rel" / "site.json").read_text())
    rec = info["config"]
    assert (rec["out"], rec["concepts"], rec["naming"]["vocab"], rec["naming"]["text_cache"]) == (
        str(tmp / "site_rel"), str(tmp / "site" / "concepts_data"), str(tmp / "vocab.txt"), str(tmp / "cache")), rec
    assert info["sae"] == rec["naming"]["sae"] == str(tmp / "sae") and info["shards"] == str(tmp / "shards"), info
    assert info["concepts_from"] == str(tmp / "site" / "concepts_data"), info


def test_histogram_svg_crops_to_range():
    edges = np.geomspace(1e-3, 1e3, 61)
    counts = np.zeros(60, np.int64)
    counts[30:33] = [5, 9, 2]
    svg = histogram_svg(counts, edges)
    assert svg.count("<rect") == 3 and "9 examples" in svg
    assert "never fired" in histogram_svg(np.zeros(60), edges)


def test_site_in_headless_chromium(world, tmp_path):
    if _chromium() is None:
        if os.environ.get("VISAE_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed but VISAE_REQUIRE_BROWSER is set (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    site = world["site"]
    httpd, url = serve(site, 0, block=False)
    try:
        assert url.startswith("http://127.0.0.1:")
        dom = run_chromium(url, tmp_path)
        assert 'data-ready="1"' in dom
        rows = re.findall(r'<tr class="concept" data-latent="(\d+)"', dom)
        assert sorted(map(int, rows)) == list(range(len(WORDS) + 2))
        assert f"{len(WORDS) + 2} of {len(WORDS) + 2} concepts" in dom

        dom = run_chromium(url + "?q=viol", tmp_path)  # the search box, set from the URL, filters the table
        rows = re.findall(r'<tr class="concept" data-latent="(\d+)"', dom)
        assert rows == [str(WORDS.index("violin"))]
        assert "1 of 8 concepts" in dom

        dom = run_chromium(url + "?named=1&sort=name", tmp_path)
        rows = re.findall(r'<tr class="concept" data-latent="(\d+)"', dom)
        assert [WORDS[int(r)] for r in rows] == sorted(WORDS)

        page_url = url.replace("index.html", f"concepts/{WORDS.index('pizza')}.html")
        dom = run_chromium(page_url, tmp_path)
        m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
        assert m and int(m.group(2)) == 6 + 3 and int(m.group(1)) == int(m.group(2)), m and m.group(0)
        assert "pizza" in dom

        dom = run_chromium(url.replace("index.html", "concepts/0.html"), tmp_path)
        assert "moved/away.png" in dom  # the missing image is shown by its id
        m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
        assert m and int(m.group(1)) >= 6

        shot = world["tmp"] / "index.png"
        run_chromium(url, tmp_path, screenshot=str(shot))
        assert shot.is_file() and shot.stat().st_size > 5000
        run_chromium(page_url, tmp_path, screenshot=str(world["tmp"] / "concept.png"))
        if os.environ.get("VISAE_KEEP_SCREENSHOTS"):
            out = os.environ["VISAE_KEEP_SCREENSHOTS"]
            os.makedirs(out, exist_ok=True)
            shutil.copy(shot, out)
            shutil.copy(world["tmp"] / "concept.png", out)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_serve_binds_localhost_only(world):
    httpd, url = serve(world["site"], 0, block=False)
    try:
        assert httpd.server_address[0] == "127.0.0.1"
        import urllib.request

        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and b"concept-data" in r.read()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_toyworld_ids_resolve_to_thumbnails_from_many_threads(tmp_path):
    from visae.browse.images import ImageResolver, image_id, make_thumbnails
    from visae.toyworld import generate_world

    root = generate_world(tmp_path / "world", 40, seed=3, progress=False)
    src = {"dataset": str(root), "dataset_kind": "toyworld"}
    ids = [f"{i:06d}" for i in range(40)] + ["000007#p3", "no-such-image"]
    thumbs = make_thumbnails(ImageResolver(src), ids, tmp_path / "thumbs", size=32, workers=8, progress=False)
    assert all(thumbs[f"{i:06d}"] for i in range(40)) and thumbs["no-such-image"] is None
    assert image_id("000007#p3") == "000007" and len(list((tmp_path / "thumbs").glob("*.jpg"))) == 40
    with Image.open(tmp_path / "thumbs" / thumbs["000005"]) as im:
        assert max(im.size) == 32
    # moved images: --images_root points the resolver at their new place
    moved = tmp_path / "moved"
    shutil.move(str(root), moved)
    assert ImageResolver(src).open("000001") is None
    assert ImageResolver(src, images_root=str(moved)).open("000001") is not None


HOSTILE = ["<!--<script>", "</script><script>document.title='pwned'</script>",
           "\"><img src=x onerror=\"document.title='pwned'\">", "a & b <i>italic", "&amp; not an entity",
           "caf\u00e9 \u2028 line"]


def test_hostile_names_ids_and_file_names_in_headless_chromium(tmp_path):
    """Vocabulary entries, ids and file names full of markup: the index's embedded JSON still parses, every
    concept is listed, nothing injected runs, and a concept page shows its images."""
    if _chromium() is None:
        if os.environ.get("VISAE_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed but VISAE_REQUIRE_BROWSER is set (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    # the hostile entries are not word-like: keep them in the vocabulary
    site, _ = _planted_site(tmp_path, HOSTILE, lambda i: f"sub/we\"ird <b>{i}<\\b> & #?%20 '{i}'.png",
                            naming={"alpha_only": False})
    html = (site / "index.html").read_text()
    blob = re.search(r'<script id="concept-data" type="application/json">(.*?)</script>', html, re.S).group(1)
    assert "<" not in blob and json.loads(blob)["concepts"][0]["name"] == HOSTILE[0]
    httpd, url = serve(site, 0, block=False)
    try:
        dom = run_chromium(url, tmp_path)
        assert 'data-ready="1"' in dom, dom[-500:]
        rows = re.findall(r'<tr class="concept" data-latent="(\d+)"', dom)
        assert sorted(map(int, rows)) == list(range(len(HOSTILE) + 2))
        assert re.search(r"<title>(.*?)</title>", dom, re.S).group(1) != "pwned"  # no injected script ran
        assert "&lt;!--&lt;script&gt;" in dom and '<img src="x"' not in dom  # shown as text, not markup
        for j in range(len(HOSTILE)):
            dom = run_chromium(url.replace("index.html", f"concepts/{j}.html"), tmp_path)
            assert re.search(r"<title>(.*?)</title>", dom, re.S).group(1) != "pwned"
            assert '<img src="x"' not in dom
            m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
            assert m and int(m.group(1)) >= 6, (j, m and m.group(0))
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_random_weight_backbone_is_flagged_on_every_page(world):
    """The shard set's provenance records random_init: the index and every concept page say so (issue 10.9)."""
    from visae.browse import RANDOM_WEIGHTS_SITE_NOTE, random_weights_recorded

    site = world["site"]
    pages = [site / "index.html"] + sorted((site / "concepts").glob("*.html"))
    assert len(pages) > 1
    for p in pages:
        assert 'class="warning"' in p.read_text() and "RANDOM weights" in p.read_text(), p
    assert json.loads((site / "site.json").read_text())["backbone_random_init"] is True
    assert "RANDOM weights" in RANDOM_WEIGHTS_SITE_NOTE
    trained = {"model": "ViT-B-32", "random_init": False}
    assert not random_weights_recorded(trained, {"shards": {"source": trained}}, {"random_init": False})
    assert random_weights_recorded(trained, {"backbone_random_init": True}, {})
    assert random_weights_recorded(None, {"shards": {"source": {"random_init": True}}}, None)


ROW = r'<tr class="concept[^"]*" data-latent="(\d+)"'


def _require_chromium():
    if _chromium() is None:
        if os.environ.get("VISAE_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed but VISAE_REQUIRE_BROWSER is set (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")


def test_search_ranks_exact_names_first_and_index_explains_columns(tmp_path):
    """Issue 14.4: "triangle" lists the concept named triangle first, then names containing it, then concepts where
    it is only a candidate, whatever the sort; the index says what score, margin and frequency mean."""
    from visae.browse.site import write_site

    _require_chromium()
    names = ["red", "blue", "triangles", "green", "square", "circle", "star", "triangle", "dog", "cat"]
    concepts = []
    for j, nm in enumerate(names):
        alts = [{"name": nm, "score": 0.3}, {"name": "triangle" if j % 2 else "thing", "score": 0.2}]
        # the exact match is the rarest concept: under the default sort (frequency) it would come last
        concepts.append({"latent": j, "name": nm, "score": 0.3, "margin": 0.1, "alternatives": alts,
                         "frequency": 0.05 if nm == "triangle" else 0.5 - 0.01 * j, "mean_activation": 1.0})
    site = tmp_path / "site"
    write_site(site, concepts, None, np.array([]), None, None, {}, title="t", subtitle="s", info={})
    html = (site / "index.html").read_text()
    for term in ("score", "margin", "frequency"):
        assert re.search(rf"<dt>{term}</dt><dd>[^<]{{20,}}", html), term
    httpd, url = serve(site, 0, block=False)
    try:
        dom = run_chromium(url + "?q=triangle", tmp_path)
        rows = [int(r) for r in re.findall(ROW, dom)]
        cand = [j for j in range(len(names)) if j % 2 and names[j] not in ("triangle", "triangles")]
        assert rows[:2] == [7, 2], rows  # exact name, then the name containing the word
        assert sorted(rows[2:]) == cand and rows[2:] == sorted(cand, key=lambda j: -concepts[j]["frequency"]), rows
        match = re.findall(r'data-latent="\d+" data-match="(\w+)"', dom)
        assert match == ["exact", "name"] + ["candidates"] * len(cand), match
        dom = run_chromium(url + "?q=triangle&sort=latent", tmp_path)  # another sort: tiers still first
        assert [int(r) for r in re.findall(ROW, dom)][:2] == [7, 2]
        assert 'id="legend"' in dom
    finally:
        httpd.shutdown()
        httpd.server_close()


def _patch_site(tmp, image_score="max", progress=True):
    """A planted SAE on patch tokens (2x2 grid): image i shows colour i % 4 in quadrant (i // 4) % 4; its object
    patch holds 2 * e_colour and the horizontally adjacent patch 1 * e_colour (two patch rows fire per image;
    a per-row top list would show each photo twice)."""
    g = torch.Generator().manual_seed(0)
    d, n_img, P = 8, 16, 4
    sae = build_sae(SAEConfig(architecture="relu", d_in=d, d_sae=5, k=2), generator=g)
    with torch.no_grad():
        sae.W_dec[0] = torch.eye(5, d)
        sae.W_enc[0] = sae.W_dec[0].T
        sae.b_enc.fill_(-0.5)
        sae.b_dec.zero_()
    images = tmp / "images"
    images.mkdir()
    x, ids, quads = [], [], []
    for i in range(n_img):
        c, q = i % 4, (i // 4) % 4
        im = Image.new("RGB", (64, 64), (128, 128, 128))
        im.paste(COLOURS[c], (32 * (q % 2), 32 * (q // 2), 32 * (q % 2) + 32, 32 * (q // 2) + 32))
        im.save(images / f"img_{i:02d}.png")
        for j in range(P):
            v = 0.05 * torch.randn(d, generator=g)
            v[d - 1] += 1.0  # shared background direction: rows are stored unit-norm, noise stays small
            v[c] += 2.0 if j == q else (1.0 if j == q ^ 1 else 0.0)
            x.append(v.numpy())
            ids.append(f"img_{i:02d}.png#p{j}")
        quads.append(q)
    source = {"model": "visae-tiny-test", "pretrained": None, "layer": 1, "token": "patch", "dataset": str(images),
              "dataset_kind": "folder"}
    shards = tmp / "shards"
    with ShardWriter(shards, d=d, shard_size=10, source=source) as w:  # images span shards
        w.add(np.stack(x), ids=ids)
    sae.save(tmp / "sae", extra={"shards": {"path": str(shards), "source": source}})
    site = tmp / "site"
    cfg = BrowseConfig(out=str(site), thumb_size=64, image_score=image_score,
                       naming=NameConfig(sae=str(tmp / "sae"), n_top=6, n_random=3, batch_size=7, progress=progress))
    build_site(cfg)
    return site, quads


def test_a_site_is_not_built_over_a_directory_of_something_else(tmp_path):
    """The review's find: the build replaces the whole --out (built beside, swapped in), so `visae browse --out
    runs/sae` deleted a trained SAE. A directory holding anything but a site is refused and left as it was."""
    from visae.browse import build_site

    other = tmp_path / "sae"
    other.mkdir()
    (other / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"holds other files \(weights.safetensors\), not a site"):
        build_site(BrowseConfig(out=str(other), naming=NameConfig(sae=str(tmp_path / "nope"))))
    assert [f.name for f in other.iterdir()] == ["weights.safetensors"]


def test_no_progress_draws_no_bar(tmp_path, capfd):
    """The newcomer's report: `visae browse --no_progress` still drew the "top images" bar (the site's statistics
    pass was not given the switch)."""
    _patch_site(tmp_path, progress=False)
    err = capfd.readouterr().err
    assert "top images:" not in err and "%|" not in err, err  # a tqdm bar: "top images:  50%|..." (a logged
    # warning may still mention "(top images)")


def test_patch_token_site_counts_images_and_draws_heatmaps_in_headless_chromium(tmp_path):
    """Issue 14.2/14.4 for an SAE on patch tokens: the header counts images (16), not rows (64); a concept's top images
    are distinct photos; each thumbnail carries the concept's per-patch heatmap, drawn by the page over the image,
    peaking on the patch of the object; `visae browse serve SITE` serves the site without rebuilding it."""
    _require_chromium()
    site, quads = _patch_site(tmp_path)
    import html as htmllib

    index = htmllib.unescape((site / "index.html").read_text())
    assert "16 images (64 patch tokens; an image's activation is the max over its patches)" in index
    assert "at least one patch" in index  # frequency explained per image
    for c in range(4):
        page = (site / "concepts" / f"{c}.html").read_text()
        top = re.search(r'id="top-images">(.*?)</div>\s*<h2>', page, re.S).group(1)
        shown = re.findall(r'<figure title="([^"]+)"', top)
        assert shown == [f"img_{i:02d}.png" for i in range(16) if i % 4 == c] or sorted(shown) == sorted(
            f"img_{i:02d}.png" for i in range(16) if i % 4 == c), shown  # 4 distinct photos, no '#p' rows
        assert "<dt>active images</dt><dd>4</dd>" in page and "<dt>active patch tokens</dt><dd>8</dd>" in page
        assert top.count("data-heat=") == 4
    httpd, url = serve(site, 0, block=False)
    try:
        for c in range(4):
            dom = run_chromium(url.replace("index.html", f"concepts/{c}.html"), tmp_path)
            assert re.search(r'data-heatmaps="(\d+)/\1"', dom) and 'data-heatmaps="0/0"' not in dom, dom[-300:]
            figs = re.findall(r'<figure title="img_(\d+)\.png" data-grid="2x2" data-heat="[\d,]+" '
                              r'data-heat-peak="(\d),(\d)" data-heat-aligned="(\d)"', dom)
            assert len(figs) >= 4, dom[-1500:]
            for i, r, col, aligned in figs:
                q = quads[int(i)]
                assert (int(r), int(col)) == (q // 2, q % 2), (c, i, r, col, q)  # peaks on the object's patch
                assert aligned == "1"  # the overlay covers the thumbnail exactly
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_serve_subcommand_serves_an_existing_site_without_rebuilding(world, tmp_path):
    import subprocess
    import sys
    import urllib.request

    from visae.browse import main

    assert main(["serve", str(tmp_path / "nothing")]) == 2  # no index.html: refused, nothing written
    assert not (tmp_path / "nothing").exists()
    site = world["site"]
    before = {p: p.stat().st_mtime_ns for p in site.rglob("*") if p.is_file()}
    proc = subprocess.Popen([sys.executable, "-m", "visae.cli", "browse", "serve", str(site), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+/index\.html)", line).group(1)
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and b"concept-data" in r.read()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    after = {p: p.stat().st_mtime_ns for p in site.rglob("*") if p.is_file()}
    assert after == before  # nothing rebuilt or rewritten


def test_failed_rebuild_leaves_the_previous_site_byte_identical_and_thumbnails_are_reused(tmp_path, monkeypatch):
    """Issue 11 item 1: the site is built beside and swapped in; a build that fails part-way changes nothing."""
    import dataclasses
    import hashlib

    import visae.browse.site as vsite
    from visae.backbones import load_backbone, register_tiny_clip

    site, cfg = _planted_site(tmp_path, WORDS, lambda i: f"img_{i:03d}.png")

    def digest():
        return {str(p.relative_to(site)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(site.rglob("*")) if p.is_file() and p.name != ".visae.lock"}

    before = digest()
    assert any(k.startswith("thumbs/") for k in before) and "index.html" in before
    thumb = next(p for p in (site / "thumbs").iterdir())
    inode = thumb.stat().st_ino
    (site / "concepts" / "999.html").write_text("a page of an older, larger SAE")
    before = digest()
    real = vsite.atomic_write_text

    def fail_on_index(path, text, **kw):  # concept pages written, then the disk fills
        if os.path.basename(path) == "index.html":
            raise OSError(28, "No space left on device", str(path))
        return real(path, text, **kw)

    monkeypatch.setattr(vsite, "atomic_write_text", fail_on_index)
    bb = load_backbone(register_tiny_clip(), random_init=True)
    with pytest.raises(OSError):  # another title: every page it wrote before failing differs from the old one
        build_site(dataclasses.replace(cfg, title="another title"), backbone=bb)
    monkeypatch.undo()
    assert digest() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".site.")) == [], "staging dir left"
    build_site(cfg, backbone=bb)
    after = digest()
    assert "concepts/999.html" not in after  # the new site replaced the old one whole
    assert thumb.stat().st_ino == inode  # the thumbnail was reused (carried), not made again
    assert {k: v for k, v in after.items() if k.startswith("thumbs/")} == \
        {k: v for k, v in before.items() if k.startswith("thumbs/")}


# ----------------------------------------------------------------------------- issue 14.1: class pages of a CBM


@pytest.fixture(scope="module")
def cbm_site(world, tmp_path_factory):
    """The planted world's site rebuilt with a concept bottleneck classifier trained on its SAE: class k (label k,
    the images of word k) is decided by latent k, the one named WORDS[k]."""
    import dataclasses

    from visae.cbm import CBMConfig, train_cbm

    tmp = tmp_path_factory.mktemp("browse_cbm")
    concepts = tmp / "concepts"
    shutil.copytree(world["site"] / "concepts_data", concepts)
    cfg = world["cfg"]
    shards = str(world["tmp"] / "shards")
    cbm = tmp / "cbm"
    res = train_cbm(CBMConfig(sae=cfg.naming.sae, concepts=str(concepts), train_shards=shards, val_shards=shards,
                              target_concepts_per_class=1.0, zero_shot=False, n_lambdas=8, bisect_steps=3, max_iter=200,
                              out=str(cbm)))
    site = tmp / "site"
    build_site(dataclasses.replace(cfg, out=str(site), cbm=str(cbm), concepts=str(concepts)))
    return {"site": site, "cbm": cbm, "res": res, "cfg": cfg, "concepts": concepts}


def _hrefs(html_text, pattern):
    return re.findall(rf'href="({pattern})"', html_text)


def test_cbm_class_pages_list_their_concepts_and_concept_pages_the_classes(cbm_site):
    """Issue 14.1: a page per class with its concepts (signed weights, linked to the concept pages) and accuracy; a
    concept page lists the classes that use it, linked back; an index of the classes."""
    import html as htmllib

    from visae.browse.site import _pct

    site, res = cbm_site["site"], cbm_site["res"]
    assert res["num_classes"] == len(WORDS) and res["concepts_per_class"] <= 1.0
    index = (site / "index.html").read_text()
    assert 'href="classes/index.html"' in index
    cls_index = (site / "classes" / "index.html").read_text()
    assert _hrefs(cls_index, r"\d+\.html") == [f"{k}.html" for k in range(len(WORDS))]
    for cls in res["classes"]:
        k = cls["class"]
        page = (site / "classes" / f"{k}.html").read_text()
        assert f"<h1>{WORDS[k]} " in page
        rows = re.findall(r'<tr class="cbm-concept" data-latent="(\d+)" data-weight="([^"]+)">', page)
        assert [(int(j), float(w)) for j, w in rows] == [(x["latent"], x["weight"]) for x in cls["concepts"]]
        assert rows and int(rows[0][0]) == k and float(rows[0][1]) > 0, (k, rows)  # decided by its own word
        assert _hrefs(page, r"\.\./concepts/\d+\.html") == [f"../concepts/{x['latent']}.html" for x in cls["concepts"]]
        stats = htmllib.unescape(re.search(r'id="class-stats">(.*?)</dl>', page, re.S).group(1))
        assert f"<dt>accuracy (recall) on them</dt><dd>{_pct(cls['val_top1'])}</dd>" in stats
        assert f"<dt>validation examples</dt><dd>{cls['n_val']:,}</dd>" in stats
    users = {}
    for cls in res["classes"]:
        for x in cls["concepts"]:
            users.setdefault(x["latent"], []).append((cls["class"], x["weight"]))
    for j in range(len(WORDS) + 2):
        page = (site / "concepts" / f"{j}.html").read_text()
        listed = [int(c) for c in re.findall(r'<tr data-class="(\d+)"><td><a href="\.\./classes/\d+\.html">', page)]
        want = sorted(users.get(j, []), key=lambda r: -abs(r[1]))
        assert listed == [c for c, _ in want], (j, listed, want)
        for c, w in want:
            assert f'<a href="../classes/{c}.html">{WORDS[c]}</a></td><td class="num">{w:+.3f}</td>' in page
    info = json.loads((site / "site.json").read_text())
    assert info["cbm"]["num_classes"] == len(WORDS) and info["cbm"]["dir"] == str(cbm_site["cbm"])


def test_cbm_class_pages_and_links_both_ways_in_headless_chromium(cbm_site, tmp_path):
    """The real browser follows the links: index -> classes -> class page -> its top concept's page -> back to the
    class; every page's JS-free content renders and nothing is loaded from the network."""
    from urllib.parse import urljoin

    _require_chromium()
    site = cbm_site["site"]
    httpd, url = serve(site, 0, block=False)
    try:
        dom = run_chromium(url, tmp_path)
        assert 'data-ready="1"' in dom
        classes_url = urljoin(url, re.search(r'id="classes-link" href="([^"]+)"', dom).group(1))
        dom = run_chromium(classes_url, tmp_path)
        links = re.findall(r'<tr class="class" data-class="(\d+)"><td><a href="([^"]+)">([^<]+)</a>', dom)
        assert [(int(c), nm) for c, _, nm in links] == [(k, WORDS[k]) for k in range(len(WORDS))]
        for k, href, _ in (links[0], links[-1]):
            page_url = urljoin(classes_url, href)
            dom = run_chromium(page_url, tmp_path)
            if os.environ.get("VISAE_KEEP_SCREENSHOTS"):
                run_chromium(page_url, tmp_path, screenshot=os.path.join(os.environ["VISAE_KEEP_SCREENSHOTS"], f"class{k}.png"))
            assert f'data-class="{k}"' in dom
            first = re.search(r'<tr class="cbm-concept" data-latent="(\d+)"[^>]*>.*?<a href="([^"]+)">([^<]+)</a>', dom, re.S)
            assert first and int(first.group(1)) == int(k) and first.group(3) == WORDS[int(k)], dom[-800:]
            concept_url = urljoin(page_url, first.group(2))
            dom = run_chromium(concept_url, tmp_path)
            if os.environ.get("VISAE_KEEP_SCREENSHOTS"):
                run_chromium(concept_url, tmp_path, screenshot=os.path.join(os.environ["VISAE_KEEP_SCREENSHOTS"], f"concept{k}.png"))
            assert f'data-latent="{k}"' in dom and 'id="cbm-classes"' in dom
            back = re.findall(r'<tr data-class="(\d+)"><td><a href="([^"]+)">([^<]+)</a>', dom)
            assert (k, WORDS[int(k)]) in [(c, nm) for c, _, nm in back], back
            href_back = next(h for c, h, _ in back if c == k)
            assert urljoin(concept_url, href_back) == page_url  # the link back lands on the class page
            m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
            assert m and int(m.group(1)) == int(m.group(2)) > 0
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_cbm_pages_escape_hostile_class_and_concept_names_in_headless_chromium(tmp_path):
    """Class names and concept names full of markup are shown as text on the class pages, the classes index and the
    concept pages' class lists; no injected script runs."""
    from visae.browse.site import write_site

    _require_chromium()
    concepts = [{"latent": j, "name": HOSTILE[j % len(HOSTILE)], "score": 0.3, "margin": 0.1, "alternatives": [],
                 "frequency": 0.1, "mean_activation": 1.0} for j in range(4)]
    classes = [{"class": c, "name": HOSTILE[(c + 1) % len(HOSTILE)], "n_val": 10, "val_top1": 0.9,
                "concepts": [{"latent": c, "name": HOSTILE[c], "weight": 1.5}, {"latent": 3, "name": "x", "weight": -0.5}]}
               for c in range(3)]
    cbm = {"classes": classes, "latents": [0, 1, 2, 3], "top1": {"cbm": 0.9}, "n_val": 30, "concepts_per_class": 2.0,
           "num_concepts_used": 4, "num_candidate_concepts": 4}
    site = tmp_path / "site"
    write_site(site, concepts, None, np.array([]), None, None, {}, title="<b>t</b>", subtitle="s", info={}, cbm=cbm)
    for p in [site / "classes" / "index.html"] + sorted((site / "classes").glob("[0-9]*.html")):
        text = p.read_text()
        assert "<script>" not in text and "<img src=x" not in text and "<!--<script>" not in text, p
    httpd, url = serve(site, 0, block=False)
    try:
        doms = {}
        for rel in ["classes/index.html", "classes/0.html", "classes/1.html", "concepts/3.html"]:
            doms[rel] = dom = run_chromium(url.replace("index.html", rel), tmp_path)
            assert re.search(r"<title>(.*?)</title>", dom, re.S).group(1) != "pwned", rel
            assert '<img src="x"' not in dom, rel
        assert "&lt;!--&lt;script&gt;" in doms["classes/0.html"]  # concept 0's name, as text
        assert "&lt;/script&gt;&lt;script&gt;document.title" in doms["classes/0.html"]  # class 0's name, as text
        assert "a &amp; b &lt;i&gt;italic" in doms["classes/index.html"]  # class 2's name, as text
        assert "&lt;i&gt;" in doms["concepts/3.html"]  # class 2's name among the classes using concept 3
        assert len(re.findall(r'<tr data-class="(\d+)">', doms["concepts/3.html"])) == 3  # all three classes use it
        assert "-0.500" in doms["concepts/3.html"]  # a negative weight, signed
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_cbm_of_another_sae_is_refused_before_anything_is_written(cbm_site, tmp_path):
    import dataclasses

    from visae.browse import main

    cfg = cbm_site["cfg"]
    bad = tmp_path / "cbm_bad"
    shutil.copytree(cbm_site["cbm"], bad)
    doc = json.loads((bad / "cbm.json").read_text())
    doc["member"] = 3
    (bad / "cbm.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="field 'member' is 3"):
        build_site(dataclasses.replace(cfg, out=str(tmp_path / "site1"), cbm=str(bad), concepts=str(cbm_site["concepts"])))
    assert not (tmp_path / "site1").exists()
    rc = main(["--sae", cfg.naming.sae, "--concepts", str(cbm_site["concepts"]), "--cbm", str(tmp_path / "nothing"),
               "--out", str(tmp_path / "site2")])
    assert rc == 2 and not (tmp_path / "site2").exists()
