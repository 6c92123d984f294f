//! Publishing to JetStream with a de-duplication id (`Nats-Msg-Id`): an ack that does not come
//! is "unknown", so the same message is published again with the same id (DESIGN.md).

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;

use super::JetStream;
use crate::subjects;
use crate::wire;

/// Publishes `payload` to `subject` with `Nats-Msg-Id: msg_id` and waits for the stream's ack.
/// An ack that does not come is "unknown": it publishes again with the same id (for up to
/// [`PUBLISH_PATIENCE`]), which the stream drops if the first one was stored. Returns whether
/// the stream saw a duplicate.
pub async fn publish(
    js: &JetStream,
    subject: String,
    msg_id: &str,
    mut headers: HeaderMap,
    payload: Bytes,
) -> anyhow::Result<bool> {
    headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
    let mut delay = RETRY_DELAY_MIN;
    let mut ack_wait = ACK_WAIT_MIN;
    let mut attempt = 0;
    let give_up = tokio::time::Instant::now() + PUBLISH_PATIENCE;
    loop {
        attempt += 1;
        let result = match js
            .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
            .await
        {
            Ok(ack) => match tokio::time::timeout(ack_wait, ack).await {
                Ok(acked) => acked.map_err(anyhow::Error::from),
                Err(_) => Err(anyhow::anyhow!("no ack within {ack_wait:?}")),
            },
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(ack) => return Ok(ack.duplicate),
            // The same bytes never fit: no second try (a caller dead-letters it).
            Err(e) if is_too_large(&e) => {
                return Err(e.context(format!("publishing {msg_id} to {subject}")));
            }
            Err(e) if tokio::time::Instant::now() + delay < give_up => {
                tracing::warn!(%subject, msg_id, attempt, "publish not acknowledged, retrying: {e:#}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_DELAY_MAX);
                ack_wait = (ack_wait * 2).min(ACK_WAIT_MAX);
            }
            Err(e) => {
                return Err(e.context(format!("publishing {msg_id} to {subject}")));
            }
        }
    }
}

/// The ack wait of [`publish`]'s first attempt, doubled at each retry up to [`ACK_WAIT_MAX`]
/// (the client's own ack timeout). A stream whose leader died answers nothing until a new one
/// is elected (5-7 s here): short waits at first find the new leader within a second of its
/// election, where waiting the client's 5 s each time could add up to 5 s more.
const ACK_WAIT_MIN: Duration = Duration::from_secs(1);
const ACK_WAIT_MAX: Duration = Duration::from_secs(5);
/// The pause between attempts: from 50 ms, doubling, at most half a second ("no responders"
/// and "no stream" answers come at once during an election; retrying every 2 s added up to 2 s).
const RETRY_DELAY_MIN: Duration = Duration::from_millis(50);
const RETRY_DELAY_MAX: Duration = Duration::from_millis(500);

/// How long [`publish`] tries again before it gives up: longer than a JetStream leader
/// election after a node of a cluster dies (5-7 s here; `tests/it/cluster.rs`), during which a
/// stream answers "no stream found" or nothing at all.
pub const PUBLISH_PATIENCE: Duration = Duration::from_secs(30);

/// Whether `e` is a publish refused for exceeding the server's `max_payload`: the same
/// message never goes through, so it is no transient failure.
pub fn is_too_large(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<async_nats::jetstream::context::PublishError>()
            .is_some_and(|p| {
                p.kind() == async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded
            })
    })
}

/// Publishes an agent's action on `fl.<tenant>.agent.<agent>.action`, as a desktop does: with
/// `Nats-Msg-Id` = its `action_id` (so it is applied once) and the current trace context.
pub async fn publish_action(
    js: &JetStream,
    tenant: &crate::domain::TenantId,
    agent: &crate::domain::AgentId,
    action: &wire::AgentAction,
) -> anyhow::Result<()> {
    let mut headers = HeaderMap::new();
    crate::telemetry::inject_current(&mut headers);
    publish(
        js,
        subjects::agent_action(tenant, agent),
        &action.action_id.to_string(),
        headers,
        wire::encode(action),
    )
    .await
    .map(|_| ())
}

/// One message to publish with [`publish_all`].
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub subject: String,
    pub msg_id: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// How many publishes [`publish_all`] has in flight at once. The client holds a permit per
/// unacknowledged publish (5,000 per context, shared by every task), and waits for one when
/// none is left: sending a whole large batch before reading any ack would wait forever.
const PUBLISH_WINDOW: usize = 256;

/// Publishes `messages` pipelined: sends a window of them, in order, then collects the
/// stream's acks (one round trip per window instead of one per message). A message whose ack
/// does not come is published again on its own, with the same id, as [`publish`] does; once one
/// of those is given up, the others whose ack did not come are not tried again here.
/// Returns, per message, whether it is stored.
pub async fn publish_all(js: &JetStream, messages: &[Outgoing]) -> Vec<anyhow::Result<()>> {
    let mut results = Vec::with_capacity(messages.len());
    let mut gave_up = false;
    for window in messages.chunks(PUBLISH_WINDOW) {
        let mut pending = Vec::with_capacity(window.len());
        for m in window {
            let mut headers = m.headers.clone();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, m.msg_id.as_str());
            pending.push(
                js.publish_with_headers(m.subject.clone(), headers, m.payload.clone())
                    .await,
            );
        }
        // Every ack of the window awaited together: when a node dies, the acks of all the
        // messages sent to it are lost at once and cost one ack timeout, not one each.
        let acks = futures::future::join_all(pending.into_iter().map(|sent| async move {
            match sent {
                Ok(ack) => ack.await.map(|_| ()).map_err(anyhow::Error::from),
                Err(e) => Err(anyhow::Error::from(e)),
            }
        }))
        .await;
        for (m, acked) in window.iter().zip(acks) {
            results.push(match acked {
                Ok(()) => Ok(()),
                Err(e) if is_too_large(&e) => {
                    Err(e.context(format!("publishing {} to {}", m.msg_id, m.subject)))
                }
                // The server did not take one in [`PUBLISH_PATIENCE`]: the rest are not
                // tried one by one for as long each (the caller keeps them, as the outbox does).
                Err(e) if gave_up => Err(e.context("not published: NATS did not answer")),
                // Tried again one at a time, in order: the first waits out the election, the
                // others then go through at once.
                Err(_) => {
                    let again = publish(
                        js,
                        m.subject.clone(),
                        &m.msg_id,
                        m.headers.clone(),
                        m.payload.clone(),
                    )
                    .await;
                    gave_up = again.as_ref().is_err_and(|e| !is_too_large(e));
                    again.map(|_| ())
                }
            });
        }
    }
    results
}
