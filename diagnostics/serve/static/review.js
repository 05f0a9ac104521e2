// Heatmap overlays: one checkbox per finding, one opacity slider. Nothing else runs here.
(function () {
  var slider = document.getElementById("heat-opacity");
  function heats() { return document.querySelectorAll("img.heat"); }
  document.querySelectorAll(".heat-toggle").forEach(function (box) {
    box.addEventListener("change", function () {
      var img = document.getElementById("heat-" + box.dataset.label);
      if (img) { img.classList.toggle("hidden", !box.checked); }
    });
  });
  if (slider) {
    slider.addEventListener("input", function () {
      heats().forEach(function (img) { img.style.opacity = slider.value / 100; });
    });
  }
})();
