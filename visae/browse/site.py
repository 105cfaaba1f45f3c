"""Static site of named concepts: ``index.html`` (search / filter / sort) and one page per concept.

Layout (all relative links, works from a file:// URL or ``--serve``)::

    SITE/index.html              the concept table; data embedded as JSON, vanilla JS (static/index.js)
    SITE/concepts/<latent>.html  name candidates, statistics, activation histogram (inline SVG),
                                 top-activating and random activating images with their activations
    SITE/thumbs/<sha1>.jpg       thumbnails, made with PIL from the images behind the shard ids
    SITE/static/                 style.css, index.js, concept.js (copied from the package)
    SITE/site.json               what the site was built from (config, SAE, shards, concepts)
    SITE/concepts_data/          concepts.json / .csv / top_images.npz when the naming ran here
    SITE/classes/index.html      with a concept bottleneck classifier (``--cbm``): its classes, per-class accuracy
    SITE/classes/<class>.html    one class: its concepts with their signed weights, linked to the concept pages
                                 (and each concept page lists the classes that use it, linked back)
"""

from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from visae.atomic import atomic_write_text

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = ("style.css", "index.js", "concept.js")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "\u2013"
    return f"{float(x):.{digits}f}"


def _pct(x: Any) -> str:
    if x is None:
        return "\u2013"
    x = float(x)
    if x == 0:
        return "0"
    if x < 1e-4:
        return "<0.01%"
    return f"{100 * x:.{2 if x < 0.01 else 1}f}%"


