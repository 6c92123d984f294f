//! The reference web-chat gateway (`workers/webchat`) in a test: NATS with the fenced users of
//! `firstline nats-config` (the workers, and one gateway user per tenant), the gateway of a
//! tenant as that user on a free port, and what its widget shows in a browser (read from the
//! DOM). Used by the gateway's tests (`webchat::`) and the end-to-end one (`try_it::`).

use std::time::Duration;

use firstline::nats_config::{self, Gateway as GatewayUser};
use firstline_shared::domain::TenantId;
use firstline_tests::nats::TestNats;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{eventually, Page, TestApp};

/// The password of `gateway-<tenant>` in these tests.
pub fn gateway_password(tenant: &str) -> String {
    format!("{tenant}-gateway-secret")
}

/// A NATS server with the configuration `firstline nats-config` prints: the workers' user
/// `firstline` (in the server's URL) and a fenced gateway user for each of `tenants`.
pub async fn fenced_nats(tenants: &[&str]) -> TestNats {
    let gateways: Vec<GatewayUser> = tenants
        .iter()
        .map(|t| GatewayUser {
            tenant: TenantId::parse(*t).unwrap(),
            password: gateway_password(t),
        })
        .collect();
    let auth = nats_config::authorization("firstline", "workers-secret", &gateways);
    TestNats::start_with_config(&auth, Some(("firstline", "workers-secret"))).await
}

/// A running gateway ([`firstline_webchat::serve`]) of one tenant's `webchat` channel.
pub struct Gateway {
    /// `http://127.0.0.1:<port>`: the demo page with the widget is `/`, the WebSocket `/ws`.
    pub url: String,
    tenant: String,
    secret: Option<String>,
    /// Stops the gateway (it also stops with the app).
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    /// The gateway of `tenant`, as its fenced gateway user (NATS from [`fenced_nats`]), on a
    /// free port, with the customer-identity `secret`; returns once its durable consumer on
    /// `FL_OUTBOUND` exists (the fenced user could make it, after the replay).
    pub async fn start(app: &TestApp, tenant: &str, secret: Option<&str>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = firstline_webchat::Config::new(
            format!("nats://127.0.0.1:{}", app.nats.port),
            tenant,
            addr,
        );
        config.nats_user = Some(format!("gateway-{tenant}"));
        config.nats_password = Some(gateway_password(tenant));
        config.secret = secret.map(str::to_owned);
        let stop = app.shutdown.child_token();
        let task = tokio::spawn(firstline_webchat::serve(config, listener, stop.clone()));
        let js = app.js.clone();
        let consumer = format!("gateway-{tenant}");
        eventually(
            "the gateway's consumer on FL_OUTBOUND",
            Duration::from_secs(20),
            || async {
                let stream = js.get_stream("FL_OUTBOUND").await.ok()?;
                stream.consumer_info(&consumer).await.ok().map(|_| ())
            },
        )
        .await;
        Self {
            url: format!("http://{addr}"),
            tenant: tenant.to_owned(),
            secret: secret.map(str::to_owned),
            stop,
            task,
        }
    }

    /// Stops the gateway (it finishes its sessions) and starts a new one, on another port.
    pub async fn restart(&mut self, app: &TestApp) {
        self.stop.cancel();
        (&mut self.task)
            .await
            .unwrap()
            .expect("the gateway stops cleanly");
        *self = Self::start(app, &self.tenant, self.secret.as_deref()).await;
    }
}

/// What the widget shows, read from the DOM (a JSON string).
const WIDGET_SHOWN: &str = r#"(() => JSON.stringify({
    connected: document.querySelector(".flw") ? document.querySelector(".flw").dataset.connected : null,
    title: (document.querySelector(".flw-title") || {}).textContent || null,
    visible: !!document.querySelector(".flw") && getComputedStyle(document.querySelector(".flw")).visibility === "visible",
    at_bottom: (l => !!l && l.scrollTop + l.clientHeight >= l.scrollHeight - 2)(document.querySelector(".flw-log")),
    messages: [...document.querySelectorAll(".flw-msg")].map(li => ({
        author: [...li.classList].find(c => c !== "flw-msg" && c !== "flw-pending").slice(4),
        pending: li.classList.contains("flw-pending"),
        id: li.dataset.messageId, seq: li.dataset.seq ? +li.dataset.seq : null,
        text: (li.querySelector(".flw-text") || {}).textContent || "",
        buttons: [...li.querySelectorAll(".flw-button")].map(b => ({label: b.textContent, disabled: b.disabled})),
        image: !!li.querySelector("img.flw-image") && li.querySelector("img.flw-image").naturalWidth > 0,
    })),
}))()"#;

/// What the widget on `page` shows now: `connected`, `title`, `visible`, `at_bottom` and
/// `messages` (`author`, `pending`, `id`, `seq`, `text`, `buttons`, `image`).
pub async fn widget_shown(page: &mut Page) -> Value {
    page.json(WIDGET_SHOWN).await
}

/// Waits (30 s) until what the widget shows satisfies `ok`; that.
pub async fn wait_widget(page: &mut Page, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    page.wait_json(what, WIDGET_SHOWN, ok).await
}

/// The texts of the widget's messages, in order.
pub fn widget_texts(shown: &Value) -> Vec<String> {
    shown["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect()
}

/// Types `text` into the widget's box, as a keyboard would, and presses its send button.
pub async fn type_in_widget(page: &mut Page, text: &str) {
    page.eval(r#"document.querySelector(".flw-input").focus()"#)
        .await;
    page.call("Input.insertText", json!({ "text": text })).await;
    page.click(".flw-send").await;
}

/// Presses the button labelled `label` of the widget's latest message.
pub async fn press_widget_button(page: &mut Page, label: &str) {
    let label = serde_json::to_string(label).unwrap();
    let found = page
        .eval(&format!(
            r#"(() => {{ const b = [...document.querySelectorAll(".flw-button")].filter(b => !b.disabled).find(b => b.textContent === {label});
                if (!b) return false; b.click(); return true; }})()"#
        ))
        .await;
    assert_eq!(found, true, "no button {label} to press in the widget");
}
