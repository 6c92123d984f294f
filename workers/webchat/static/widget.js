/* FIRST LINE web chat widget: plain JavaScript, no build step.
 *
 *   <script src="https://chat.example.com/widget.js" async
 *           data-customer-id="member-42" data-token="<hex HMAC-SHA256(secret, id)>"
 *           data-lang="zh-TW" data-open="true"></script>
 *
 * Without data-customer-id the visitor is anonymous: a random id kept in localStorage.
 * data-lang: "zh-TW" or "en" (default: from navigator.language). The transcript is kept in
 * localStorage, so it survives a reload; after a dropped connection the widget reconnects with
 * the last entry it saw (`after=<seq>`) and gets exactly what it missed (after a restart of the
 * gateway, entries it has may come again: their message_id tells). Messages typed while
 * offline wait in localStorage and are sent (with the same id) once connected again.
 */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || window.__firstlineWebchat) return;
  var base = new URL(script.src, location.href);
  var attr = function (name) { return script.getAttribute("data-" + name); };

  var TEXT = {
    "zh-TW": { title: "線上客服", placeholder: "輸入訊息…", send: "送出", connecting: "連線中…",
      online: "已連線", offline: "連線中斷，重新連線中…", refused: "無法驗證您的身分", you: "您",
      bot: "客服機器人", agent: "客服專員", sending: "傳送中…", failed: "未送出，將重試", open: "聯絡客服",
      close: "關閉" },
    "en": { title: "Chat with us", placeholder: "Type a message…", send: "Send", connecting: "Connecting…",
      online: "Connected", offline: "Connection lost, reconnecting…", refused: "We could not verify who you are",
      you: "You", bot: "Bot", agent: "Agent", sending: "Sending…", failed: "Not sent yet, will retry",
      open: "Chat with us", close: "Close" }
  };
  var lang = attr("lang") || (navigator.language || "en");
  lang = /^zh/i.test(lang) ? "zh-TW" : "en";
  var t = TEXT[lang];

  var prefix = "fl-webchat:" + base.host + ":";
  var token = attr("token");
  var customer = attr("customer-id") || localStorage.getItem(prefix + "visitor");
  if (!customer) {
    var bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    customer = "anon-" + Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
    localStorage.setItem(prefix + "visitor", customer);
  }
  var key = prefix + "transcript:" + customer;

  // { entries: [{seq, message:{message_id, author, text, buttons, image_url, at}}], pending: [{message_id, text, postback}] }
  var state;
  try { state = JSON.parse(localStorage.getItem(key)) || {}; } catch (e) { state = {}; }
  state.entries = state.entries || [];
  state.pending = state.pending || [];
  function save() { localStorage.setItem(key, JSON.stringify(state)); }
  // The last seq received (entries keep the seq they came with).
  function lastSeq() { return state.last != null ? state.last : state.entries.length ? state.entries[state.entries.length - 1].seq : null; }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }
  function newId() {
    var b = new Uint8Array(16);
    crypto.getRandomValues(b);
    b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
    var h = Array.prototype.map.call(b, function (x) { return ("0" + x.toString(16)).slice(-2); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }
  function safeImage(url) {
    try { var u = new URL(url); return u.protocol === "https:" || u.protocol === "http:" ? u.href : null; } catch (e) { return null; }
  }

  var css = el("link");
  css.rel = "stylesheet";
  css.href = new URL("widget.css", base).href;
  document.head.appendChild(css);
  function toBottom() { log.scrollTop = log.scrollHeight; }

  var root = el("div", "flw");
  // Shown once its style is there (no flash of unstyled content), scrolled to the latest.
  root.style.visibility = "hidden";
  css.onload = css.onerror = function () { root.style.visibility = ""; toBottom(); };
  root.setAttribute("lang", lang);
  root.dataset.connected = "false";
  var launcher = el("button", "flw-launcher", t.open);
  launcher.type = "button";
  var panel = el("section", "flw-panel");
  panel.setAttribute("aria-label", t.title);
  var header = el("header", "flw-header");
  header.appendChild(el("span", "flw-title", t.title));
  var status = el("span", "flw-status", t.connecting);
  header.appendChild(status);
  var closer = el("button", "flw-close", "×");
  closer.type = "button";
  closer.title = t.close;
  header.appendChild(closer);
  var log = el("ol", "flw-log");
  log.setAttribute("aria-live", "polite");
  var form = el("form", "flw-form");
  var input = el("input", "flw-input");
  input.placeholder = t.placeholder;
  input.maxLength = 5000;
  input.setAttribute("aria-label", t.placeholder);
  var send = el("button", "flw-send", t.send);
  send.type = "submit";
  form.appendChild(input);
  form.appendChild(send);
  panel.appendChild(header);
  panel.appendChild(log);
  panel.appendChild(form);
  root.appendChild(panel);
  root.appendChild(launcher);
  function setOpen(open) { root.dataset.open = open ? "true" : "false"; if (open) input.focus(); }
  launcher.onclick = function () { setOpen(true); };
  closer.onclick = function () { setOpen(false); };
  setOpen(attr("open") === "true");

  function author(m) {
    if (m.author === "customer") return t.you;
    if (m.author === "agent") return t.agent + (m.agent_id ? " " + m.agent_id : "");
    return t.bot;
  }
  function render() {
    log.textContent = "";
    var last = state.entries.length - 1;
    state.entries.forEach(function (e, i) {
      var m = e.message;
      var li = el("li", "flw-msg flw-" + m.author);
      li.dataset.seq = e.seq;
      li.dataset.messageId = m.message_id;
      li.appendChild(el("span", "flw-author", author(m)));
      if (m.text) li.appendChild(el("p", "flw-text", m.text));
      var src = m.image_url && safeImage(m.image_url);
      if (src) { var img = el("img", "flw-image"); img.onload = toBottom; img.src = src; img.alt = ""; li.appendChild(img); }
      if (m.buttons && m.buttons.length) {
        var row = el("div", "flw-buttons");
        m.buttons.forEach(function (b) {
          var btn = el("button", "flw-button", b.label);
          btn.type = "button";
          btn.disabled = i !== last;
          btn.onclick = function () { submit(b.label, b.payload); };
          row.appendChild(btn);
        });
        li.appendChild(row);
      }
      log.appendChild(li);
    });
    state.pending.forEach(function (p) {
      var li = el("li", "flw-msg flw-customer flw-pending");
      li.dataset.messageId = p.message_id;
      li.appendChild(el("span", "flw-author", author({ author: "customer" })));
      li.appendChild(el("p", "flw-text", p.text));
      li.appendChild(el("span", "flw-note", p.failed ? t.failed : t.sending));
      log.appendChild(li);
    });
    toBottom();
  }

  var socket = null, open = false, retry = 500, refused = false;
  function setStatus(text, connected) {
    status.textContent = text;
    root.dataset.connected = connected ? "true" : "false";
  }
  function transmit(p) {
    if (open) socket.send(JSON.stringify({ message_id: p.message_id, text: p.text, postback: p.postback || undefined }));
  }
  function submit(text, postback) {
    if (!text.trim() && !postback) return;
    var p = { message_id: newId(), text: text, postback: postback || null };
    state.pending.push(p);
    save();
    render();
    transmit(p);
  }
  form.onsubmit = function (ev) {
    ev.preventDefault();
    var text = input.value;
    input.value = "";
    submit(text, null);
  };

  function receive(frame) {
    if (frame.type === "welcome") {
      open = true;
      retry = 500;
      setStatus(t.online, true);
      state.pending.forEach(transmit);
    } else if (frame.type === "message") {
      var seq = lastSeq();
      if (seq != null && frame.seq <= seq) return; // seen already: nothing twice
      state.last = frame.seq;
      var id = frame.message.message_id;
      // After a restart the gateway may send again, under a new seq, what the widget has.
      var known = state.entries.some(function (e) { return e.message.message_id === id; });
      if (!known) state.entries.push({ seq: frame.seq, message: frame.message });
      if (state.entries.length > 500) state.entries.splice(0, state.entries.length - 500);
      state.pending = state.pending.filter(function (p) { return p.message_id !== frame.message.message_id; });
      save();
      render();
    } else if (frame.type === "error") {
      // Not taken: shown as such, and sent again in a while (and at every reconnect).
      state.pending.forEach(function (p) {
        if (p.message_id !== frame.message_id) return;
        p.failed = true;
        setTimeout(function () { transmit(p); }, 5000);
      });
      render();
    } else if (frame.type === "refused") {
      refused = true;
      setStatus(t.refused, false);
    }
  }

  function connect() {
    var url = new URL("ws", base);
    url.protocol = base.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("customer_id", customer);
    if (token) url.searchParams.set("token", token);
    var seq = lastSeq();
    if (seq != null) url.searchParams.set("after", String(seq));
    socket = new WebSocket(url.href);
    socket.onmessage = function (ev) { try { receive(JSON.parse(ev.data)); } catch (e) { /* not ours */ } };
    socket.onclose = function () {
      open = false;
      if (refused) return;
      setStatus(t.offline, false);
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 10000);
    };
  }

  window.__firstlineWebchat = {
    customerId: customer,
    /** Drops the connection, as a network failure would; the widget reconnects by itself. */
    drop: function () { if (socket) socket.close(); },
    state: function () { return state; }
  };
  function mount() {
    document.body.appendChild(root);
    render();
    connect();
  }
  if (document.body) mount(); else document.addEventListener("DOMContentLoaded", mount);
})();
