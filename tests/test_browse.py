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
