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
