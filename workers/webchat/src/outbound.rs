//! What to deliver: the bot's and agents' replies on `fl.<tenant>.outbound.<channel>`, read
//! with the gateway's durable pull consumer on `FL_OUTBOUND` (named `gateway-<tenant>` by
//! default: the name the fenced gateway user of `firstline nats-config` may use). Each message
//! is recorded in its customer's transcript, which sends it to the customer's open widgets,
//! then acknowledged; one that is not an `outbound-message` is refused (`Term`) with a warning.
//! A message whose ack was lost comes again and is recorded once (its `message_id`).
//!
//! At start, before that, the replies of the last `FL_WEBCHAT_REPLAY_SECS` are read again from
//! the stream ([`replay`], with a second consumer, `replay-<tenant>`, deleted when done), so
//! that a gateway restart does not lose a reply it had taken for a customer whose widget was
//! closed: the transcripts live in memory (docs/webchat.md).

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::AckKind;
use chrono::{DateTime, Utc};
use firstline_shared::bus::JetStream;
use firstline_shared::domain::{ChannelId, TenantId};
use firstline_shared::subjects;
use firstline_shared::wire::{self, OutboundMessage};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::transcript::{Entry, Hub};

/// The consumer's settings: one durable per gateway, filtered to its channel.
pub fn consumer_config(name: &str, tenant: &TenantId, channel: &ChannelId) -> pull::Config {
    pull::Config {
        durable_name: Some(name.to_owned()),
        name: Some(name.to_owned()),
        description: Some(format!("web-chat gateway of {tenant}/{channel}")),
        filter_subject: subjects::outbound(tenant, channel),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        // A new gateway delivers what was published since its consumer was made, not a
        // week of history.
        deliver_policy: DeliverPolicy::New,
        max_ack_pending: 1_000,
        ..Default::default()
    }
}

/// The consumer that re-reads the replies published since `since`, without acks.
pub fn replay_config(
    name: &str,
    tenant: &TenantId,
    channel: &ChannelId,
    since: DateTime<Utc>,
) -> pull::Config {
    pull::Config {
        name: Some(name.to_owned()),
        description: Some(format!(
            "web-chat gateway of {tenant}/{channel}: replay at start"
        )),
        filter_subject: subjects::outbound(tenant, channel),
        ack_policy: AckPolicy::None,
        deliver_policy: DeliverPolicy::ByStartTime { start_time: since },
        // Gone by itself if the gateway dies before it deletes it.
        inactive_threshold: Duration::from_secs(60),
        ..Default::default()
    }
}

/// What the gateway consumes: its durable consumer, and what it re-reads at start.
#[derive(Clone, Debug)]
pub struct Consumers {
    /// The durable consumer's name (`gateway-<tenant>`).
    pub name: String,
    /// The consumer that re-reads at start (`replay-<tenant>`).
    pub replay_name: String,
    /// How far back the replies are read again at start (zero: not at all).
    pub replay: Duration,
}

/// Records the replies published since `since` in the transcripts (each once: a reply
/// already recorded is not recorded again); returns how many were read.
pub async fn replay(
    js: &JetStream,
    name: &str,
    tenant: &TenantId,
    channel: &ChannelId,
    hub: &Hub,
    since: DateTime<Utc>,
) -> anyhow::Result<usize> {
    let stream = js.get_stream_no_info(subjects::OUTBOUND.name).await?;
    // One that an earlier start left (within its inactive threshold) starts elsewhere.
    let _ = stream.delete_consumer(name).await;
    let mut consumer = stream
        .create_consumer::<pull::Config>(replay_config(name, tenant, channel, since))
        .await?;
    let mut read = 0;
    if consumer.info().await?.num_pending > 0 {
        let mut messages = consumer.messages().await?;
        // What was pending may have aged out of the stream meanwhile: a quiet while ends it.
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_secs(5), messages.next()).await
        {
            let message = message?;
            let pending = message.info().map_err(|e| anyhow::anyhow!("{e}"))?.pending;
            if let Ok(out) = wire::decode::<OutboundMessage>(&message.payload) {
                hub.record(&out.customer_id, Entry::from(&out));
            }
            read += 1;
            if pending == 0 {
                break;
            }
        }
    }
    let _ = stream.delete_consumer(name).await;
    Ok(read)
}

/// Consumes until `shutdown`, after [`replay`]; a lost connection or a missing stream (the
/// workers create it) is tried again after a pause.
pub async fn consume(
    js: JetStream,
    consumers: Consumers,
    tenant: TenantId,
    channel: ChannelId,
    hub: Hub,
    shutdown: CancellationToken,
) {
    let mut pause = Duration::from_millis(200);
    let mut failures = 0;
    let since = Utc::now() - chrono::Duration::from_std(consumers.replay).unwrap_or_default();
    let mut replayed = consumers.replay.is_zero();
    let consumer_name = consumers.name.clone();
    while !shutdown.is_cancelled() {
        if !replayed {
            let name = consumers.replay_name.clone();
            let done = tokio::select! {
                r = replay(&js, &name, &tenant, &channel, &hub, since) => r,
                _ = shutdown.cancelled() => return,
            };
            match done {
                Ok(n) => {
                    tracing::info!(consumer = %name, "read {n} replies since {since} again");
                    replayed = true;
                }
                Err(e) => {
                    tracing::info!(consumer = %name, "replay: {e:#}; trying again in {pause:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        match consume_once(&js, &consumer_name, &tenant, &channel, &hub, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                failures += 1;
                // At start the workers may not have made the stream yet: said once it lasts.
                if failures > 3 {
                    tracing::warn!(consumer = %consumer_name, "outbound consumer: {e:#}; trying again in {pause:?}");
                } else {
                    tracing::info!(consumer = %consumer_name, "outbound consumer: {e:#}; trying again in {pause:?}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.cancelled() => return,
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn consume_once(
    js: &JetStream,
    consumer_name: &str,
    tenant: &TenantId,
    channel: &ChannelId,
    hub: &Hub,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    // No stream info: it would show every tenant's subjects, which a gateway may not read.
    let stream = js.get_stream_no_info(subjects::OUTBOUND.name).await?;
    let consumer = stream
        .create_consumer::<pull::Config>(consumer_config(consumer_name, tenant, channel))
        .await?;
    let mut messages = consumer.messages().await?;
    tracing::info!(consumer = %consumer_name, "delivering {}", subjects::outbound(tenant, channel));
    loop {
        let message = tokio::select! {
            m = messages.next() => m,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let Some(message) = message else {
            anyhow::bail!("the consumer's message stream ended");
        };
        let message = message?;
        match wire::decode::<OutboundMessage>(&message.payload) {
            Ok(out) => {
                let new = hub.record(&out.customer_id, Entry::from(&out));
                tracing::debug!(message_id = %out.message_id, customer = %out.customer_id, new, "outbound");
            }
            Err(e) => {
                tracing::warn!(subject = %message.subject, "refusing an outbound message: {e}");
                message
                    .ack_with(AckKind::Term)
                    .await
                    .map_err(|e| anyhow::anyhow!("term: {e}"))?;
                continue;
            }
        }
        message
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
    }
}
