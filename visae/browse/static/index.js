// visae concept browser: search, filter and sort the concept table (vanilla JS, data embedded in the page).
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("concept-data").textContent);
  var concepts = DATA.concepts;  // [{latent, name, score, margin, z, frequency, mean_activation, alternatives, thumb}]
  var PAGE = 200;
  var shown = PAGE;
  var state = { q: "", sort: "frequency", order: "desc", named: false, minfreq: 0, minscore: -1 };

  var el = function (id) { return document.getElementById(id); };
  var q = el("search"), sortSel = el("sort"), named = el("named-only"), minfreq = el("min-freq"), minscore = el("min-score");
  var tbody = el("rows"), count = el("count"), more = el("more");

  function fmt(x, digits) { return (x === null || x === undefined) ? "\u2013" : Number(x).toFixed(digits); }
  function pct(x) {
    if (x === null || x === undefined) return "\u2013";
    if (x === 0) return "0";
    if (x < 0.0001) return "<0.01%";
    return (100 * x).toFixed(x < 0.01 ? 2 : 1) + "%";
  }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  function readUrl() {
    var p = new URLSearchParams(window.location.search);
    if (p.has("q")) state.q = p.get("q");
    if (p.has("sort")) {
      state.sort = p.get("sort");
      state.order = state.sort === "name" || state.sort === "latent" ? "asc" : "desc";
    }
    if (p.has("order")) state.order = p.get("order") === "asc" ? "asc" : "desc";
    if (p.has("named")) state.named = p.get("named") === "1";
    if (p.has("minfreq")) state.minfreq = parseFloat(p.get("minfreq")) || 0;
    if (p.has("minscore")) state.minscore = parseFloat(p.get("minscore"));
    if (isNaN(state.minscore)) state.minscore = -1;
  }
  function writeUrl() {
    var p = new URLSearchParams();
    if (state.q) p.set("q", state.q);
    if (state.sort !== "frequency") p.set("sort", state.sort);
    var natural = state.sort === "name" || state.sort === "latent" ? "asc" : "desc";
    if (state.order !== natural) p.set("order", state.order);
    if (state.named) p.set("named", "1");
    if (state.minfreq > 0) p.set("minfreq", String(state.minfreq));
    if (state.minscore > -1) p.set("minscore", String(state.minscore));
    var s = p.toString();
    try { history.replaceState(null, "", s ? "?" + s : window.location.pathname); } catch (e) { /* file:// */ }
  }
  function syncControls() {
    q.value = state.q; sortSel.value = state.sort; named.checked = state.named;
    minfreq.value = state.minfreq ? String(100 * state.minfreq) : "";
    minscore.value = state.minscore > -1 ? String(state.minscore) : "";
  }

  function matches(c, terms) {
    if (state.named && !c.name) return false;
    if (state.minfreq > 0 && !(c.frequency >= state.minfreq)) return false;
    if (state.minscore > -1 && !(c.score >= state.minscore)) return false;
    for (var i = 0; i < terms.length; i++) {
      var t = terms[i];
      if (t.charAt(0) === "#") { if (String(c.latent) !== t.slice(1)) return false; continue; }
      var hay = ((c.name || "") + " " + c.alternatives.map(function (a) { return a.name; }).join(" ")).toLowerCase();
      if (hay.indexOf(t) < 0) return false;
    }
    return true;
  }

  // Search ranking: 0 = the name is exactly the query, 1 = the name contains every word of it,
  // 2 = some word is found only among the name candidates; within a tier, the chosen sort.
  var MATCH = ["exact", "name", "candidates"];
  function tier(c, terms) {
    var words = terms.filter(function (t) { return t.charAt(0) !== "#"; });
    if (!words.length) return 0;
    var name = (c.name || "").toLowerCase();
    if (name && name === words.join(" ")) return 0;
    for (var i = 0; i < words.length; i++) if (name.indexOf(words[i]) < 0) return 2;
    return 1;
  }

  function key(c) {
    var v = c[state.sort === "mean" ? "mean_activation" : state.sort];
    return v;
  }
  function compare(a, b) {
    var ka = key(a), kb = key(b);
    var dir = state.order === "asc" ? 1 : -1;
    var na = ka === null || ka === undefined, nb = kb === null || kb === undefined;
    if (na || nb) return na === nb ? a.latent - b.latent : (na ? 1 : -1);  // missing values last
    if (state.sort === "name") { var r = String(ka).localeCompare(String(kb)); return r !== 0 ? dir * r : a.latent - b.latent; }
    return ka !== kb ? dir * (ka < kb ? -1 : 1) : a.latent - b.latent;
  }

  function row(c) {
    var m = c._tier === undefined ? "" : ' data-match="' + MATCH[c._tier] + '"';
    var note = c._tier === 2 ? ' <span class="match-note">(matched a candidate)</span>' : "";
    var thumb = c.thumb ? '<img loading="lazy" src="' + esc(c.thumb) + '" alt="">' : '<div class="noimg"></div>';
    var name = c.name ? '<span class="name">' + esc(c.name) + "</span>" : '<span class="name unnamed">unnamed</span>';
    var alts = c.alternatives.slice(0, 4).map(function (a) { return esc(a.name) + " " + fmt(a.score, 2); }).join(", ");
    return '<tr class="concept' + (c._tier === 2 ? " cand-only" : "") + '" data-latent="' + c.latent + '"' + m + ">" +
      '<td class="thumb"><a href="concepts/' + c.latent + '.html">' + thumb + "</a></td>" +
      '<td><a href="concepts/' + c.latent + '.html">' + name + '</a> <span class="latent">#' + c.latent + "</span>" + note +
      '<div class="alts">' + alts + "</div></td>" +
      '<td class="num">' + fmt(c.score, 3) + "</td>" +
      '<td class="num">' + fmt(c.margin, 3) + "</td>" +
      '<td class="num">' + pct(c.frequency) + "</td>" +
      '<td class="num">' + fmt(c.mean_activation, 3) + "</td></tr>";
  }

  function render() {
    var terms = state.q.toLowerCase().split(/\s+/).filter(Boolean);
    var hits = concepts.filter(function (c) { return matches(c, terms); });
    var searching = terms.some(function (t) { return t.charAt(0) !== "#"; });
    hits.forEach(function (c) { c._tier = searching ? tier(c, terms) : undefined; });
    hits.sort(function (a, b) { return searching && a._tier !== b._tier ? a._tier - b._tier : compare(a, b); });
    var page = hits.slice(0, shown);
    tbody.innerHTML = page.length ? page.map(row).join("") :
      '<tr><td colspan="6" class="empty">No concept matches.</td></tr>';
    count.textContent = hits.length + " of " + concepts.length + " concepts";
    more.style.display = hits.length > shown ? "block" : "none";
    more.textContent = "Show more (" + (hits.length - shown) + " left)";
    var ths = document.querySelectorAll("th[data-sort]");
    for (var i = 0; i < ths.length; i++) {
      var on = ths[i].getAttribute("data-sort") === state.sort;
      ths[i].classList.toggle("sorted", on);
      ths[i].classList.toggle("asc", on && state.order === "asc");
    }
    document.body.setAttribute("data-shown", String(page.length));
    document.body.setAttribute("data-matches", String(hits.length));
    writeUrl();
  }

  function update() { shown = PAGE; render(); }
  q.addEventListener("input", function () { state.q = q.value; update(); });
  sortSel.addEventListener("change", function () {
    state.sort = sortSel.value; state.order = state.sort === "name" || state.sort === "latent" ? "asc" : "desc"; update();
  });
  named.addEventListener("change", function () { state.named = named.checked; update(); });
  minfreq.addEventListener("input", function () { state.minfreq = (parseFloat(minfreq.value) || 0) / 100; update(); });
  minscore.addEventListener("input", function () {
    var v = parseFloat(minscore.value); state.minscore = isNaN(v) ? -1 : v; update();
  });
  more.addEventListener("click", function () { shown += PAGE; render(); });
  var ths = document.querySelectorAll("th[data-sort]");
  for (var i = 0; i < ths.length; i++) {
    ths[i].addEventListener("click", function () {
      var s = this.getAttribute("data-sort");
      if (state.sort === s) state.order = state.order === "asc" ? "desc" : "asc";
      else { state.sort = s; state.order = s === "name" || s === "latent" ? "asc" : "desc"; }
      sortSel.value = state.sort; update();
    });
  }
  readUrl();
  syncControls();
  render();
  document.body.setAttribute("data-ready", "1");
})();
