// visae concept page: replace thumbnails that fail to load by their image id; record how many loaded.
(function () {
  "use strict";
  function done() {
    var imgs = document.querySelectorAll("figure img");
    var ok = 0;
    for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
    document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
  }
  var imgs = document.querySelectorAll("figure img");
  for (var i = 0; i < imgs.length; i++) {
    imgs[i].addEventListener("error", function () {
      var d = document.createElement("div");
      d.className = "noimg";
      d.textContent = this.getAttribute("alt") || "image not found";
      this.parentNode.replaceChild(d, this);
    });
  }
  if (document.readyState === "complete") done(); else window.addEventListener("load", done);
})();
