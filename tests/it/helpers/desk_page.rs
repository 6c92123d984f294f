//! What the agent desk (`/desk`, `workers/api/static/desk/`) shows in a browser, read from its
//! DOM, for the desk's tests (`desk::`) and the end-to-end one (`try_it::`).

use serde_json::Value;
use uuid::Uuid;

use super::Page;

/// What the desk shows, read from the DOM (a JSON string).
const DESK_SHOWN: &str = r##"(() => { try { const $ = id => document.getElementById(id); return JSON.stringify({
    signedIn: document.body.dataset.signedIn || null,
    live: $("live-status").dataset.connected,
    snapshots: +(document.body.dataset.snapshots || 0),
    title: document.querySelector("h1").textContent,
    lang: document.documentElement.lang,
    presence: $("presence").dataset.status,
    presenceText: $("presence-text").textContent,
    buttons: [...document.querySelectorAll("button")].filter(b => b.offsetParent).map(b => b.textContent),
    offers: [...document.querySelectorAll(".offer")].map(o => ({ offer: o.dataset.offerId,
        conversation: o.dataset.conversationId, countdown: o.querySelector(".countdown").textContent,
        expired: o.dataset.expired, text: o.textContent })),
    serving: [...document.querySelectorAll("#serving li")].map(l => ({ conversation: l.dataset.conversationId,
        selected: l.getAttribute("aria-selected"), text: l.textContent })),
    open: $("conversation").hidden ? null : $("conversation").dataset.conversationId,
    messages: [...document.querySelectorAll("#transcript .msg")].map(m => ({ id: m.dataset.messageId,
        author: m.dataset.author, pending: m.dataset.pending, text: m.lastChild.textContent })),
    notices: [...document.querySelectorAll(".notice")].map(n => n.textContent),
    marker: window.__marker || null,
}); } catch (e) { return JSON.stringify({ loading: String(e) }); } })()"##;

/// Waits (30 s) until what the desk on `page` shows satisfies `ok`; that. It has `signedIn`,
/// `live`, `snapshots`, `title`, `lang`, `presence`, `presenceText`, `buttons`, `offers`
/// (`offer`, `conversation`, `countdown`, `expired`, `text`), `serving`, `open` (the
/// conversation shown), `messages` (`id`, `author`, `pending`, `text`), `notices`, `marker`.
pub async fn desk_shown(page: &mut Page, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    page.wait_json(what, DESK_SHOWN, ok).await
}

/// The offer of `conversation` the desk shows, if it shows one.
pub fn offer_for(shown: &Value, conversation: Uuid) -> Option<Value> {
    shown["offers"]
        .as_array()?
        .iter()
        .find(|o| o["conversation"] == conversation.to_string())
        .cloned()
}

/// Whether the open conversation's transcript shows a message `text` by `author`
/// (`customer`, `agent`, `bot`).
pub fn desk_message_shown(shown: &Value, author: &str, text: &str) -> bool {
    shown["messages"].as_array().is_some_and(|ms| {
        ms.iter()
            .any(|m| m["author"] == author && m["text"] == text)
    })
}
