//! A widget's WebSocket, `/ws?customer_id=…&token=…&after=<seq>`.
//!
//! Frames from the gateway (JSON text):
//! - `{"type":"welcome","customer_id":"…"}` first (a widget that gave no id gets a new
//!   anonymous one here), or `{"type":"refused","reason":"…"}` and a close (code 4403) when the
//!   customer's identity does not check ([`crate::identity`]);
//! - `{"type":"message","seq":N,"message":{message_id, author, text, buttons, image_url, at}}`
//!   for every transcript entry after `after`, then for each new one: the bot's and agents'
//!   replies and the customer's own messages (the echo of one is its acknowledgement);
//! - `{"type":"error","message_id":"…","reason":"…"}` for a message that was not taken.
//!
//! Frames from the widget: `{"message_id":"<uuid>","text":"…"}`, or with `"postback":"<payload>"`
//! for a button press (`text` = its label). A message is published to FIRST LINE (in the order
//! sent), then recorded; the same `message_id` sent again after a reconnect is stored once.

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use firstline_shared::wire::Author;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::inbound::{self, CustomerMessage};
use crate::transcript::{Entry, Frame};
use crate::{identity, Gateway};

#[derive(Debug, Default, Deserialize)]
pub struct Params {
    pub customer_id: Option<String>,
    pub token: Option<String>,
    /// The last `seq` the widget has: entries after it are sent again.
    pub after: Option<u64>,
}

pub async fn widget_socket(
    State(gateway): State<Gateway>,
    Query(params): Query<Params>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(r) => {
            let error = serde_json::json!({"error": {"status": 400,
                "message": format!("this endpoint is a WebSocket (send Upgrade: websocket): {}", r.body_text())}});
            return (StatusCode::BAD_REQUEST, Json(error)).into_response();
        }
    };
    let running = gateway.tasks.token();
    upgrade.on_upgrade(move |socket| async move {
        if let Err(e) = session(&gateway, params, socket).await {
            tracing::debug!("widget session ended: {e:#}");
        }
        drop(running);
    })
}

fn text(json: serde_json::Value) -> Message {
    Message::Text(json.to_string().into())
}

async fn session(gateway: &Gateway, params: Params, mut socket: WebSocket) -> anyhow::Result<()> {
    let customer = match params.customer_id.as_deref().filter(|c| !c.is_empty()) {
        None => identity::new_anonymous(),
        Some(c) => {
            if let Err(e) = identity::check(gateway.secret.as_deref(), c, params.token.as_deref()) {
                tracing::info!(customer = c, "refused a widget: {e}");
                socket
                    .send(text(
                        serde_json::json!({"type": "refused", "reason": e.to_string()}),
                    ))
                    .await?;
                socket
                    .send(Message::Close(Some(CloseFrame {
                        code: 4403,
                        reason: "refused".into(),
                    })))
                    .await?;
                return Ok(());
            }
            c.to_owned()
        }
    };
    socket
        .send(text(
            serde_json::json!({"type": "welcome", "customer_id": customer}),
        ))
        .await?;
    let (outbox, mut frames) = mpsc::unbounded_channel();
    let _attached = gateway.hub.attach(&customer, params.after, outbox.clone());
    // The customer's messages are published one after another, in the order sent.
    let (to_publish, mut publishing) = mpsc::unbounded_channel::<CustomerMessage>();
    let publisher = {
        let gateway = gateway.clone();
        let customer = customer.clone();
        tokio::spawn(async move {
            while let Some(m) = publishing.recv().await {
                match inbound::publish(
                    &gateway.js,
                    &gateway.tenant,
                    &gateway.channel,
                    &customer,
                    &m,
                )
                .await
                {
                    Ok(()) => {
                        gateway.hub.record(&customer, customer_entry(&m));
                    }
                    Err(e) => {
                        tracing::warn!(%customer, message_id = %m.message_id, "publishing a customer message: {e:#}");
                        let _ = outbox.send(Frame::Error {
                            message_id: m.message_id.clone(),
                            reason: "not sent: try again".into(),
                        });
                    }
                }
            }
        })
    };
    let result = async {
        loop {
            tokio::select! {
                frame = frames.recv() => {
                    let Some(frame) = frame else { return Ok(()) };
                    socket.send(Message::Text(frame.to_json().into())).await?;
                }
                incoming = socket.recv() => match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Ok(Message::Text(body))) => {
                        match serde_json::from_str::<CustomerMessage>(&body) {
                            Ok(m) => match m.problem() {
                                None => { let _ = to_publish.send(m); }
                                Some(reason) => {
                                    let frame = Frame::Error { message_id: m.message_id.clone(), reason };
                                    socket.send(Message::Text(frame.to_json().into())).await?;
                                }
                            },
                            Err(e) => {
                                let frame = Frame::Error { message_id: String::new(), reason: format!("not a message: {e}") };
                                socket.send(Message::Text(frame.to_json().into())).await?;
                            }
                        }
                    }
                    Some(Ok(_)) => {} // pings are answered by the library
                },
                _ = gateway.shutdown.cancelled() => {
                    let _ = socket.send(Message::Close(None)).await;
                    return Ok(());
                }
            }
        }
    }
    .await;
    // What the customer sent before the drop is still published (the task ends when done).
    drop(to_publish);
    let _ = publisher.await;
    result
}

fn customer_entry(m: &CustomerMessage) -> Entry {
    Entry {
        message_id: m.message_id.clone(),
        author: Author::Customer,
        agent_id: None,
        text: m.text.clone(),
        buttons: Vec::new(),
        image_url: None,
        at: chrono::Utc::now(),
    }
}
