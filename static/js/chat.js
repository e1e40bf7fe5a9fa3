// The end-user chat page: streams a reply over the thread's websocket and renders it as it comes.
// No inline scripts (CSP) and no build step. Everything that comes from events is untrusted: it is
// only ever put in the page with textContent, never innerHTML. When a run ends, the final
// messages are fetched from the server (htmx), where markdown is rendered and sanitised.
(function () {
  "use strict";

  var root = document.getElementById("chat");
  if (!root || !window.WebSocket) return;
  var log = document.getElementById("chat-log");
  var form = document.getElementById("chat-composer");
  var input = document.getElementById("chat-input");
  var sendBtn = document.getElementById("chat-send");
  var stopBtn = document.getElementById("chat-stop");
  var statusEl = document.getElementById("chat-status");
  var strategyEl = document.getElementById("chat-strategy");
  var announceEl = document.getElementById("chat-announce");
  var wsPath = root.getAttribute("data-ws-url");
  var itemsUrl = root.getAttribute("data-items-url");
  var homeUrl = root.getAttribute("data-home-url") || "/";
  var KEY = "chat:" + wsPath;

  var ws = null;
  var opened = 0; // sockets this page has opened: more than one after a lost connection
  // Whether the socket is open. While it is not, Send, "Try again" and Stop are disabled and the
  // status line says why, rather than queueing what is asked for until the socket is back: a
  // message sent minutes later, into a conversation that may have moved on meanwhile (another
  // tab, the API), would surprise more than a button that waits. The typed text stays in the box.
  function connected() { return !!ws && ws.readyState === WebSocket.OPEN; }
  // Messages sent just before the connection was lost, whose answer never came: the server may
  // or may not have stored them. Their text is back in the box until the history, read again
  // once the socket is back, says whether they were stored.
  var unsure = [];
  // "Don't send" asked just before the connection was lost, whose answer never came: the
  // history, read again once the socket is back, shows whether the message was taken back.
  var unsureWithdraws = [];
  var NOT_CONNECTED = "Not connected; reconnecting\u2026 You can send again once the connection is back.";
  var MAYBE_LOST = "Not connected; reconnecting\u2026 Your last message may not have reached the " +
    "agent: it is back in the message box until the connection is back.";
  var retry = 1000;
  var closedForGood = false;
  var run = null; // {id, after, text, steps: [...], attempt}
  var bubble = null; // the pending assistant bubble being written
  // A message is labelled with its agent when another agent than the conversation's speaks
  // (after a handoff), as the server labels the saved ones.
  var threadAgent = root.getAttribute("data-agent") || "";
  // What this tab asked and the server has not answered yet, oldest first. The server answers a
  // socket's messages one at a time, in order: a send with `run.created` or an error (nothing
  // was stored), a cancel with an error or nothing, then the pong of the ping sent after it.
  var asked = [];

  // --- state kept across a page refresh (per tab) ---
  function save() {
    if (run) sessionStorage.setItem(KEY, JSON.stringify(run));
    else sessionStorage.removeItem(KEY);
  }
  function load() {
    try { return JSON.parse(sessionStorage.getItem(KEY) || "null"); } catch (e) { return null; }
  }

  // `quiet`: shown, not announced again (a countdown would be read out every second).
  function status(text, kind, quiet) {
    if (quiet) statusEl.setAttribute("aria-live", "off");
    else statusEl.removeAttribute("aria-live");
    var bottom = atBottom();
    if (!text) { statusEl.hidden = true; statusEl.textContent = ""; }
    else {
      statusEl.hidden = false;
      statusEl.className = "chat-status" + (kind ? " chat-status-" + kind : "");
      statusEl.textContent = text;
    }
    if (bottom) scrollDown(); // the list got shorter: the newest message stays in view
  }

  // While a reply is being written, a new message goes with the strategy picked next to Stop
  // (after the reply, stopping it, or replacing the last message); otherwise it simply starts.
  function busy(on) {
    running = on;
    // Only the conversation's latest reply can be tried again: not once another one started.
    if (on) log.querySelectorAll("form.chat-retry").forEach(function (n) { n.remove(); });
    // Stop leaves with the reply it stopped: the keyboard goes back to the message box.
    if (!on && document.activeElement === stopBtn) input.focus();
    var bottom = atBottom();
    stopBtn.hidden = !on;
    if (strategyEl) strategyEl.hidden = !on;
    holdSends();
    if (bottom) scrollDown();
  }

  // --- rate limits: the refused message stays in the composer; Send waits for the window ---
  var running = false;
  var limitedUntil = 0;
  var limitTimer = null;
  function limited() { return Date.now() < limitedUntil; }
  function canSend() {
    return connected() && !unsure.length && !limited();
  }
  // Send and "Try again" wait for the window (both would be refused until then), and for the
  // socket; Stop and "Don't send" wait for the socket.
  function holdSends() {
    var held = !canSend();
    sendBtn.disabled = held;
    stopBtn.disabled = !connected();
    log.querySelectorAll("form.chat-retry button").forEach(function (b) { b.disabled = held; });
    log.querySelectorAll("form.chat-withdraw button").forEach(function (b) {
      b.disabled = !connected() || b.hasAttribute("data-asked");
    });
  }
  function rateLimited(msg) {
    var seconds = Math.max(1, parseInt(msg.retry_after, 10) || 1);
    var base = (msg.message || "").replace(/ You can send it again in .*$/, "");
    limitedUntil = Date.now() + seconds * 1000;
    holdSends();
    clearInterval(limitTimer);
    var ticks = 0;
    var tick = function () {
      var left = Math.ceil((limitedUntil - Date.now()) / 1000);
      if (!connected()) return; // the status line says why nothing can be sent
      if (left <= 0) {
        clearInterval(limitTimer);
        limitTimer = null;
        holdSends();
        status("You can send your message now.", "");
        return;
      }
      var when = left < 60 ? left + (left === 1 ? " second" : " seconds")
        : Math.ceil(left / 60) + (Math.ceil(left / 60) === 1 ? " minute" : " minutes");
      status(base + " You can send it again in " + when + ".", "warn", ticks++ > 0);
    };
    tick();
    limitTimer = setInterval(tick, 1000);
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text != null) node.textContent = text;
    return node;
  }

  // The list follows the newest message while the reader is at it. One who scrolled back to read
  // stays where they are while a reply is written; sending a message (`force`) brings them back.
  var following = true;
  function scrollDown(force) {
    if (!force && !following) return;
    log.scrollTop = log.scrollHeight;
    following = true;
  }
  // Whether the list shows its newest message (the reader has not scrolled back).
  function atBottom() { return log.scrollHeight - log.scrollTop - log.clientHeight < 40; }
  log.addEventListener("scroll", function () { following = atBottom(); }, { passive: true });

  function dropEmpty() {
    var empty = document.getElementById("chat-empty");
    if (empty) empty.remove();
  }

  // --- rendering the live reply (all textContent) ---
  function pendingBubble(agent) {
    if (!bubble) {
      var wrap = el("div", "msg msg-assistant msg-pending");
      wrap.setAttribute("data-pending", "");
      wrap.setAttribute("aria-busy", "true"); // still being written
      if (agent && agent !== threadAgent) wrap.appendChild(el("div", "msg-agent muted small", agent));
      bubble = el("div", "bubble");
      wrap.appendChild(bubble);
      log.appendChild(wrap);
    }
    return bubble;
  }

  function addStep(step) {
    dropEmpty();
    if (step.kind === "handoff") {
      var h = el("div", "step step-handoff", "\u21aa Handed off from " + step.from + " to " + step.to);
      h.setAttribute("data-pending", "");
      log.appendChild(h);
      bubble = null;
      return;
    }
    var d = el("details", "step step-tool_call");
    d.setAttribute("data-pending", "");
    d.setAttribute("data-call-id", step.call_id || "");
    var summary = el("summary", null, "Used tool ");
    summary.appendChild(el("span", "mono", step.tool || "tool"));
    d.appendChild(summary);
    d.appendChild(el("pre", null, step.arguments || ""));
    if (step.output != null) d.appendChild(el("pre", "step-output", step.output));
    log.appendChild(d);
    bubble = null; // text after a tool call goes into a new bubble
  }

  function finishStep(callId, output) {
    var steps = log.querySelectorAll("details[data-pending][data-call-id]");
    for (var i = 0; i < steps.length; i++) {
      if (steps[i].getAttribute("data-call-id") === callId) {
        steps[i].appendChild(el("pre", "step-output", output || ""));
        return;
      }
    }
  }

  // The run saves each turn's items while it goes on, and the server renders them: a page
  // opened or refreshed mid-reply already shows part of what the run's stream replays from its
  // start. Such a step is not drawn again: a tool call whose call id the page shows, and any
  // message, handoff or tool call whose place among the run's own of its kind is at most the
  // highest the page shows (`data-run-seq`, numbered by the server over the whole thread).
  // Items are saved in order, so the run's earlier ones are saved too, even those on older
  // pages of the history that the page has not loaded. The place is the event's `seq`; a
  // message still being written has none yet: its place is counted from the attempt's start
  // if the page read it (`run.whole`), and otherwise it is unsaved (a message is saved after
  // it ends), which its `message.completed` confirms or corrects.
  var SAVED_AS = { text: ".msg-assistant", handoff: ".step-handoff", tool: ".step-tool_call" };
  function shownCall(callId) {
    var steps = log.querySelectorAll("[data-call-id]:not([data-pending])");
    for (var i = 0; i < steps.length; i++) {
      if (steps[i].getAttribute("data-call-id") === callId) return true;
    }
    return false;
  }
  function savedUpTo(kind) {
    var shown = log.querySelectorAll(
      SAVED_AS[kind] + ':not([data-pending])[data-run-id="' + run.id + '"][data-run-seq]');
    var most = -1;
    for (var i = 0; i < shown.length; i++) {
      var seq = parseInt(shown[i].getAttribute("data-run-seq"), 10);
      if (seq > most) most = seq;
    }
    return most;
  }
  function isSaved(step) {
    if (step.kind === "tool" && step.call_id && shownCall(step.call_id)) return true;
    if (typeof step.seq === "number") return step.seq <= savedUpTo(step.kind);
    if (!run.whole) return false;
    var before = 0;
    for (var i = 0; i < run.steps.length && run.steps[i] !== step; i++) {
      if (run.steps[i].kind === step.kind) before++;
    }
    return before <= savedUpTo(step.kind);
  }

  function drawText(s, agent) {
    bubble = null;
    pendingBubble(agent).textContent = s.text;
    if (s.done) bubble.parentNode.removeAttribute("aria-busy");
  }

  function redraw() {
    // After a refresh: what this tab had already shown of the running reply.
    if (!run) return;
    dropEmpty();
    (run.steps || []).forEach(function (s) {
      s.saved = isSaved(s);
      if (s.saved) bubble = null;
      else if (s.kind === "text") drawText(s, s.agent);
      else addStep(s);
    });
    scrollDown();
  }

  function lastItemId() {
    var items = log.querySelectorAll("[data-item-id]");
    var max = 0;
    for (var i = 0; i < items.length; i++) {
      var n = parseInt(items[i].getAttribute("data-item-id"), 10);
      if (n > max) max = n;
    }
    return max;
  }

  // Once the server's history is in: a reply that started meanwhile (the next one in line, or
  // the one that replaced the ended reply) may have drawn into the log during the request, and
  // its bubble may have left the page with the swap. Draw it again, from the tab's state. The
  // messages waiting for the agent came with the history: they stay.
  function afterReload() {
    log.querySelectorAll("[data-pending]:not(.msg-user)").forEach(function (n) { n.remove(); });
    bubble = null;
    startedRun = null; // a waiting message may have come back with its note
    if (run && (run.attempt !== null || run.steps.length)) started(run.id);
    redraw();
    holdSends(); // a "Try again" the server rendered waits like the others
    scrollDown();
  }

  // The history's requests go one after another, each made when its turn comes. htmx holds a
  // request made while another is on its way and answers its promise at once, before it is
  // sent: what waits for the history (`then`) would read the page as it was, and two requests
  // for the items after the same one would both add them.
  var loading = Promise.resolve();
  function inTurn(request) {
    var turn = loading.then(request);
    loading = turn.then(null, function () {});
    return turn;
  }

  // Whether the history's request in progress failed: an error answer (htmx resolves its
  // promise all the same, without swapping anything in) or none at all. What waits for the
  // history (`then`) is told, so that it does not read the page the answer did not replace.
  var historyFailed = false;
  function historyPath(e) {
    var path = e.detail && e.detail.pathInfo ? e.detail.pathInfo.requestPath || "" : "";
    return path.indexOf(itemsUrl) === 0;
  }
  document.addEventListener("htmx:responseError", function (e) {
    if (historyPath(e)) historyFailed = true;
  });
  // What the history's answer replaces, removed only once that answer is in hand: if it does
  // not come (an error answer, no answer), the page keeps showing what it showed.
  var replaced = null;
  document.addEventListener("htmx:beforeSwap", function (e) {
    // The history's own answer only: "Load earlier messages" asks the same address for the
    // page above, which replaces nothing of what is shown.
    if (!replaced || !historyPath(e) || !e.detail.shouldSwap || e.detail.target !== log) return;
    replaced.forEach(function (n) { n.remove(); });
    replaced = null;
    bubble = null;
  });
  function loadHistory(url, swap, then) {
    var done = function (ok) {
      replaced = null;
      // A failed reload changed nothing on the page: nothing to draw again.
      if (ok) afterReload();
      else holdSends();
      if (then) then(ok);
    };
    return function () {
      historyFailed = false;
      return htmx.ajax("GET", url(), { target: "#chat-log", swap: swap }).then(
        function () { done(!historyFailed); }, function () { done(false); });
    };
  }

  // The server's sanitised rendering replaces what was streamed. `then(ok)` runs once it is in
  // (`ok` false: the history could not be read).
  function reloadNewItems(then) {
    if (!window.htmx) { location.reload(); return; }
    var load = loadHistory(function () { return itemsUrl + "?after=" + lastItemId(); },
      "beforeend", then);
    inTurn(function () {
      // The answer brings the messages still waiting, and the reply's steps are drawn again
      // from the tab's state (`afterReload`): what the page drew of them goes with the swap.
      replaced = Array.prototype.slice.call(log.querySelectorAll("[data-pending]"));
      return load();
    });
  }

  // A reply that failed is followed in the history by why, as a reload renders it: its question
  // was often on the page already, so the new items do not bring the server's note.
  function noteFailure(id, said) {
    if (!id || log.querySelector('.chat-run-error[data-run-id="' + id + '"]')) return;
    var note = el("div", "chat-run-error");
    note.setAttribute("data-run-id", id);
    note.setAttribute("role", "note");
    note.appendChild(el("strong", null, "No reply:"));
    note.appendChild(document.createTextNode(" " + said));
    var mine = log.querySelectorAll('[data-run-id="' + id + '"]');
    var last = mine.length ? mine[mine.length - 1] : null;
    if (last && last.parentNode === log) log.insertBefore(note, last.nextSibling);
    else log.appendChild(note);
    if (!running) log.insertBefore(retryForm(id), note.nextSibling);
    scrollDown();
  }

  // A form about run `id` that posts `name=id` to the composer's address (what the page does
  // without its script), with the page's CSRF token.
  function runForm(cls, name, id) {
    var f = el("form", cls);
    f.setAttribute("data-run-id", id);
    f.method = "post";
    f.action = form.action;
    var token = form.querySelector('[name="csrfmiddlewaretoken"]');
    if (token) f.appendChild(token.cloneNode());
    var field = el("input");
    field.type = "hidden";
    field.name = name;
    field.value = id;
    f.appendChild(field);
    return f;
  }

  // "Try again" under a reply that failed, as the server renders it (without script, the form
  // posts to the composer's address).
  function retryForm(id) {
    var f = runForm("chat-retry", "retry_of", id);
    var button = el("button", "btn btn-small", "Try again");
    button.type = "submit";
    button.disabled = !canSend();
    f.appendChild(button);
    return f;
  }

  // "Don't send" under a message waiting in line, as the server renders it (without script,
  // the form posts to the composer's address).
  function withdrawForm(id) {
    var f = runForm("chat-withdraw", "withdraw", id);
    var button = el("button", "btn btn-small btn-ghost", "Don't send");
    button.appendChild(el("span", "sr-only", " this message"));
    button.type = "submit";
    button.disabled = !connected();
    f.appendChild(button);
    return f;
  }

  // Whether the page ends with a reply that failed. A reply that starts elsewhere (another tab)
  // may be that one tried again, which took its question and what it said out of the
  // conversation: only the server's latest page shows what is left (see `reloadAll`).
  function offersRetry() { return !!log.querySelector("form.chat-retry"); }

  // The latest page of the history, from the server (a replaced message has left it). `then`
  // runs once it is in.
  function reloadAll(then) {
    if (!window.htmx) { location.reload(); return; }
    var load = loadHistory(function () { return itemsUrl; }, "innerHTML", then);
    inTurn(load);
  }

  // A new conversation takes its title from its first message: the heading and the tab say so.
  function retitle(title) {
    var heading = document.querySelector("main h1, h1");
    if (!heading || heading.textContent === title) return;
    heading.textContent = title;
    document.title = document.title.replace(/^.*? · Chat/, title + " · Chat");
  }

  // The reply being written, as far as this page knows: set by `hello`, `run.created` and
  // `run.started`, cleared when that reply ends.
  function activeRun() { return root.getAttribute("data-active-run"); }

  // An earlier reply's events can still arrive after the next reply started (a message sent
  // with "Stop this reply, then send" interrupts it): they must not touch the reply being
  // written. Only the earlier reply's end matters, for what it saved.
  function isEarlier(id) {
    var active = activeRun();
    return !!(id && active && id !== active);
  }

  function endRun(ev, id) {
    if (id) { ended[id] = true; delete queued[id]; }
    var replaced = ev && (ev.status === "cancelled" || ev.status === "interrupted");
    var failed = ev && (ev.status === "error" || ev.status === "timeout");
    // `detail` (the run's reason for those who run the agent) reaches owners and admins only.
    var why = ev && (ev.detail || ev.message);
    var noted = failed ? function () { noteFailure(id, why || "The agent could not answer."); } : null;
    if (isEarlier(id)) {
      if (replaced) reloadAll();
      else reloadNewItems(noted);
      return;
    }
    if (id && activeRun() === id) root.removeAttribute("data-active-run");
    busy(false);
    if (ev && ev.status && ev.status !== "success") {
      status(why || ("The reply ended: " + ev.status + "."), replaced ? "warn" : "error");
    } else {
      status("");
    }
    run = null;
    save();
    if (replaced) reloadAll();
    else reloadNewItems(noted);
  }

  // A message's "Waiting for the agent" (or "Queued") note, and its "Don't send", go once its
  // run is running.
  var startedRun = null;
  function started(id) {
    if (startedRun === id) return;
    startedRun = id;
    log.querySelectorAll('[data-waiting-run="' + id + '"]').forEach(function (n) {
      n.classList.remove("msg-waiting");
      n.querySelectorAll(".msg-note, .chat-withdraw").forEach(function (c) { c.remove(); });
    });
  }

  // "Don't send" was not done (refused, or its answer lost with the connection): the message
  // stays as it is, and its button can be used again.
  function kept(asking) {
    var button = asking.node && asking.node.querySelector(".chat-withdraw button");
    if (button) {
      button.removeAttribute("data-asked");
      button.disabled = !connected();
    }
  }

  // A message taken back before its turn ("Don't send", here or in another tab) leaves the
  // page. In the tab that asked (`mine`: what it asked), its text goes back to the message box
  // if the box is empty (what was typed since is left alone), and the keyboard goes there.
  function withdrawn(id, text, mine) {
    gone[id] = true;
    ended[id] = true;
    delete queued[id];
    var bottom = atBottom();
    var removed = false, focused = false;
    log.querySelectorAll('[data-waiting-run="' + id + '"]').forEach(function (n) {
      if (n.contains(document.activeElement)) focused = true;
      removed = true;
      n.remove();
    });
    if (!mine && removed) {
      // Taken back in another tab: say so here too, and keep the keyboard on the page.
      status("A message waiting in line was taken back in another tab: it will not be sent.", "");
      if (focused) input.focus();
    }
    if (mine) {
      var back = !input.value.trim();
      if (back) input.value = typeof text === "string" ? text : mine.text;
      input.focus();
      status(back ? "Not sent: your message is back in the message box."
        : "Not sent. The message box already had text in it, so the message was not put back.",
        "");
    }
    if (bottom) scrollDown();
  }

  var TERMINAL = ["success", "error", "cancelled", "interrupted", "timeout"];

  var ended = {}; // runs whose end this page has seen
  var gone = {}; // messages taken back before their turn: nothing of their run is shown
  var queued = {}; // runs this page sent that wait in line behind the active one

  function onEvent(msg) {
    if (gone[msg.run_id]) return;
    var ev = msg.event || {};
    var starts = ev.type === "run.status" && ev.status === "running";
    if (isEarlier(msg.run_id) && starts && queued[msg.run_id] && !ended[msg.run_id]) {
      // One reply runs at a time: the run this page queued running means the one it waited
      // for ended (its end may still be on its way). A queued message's socket follows its run
      // from the start, so it hears no `run.started` of it. Any other run's start is an older
      // reply's, read late: it changes nothing.
      root.setAttribute("data-active-run", msg.run_id);
    }
    if (starts) delete queued[msg.run_id]; // it waits in line no more: a later start is a retry
    if (isEarlier(msg.run_id)) {
      if (ev.type === "run.status" && TERMINAL.indexOf(ev.status) >= 0) endRun(ev, msg.run_id);
      return;
    }
    if (!run || run.id !== msg.run_id) {
      run = { id: msg.run_id, after: "0-0", steps: [], attempt: null };
      bubble = null; // never write one reply into another's bubble
    }
    run.after = msg.id;
    if (ev.type !== "run.status" || ev.status === "running") started(run.id);
    switch (ev.type) {
      case "run.status":
        if (ev.status === "running") {
          // A new attempt: another than the one read, or, when the page read none (the stream
          // lost its start), one that comes after steps it read or is not the first.
          var newAttempt = run.attempt !== null ? ev.attempt !== run.attempt
            : run.steps.length > 0 || ev.attempt > 1;
          if (newAttempt) {
            // A retry of the run starts the reply over, from its question: what the earlier
            // attempt saved is gone from the thread too.
            log.querySelectorAll("[data-pending]:not(.msg-user)").forEach(function (n) { n.remove(); });
            log.querySelectorAll('[data-run-id="' + run.id + '"]').forEach(function (n) {
              // The retry saved the question again: this copy stays until the history's
              // reload brings that one.
              if (n.classList.contains("msg-user")) {
                n.setAttribute("data-pending", "");
                n.removeAttribute("data-item-id");
              } else {
                n.remove();
              }
            });
            run.steps = [];
            bubble = null;
          }
          run.attempt = ev.attempt == null ? null : ev.attempt;
          run.whole = true; // the page reads this attempt from its start
          busy(true);
          status("Replying\u2026");
        } else if (ev.status === "pending") {
          busy(true);
        } else {
          save();
          endRun(ev, run.id);
          return;
        }
        break;
      case "message.delta":
        dropEmpty();
        var last = run.steps[run.steps.length - 1];
        if (!last || last.kind !== "text" || last.done) {
          last = { kind: "text", text: "", agent: ev.agent || "" };
          run.steps.push(last);
          last.saved = isSaved(last);
          bubble = null;
        }
        last.text += ev.text || "";
        if (!last.saved) pendingBubble(ev.agent).textContent = last.text;
        status("");
        break;
      case "message.completed":
        var cur = run.steps[run.steps.length - 1];
        if (cur && cur.kind === "text" && !cur.done) {
          // The whole message: its first deltas may have been trimmed from a long stream.
          if (typeof ev.text === "string") cur.text = ev.text;
          if (typeof ev.seq === "number") cur.seq = ev.seq;
          if (!cur.saved && isSaved(cur)) {
            // Its place is known now: the page shows it already.
            cur.saved = true;
            if (bubble && bubble.parentNode) bubble.parentNode.remove();
            bubble = null;
          }
          if (!cur.saved && bubble) bubble.textContent = cur.text;
        } else {
          // A message none of whose deltas were read: drawn whole.
          cur = { kind: "text", text: ev.text || "", agent: ev.agent || "", seq: ev.seq };
          run.steps.push(cur);
          cur.saved = isSaved(cur);
          if (!cur.saved) { drawText(cur, ev.agent); dropEmpty(); }
        }
        cur.done = true;
        if (bubble && bubble.parentNode) bubble.parentNode.removeAttribute("aria-busy");
        bubble = null;
        // Read out once, whole (the log itself is not a live region).
        if (announceEl) announceEl.textContent = (ev.agent ? ev.agent + ": " : "") + (ev.text || "");
        break;
      case "tool.started":
        var step = { kind: "tool", call_id: ev.call_id, tool: ev.tool, arguments: ev.arguments,
                     seq: ev.seq };
        run.steps.push(step);
        step.saved = isSaved(step);
        if (step.saved) bubble = null;
        else addStep(step);
        break;
      case "tool.finished":
        run.steps.forEach(function (s) { if (s.call_id === ev.call_id) s.output = ev.output; });
        finishStep(ev.call_id, ev.output);
        break;
      case "handoff":
        var hs = { kind: "handoff", from: ev.from_agent, to: ev.to_agent, seq: ev.seq };
        run.steps.push(hs);
        hs.saved = isSaved(hs);
        if (hs.saved) bubble = null;
        else addStep(hs);
        break;
      case "guardrail.tripped":
        status("A guardrail stopped the reply: " + (ev.message || ""), "error");
        break;
      case "model.retry":
        // The model call failed and is tried again. With `discard`, the text it had streamed is
        // written again from the start: drop it, so the reply is never shown twice.
        var partial = run.steps[run.steps.length - 1];
        if (ev.discard && partial && partial.kind === "text" && !partial.done) {
          run.steps.pop();
          if (bubble && bubble.parentNode) bubble.parentNode.remove();
          bubble = null;
        }
        var said = ev.message || "Trying again\u2026";
        status(said, "warn");
        // Once the wait is over the call is being made again: the countdown no longer holds.
        var reason = said.replace(/\s*Trying again in [\d.]+ s\.$/, "");
        if (reason !== said) {
          setTimeout(function () {
            if (statusEl.textContent === said) status(reason + " Trying again\u2026", "warn");
          }, Math.max(ev.wait_ms || 0, 0));
        }
        break;
      case "error":
        status(ev.message || "Something went wrong.", "error");
        break;
      default:
        break; // usage and anything new: nothing to show
    }
    save();
    scrollDown();
  }

  // --- the socket ---
  function connect() {
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + wsPath;
    var active = root.getAttribute("data-active-run");
    if (run && run.after && (!active || active === run.id)) url += "?after=" + encodeURIComponent(run.after);
    ws = new WebSocket(url);
    ws.onopen = function () {
      retry = 1000;
      opened++;
      var said = statusEl.textContent;
      if (said === NOT_CONNECTED || said === MAYBE_LOST) status("");
      holdSends();
    };
    ws.onmessage = function (raw) {
      var msg;
      try { msg = JSON.parse(raw.data); } catch (e) { return; }
      if (msg.type === "run.created" && msg.title) retitle(msg.title);
      if (msg.type === "hello") {
        // The reply the page knew of (from its render, or this tab's state) ended, or another
        // one started, before this socket opened: the history has what changed meanwhile.
        var known = root.getAttribute("data-active-run") || (run ? run.id : null);
        var current = msg.active_run || null;
        var failedHere = offersRetry();
        if (current) root.setAttribute("data-active-run", current);
        else root.removeAttribute("data-active-run");
        if (run && run.id !== current) { run = null; save(); }
        busy(!!current);
        if (known !== current || (!current && opened > 1) || unsure.length ||
            unsureWithdraws.length) {
          // Also back after a lost connection with no reply being written on either side: a
          // whole exchange may have happened meanwhile (another tab, the API), which no event
          // told this page. And a message whose answer the lost connection took is in the
          // history if the server stored it.
          if (!current) status("");
          var settle = unsure.length || unsureWithdraws.length ? settleDoubts : null;
          if (failedHere) reloadAll(settle);
          else reloadNewItems(settle);
        }
      } else if (msg.type === "event") {
        onEvent(msg);
      } else if (msg.type === "pong") {
        if (asked.length && asked[0].kind === "cancel") asked.shift();
      } else if (msg.type === "run.created" && msg.queued) {
        // Waits in line behind the reply being written: it starts when that one ends.
        var sent = asked.length && asked[0].kind === "send" ? asked.shift() : null;
        queued[msg.run_id] = true;
        if (sent && sent.node) {
          sent.node.classList.add("msg-waiting");
          sent.node.setAttribute("data-waiting-run", msg.run_id);
          sent.node.appendChild(
            el("div", "msg-note muted small", "Queued: sent when the current reply ends"));
          sent.node.appendChild(withdrawForm(msg.run_id));
        }
      } else if (msg.type === "run.started" && ended[msg.run_id]) {
        // A late announcement of a reply this page saw end: nothing to follow.
      } else if (msg.type === "run.created" || msg.type === "run.started") {
        var tried = msg.type === "run.started" && offersRetry();
        if (msg.type === "run.created" && asked.length && asked[0].kind === "send") {
          var accepted = asked.shift();
          if (accepted.node) accepted.node.setAttribute("data-waiting-run", msg.run_id);
          if (accepted.retried) {
            // Tried again: the failed reply has left the conversation; its question waits
            // for the new one (from the server when it is on an older page).
            accepted.retried.forEach(function (n) { n.remove(); });
            if (!accepted.node) reloadAll();
          }
        }
        root.setAttribute("data-active-run", msg.run_id);
        if (!run || run.id !== msg.run_id) {
          run = { id: msg.run_id, after: "0-0", steps: [], attempt: null };
          bubble = null;
        }
        save();
        busy(true);
        status("Waiting for the agent\u2026");
        if (tried) reloadAll();
      } else if (msg.type === "live") {
        status(running ? "Replying\u2026" : "");
      } else if (msg.type === "run.withdrawn") {
        var asking = asked.length && asked[0].kind === "withdraw" && asked[0].id === msg.run_id
          ? asked.shift() : null;
        withdrawn(msg.run_id, msg.text, asking);
      } else if (msg.type === "run.ended") {
        if (!gone[msg.run_id]) endRun({ status: msg.status }, msg.run_id);
      } else if (msg.type === "error") {
        onError(msg);
      } else if (msg.type === "revoked") {
        closedForGood = true;
        run = null;
        save();
        if (msg.reason === "thread deleted") {
          // Deleted here or in another tab: back to the tenant's chat, where the others are.
          status("This conversation was deleted.", "error");
          setTimeout(function () { location.href = homeUrl; }, 2500);
        } else {
          status("Your access to this tenant has ended (" + (msg.reason || "") + ").", "error");
          setTimeout(function () { location.href = "/"; }, 2500);
        }
      }
    };
    ws.onclose = function (ev) {
      // Their answers will not come: a "Try again" puts the failed reply back as it was (the
      // history, read again once the socket is back, shows whether it was taken), a message's
      // text goes back to the box until then.
      var back = [];
      asked.forEach(function (sent) {
        if (sent.kind === "withdraw") {
          // Taken back or not: the history, read again once the socket is back, tells.
          kept(sent);
          unsureWithdraws.push(sent);
        }
        if (sent.kind !== "send") return;
        if (sent.retried) { refused(sent); return; }
        sent.node.remove();
        back.push(sent.text);
        unsure.push(sent);
      });
      // In the order they were sent, before anything typed since.
      if (back.length) giveBack(back);
      asked = [];
      holdSends();
      if (closedForGood || ev.code === 4401 || ev.code === 4403 || ev.code === 4404) {
        if (!closedForGood) status("This conversation is not available any more.", "error");
        busy(false);
        return;
      }
      // Said once, not at each failed attempt to reconnect.
      var said = unsure.length ? MAYBE_LOST : NOT_CONNECTED;
      if (statusEl.textContent !== said) status(said, "warn");
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 30000);
    };
  }

  // A send the server refused stored nothing: its bubble goes, and its text goes back to the
  // composer (before anything typed since).
  function refused(sent) {
    if (sent.retried) {
      // "Try again" refused: the failed reply stays as it was.
      sent.retried.forEach(function (n) { n.hidden = false; });
      if (sent.node) {
        sent.node.removeAttribute("data-pending");
        sent.node.setAttribute("data-item-id", sent.itemId || "");
        // Back above its reply and the note, where it was.
        if (sent.place && sent.place.parentNode === log) log.insertBefore(sent.node, sent.place);
      }
      return;
    }
    sent.node.remove();
    giveBack([sent.text]);
  }

  // Messages that were not sent, or may not have been, go back to the composer, oldest first,
  // before anything typed since.
  function giveBack(texts) {
    var typed = input.value.trim();
    input.value = texts.concat(typed ? [typed] : []).join("\n");
  }

  // A message given back that the server turned out to have stored leaves the composer: its
  // text, as a whole block of lines, wherever it is in the box (one given back with others, or
  // typed around since).
  function takeBack(text) {
    var value = input.value;
    for (var at = value.indexOf(text); at >= 0; at = value.indexOf(text, at + 1)) {
      var end = at + text.length;
      if ((at === 0 || value.charAt(at - 1) === "\n") &&
          (end === value.length || value.charAt(end) === "\n")) {
        input.value = end === value.length ? value.slice(0, Math.max(at - 1, 0))
          : value.slice(0, at) + value.slice(end + 1);
        return;
      }
    }
  }

  // An id for a message this page sends, which the server keeps with it and the history shows
  // (`data-message-id`): a message whose answer a lost connection took is found by it, exactly.
  function messageId() {
    var bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) {
      return (b < 16 ? "0" : "") + b.toString(16);
    }).join("");
  }

  function settleDoubts(ok) {
    if (unsure.length) settleUnsure(ok);
    settleWithdraws(ok);
  }

  // Once the history is read again after a lost connection: a message whose "Don't send" lost
  // its answer, and that the history shows neither waiting nor sent, was taken back: it is told
  // as if the answer had come.
  function settleWithdraws(ok) {
    var doubts = unsureWithdraws;
    unsureWithdraws = [];
    if (!ok) return; // the page still shows the message, with its "Don't send"
    doubts.forEach(function (doubt) {
      var shown = log.querySelector('[data-waiting-run="' + doubt.id + '"], ' +
        '.msg-user[data-run-id="' + doubt.id + '"]');
      if (shown) return;
      withdrawn(doubt.id, null, doubt);
    });
  }

  // Once the history is read again after a lost connection: a message whose answer was lost and
  // that the history now shows (saved, waiting for the agent, or stopped in line), found by the
  // id the page gave it, was stored, and leaves the box; any other stays there, and the status
  // line says it was not sent.
  function settleUnsure(ok) {
    if (!ok) {
      // The history did not come: whether the message arrived is not known. It stays in the
      // box, and the reader is asked to look before sending it again.
      unsure = [];
      holdSends();
      status("Your message may not have been sent, and the conversation could not be read " +
        "to check: it is in the message box. Reload the page to see whether it arrived " +
        "before you send it again.", "warn");
      return;
    }
    var notSent = false;
    unsure.forEach(function (sent) {
      var stored = log.querySelector('.msg-user[data-message-id="' + sent.id + '"]');
      if (!stored) { notSent = true; return; }
      takeBack(sent.text);
    });
    unsure = [];
    holdSends();
    if (notSent) {
      status("Your message was not sent: the connection was lost before it arrived. It is in " +
        "the message box.", "warn");
    }
  }

  function onError(msg) {
    // Errors about a followed run name it; any other answers the oldest open request.
    var sent = !msg.run_id && asked.length && asked[0].kind === "send" ? asked.shift() : null;
    if (sent) refused(sent);
    if (!msg.run_id && asked.length && asked[0].kind === "withdraw") {
      // Not taken back (it was sent to the agent meanwhile, or stopped): it stays as it is.
      kept(asked.shift());
    }
    if (msg.code === "rate_limited") {
      rateLimited(msg);
    } else if (msg.code === "thread_busy") {
      status(msg.message, "warn");
    } else if (msg.code === "unavailable") {
      // The run's stream cannot be read: the server keeps trying, and sends `live` when the
      // events come again or `run.ended` once the reply is saved (the history is reloaded then).
      status("Live updates are unavailable; the reply will appear when it is saved.", "warn");
    } else {
      status(msg.message || "Something went wrong.", "error");
    }
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var text = input.value.trim();
    if (!text || !canSend()) return; // Send is disabled, and the status line says why
    var id = messageId();
    dropEmpty();
    var mine = el("div", "msg msg-user");
    mine.setAttribute("data-pending", "");
    mine.setAttribute("data-message-id", id);
    mine.appendChild(el("div", "bubble", text));
    log.appendChild(mine);
    scrollDown(true);
    var message = { type: "send", text: text, message_id: id };
    if (strategyEl && !strategyEl.hidden) message.strategy = strategyEl.value;
    ws.send(JSON.stringify(message));
    asked.push({ kind: "send", node: mine, text: text, id: id });
    input.value = "";
  });
  // "Don't send": the message waiting in line is taken back; it leaves the page when the server
  // says so (`run.withdrawn`), or stays, with why, if it was sent meanwhile.
  log.addEventListener("submit", function (e) {
    var withdrawing = e.target.closest && e.target.closest("form.chat-withdraw");
    if (!withdrawing) return;
    e.preventDefault();
    var button = withdrawing.querySelector("button");
    if (!connected() || (button && button.hasAttribute("data-asked"))) return;
    var id = withdrawing.getAttribute("data-run-id");
    var node = withdrawing.closest("[data-waiting-run]");
    var bubbleEl = node && node.querySelector(".bubble");
    if (button) { button.setAttribute("data-asked", ""); button.disabled = true; }
    ws.send(JSON.stringify({ type: "withdraw", run_id: id }));
    // The text as typed: a bubble the server drew has its line breaks as <br>, which
    // textContent drops (`data-text` keeps them).
    var typed = node && node.hasAttribute("data-text") ? node.getAttribute("data-text") : null;
    asked.push({ kind: "withdraw", id: id, node: node,
                 text: typed != null ? typed : (bubbleEl ? bubbleEl.textContent : "") });
  });
  // "Try again": the failed reply (its steps and note) goes, its question waits for the new one.
  log.addEventListener("submit", function (e) {
    var retrying = e.target.closest && e.target.closest("form.chat-retry");
    if (!retrying) return;
    e.preventDefault();
    if (!canSend() || running) return;
    var id = retrying.querySelector('[name="retry_of"]').value;
    var question = null;
    var gone = [];
    log.querySelectorAll('[data-run-id="' + id + '"]').forEach(function (n) {
      if (n.classList.contains("msg-user") && !question) question = n;
      else gone.push(n);
    });
    // The keyboard was on the button, which goes: it moves to the message box, as after Send.
    input.focus();
    gone.forEach(function (n) { n.hidden = true; });
    var itemId = null;
    var place = null;
    if (question) {
      place = question.nextSibling;
      itemId = question.getAttribute("data-item-id");
      question.setAttribute("data-pending", "");
      question.removeAttribute("data-item-id");
      log.appendChild(question);
    }
    scrollDown(true);
    ws.send(JSON.stringify({ type: "retry", run_id: id }));
    asked.push({ kind: "send", node: question, text: "", retried: gone, itemId: itemId,
                 place: place });
  });
  input.addEventListener("keydown", function (e) {
    // Not while an input method is composing (Enter there picks the characters).
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  stopBtn.addEventListener("click", function () {
    if (!connected()) return;
    ws.send(JSON.stringify({ type: "cancel" }));
    ws.send(JSON.stringify({ type: "ping" })); // its pong closes the cancel's answers
    asked.push({ kind: "cancel" });
  });

  // "Load earlier messages": the older page goes above what is being read, which stays where it
  // is on the screen; the keyboard moves to the button of the page before it, or, at the start
  // of the conversation, to the first message.
  log.addEventListener("click", function (e) {
    var button = e.target.closest && e.target.closest("#chat-earlier button");
    if (!button || !window.htmx) return; // without htmx the button does nothing anyway
    e.preventDefault();
    e.stopPropagation();
    var url = button.getAttribute("hx-get");
    inTurn(function () {
      if (!document.getElementById("chat-earlier")) return null; // the history was read again
      var fromBottom = log.scrollHeight - log.scrollTop;
      return htmx.ajax("GET", url, { target: "#chat-earlier", swap: "outerHTML" }).then(function () {
        log.scrollTop = log.scrollHeight - fromBottom;
        var next = document.querySelector("#chat-earlier button");
        var first = log.firstElementChild;
        if (!next && first) first.setAttribute("tabindex", "-1");
        var target = next || first;
        if (target) target.focus({ preventScroll: true });
      });
    });
  }, true);

  run = load();
  var active = root.getAttribute("data-active-run");
  if (run && active && run.id === active) redraw();
  else if (run && !active) { run = null; save(); }
  scrollDown();
  holdSends(); // until the socket is open
  connect();
})();
