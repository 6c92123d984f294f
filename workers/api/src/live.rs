//! Live notifications for an agent's desktop, over a WebSocket: offers (with their deadline),
//! revocations, assignments, customer messages, closes, transfers and rejected actions, as the
//! notifier publishes them on `fl.<tenant>.notify.<agent>` (stream `FL_NOTIFY`).
//!
//! Frames (JSON text):
//! - first `{"type":"snapshot","last_seq":N,"offers":[...],"serving":[...]}`: the agent's open
//!   offers and the conversations it serves, read from the database when it connects;
//! - then `{"type":"notification","seq":S,"notification":{...AgentNotification}}` for every
//!   notification after `?after=<seq>` (a reconnecting client passes the last `seq` it saw), or
//!   after `last_seq` on a first connection.
//!
//! A reconnecting client misses nothing still relevant: the stream keeps a day of notifications
//! and is read from where the client left off (offers whose deadline has passed are skipped),
//! and the snapshot covers anything older. Delivery is at least once: a notification may come
//! twice around a reconnect; `notification_id` tells.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use firstline_shared::domain::{AgentId, TenantId};
use firstline_shared::subjects;
use firstline_shared::wire::{AgentNotification, NotificationKind};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody, Query};
use crate::AppState;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LiveParams {
    /// The last `seq` this client received: notifications after it are sent again.
    pub after: Option<u64>,
    /// The token, for clients that cannot set the Authorization header (read by the
    /// [`Principal`] extractor; here so that the document lists it).
    #[allow(dead_code)]
    pub access_token: Option<String>,
}

/// An open offer in the snapshot.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenOffer {
    pub offer_id: Uuid,
    pub conversation_id: Uuid,
    pub channel: String,
    pub customer_id: String,
    pub customer_name: Option<String>,
    pub required_skills: Vec<String>,
    /// Accept before this (SPEC D8).
    pub deadline: DateTime<Utc>,
}

/// The first frame of a session.
#[derive(Debug, Serialize, ToSchema)]
pub struct Snapshot {
    /// Always "snapshot".
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The stream position the notifications continue after.
    pub last_seq: u64,
    pub offers: Vec<OpenOffer>,
    /// Conversations the agent serves (processing).
    pub serving: Vec<Uuid>,
}