def histogram_svg(counts: np.ndarray, edges: np.ndarray, width: int = 420, height: int = 150) -> str:
    """Inline SVG bar chart of one latent's activation histogram (log-spaced bins, empty tails cropped)."""
    counts = np.asarray(counts)
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return '<p class="note">This latent never fired on the shard set.</p>'
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    pad = max(0, 8 - (hi - lo))  # at least a few bins wide
    lo, hi = max(0, lo - pad // 2), min(len(counts), hi + (pad - pad // 2))
    c = counts[lo:hi]
    m_left, m_bottom, m_top = 44, 34, 8
    w, h = width - m_left - 8, height - m_bottom - m_top
    bw = w / len(c)
    cmax = max(int(c.max()), 1)
    bars = []
    for i, v in enumerate(c):
        if v <= 0:
            continue
        bh = h * v / cmax
        x0 = m_left + i * bw
        bars.append(f'<rect x="{x0 + 0.5:.1f}" y="{m_top + h - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" height="{bh:.1f}" '
                    f'fill="#5b7fc7"><title>{edges[lo + i]:.3g} to {edges[lo + i + 1]:.3g}: {int(v)} examples</title></rect>')
    ticks = []
    for i in range(0, len(c) + 1, max(1, len(c) // 5)):
        x = m_left + i * bw
        ticks.append(f'<line x1="{x:.1f}" y1="{m_top + h}" x2="{x:.1f}" y2="{m_top + h + 4}" stroke="#888"/>'
                     f'<text x="{x:.1f}" y="{m_top + h + 16}" font-size="10" text-anchor="middle" fill="#555">{edges[lo + i]:.3g}</text>')
    axis = (f'<line x1="{m_left}" y1="{m_top + h}" x2="{m_left + w}" y2="{m_top + h}" stroke="#888"/>'
            f'<text x="{m_left - 6}" y="{m_top + 10}" font-size="10" text-anchor="end" fill="#555">{cmax}</text>'
            f'<text x="{m_left - 6}" y="{m_top + h}" font-size="10" text-anchor="end" fill="#555">0</text>'
            f'<text x="{m_left + w / 2:.1f}" y="{height - 3}" font-size="11" text-anchor="middle" fill="#555">'
            'activation (log scale; examples where the latent fires)</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="activation histogram">{axis}{"".join(ticks)}{"".join(bars)}</svg>')


def heat_attrs(heat: np.ndarray | None, grid: Sequence[int] | None, scale: float) -> str:
    """``data-grid`` / ``data-heat`` attributes of a figure: the concept's activation per patch ([P], row-major
    over a ``grid`` = (rows, cols) patch grid) quantised to 0-99 of ``scale`` (the concept's largest patch
    activation among the shown images, so images of one page share one colour scale). Empty when there is
    no heatmap (not a patch-token set, or a patch count that is not a square grid)."""
    if heat is None or grid is None or int(grid[0]) * int(grid[1]) != len(heat) or len(heat) == 0:
        return ""
    q = np.clip(np.rint(99 * np.asarray(heat, np.float64) / max(scale, 1e-12)), 0, 99).astype(int)
    return f' data-grid="{int(grid[0])}x{int(grid[1])}" data-heat="{",".join(map(str, q.tolist()))}"'


def _figure(entry: dict[str, Any]) -> str:
    cap = f'<b>{entry["value"]:.3f}</b> {_e(entry["caption"])}'
    heat = entry.get("heat_attrs", "")
    if entry.get("thumb"):
        img = f'<img loading="lazy" src="../thumbs/{_e(entry["thumb"])}" alt="{_e(entry["id"])}">'
        if heat:
            img = f'<div class="thumbwrap">{img}<canvas class="heat" aria-hidden="true"></canvas></div>'
    else:
        img = f'<div class="noimg">{_e(entry["id"])}</div>'
    return f'<figure title="{_e(entry["id"])}"{heat}>{img}<figcaption>{cap}</figcaption></figure>'


def _warning_html(warning: str | None) -> str:
    return f'<div class="warning" role="alert"><strong>Warning:</strong> {_e(warning)}</div>' if warning else ""


def concept_page(c: dict[str, Any], *, top: Sequence[dict[str, Any]], rand: Sequence[dict[str, Any]], hist_svg: str,
                 n_concepts: int, title: str, max_activation: float | None, count: int | None,
                 warning: str | None = None, unit: dict[str, Any] | None = None,
                 classes: Sequence[dict[str, Any]] | None = None) -> str:
    """One concept's page. ``unit``: for patch-token sets ``{"image_score": "max"|"mean", "row_count": int,
    "heatmaps": bool}`` (counts are of images; the image's activation is that score over its patches).
    ``classes``: with a CBM, the classes whose weight on this concept is non-zero, ``[{class, name, weight}]``
    (largest |weight| first; an empty list says the CBM has the concept but no class uses it); None: no CBM."""
    j = c["latent"]
    name = c.get("name")
    head = _e(name) if name else '<span class="unnamed">unnamed</span>'
    reason = f' <span class="note">({_e(c["unnamed_reason"])})</span>' if (not name and c.get("unnamed_reason")) else ""
    alts = c.get("alternatives") or []
    smax = max([a["score"] for a in alts if a.get("score") is not None] + [1e-9])
    rows = []
    for a in alts:
        s = a.get("score")
        wpct = 0 if s is None else max(0.0, min(100.0, 100 * s / smax))
        cls = ' class="chosen"' if a["name"] == name else ""
        rows.append(f'<tr{cls}><td>{_e(a["name"])}</td><td class="num">{_num(s)}</td>'
                    f'<td style="width:120px"><div class="bar"><span style="width:{wpct:.0f}%"></span></div></td></tr>')
    stats = [("latent", f"#{j}"), ("cosine score", _num(c.get("score"))), ("margin (1st - 2nd)", _num(c.get("margin"))),
             ("z vs vocabulary", _num(c.get("z"), 2)), ("frequency", _pct(c.get("frequency"))),
             ("mean activation (active)", _num(c.get("mean_activation"))), ("max activation", _num(max_activation)),
             ("active images" if unit else "active examples", "\u2013" if count is None else f"{count:,}")]
    if unit:
        stats.append(("active patch tokens", f"{unit['row_count']:,}"))
        stats.append(("image activation", f"{unit['image_score']} over its patches"))
    nav = ['<a href="../index.html">\u2190 all concepts</a>']
    if classes is not None:
        nav.append('<a href="../classes/index.html">classes</a>')
    if j > 0:
        nav.append(f'<a href="{j - 1}.html">\u2039 #{j - 1}</a>')
    if j + 1 < n_concepts:
        nav.append(f'<a href="{j + 1}.html">#{j + 1} \u203a</a>')
    top_html = "".join(_figure(e) for e in top) or '<p class="note">No activating images.</p>'
    rand_html = "".join(_figure(e) for e in rand) or '<p class="note">No activating images.</p>'
    heat_toggle = ""
    if unit and unit.get("heatmaps"):
        heat_toggle = ('<label class="heat-toggle"><input type="checkbox" id="show-heat" checked> heatmap: the concept\'s '
                       'activation on each patch (one colour scale for the page)</label>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(name or "unnamed")} (#{j}) - {_e(title)}</title>
<link rel="stylesheet" href="../static/style.css"></head>
<body data-latent="{j}">
<header><h1>{head} <span class="latent">#{j}</span>{reason}</h1><div class="sub">{_e(title)}</div>{_warning_html(warning)}</header>
<main>
<div class="nav">{" ".join(nav)}</div>
<div class="summary">
 <div class="panel"><dl class="stats">{"".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in stats)}</dl></div>
 <div class="panel"><b>Name candidates</b> (cosine with the decoder direction)
  <table class="cands" id="candidates">{"".join(rows) or "<tr><td>none</td></tr>"}</table></div>
 <div class="panel hist"><b>Activation histogram</b>{hist_svg}</div>
{_concept_classes_panel(classes)}
</div>
<h2>Top-activating images</h2>{heat_toggle}
<div class="grid" id="top-images">{top_html}</div>
<h2>Random activating images</h2>
<div class="grid" id="random-images">{rand_html}</div>
</main>
<script src="../static/concept.js"></script>
</body></html>
"""


# Inside <script type="application/json"> the HTML parser, not JSON, decides where the element ends:
# "</script" closes it and "<!--<script" switches to the double-escaped state where the real closing
# tag no longer ends it. JSON allows any character as a \uXXXX escape, so <, > and & (and the two
# line separators some JS engines reject) are written that way: the parser then never sees markup.
_JSON_IN_HTML = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
                 0x2028: "\\u2028", 0x2029: "\\u2029"}


def json_for_html(data: Any) -> str:
    """``data`` as JSON safe to embed in an HTML ``<script type="application/json">`` element.

    ``<``, ``>``, ``&``, U+2028 and U+2029 are written as ``\\uXXXX`` escapes, so no string in the data
    (a vocabulary entry ``<!--<script>``, an id ``</script>``) can end or re-open the element; ``JSON.parse``
    of the element's text gives back ``data`` unchanged.
    """
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).translate(_JSON_IN_HTML)


def legend_html(per_image: bool = False, image_score: str = "max") -> str:
    """What the index's columns mean (shown under the controls)."""
    if per_image:
        freq = (f"fraction of the images on which the latent fires on at least one patch (its image activation, the "
                f"{_e(image_score)} over the image's patch tokens, is &gt; 0); images are counted, not patch tokens")
    else:
        freq = "fraction of the images (examples of the shard set) on which the latent fires (activation &gt; 0)"
    return ('<details class="legend" id="legend" open><summary>What the columns mean</summary><dl>'
            '<dt>score</dt><dd>cosine between the latent\'s decoder direction and the text embedding of its name, in '
            'CLIP space: how well the name matches the direction</dd>'
            '<dt>margin</dt><dd>the name\'s cosine minus the next candidate\'s: near 0, another word fits almost as '
            'well (an ambiguous name)</dd>'
            f'<dt>frequency</dt><dd>{freq}</dd>'
            '<dt>mean act.</dt><dd>mean activation over the images where the latent fires</dd>'
            '<dt>search</dt><dd>concepts named exactly by a search word come first, then names containing it, then '
            'concepts where it is only among the name candidates</dd></dl></details>')


def index_page(data: dict[str, Any], title: str, subtitle: str, warning: str | None = None, legend: str = "",
               n_classes: int | None = None) -> str:
    """The concept table. ``n_classes``: the site has class pages (a CBM): the index links to their index."""
    blob = json_for_html(data)
    nav = (f'<div class="nav"><a id="classes-link" href="classes/index.html">the {n_classes} classes of the concept '
           'bottleneck classifier, with the concepts each uses</a></div>' if n_classes else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<link rel="stylesheet" href="static/style.css"></head>
<body>
<header><h1>{_e(title)}</h1><div class="sub">{_e(subtitle)}</div>{_warning_html(warning)}</header>
<main>
{nav}
<div class="controls">
 <label>Search <input type="search" id="search" placeholder="name, candidate or #latent" autofocus></label>
 <label>Sort by <select id="sort">
  <option value="frequency">frequency</option><option value="score">score</option><option value="name">name</option>
  <option value="margin">margin</option><option value="mean">mean activation</option><option value="latent">latent id</option>
 </select></label>
 <label><input type="checkbox" id="named-only"> named only</label>
 <label>min frequency % <input type="number" id="min-freq" min="0" max="100" step="0.1"></label>
 <label>min score <input type="number" id="min-score" min="-1" max="1" step="0.01"></label>
 <span id="count"></span>
</div>
{legend or legend_html()}
<table class="concepts">
 <thead><tr><th></th><th data-sort="name">concept</th><th class="num" data-sort="score">score</th>
  <th class="num" data-sort="margin">margin</th><th class="num" data-sort="frequency">frequency</th>
  <th class="num" data-sort="mean">mean act.</th></tr></thead>
 <tbody id="rows"></tbody>
</table>
<button id="more" type="button">Show more</button>
<noscript><p class="note">The search needs JavaScript; concept pages are in concepts/&lt;latent&gt;.html.</p></noscript>
</main>
<script id="concept-data" type="application/json">{blob}</script>
<script src="static/index.js"></script>
</body></html>
"""


def _signed(x: float) -> str:
    return f"{float(x):+.3f}"


def _weight_bar(w: float, wmax: float) -> str:
    """A bar of |w| / wmax, blue for a positive weight (evidence for the class), red for a negative one."""
    pct = max(0.0, min(100.0, 100 * abs(w) / max(wmax, 1e-12)))
    return f'<div class="bar {"pos" if w > 0 else "neg"}"><span style="width:{pct:.0f}%"></span></div>'


CBM_WEIGHT_NOTE = ("weight: the class's logit per standard deviation of the concept's activation (on the CBM's training "
                   "split); positive = evidence for the class, negative = against it")


def _concept_classes_panel(classes: Sequence[dict[str, Any]] | None) -> str:
    if classes is None:
        return ""
    if not classes:
        body = '<p class="note">No class of the concept bottleneck classifier uses this concept.</p>'
    else:
        wmax = max(abs(c["weight"]) for c in classes)
        body = '<table class="cands" id="cbm-classes">' + "".join(
            f'<tr data-class="{int(c["class"])}"><td><a href="../classes/{int(c["class"])}.html">{_e(c["name"])}</a></td>'
            f'<td class="num">{_signed(c["weight"])}</td><td style="width:120px">{_weight_bar(c["weight"], wmax)}</td></tr>'
            for c in classes) + "</table>"
    return (f'<div class="panel"><b>Classes that use it</b> (concept bottleneck classifier; '
            f'<span title="{_e(CBM_WEIGHT_NOTE)}">weight per s.d.</span>){body}</div>')


def _cbm_summary(cbm: dict[str, Any]) -> str:
    t = cbm.get("top1") or {}
    parts = [f"top-1 {_pct(t.get('cbm'))} on {int(cbm.get('n_val', 0)):,} validation examples",
             f"{float(cbm.get('concepts_per_class', 0)):.2f} concepts per class on average",
             f"{int(cbm.get('num_concepts_used', 0))} of {int(cbm.get('num_candidate_concepts', 0))} concepts used"]
    if t.get("linear_probe") is not None:
        parts.append(f"linear probe on the clean embeddings {_pct(t['linear_probe'])}")
    if t.get("zero_shot") is not None:
        parts.append(f"zero-shot {_pct(t['zero_shot'])}")
    return "Concept bottleneck classifier: " + "; ".join(parts)


def class_page(cls: dict[str, Any], *, concept_names: dict[int, str | None], n_classes: int, title: str,
               cbm: dict[str, Any], warning: str | None = None) -> str:
    """One class of a CBM (``cls``: an entry of cbm.json's ``classes``: ``class``, ``name``, ``n_val``, ``val_top1``,
    ``concepts`` ``[{latent, name, weight}]`` by |weight|): its accuracy and its concepts with their signed weights,
    each linked to its concept page. ``concept_names``: latent -> the site's name of it (None: unnamed).
    """
    c = int(cls["class"])
    name = str(cls["name"])
    concepts = cls.get("concepts") or []
    wmax = max([abs(x["weight"]) for x in concepts] + [1e-12])
    rows = []
    for rank, x in enumerate(concepts, 1):
        j = int(x["latent"])
        nm = concept_names.get(j)
        label = _e(nm) if nm else '<span class="unnamed">unnamed</span>'
        then = x.get("name") or ""
        was = (f' <span class="latent">(named &ldquo;{_e(then)}&rdquo; when the CBM was trained)</span>'
               if then and nm and then != nm else "")
        rows.append(f'<tr class="cbm-concept" data-latent="{j}" data-weight="{float(x["weight"])!r}"><td class="num">{rank}</td>'
                    f'<td><a href="../concepts/{j}.html">{label}</a> <span class="latent">#{j}</span>{was}</td>'
                    f'<td class="num">{_signed(x["weight"])}</td><td style="width:160px">{_weight_bar(x["weight"], wmax)}</td></tr>')
    table = ('<table class="concepts" id="class-concepts"><thead><tr><th class="num">#</th><th>concept</th>'
             '<th class="num">weight</th><th></th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
             if rows else '<p class="note">This class uses no concept: the classifier predicts it from its bias alone.</p>')
    acc = cls.get("val_top1")
    stats = [("class", f"{c}"), ("validation examples", f"{int(cls.get('n_val') or 0):,}"),
             ("accuracy (recall) on them", _pct(acc) if acc is not None else "\u2013"),
             ("concepts used", f"{len(concepts)}")]
    nav = ['<a href="../index.html">\u2190 all concepts</a>', '<a href="index.html">all classes</a>']
    if c > 0:
        nav.append(f'<a href="{c - 1}.html">\u2039 class {c - 1}</a>')
    if c + 1 < n_classes:
        nav.append(f'<a href="{c + 1}.html">class {c + 1} \u203a</a>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>class {_e(name)} - {_e(title)}</title>
<link rel="stylesheet" href="../static/style.css"></head>
<body data-class="{c}">
<header><h1>{_e(name)} <span class="latent">class {c}</span></h1><div class="sub">{_e(_cbm_summary(cbm))}</div>{_warning_html(warning)}</header>
<main>
<div class="nav">{" ".join(nav)}</div>
<div class="summary"><div class="panel"><dl class="stats" id="class-stats">{"".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in stats)}</dl></div></div>
<h2>Concepts of this class</h2>
<p class="legend-note">{_e(CBM_WEIGHT_NOTE)}; largest |weight| first.</p>
{table}
</main>
</body></html>
"""


def classes_index_page(cbm: dict[str, Any], *, concept_names: dict[int, str | None], title: str,
                       warning: str | None = None, top: int = 3) -> str:
    """The index of a CBM's classes: name, accuracy, number of concepts and the ``top`` concepts of each."""
    rows = []
    for cls in cbm["classes"]:
        c = int(cls["class"])
        cs = cls.get("concepts") or []
        tops = ", ".join(f'<a href="../concepts/{int(x["latent"])}.html">{_e(concept_names.get(int(x["latent"])) or "#" + str(x["latent"]))}</a> '
                         f'{_signed(x["weight"])}' for x in cs[:top])
        acc = cls.get("val_top1")
        rows.append(f'<tr class="class" data-class="{c}"><td><a href="{c}.html">{_e(cls["name"])}</a></td>'
                    f'<td class="num">{_pct(acc) if acc is not None else "&ndash;"}</td><td class="num">{int(cls.get("n_val") or 0)}</td>'
                    f'<td class="num">{len(cs)}</td><td>{tops}</td></tr>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>classes - {_e(title)}</title>
<link rel="stylesheet" href="../static/style.css"></head>
<body>
<header><h1>Classes of the concept bottleneck classifier</h1><div class="sub">{_e(_cbm_summary(cbm))}</div>{_warning_html(warning)}</header>
<main>
<div class="nav"><a href="../index.html">\u2190 all concepts</a></div>
<p class="legend-note">accuracy: the fraction of the class's validation examples that the classifier assigns to it; {_e(CBM_WEIGHT_NOTE)}.</p>
<table class="concepts" id="classes"><thead><tr><th>class</th><th class="num">accuracy</th><th class="num">val. examples</th>
<th class="num">concepts</th><th>top concepts (weight)</th></tr></thead><tbody>{"".join(rows)}</tbody></table>
</main>
</body></html>
"""


def concept_classes(cbm: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """latent -> the CBM classes whose weight on it is non-zero, ``[{class, name, weight}]`` by |weight|."""
    out: dict[int, list[dict[str, Any]]] = {}
    for cls in cbm["classes"]:
        for x in cls.get("concepts") or []:
            out.setdefault(int(x["latent"]), []).append({"class": int(cls["class"]), "name": cls["name"],
                                                         "weight": float(x["weight"])})
    for v in out.values():
        v.sort(key=lambda r: -abs(r["weight"]))
    return out


def copy_static(site: Path) -> None:
    dst = site / "static"
    dst.mkdir(parents=True, exist_ok=True)
    for name in STATIC_FILES:
        shutil.copyfile(STATIC / name, dst / name)


def write_site(site: Path, concepts: list[dict[str, Any]], stats: Any, ids: np.ndarray, labels: np.ndarray | None,
               label_names: Sequence[str] | None, thumbs: dict[str, str | None], *, title: str, subtitle: str,
               info: dict[str, Any], warning: str | None = None, cbm: dict[str, Any] | None = None) -> Path:
    """Write index.html, one page per concept, the static files and site.json into ``site``.

    ``warning``: shown at the top of every page (e.g. the backbone had random weights). ``cbm``: a concept
    bottleneck classifier's cbm.json (:mod:`visae.cbm`) over these concepts: adds ``classes/index.html``, a page
    per class (``classes/<class>.html``) and on each concept page the classes that use it.
    """
    from visae.browse.images import image_id

    site.mkdir(parents=True, exist_ok=True)
    (site / "concepts").mkdir(exist_ok=True)
    copy_static(site)

    per_image = bool(getattr(stats, "per_image", False))
    grid = getattr(stats, "patch_grid", None) if per_image else None
    has_heat = per_image and grid is not None and int(grid[0]) * int(grid[1]) > 0

    def entries(idx_row: np.ndarray, val_row: np.ndarray, heat: np.ndarray | None = None,
                scale: float = 1.0) -> list[dict[str, Any]]:
        out = []
        for r, (i, v) in enumerate(zip(idx_row, val_row)):
            if i < 0:
                continue
            sid = image_id(str(ids[i])) if per_image else str(ids[i])
            cap = sid
            if labels is not None and label_names is not None and 0 <= int(labels[i]) < len(label_names):
                cap = f"{label_names[int(labels[i])]} \u00b7 {sid}"
            out.append({"id": sid, "value": float(v), "caption": cap, "thumb": thumbs.get(image_id(sid)),
                        "heat_attrs": heat_attrs(heat[r], grid, scale) if heat is not None else ""})
        return out

    rows = []
    n = len(concepts)
    uses = concept_classes(cbm) if cbm is not None else {}
    cbm_latents = {int(j) for j in (cbm or {}).get("latents", [])} | set(uses)
    for c in concepts:
        j = c["latent"]
        top_h = rnd_h = None
        scale = 1.0
        if has_heat:
            top_h, rnd_h = stats.top_heat[j].astype(np.float32), stats.rand_heat[j].astype(np.float32)
            scale = float(max(top_h.max(initial=0.0), rnd_h.max(initial=0.0)))
        top = entries(stats.top_index[j], stats.top_value[j], top_h, scale) if stats is not None else []
        rnd = entries(stats.rand_index[j], stats.rand_value[j], rnd_h, scale) if stats is not None else []
        unit = ({"image_score": stats.image_score, "row_count": int(stats.row_count[j]), "heatmaps": has_heat}
                if per_image else None)
        hist = histogram_svg(stats.hist_counts[j], stats.hist_edges) if stats is not None else ""
        page = concept_page(c, top=top, rand=rnd, hist_svg=hist, n_concepts=n, title=title,
                            max_activation=float(stats.max[j]) if stats is not None else None,
                            count=int(stats.count[j]) if stats is not None else None, warning=warning, unit=unit,
                            classes=(uses.get(j, []) if j in cbm_latents else None) if cbm is not None else None)
        atomic_write_text(site / "concepts" / f"{j}.html", page)
        thumb = next((e["thumb"] for e in top if e["thumb"]), None)
        rows.append({
            "latent": j, "name": c.get("name"), "score": c.get("score"), "margin": c.get("margin"), "z": c.get("z"),
            "frequency": c.get("frequency"), "mean_activation": c.get("mean_activation"),
            "alternatives": [{"name": a["name"], "score": a.get("score")} for a in (c.get("alternatives") or [])],
            "thumb": f"thumbs/{thumb}" if thumb else None,
        })
    legend = legend_html(per_image, getattr(stats, "image_score", "") or "max")
    if cbm is not None:
        (site / "classes").mkdir(exist_ok=True)
        names = {int(c["latent"]): c.get("name") for c in concepts}
        for cls in cbm["classes"]:
            atomic_write_text(site / "classes" / f"{int(cls['class'])}.html",
                              class_page(cls, concept_names=names, n_classes=len(cbm["classes"]), title=title, cbm=cbm,
                                         warning=warning))
        atomic_write_text(site / "classes" / "index.html", classes_index_page(cbm, concept_names=names, title=title,
                                                                              warning=warning))
    atomic_write_text(site / "index.html", index_page({"concepts": rows}, title, subtitle, warning, legend,
                                                      n_classes=len(cbm["classes"]) if cbm is not None else None))
    atomic_write_text(site / "site.json", json.dumps(info, indent=1, default=str))
    return site / "index.html"
