// visae concept page: replace thumbnails that fail to load by their image id; record how many loaded;
// draw each figure's heatmap (data-grid "RxC", data-heat: activation per patch, 0-99) on a canvas over its image.
(function () {
  "use strict";
  function drawHeat(fig) {
    var canvas = fig.querySelector("canvas.heat");
    if (!canvas) return false;
    var g = fig.getAttribute("data-grid").split("x"), rows = +g[0], cols = +g[1];
    var v = fig.getAttribute("data-heat").split(",").map(Number);
    if (!(rows > 0 && cols > 0) || v.length !== rows * cols) return false;
    canvas.width = cols; canvas.height = rows;  // one canvas pixel per patch; CSS stretches it over the image
    var ctx = canvas.getContext("2d");
    var im = ctx.createImageData(cols, rows);
    for (var k = 0; k < v.length; k++) {
      var a = Math.max(0, Math.min(99, v[k])) / 99;
      im.data[4 * k] = 255; im.data[4 * k + 1] = Math.round(200 * (1 - a)); im.data[4 * k + 2] = 0;
      im.data[4 * k + 3] = Math.round(200 * a);
    }
    ctx.putImageData(im, 0, 0);
    // read back what was drawn: the peak cell (row,col) and whether the overlay covers the image exactly
    var px = ctx.getImageData(0, 0, cols, rows).data, best = -1, at = 0;
    for (var j = 0; j < rows * cols; j++) if (px[4 * j + 3] > best) { best = px[4 * j + 3]; at = j; }
    fig.setAttribute("data-heat-peak", Math.floor(at / cols) + "," + (at % cols));
    var img = fig.querySelector("img");
    if (img) {
      var a1 = img.getBoundingClientRect(), b1 = canvas.getBoundingClientRect();
      var same = Math.abs(a1.left - b1.left) < 1 && Math.abs(a1.top - b1.top) < 1 &&
                 Math.abs(a1.width - b1.width) < 1 && Math.abs(a1.height - b1.height) < 1 && a1.width > 0;
      fig.setAttribute("data-heat-aligned", same ? "1" : "0");
    }
    return true;
  }
  function done() {
    var imgs = document.querySelectorAll("figure img");
    var ok = 0;
    for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
    document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
    var figs = document.querySelectorAll("figure[data-heat]"), drawn = 0;
    for (var f = 0; f < figs.length; f++) if (drawHeat(figs[f])) drawn++;
    document.body.setAttribute("data-heatmaps", drawn + "/" + figs.length);
  }
  var imgs = document.querySelectorAll("figure img");
  for (var i = 0; i < imgs.length; i++) {
    imgs[i].addEventListener("error", function () {
      var d = document.createElement("div");
      d.className = "noimg";
      d.textContent = this.getAttribute("alt") || "image not found";
      var wrap = this.parentNode;
      if (wrap.className === "thumbwrap") wrap.parentNode.replaceChild(d, wrap); else wrap.replaceChild(d, this);
    });
  }
  var toggle = document.getElementById("show-heat");
  if (toggle) {
    toggle.addEventListener("change", function () { document.body.classList.toggle("no-heat", !toggle.checked); });
  }
  if (document.readyState === "complete") done(); else window.addEventListener("load", done);
})();
