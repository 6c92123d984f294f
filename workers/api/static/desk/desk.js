// The agent desk (專員工作台): a client of the public API, nothing more (docs/api.md, "Agent desk").
// - sign-in: an agent token, kept in this tab's sessionStorage (or #token= in the address);
// - presence (SPEC S2, the product's 服務狀態): ready 就緒, away 離開 with a reason, logged out
//   登出: PUT /api/v1/agents/{me}/presence {status, reason};
// - live: the agent WebSocket /api/v1/live (snapshot, then notifications), reconnected with
//   ?after=<last seq> when it drops, so nothing is missed;
// - actions: POST /api/v1/conversations/{id}/accept|decline|reply|close|transfer, each with an
//   Idempotency-Key; transcripts: GET /api/v1/conversations/{id}.
"use strict";

const I18N = {
  "zh-TW": {
    title: "專員工作台", offline: "未連線", online: "即時", goReady: "就緒", goAway: "離開", goOffline: "登出",
    reasonHint: "離開原因", status_ready: "就緒", status_away: "離開", status_logged_out: "登出",
    signOut: "結束工作台", signInTitle: "專員登入", signIn: "請輸入專員的 API token", ok: "登入",
    offers: "待接應", noOffers: "目前沒有分派給您的交談", serving: "服務中", noServing: "沒有服務中的交談",
    accept: "接應", decline: "婉拒", declineHint: "婉拒原因（選填）", expired: "已逾時",
    toSkill: "轉給技能", toAgent: "轉給專員", transferHint: "技能或專員 ID", transfer: "轉接", close: "結束交談",
    replyHint: "輸入回覆…（Enter 送出，Shift+Enter 換行）", send: "送出",
    pick: "接應一則交談，或從左側選擇服務中的交談。", skills: "技能", started: "服務開始",
    author_customer: "客戶", author_bot: "機器人", author_agent: "專員", you: "您",
    notAgent: "這個 token 不是專員的：請使用專員的 token", transferNeedsTarget: "請輸入要轉接的技能或專員",
    reasons: ["休息", "用餐", "會議", "訓練"], other: "切換語言",
    revoked: r => `分派已收回（${r}）`, closedNotice: n => `與 ${n} 的交談已結束`,
    transferredNotice: (n, to) => `已將 ${n} 轉接給 ${to}`, rejected: r => `動作未完成：${r}`,
    transferredToYou: (from, n) => `${from} 將 ${n} 轉接給您`,
    failed: r => `失敗：${r}`,
  },
  "en": {
    title: "Agent desk", offline: "offline", online: "live", goReady: "Ready", goAway: "Away", goOffline: "Log out",
    reasonHint: "away reason", status_ready: "Ready", status_away: "Away", status_logged_out: "Logged out",
    signOut: "Sign out", signInTitle: "Agent sign-in", signIn: "Enter your agent API token", ok: "Sign in",
    offers: "Offers", noOffers: "No conversations offered to you", serving: "Serving", noServing: "No conversations being served",
    accept: "Accept", decline: "Decline", declineHint: "reason (optional)", expired: "expired",
    toSkill: "To skill", toAgent: "To agent", transferHint: "skill or agent id", transfer: "Transfer", close: "Close",
    replyHint: "Type a reply… (Enter sends, Shift+Enter for a new line)", send: "Send",
    pick: "Accept an offer, or pick a conversation you serve on the left.", skills: "skills", started: "started",
    author_customer: "Customer", author_bot: "Bot", author_agent: "Agent", you: "you",
    notAgent: "This is not an agent token: sign in with an agent's token", transferNeedsTarget: "Enter the skill or agent to transfer to",
    reasons: ["break", "lunch", "meeting", "training"], other: "Switch language",
    revoked: r => `Offer withdrawn (${r})`, closedNotice: n => `Conversation with ${n} closed`,
    transferredNotice: (n, to) => `${n} transferred to ${to}`, rejected: r => `Action not applied: ${r}`,
    transferredToYou: (from, n) => `${from} transferred ${n} to you`,
    failed: r => `Failed: ${r}`,
  },
};

