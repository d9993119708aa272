// hms-ach console: the only script of the console (no library). Written for this project.
// An element with data-refresh-url and data-refresh-ms is reloaded from that URL every so often
// (same origin, the session cookie goes along); a failed fetch leaves the last content in place.
"use strict";
(function () {
  function refresh(el) {
    var url = el.getAttribute("data-refresh-url");
    var every = parseInt(el.getAttribute("data-refresh-ms"), 10) || 5000;
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html !== null) { el.innerHTML = html; } })
        .catch(function () { /* keep the last content */ })
        .finally(function () { setTimeout(tick, every); });
    }
    setTimeout(tick, every);
  }
  // A file chosen in an <input type="file" data-fill="ID"> is read here, in the browser, into the
  // text area ID (the mapping workbench's sample): it is sent like pasted text.
  function fill(input) {
    input.addEventListener("change", function () {
      var target = document.getElementById(input.getAttribute("data-fill"));
      if (!target || !input.files || !input.files[0]) { return; }
      input.files[0].text().then(function (text) { target.value = text; });
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh-url]").forEach(refresh);
    document.querySelectorAll("input[type=file][data-fill]").forEach(fill);
  });
})();