#[utoipa::path(get, path = "/api/v1/live", tag = "live",
    summary = "WebSocket of the agent's live notifications (agent token)",
    description = "Upgrade to a WebSocket. The first frame is a snapshot (open offers with deadlines, conversations served); then one frame per notification: {\"type\":\"notification\",\"seq\":S,\"notification\":{...}}. Reconnect with ?after=<last seq> to resume without a gap. The token may be passed as ?access_token=.",
    params(LiveParams),
    responses((status = 101, description = "Switching to the WebSocket protocol", body = Snapshot),
        (status = 400, description = "Not a WebSocket request", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn agent_live(
    State(state): State<AppState>,
    p: Principal,
    Query(params): Query<LiveParams>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let agent = p.agent()?.clone();
    let upgrade = upgrade.map_err(|r| {
        ApiError::bad_request(format!(
            "this endpoint is a WebSocket (send Upgrade: websocket): {}",
            r.body_text()
        ))
    })?;
    let tenant = p.tenant;
    // The worker waits for the session at shutdown (it ends on `state.shutdown`).
    let running = state.tasks.token();
    Ok(upgrade
        .on_upgrade(move |socket| async move {
            if let Err(e) = session(&state, &tenant, &agent, params.after, socket).await {
                tracing::info!(%agent, "live session ended: {e:#}");
            }
            drop(running);
        })
        .into_response())
}

async fn snapshot(
    state: &AppState,
    tenant: &TenantId,
    agent: &AgentId,
    last_seq: u64,
) -> anyhow::Result<Snapshot> {
    let client = state.pool.get().await?;
    let offers = client
        .query(
            "SELECT o.id, o.conversation_id, c.channel_id, cu.external_id, cu.display_name, c.required_skills, o.deadline
             FROM offers o
             JOIN conversations c ON c.id = o.conversation_id
             JOIN customers cu ON cu.id = c.customer_id
             WHERE o.tenant_id = $1 AND o.agent_id = $2 AND o.status = 'open'
             ORDER BY o.created_at",
            &[&tenant.as_str(), &agent.as_str()],
        )
        .await?
        .iter()
        .map(|r| OpenOffer {
            offer_id: r.get(0),
            conversation_id: r.get(1),
            channel: r.get(2),
            customer_id: r.get(3),
            customer_name: r.get(4),
            required_skills: r.get(5),
            deadline: r.get(6),
        })
        .collect();
    let serving = client
        .query(
            "SELECT id FROM conversations WHERE tenant_id = $1 AND agent_id = $2 AND state = 'processing'
             ORDER BY processing_at",
            &[&tenant.as_str(), &agent.as_str()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Snapshot {
        kind: "snapshot",
        last_seq,
        offers,
        serving,
    })
}

/// Whether a notification still matters when it is sent: an offer past its deadline does not.
fn still_relevant(n: &AgentNotification, now: DateTime<Utc>) -> bool {
    match &n.kind {
        NotificationKind::Offer { deadline, .. } => *deadline > now,
        _ => true,
    }
}

async fn session(
    state: &AppState,
    tenant: &TenantId,
    agent: &AgentId,
    after: Option<u64>,
    mut socket: WebSocket,
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    let mut stream = state.js.get_stream(subjects::NOTIFY.name).await?;
    let last_seq = stream.info().await?.state.last_sequence;
    // Read the position first, then the database: whatever happens in between comes both in the
    // snapshot and as a notification (at least once), never in neither.
    let snap = snapshot(state, tenant, agent, last_seq).await?;
    socket
        .send(Message::Text(serde_json::to_string(&snap)?.into()))
        .await?;
    let start = after.unwrap_or(last_seq) + 1;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subjects::notify(tenant, agent),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    metrics::gauge!("fl_api_live_sessions").increment(1.0);
    let _gauge = scopeguard(|| metrics::gauge!("fl_api_live_sessions").decrement(1.0));
    loop {
        tokio::select! {
            m = messages.next() => {
                let Some(m) = m else { return Ok(()) };
                let m = m?;
                let seq = m.info().map_err(|e| anyhow::anyhow!("{e}"))?.stream_sequence;
                let notification: AgentNotification = match serde_json::from_slice(&m.payload) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(seq, "skipping a notification that does not parse: {e}");
                        continue;
                    }
                };
                if !still_relevant(&notification, Utc::now()) {
                    continue;
                }
                let frame = serde_json::json!({"type": "notification", "seq": seq, "notification": notification});
                socket.send(Message::Text(frame.to_string().into())).await?;
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(()),
                Some(Ok(_)) => {} // pings are answered by the library; nothing else is expected
            },
            _ = state.shutdown.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                return Ok(());
            }
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use firstline_shared::domain::{ChannelId, SkillSet};
    use firstline_shared::wire::{CustomerRef, Version};

    #[test]
    fn an_offer_past_its_deadline_is_not_sent_again() {
        let now = Utc::now();
        let offer = |deadline| AgentNotification {
            version: Version,
            notification_id: Uuid::nil(),
            conversation_id: Uuid::nil(),
            kind: NotificationKind::Offer {
                offer_id: Uuid::nil(),
                channel: ChannelId::parse("line").unwrap(),
                customer: CustomerRef {
                    id: "u".into(),
                    name: None,
                },
                required_skills: SkillSet::default(),
                deadline,
            },
        };
        assert!(still_relevant(
            &offer(now + chrono::Duration::seconds(5)),
            now
        ));
        assert!(!still_relevant(
            &offer(now - chrono::Duration::seconds(5)),
            now
        ));
        let closed = AgentNotification {
            kind: NotificationKind::Closed,
            ..offer(now)
        };
        assert!(still_relevant(&closed, now));
    }
}
