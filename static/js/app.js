// Small behaviours of the dashboard. No inline scripts (the CSP forbids them) and no build step.
(function () {
  "use strict";

  document.addEventListener("click", function (event) {
    var copy = event.target.closest("[data-copy]");
    if (copy) {
      var input = document.querySelector(copy.getAttribute("data-copy"));
      if (!input) return;
      input.select();
      var done = function () { copy.textContent = "Copied"; setTimeout(function () { copy.textContent = "Copy"; }, 1800); };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(input.value).then(done, function () { document.execCommand("copy"); done(); });
      } else { document.execCommand("copy"); done(); }
      return;
    }
    var dismiss = event.target.closest("[data-dismiss]");
    if (dismiss) { dismiss.parentElement.remove(); return; }
    var confirmBtn = event.target.closest("[data-confirm]");
    if (confirmBtn && !window.confirm(confirmBtn.getAttribute("data-confirm"))) event.preventDefault();
  });

  // A <details data-disclosure> holding a small form (rename): opening it puts the focus in its
  // first field; Escape closes it, forgets what was typed and gives the focus back to its summary.
  document.addEventListener("toggle", function (event) {
    var d = event.target;
    if (!d.matches || !d.matches("details[data-disclosure]") || !d.open) return;
    var field = d.querySelector("input:not([type=hidden]), textarea, select");
    if (field) { field.focus(); if (field.select) field.select(); }
  }, true);  // toggle does not bubble
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Escape" || !event.target.closest) return;
    var d = event.target.closest("details[data-disclosure][open]");
    if (!d) return;
    event.preventDefault();
    d.open = false;
    var form = d.querySelector("form");
    if (form) form.reset();
    var summary = d.querySelector("summary");
    if (summary) summary.focus();
  });

  // A <details data-keep-open id=…> that htmx swaps for a new copy (the usage chart's "Show as
  // table" when the chart's options change) stays open if it was: the server's copy is closed.
  var keptOpen = [];
  document.addEventListener("htmx:beforeSwap", function () {
    keptOpen = Array.prototype.map.call(
      document.querySelectorAll("details[data-keep-open][open]"), function (d) { return d.id; });
  });
  document.addEventListener("htmx:afterSwap", function () {
    keptOpen.forEach(function (id) { var d = document.getElementById(id); if (d) d.open = true; });
    keptOpen = [];
  });

  // A link or button that htmx swaps for a new copy of itself, inside a target marked
  // `data-keep-focus` (the usage chart, whose options are replaced with it), keeps the keyboard:
  // the new copy with the same text takes the focus, instead of the focus falling back to the
  // page's start.
  var refocus = null;
  document.addEventListener("htmx:beforeSwap", function (event) {
    var active = document.activeElement;
    var target = event.detail && event.detail.target;
    refocus = active && target && target.id && target.hasAttribute("data-keep-focus") &&
      target.contains(active) && active.matches("a, button") ?
      { id: target.id, text: active.textContent } : null;
  });
  document.addEventListener("htmx:afterSwap", function () {
    if (!refocus) return;
    var root = document.getElementById(refocus.id);
    var text = refocus.text;
    refocus = null;
    if (!root || root.contains(document.activeElement)) return;
    var same = Array.prototype.filter.call(
      root.querySelectorAll("a, button"), function (el) { return el.textContent === text; });
    if (same.length) same[0].focus();
  });

  // Close the tenant switcher when clicking elsewhere.
  document.addEventListener("click", function (event) {
    document.querySelectorAll("details.switcher[open]").forEach(function (d) {
      if (!d.contains(event.target)) d.removeAttribute("open");
    });
  });

  // Live tenant events: membership removed or logged out elsewhere ends this page's access at once.
  var url = document.body.getAttribute("data-events-url");
  if (!url || !window.WebSocket) return;
  var retry = 1000;
  function connect() {
    var ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + url);
    ws.onopen = function () { retry = 1000; };
    ws.onmessage = function (msg) {
      var data;
      try { data = JSON.parse(msg.data); } catch (e) { return; }
      if (data.type === "revoked") {
        var banner = document.getElementById("live-banner");
        if (banner) { banner.textContent = "Your access to this tenant has ended (" + data.reason + ")."; banner.hidden = false; }
        setTimeout(function () { location.href = "/"; }, 2500);
      } else if (data.type === "event" && window.htmx) {
        htmx.trigger(document.body, "tenant:" + (data.event.kind || "changed"));
      }
    };
    ws.onclose = function (ev) {
      if (ev.code === 4403 || ev.code === 4404 || ev.code === 4401) return;
      setTimeout(connect, retry); retry = Math.min(retry * 2, 30000);
    };
  }
  connect();
})();