const hash = new URLSearchParams(location.hash.slice(1));
if (hash.get("token")) {
  sessionStorage.setItem("fl_desk_token", hash.get("token"));
  history.replaceState(null, "", location.pathname + location.search);
}
let token = sessionStorage.getItem("fl_desk_token");
let lang = new URLSearchParams(location.search).get("lang") || localStorage.getItem("fl_lang") ||
  (navigator.language && navigator.language.toLowerCase().startsWith("zh") ? "zh-TW" : "en");
if (!I18N[lang]) lang = "en";

const state = {
  me: null,            // GET /api/v1/me
  agent: null,         // GET /api/v1/agents/{me}
  offers: new Map(),   // offer_id -> offer
  convs: new Map(),    // conversation_id -> {summary, messages, pending, unread, busy}
  selected: null,
  wantSelect: null,    // a conversation accepted here: shown once it is assigned
  ws: null, lastSeq: null, retry: 0, snapshots: 0, notifications: 0,
  clockOffset: 0, signedIn: false,
};

const t = k => I18N[lang][k] ?? k;
const $ = id => document.getElementById(id);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null) continue;
    if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "class") e.className = v;
    else if (k.startsWith("on")) e[k] = v;
    else e.setAttribute(k, v);
  }
  for (const c of kids) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
};
const now = () => Date.now() + state.clockOffset;
const uuid = () => {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map(x => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
};
const clock = iso => iso ? new Date(iso).toLocaleTimeString(lang, { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false }) : "";
const mmss = ms => { const s = Math.max(0, Math.ceil(ms / 1000)); return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`; };
const customerName = c => (c && (c.name || c.id)) || "";

// One API call: {status, body}. Actions carry an Idempotency-Key, so a retry is applied once.
async function api(method, path, body, idempotent) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (idempotent) headers["Idempotency-Key"] = uuid();
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const date = Date.parse(r.headers.get("date") || "");
  // The server's clock (to the second) for the offers' countdowns, when it differs from ours.
  if (!Number.isNaN(date) && Math.abs(date - Date.now()) > 2000) state.clockOffset = date - Date.now();
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = text; }
  if (r.status === 401) { showLogin(json && json.error ? json.error.message : ""); }
  return { status: r.status, body: json };
}
const errorOf = r => (r.body && r.body.error && r.body.error.message) || `HTTP ${r.status}`;

function notice(text, bad) {
  const n = el("div", { class: bad ? "notice bad" : "notice" }, text);
  $("notices").prepend(n);
  while ($("notices").children.length > 5) $("notices").lastChild.remove();
  setTimeout(() => n.remove(), 15000);
}

// ---- sign-in and presence ----

function showLogin(message) {
  state.signedIn = false;
  document.body.dataset.signedIn = "false";
  if (state.ws) { const ws = state.ws; state.ws = null; ws.onclose = null; ws.close(); }
  $("main").hidden = true; $("presence").hidden = true; $("sign-out").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  applyI18n();
}

async function start() {
  $("login").hidden = true;
  const me = await api("GET", "/api/v1/me");
  if (me.status !== 200) { showLogin(errorOf(me)); return; }
  if (!me.body.agent_id) { showLogin(t("notAgent")); return; }
  state.me = me.body;
  state.signedIn = true;
  document.body.dataset.signedIn = "true";
  $("main").hidden = false; $("presence").hidden = false; $("sign-out").hidden = false;
  await readAgent();
  connect();
  render();
}

async function readAgent() {
  const r = await api("GET", `/api/v1/agents/${encodeURIComponent(state.me.agent_id)}`);
  if (r.status === 200) { state.agent = r.body; renderHeader(); }
}

async function setPresence(status) {
  const body = { status };
  const reason = $("away-reason").value.trim();
  if (status === "away" && reason) body.reason = reason;
  const r = await api("PUT", `/api/v1/agents/${encodeURIComponent(state.me.agent_id)}/presence`, body);
  if (r.status !== 202) { notice(t("failed")(errorOf(r)), true); return; }
  // Applied by the dispatcher within milliseconds: shown at once, then read back.
  if (state.agent) { state.agent.status = status; state.agent.status_reason = body.reason || null; }
  if (status !== "away") $("away-reason").value = "";
  renderHeader();
  setTimeout(readAgent, 800);
}

// ---- the live WebSocket ----

function connect() {
  if (!state.signedIn) return;
  const proto = location.protocol === "https:" ? "wss" : "ws";
  let url = `${proto}://${location.host}/api/v1/live?access_token=${encodeURIComponent(token)}`;
  if (state.lastSeq != null) url += `&after=${state.lastSeq}`;
  const ws = new WebSocket(url);
  state.ws = ws;
  ws.onmessage = e => {
    let frame;
    try { frame = JSON.parse(e.data); } catch { return; }
    if (frame.type === "snapshot") applySnapshot(frame);
    else if (frame.type === "notification") {
      state.lastSeq = frame.seq;
      state.notifications++;
      document.body.dataset.notifications = String(state.notifications);
      handle(frame.notification);
    }
  };
  ws.onclose = () => {
    if (state.ws !== ws) return;
    state.ws = null;
    setLive(false);
    // Reconnect: 0.5 s, 1 s, 2 s... up to 10 s; a revoked token ends at the sign-in (api() sees the 401).
    const delay = Math.min(10000, 500 * 2 ** state.retry++);
    setTimeout(async () => {
      if (!state.signedIn) return;
      const me = await api("GET", "/api/v1/me").catch(() => null);
      if (me && me.status === 401) return;
      connect();
    }, delay);
  };
}

function setLive(on) {
  $("live-status").dataset.connected = String(on);
  $("live-status").textContent = t(on ? "online" : "offline");
}

function applySnapshot(s) {
  state.retry = 0;
  state.snapshots++;
  document.body.dataset.snapshots = String(state.snapshots);
  setLive(true);
  if (state.lastSeq == null) state.lastSeq = s.last_seq;
  const old = state.offers;
  state.offers = new Map();
  for (const o of s.offers) {
    state.offers.set(o.offer_id, {
      offer_id: o.offer_id, conversation_id: o.conversation_id, channel: o.channel,
      customer: { id: o.customer_id, name: o.customer_name }, required_skills: o.required_skills,
      deadline: o.deadline, total: old.get(o.offer_id)?.total,
    });
  }
  for (const id of [...state.convs.keys()]) if (!s.serving.includes(id)) state.convs.delete(id);
  for (const id of s.serving) ensureConv(id);
  if (state.selected && !state.convs.has(state.selected)) state.selected = null;
  if (!state.selected && s.serving.length) state.selected = s.serving[0];
  render();
}

function handle(n) {
  const id = n.conversation_id;
  switch (n.type) {
    case "offer":
      state.offers.set(n.offer_id, { offer_id: n.offer_id, conversation_id: id, channel: n.channel,
        customer: n.customer, required_skills: n.required_skills, deadline: n.deadline });
      break;
    case "offer_revoked": {
      const o = state.offers.get(n.offer_id);
      if (o) { state.offers.delete(n.offer_id); notice(t("revoked")(n.reason)); }
      break;
    }
    case "assigned":
      for (const [k, o] of state.offers) if (o.conversation_id === id) state.offers.delete(k);
      ensureConv(id);
      if (!state.selected || state.wantSelect === id) { state.selected = id; state.wantSelect = null; }
      break;
    case "customer_message": {
      const c = ensureConv(id);
      if (!c.messages.some(m => m.id === n.message_id)) {
        c.messages.push({ id: n.message_id, author: "customer", text: n.text, at: n.at });
        if (state.selected !== id) c.unread++;
      }
      break;
    }
    case "closed": endConv(id, name => t("closedNotice")(name)); break;
    case "transferred":
      endConv(id, name => t("transferredNotice")(name, n.to_agent || n.required_skills.join(", ")));
      break;
    case "transferred_to_you":
      // SPEC D12: a colleague's transfer is yours at once, whatever your status: no offer.
      ensureConv(id);
      notice(t("transferredToYou")(n.from_agent, customerName(n.customer)));
      if (!state.selected) state.selected = id;
      break;
    case "action_rejected": {
      notice(t("rejected")(n.reason), true);
      const c = state.convs.get(id);
      if (c) c.busy = false;
      for (const o of state.offers.values()) if (o.conversation_id === id) o.busy = false;
      break;
    }
  }
  render();
}

// ---- conversations ----

function ensureConv(id) {
  let c = state.convs.get(id);
  if (!c) {
    c = { id, summary: null, messages: [], pending: [], unread: 0, busy: false };
    state.convs.set(id, c);
    load(id);
  }
  return c;
}

function endConv(id, say) {
  const c = state.convs.get(id);
  if (!c) return;
  state.convs.delete(id);
  notice(say(c.summary ? customerName(c.summary.customer) : id.slice(0, 8)));
  if (state.selected === id) state.selected = state.convs.keys().next().value || null;
}

// Reads the transcript; messages that came live meanwhile are kept, replies sent here stay
// "pending" until the transcript has them.
async function load(id) {
  const r = await api("GET", `/api/v1/conversations/${id}`);
  const c = state.convs.get(id);
  if (!c) return;
  if (r.status !== 200) { notice(t("failed")(errorOf(r)), true); return; }
  c.summary = r.body;
  const known = new Set(r.body.messages.map(m => m.id));
  const live = c.messages.filter(m => !known.has(m.id));
  c.messages = r.body.messages.map(m => ({ id: m.id, author: m.author, agent_id: m.agent_id, text: m.text, at: m.at })).concat(live);
  c.pending = c.pending.filter(p => !r.body.messages.some(m => m.author === "agent" && m.text === p.text && Date.parse(m.at) >= p.sent - 60000));
  render();
}

function selected() { return state.selected ? state.convs.get(state.selected) : null; }

async function accept(o) {
  o.busy = true; state.wantSelect = o.conversation_id; render();
  const r = await api("POST", `/api/v1/conversations/${o.conversation_id}/accept`, undefined, true);
  if (r.status !== 202) {
    notice(t("failed")(errorOf(r)), true);
    if (r.status === 409) state.offers.delete(o.offer_id); else o.busy = false;
    render();
  }
}

async function decline(o, reason) {
  o.busy = true; render();
  const r = await api("POST", `/api/v1/conversations/${o.conversation_id}/decline`, reason ? { reason } : undefined, true);
  if (r.status === 202 || r.status === 409) state.offers.delete(o.offer_id); else o.busy = false;
  if (r.status !== 202) notice(t("failed")(errorOf(r)), true);
  render();
}

async function reply() {
  const c = selected();
  const text = $("reply-text").value;
  if (!c || !text.trim()) return;
  const r = await api("POST", `/api/v1/conversations/${c.id}/reply`, { text }, true);
  if (r.status !== 202) { notice(t("failed")(errorOf(r)), true); return; }
  $("reply-text").value = "";
  c.pending.push({ id: `pending-${r.body.action_id}`, author: "agent", agent_id: state.me.agent_id, text, at: new Date(now()).toISOString(), sent: now() });
  render();
  // The notifier stores the reply and sends it on; the transcript shows it once stored.
  for (const ms of [600, 2000, 5000]) setTimeout(() => { if (state.convs.get(c.id)?.pending.length) load(c.id); }, ms);
}

async function closeSelected() {
  const c = selected();
  if (!c) return;
  c.busy = true; render();
  const r = await api("POST", `/api/v1/conversations/${c.id}/close`, undefined, true);
  if (r.status !== 202) { c.busy = false; notice(t("failed")(errorOf(r)), true); render(); }
}

async function transferSelected() {
  const c = selected();
  if (!c) return;
  const target = $("transfer-target").value.trim();
  if (!target) { notice(t("transferNeedsTarget"), true); return; }
  const body = $("transfer-kind").value === "agent"
    ? { to_agent: target }
    : { skills: target.split(/[\s,，]+/).filter(Boolean) };
  c.busy = true; render();
  const r = await api("POST", `/api/v1/conversations/${c.id}/transfer`, body, true);
  if (r.status !== 202) { c.busy = false; notice(t("failed")(errorOf(r)), true); render(); }
  else $("transfer-target").value = "";
}

// ---- rendering ----

function applyI18n() {
  document.documentElement.lang = lang;
  document.title = `${t("title")} · FIRST LINE`;
  document.querySelectorAll("[data-i18n]").forEach(e => {
    const k = e.dataset.i18n;
    if (k !== "offline" && k !== "online") e.textContent = t(k);
  });
  document.querySelectorAll("[data-i18n-placeholder]").forEach(e => { e.placeholder = t(e.dataset.i18nPlaceholder); });
  $("lang").textContent = lang === "en" ? "中文" : "English";
  $("lang").title = t("other");
  $("away-reasons").replaceChildren(...t("reasons").map(r => el("option", { value: r })));
  setLive(!!state.ws && state.ws.readyState === 1);
}

function renderHeader() {
  const a = state.agent;
  const me = state.me;
  if (!me) return;
  $("who").textContent = `${a && a.display_name ? a.display_name : me.agent_id} · ${me.tenant}`;
  const status = a ? a.status : "logged_out";
  $("presence").dataset.status = status;
  $("presence-text").textContent = t(`status_${status}`) + (status === "away" && a.status_reason ? ` · ${a.status_reason}` : "");
}

function renderOffers() {
  const box = $("offers");
  // A decline reason being typed keeps its focus across the re-render.
  const typing = document.activeElement && document.activeElement.classList.contains("decline-reason")
    ? document.activeElement.closest(".offer").dataset.offerId : null;
  box.replaceChildren();
  const offers = [...state.offers.values()].sort((a, b) => Date.parse(a.deadline) - Date.parse(b.deadline));
  for (const o of offers) {
    const left = Date.parse(o.deadline) - now();
    if (o.total == null) o.total = Math.max(left, 1000);
    // Kept on the offer: a re-render (a message elsewhere) does not lose what was typed.
    const reason = el("input", { maxlength: "500", placeholder: t("declineHint"), class: "decline-reason",
      oninput: e => { o.reason = e.target.value; } });
    reason.value = o.reason || "";
    box.append(el("div", { class: "offer", dataset: { offerId: o.offer_id, conversationId: o.conversation_id, expired: String(left <= 0) } },
      el("div", { class: "top" },
        el("span", { class: "customer" }, customerName(o.customer)),
        el("span", { class: "muted" }, o.channel),
        el("span", { class: "countdown", dataset: { deadline: o.deadline } }, left > 0 ? mmss(left) : t("expired"))),
      el("div", {}, ...(o.required_skills || []).map(s => el("span", { class: "skill" }, s))),
      el("div", { class: "bar" }, el("i", { style: `width:${Math.max(0, Math.min(100, 100 * left / o.total))}%` })),
      el("div", { class: "buttons" },
        el("button", { type: "button", class: "primary accept", onclick: () => accept(o), disabled: o.busy || left <= 0 ? "" : null }, t("accept")),
        reason,
        el("button", { type: "button", class: "plain decline", onclick: () => decline(o, reason.value.trim()), disabled: o.busy ? "" : null }, t("decline")))));
  }
  if (typing) box.querySelector(`.offer[data-offer-id="${typing}"] .decline-reason`)?.focus();
  $("offers-n").textContent = String(offers.length);
  $("offers-empty").hidden = offers.length > 0;
}

function tick() {
  document.querySelectorAll(".offer").forEach(card => {
    const o = state.offers.get(card.dataset.offerId);
    if (!o) return;
    const left = Date.parse(o.deadline) - now();
    const cd = card.querySelector(".countdown");
    cd.textContent = left > 0 ? mmss(left) : t("expired");
    card.dataset.expired = String(left <= 0);
    card.querySelector(".bar > i").style.width = `${Math.max(0, Math.min(100, 100 * left / o.total))}%`;
    if (left <= 0) card.querySelector("button.accept").disabled = true;
  });
}

function renderServing() {
  const list = $("serving");
  list.replaceChildren();
  for (const c of state.convs.values()) {
    const last = c.pending.at(-1) || c.messages.at(-1);
    list.append(el("li", { dataset: { conversationId: c.id }, "aria-selected": String(state.selected === c.id),
        onclick: () => { state.selected = c.id; c.unread = 0; render(); $("reply-text").focus(); } },
      el("strong", {}, c.summary ? customerName(c.summary.customer) : c.id.slice(0, 8)),
      el("span", { class: "muted" }, c.summary ? c.summary.channel : ""),
      el("span", { class: "last" }, last ? last.text : ""),
      c.unread ? el("span", { class: "badge", "data-unread": String(c.unread) }, String(c.unread)) : ""));
  }
  $("serving-n").textContent = String(state.convs.size);
  $("serving-empty").hidden = state.convs.size > 0;
}

function renderConversation() {
  const c = selected();
  $("conversation").hidden = !c;
  $("no-conversation").hidden = !!c;
  if (!c) { $("conversation").removeAttribute("data-conversation-id"); return; }
  c.unread = 0;
  const box = $("transcript");
  const changed = $("conversation").dataset.conversationId !== c.id;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  $("conversation").dataset.conversationId = c.id;
  const s = c.summary;
  $("conv-customer").textContent = s ? customerName(s.customer) : "…";
  $("conv-meta").replaceChildren(...(s ? [
    `${s.channel} · ${s.customer.id}`,
    s.processing_at ? ` · ${t("started")} ${clock(s.processing_at)}` : "",
    s.required_skills.length ? ` · ${t("skills")} ` : "",
    ...s.required_skills.map(k => el("span", { class: "skill" }, k)),
  ] : []));
  box.replaceChildren(...c.messages.concat(c.pending).map(m => el("div", {
      class: "msg", dataset: { messageId: m.id, author: m.author, pending: String(!!m.sent) } },
    el("span", { class: "meta" }, `${m.author === "agent" ? (m.agent_id === state.me.agent_id ? t("you") : m.agent_id || t("author_agent")) : t(`author_${m.author}`)} · ${clock(m.at)}`),
    m.text)));
  if (changed || atBottom) box.scrollTop = box.scrollHeight;
  for (const id of ["close", "transfer", "reply-send"]) $(id).disabled = c.busy;
}

function render() {
  if (!state.signedIn) return;
  applyI18n();
  renderHeader();
  renderOffers();
  renderServing();
  renderConversation();
}

// ---- wiring ----

$("lang").onclick = () => { lang = lang === "en" ? "zh-TW" : "en"; localStorage.setItem("fl_lang", lang); applyI18n(); render(); };
$("token-save").onclick = () => { token = $("token-input").value.trim(); sessionStorage.setItem("fl_desk_token", token); start().catch(e => showLogin(String(e))); };
$("token-input").onkeydown = e => { if (e.key === "Enter") $("token-save").click(); };
$("sign-out").onclick = async () => {
  await setPresence("logged_out").catch(() => {});
  sessionStorage.removeItem("fl_desk_token"); token = null;
  state.convs.clear(); state.offers.clear(); state.selected = null; state.lastSeq = null;
  showLogin("");
};
$("go-ready").onclick = () => setPresence("ready");
$("go-away").onclick = () => setPresence("away");
$("go-offline").onclick = () => setPresence("logged_out");
$("reply-form").onsubmit = e => { e.preventDefault(); reply(); };
$("reply-text").onkeydown = e => { if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); reply(); } };
$("close").onclick = closeSelected;
$("transfer").onclick = transferSelected;
setInterval(tick, 250);

applyI18n();
if (token) start().catch(e => showLogin(String(e))); else showLogin("");
