// The study page: heatmap overlays (a checkbox per finding, one opacity slider) and the image
// viewer (thumbnails, zoom, pan, window/level on the image's full bit depth). Without
// JavaScript the page shows the chosen image as the model saw it, its heatmaps on it.
(function () {
  "use strict";
  var opacity = document.getElementById("heat-opacity");

  function heats() { return document.querySelectorAll("img.heat"); }
  function box(label) { return document.querySelector(".heat-toggle[data-label='" + label + "']"); }
  // a layer follows its finding's checkbox and the opacity slider
  function styleHeat(img) {
    var b = box(img.dataset.label);
    img.classList.toggle("hidden", !!b && !b.checked);
    if (opacity) { img.style.opacity = opacity.value / 100; }
  }
  document.querySelectorAll(".heat-toggle").forEach(function (b) {
    b.addEventListener("change", function () { heats().forEach(styleHeat); });
  });
  if (opacity) {
    opacity.addEventListener("input", function () { heats().forEach(styleHeat); });
  }

  var viewer = document.getElementById("viewer");
  var plane = document.getElementById("plane");
  if (!viewer || !plane || !viewer.dataset.study || !window.fetch || !window.DataView) { return; }

  var MODEL_SIDE = 1000; // the model's square view, in plane units
  var base = "/review/studies/" + viewer.dataset.study + "/images/";
  var baseImg = document.getElementById("base-image");
  var message = document.getElementById("viewer-message");
  var tools = document.getElementById("viewer-tools");
  var modelView = document.getElementById("model-view");
  var canvas = document.createElement("canvas");
  canvas.id = "view-canvas";
  plane.insertBefore(canvas, plane.firstChild);
  var ctx = canvas.getContext("2d");
  var win = { w: 100, l: 50 }; // window width and level, % of the full range
  var view = { s: 1, x: 0, y: 0, fit: 1 }; // plane -> viewer: scale, then translate (px)
  var img = null; // {id, rows, cols, data: Uint16Array, box: [x, y, w, h]}
  var loading = 0;
  var frame = 0;

  // ------------------------------------------------------------------ drawing
  function draw() {
    frame = 0;
    if (!img) { return; }
    var lo = (win.l - win.w / 2) / 100 * 65535;
    var span = Math.max(win.w / 100 * 65535, 1);
    var lut = new Uint8ClampedArray(65536);
    for (var v = 0; v < 65536; v++) { lut[v] = (v - lo) / span * 255; }
    var out = ctx.createImageData(img.cols, img.rows);
    var px = out.data;
    for (var i = 0, j = 0; i < img.data.length; i++, j += 4) {
      var g = lut[img.data[i]];
      px[j] = g; px[j + 1] = g; px[j + 2] = g; px[j + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
    viewer.dataset.ready = "1";
  }
  function redraw() { if (!frame) { frame = requestAnimationFrame(draw); } }

  function model() { return modelView && modelView.checked; }
  function size() { return model() || !img ? [MODEL_SIDE, MODEL_SIDE] : [img.cols, img.rows]; }

  function place() {
    plane.style.transform = "translate(" + view.x + "px," + view.y + "px) scale(" + view.s + ")";
  }

  // where each heat layer lies: the model's square, over the full image or as the whole plane
  function placeHeats() {
    var b = model() || !img ? [0, 0, 1, 1] : img.box;
    heats().forEach(function (h) {
      h.style.left = b[0] * 100 + "%";
      h.style.top = b[1] * 100 + "%";
      h.style.width = b[2] * 100 + "%";
      h.style.height = b[3] * 100 + "%";
    });
  }

  function layout() {
    var wh = size();
    var live = !!img && !model();
    viewer.classList.add("js");
    viewer.classList.toggle("live", live);
    plane.style.width = wh[0] + "px";
    plane.style.height = wh[1] + "px";
    placeHeats();
    tools.querySelectorAll("#win-width, #win-width-n, #win-level, #win-level-n, .wl-preset")
      .forEach(function (el) { el.disabled = !live; });
  }

  function fit() {
    var wh = size();
    var vw = viewer.clientWidth, vh = viewer.clientHeight;
    view.fit = view.s = Math.min(vw / wh[0], vh / wh[1]);
    view.x = (vw - wh[0] * view.s) / 2;
    view.y = (vh - wh[1] * view.s) / 2;
    place();
  }

  function zoomAt(mx, my, factor) {
    var s = Math.min(Math.max(view.s * factor, view.fit / 4), view.fit * 32);
    view.x = mx - (mx - view.x) * (s / view.s);
    view.y = my - (my - view.y) * (s / view.s);
    view.s = s;
    place();
  }
  function zoomCentre(factor) { zoomAt(viewer.clientWidth / 2, viewer.clientHeight / 2, factor); }

  // ------------------------------------------------------------------ window/level
  var inputs = {
    w: [document.getElementById("win-width"), document.getElementById("win-width-n")],
    l: [document.getElementById("win-level"), document.getElementById("win-level-n")],
  };
  function setWindow(w, l) {
    win.w = Math.round(Math.min(Math.max(w, 1), 100) * 10) / 10;
    win.l = Math.round(Math.min(Math.max(l, 0), 100) * 10) / 10;
    inputs.w.forEach(function (el) { el.value = win.w; });
    inputs.l.forEach(function (el) { el.value = win.l; });
    redraw();
  }
  ["w", "l"].forEach(function (k) {
    inputs[k].forEach(function (el) {
      el.addEventListener("input", function () {
        var v = parseFloat(el.value);
        if (isNaN(v)) { return; }
        if (k === "w") { setWindow(v, win.l); } else { setWindow(win.w, v); }
      });
    });
  });
  document.querySelectorAll(".wl-preset").forEach(function (b) {
    b.addEventListener("click", function () {
      setWindow(parseFloat(b.dataset.w), parseFloat(b.dataset.l));
    });
  });

  // ------------------------------------------------------------------ images
  function showMessage(text) {
    message.textContent = text || "";
    message.classList.toggle("hidden", !text);
  }

  function setHeats(thumb) {
    heats().forEach(function (h) { h.remove(); });
    var labels = (thumb.dataset.heats || "").split(" ").filter(Boolean);
    labels.forEach(function (label) {
      var h = document.createElement("img");
      h.className = "heat";
      h.dataset.label = label;
      h.alt = box(label) ? box(label).parentNode.textContent.trim() : label;
      h.src = base + thumb.dataset.instance + "/heatmaps/" + encodeURIComponent(label) + ".png";
      plane.appendChild(h);
      styleHeat(h);
    });
    document.querySelectorAll(".heat-item").forEach(function (item) {
      item.classList.toggle("hidden", labels.indexOf(item.dataset.label) < 0);
    });
  }

  function load(thumb) {
    var id = thumb.dataset.instance;
    var token = ++loading;
    document.querySelectorAll(".thumb").forEach(function (t) {
      if (t === thumb) { t.setAttribute("aria-current", "true"); } else { t.removeAttribute("aria-current"); }
    });
    viewer.dataset.instance = id;
    viewer.dataset.ready = "";
    baseImg.src = base + id + "/image.png";
    baseImg.alt = thumb.dataset.caption || "";
    if (plane.dataset.heatsOf !== id) { setHeats(thumb); }
    plane.dataset.heatsOf = id;
    showMessage("");
    return fetch(base + id + "/pixels", { credentials: "same-origin" }).then(function (r) {
      if (!r.ok) { throw new Error(String(r.status)); }
      return r.arrayBuffer().then(function (buf) {
        if (token !== loading) { return; }
        var rows = parseInt(r.headers.get("X-Rows"), 10);
        var cols = parseInt(r.headers.get("X-Columns"), 10);
        if (!(rows > 0 && cols > 0) || buf.byteLength !== rows * cols * 2) { throw new Error("size"); }
        var data = new Uint16Array(rows * cols), dv = new DataView(buf);
        for (var i = 0; i < data.length; i++) { data[i] = dv.getUint16(2 * i, true); }
        var b = (r.headers.get("X-Model-Box") || "0,0,1,1").split(",").map(parseFloat);
        img = { id: id, rows: rows, cols: cols, data: data, box: b };
        canvas.width = cols;
        canvas.height = rows;
        layout();
        fit();
        draw();
      });
    }).catch(function () {
      if (token !== loading) { return; }
      img = null; // the model's view (the PNG) is all there is, if that
      layout();
      fit();
      showMessage(viewer.dataset.unavailable);
    });
  }

  document.querySelectorAll(".thumb").forEach(function (thumb) {
    thumb.addEventListener("click", function (e) {
      if (e.button !== 0 || e.ctrlKey || e.metaKey || e.shiftKey || e.altKey) { return; }
      e.preventDefault();
      history.replaceState(null, "", thumb.getAttribute("href"));
      var lang = document.getElementById("lang-switch"); // back to this image after it
      if (lang) {
        var u = new URL(lang.href);
        u.searchParams.set("next", location.pathname + location.search);
        lang.href = u.toString();
      }
      load(thumb);
    });
  });

  // ------------------------------------------------------------------ mouse and keys
  var drag = null;
  viewer.addEventListener("wheel", function (e) {
    e.preventDefault();
    var r = viewer.getBoundingClientRect();
    zoomAt(e.clientX - r.left, e.clientY - r.top, Math.exp(-Math.max(-300, Math.min(300, e.deltaY)) * 0.002));
  }, { passive: false });
  viewer.addEventListener("contextmenu", function (e) { e.preventDefault(); });
  viewer.addEventListener("pointerdown", function (e) {
    if (e.button !== 0 && e.button !== 2) { return; }
    var wl = (e.button === 2 || e.shiftKey) && !!img && !model();
    drag = { x: e.clientX, y: e.clientY, wl: wl, vx: view.x, vy: view.y, w: win.w, l: win.l };
    viewer.focus({ preventScroll: true }); // for the keys
    viewer.setPointerCapture(e.pointerId);
    viewer.classList.add("dragging");
    e.preventDefault();
  });
  viewer.addEventListener("pointermove", function (e) {
    if (!drag) { return; }
    var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (drag.wl) {
      setWindow(drag.w + dx * 0.2, drag.l + dy * 0.2); // right: wider; down: higher level
    } else {
      view.x = drag.vx + dx;
      view.y = drag.vy + dy;
      place();
    }
  });
  function endDrag() { drag = null; viewer.classList.remove("dragging"); }
  viewer.addEventListener("pointerup", endDrag);
  viewer.addEventListener("pointercancel", endDrag);
  viewer.addEventListener("keydown", function (e) {
    if (e.key === "+" || e.key === "=") { zoomCentre(1.25); } else if (e.key === "-") { zoomCentre(0.8); } else if (e.key === "0") { reset(); } else { return; }
    e.preventDefault();
  });

  function reset() { setWindow(100, 50); fit(); }
  document.getElementById("zoom-in").addEventListener("click", function () { zoomCentre(1.25); });
  document.getElementById("zoom-out").addEventListener("click", function () { zoomCentre(0.8); });
  document.getElementById("view-reset").addEventListener("click", reset);
  modelView.addEventListener("change", function () { layout(); fit(); });

  tools.hidden = false;
  var current = document.getElementById("thumb-" + viewer.dataset.instance);
  if (current) {
    plane.dataset.heatsOf = current.dataset.instance; // the page drew its layers already
    load(current);
  }
})();
