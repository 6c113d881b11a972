// stillhouse console: draws the charts whose data the page carries in <script type="application/json">.
// Loaded from /console/static (the Content-Security-Policy allows no inline script).
"use strict";
(function () {
  function draw(el) {
    var src = document.getElementById(el.getAttribute("data-chart"));
    if (!src || typeof uPlot === "undefined") return;
    var spec = JSON.parse(src.textContent);
    if (!spec.x.length) { el.textContent = "no traffic in this period"; return; }
    var scales = { x: { time: true } };
    if (spec.x.length === 1) {  // one point: an hour either side, not uPlot's default span of years
      scales.x.range = function () { return [spec.x[0] - 3600, spec.x[0] + 3600]; };
    }
    var axes = [{}, { scale: "y" }];
    var series = [{}];
    spec.series.forEach(function (s) {
      var scale = s.scale || "y";
      if (!scales[scale]) { scales[scale] = {}; axes.push({ scale: scale, side: 1, grid: { show: false } }); }
      series.push({ label: s.label, stroke: s.colour, width: 1.5, scale: scale });
    });
    var data = [spec.x].concat(spec.series.map(function (s) { return s.values; }));
    new uPlot({ width: Math.max(el.clientWidth - 12, 300), height: 220, scales: scales, axes: axes, series: series },
              data, el);
  }
  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("[data-chart]"), draw);
  });
})();
