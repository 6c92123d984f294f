//! The notifier worker: the one place that talks to gateways and agent desktops.
//!
//! - Deliveries (`fl.<tenant>.delivery.*`, from the other workers): a message for a customer
//!   goes out on `fl.<tenant>.outbound.<channel>`; a notification for an agent (offer,
//!   revocation, customer message...) on `fl.<tenant>.notify.<agent>`.
//! - Agent replies are the dispatcher's, like every agent action: one consumer applies an
//!   agent's actions in the order sent, so a reply sent before a close is not refused by a
//!   close applied first (docs/dispatch.md). Their delivery comes here like any other.
//!
//! Every publish carries a fixed `Nats-Msg-Id` (the message or notification id), so a
//! redelivered delivery reaches the gateway or desktop once.

use async_nats::HeaderMap;
use firstline_shared::bus::{self, ConsumerSpec, Delivered};
use firstline_shared::config::CommonConfig;
use firstline_shared::domain::TenantId;
use firstline_shared::wire::{self, Delivery};
use firstline_shared::worker::Services;
use firstline_shared::{subjects, telemetry, HandleError};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "firstline-notifier",
    about = "Delivers to gateways and agent desktops"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
}

/// Consumes `FL_DELIVERY` until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let services = Services::start(&config.common, &shutdown).await?;
    forget_replies_consumer(&services).await;
    let result = bus::consume_batched(
        &services.js,
        &config.common,
        ConsumerSpec::new(subjects::DELIVERY, "notifier"),
        DELIVERY_BATCH,
        shutdown,
        |batch| deliver_all(&services, batch),
    )
    .await;
    services.close().await;
    result
}

/// The durable consumer of `FL_ACTIONS` the notifier had for replies, before the dispatcher
/// took them: deleted, so that it does not keep every action for nobody.
const OLD_REPLIES_CONSUMER: &str = "notifier-actions";

async fn forget_replies_consumer(services: &Services) {
    let Ok(stream) = services.js.get_stream(subjects::ACTIONS.name).await else {
        return;
    };
    if stream.consumer_info(OLD_REPLIES_CONSUMER).await.is_ok() {
        match stream.delete_consumer(OLD_REPLIES_CONSUMER).await {
            Ok(_) => tracing::info!(consumer = OLD_REPLIES_CONSUMER, "old consumer deleted"),
            Err(e) => tracing::warn!(consumer = OLD_REPLIES_CONSUMER, "not deleted: {e}"),
        }
    }
}

/// How many deliveries already received are published together, at most.
const DELIVERY_BATCH: usize = 256;

/// Publishes the deliveries received so far together: every publish sent, in the order
/// received, before waiting for the stream's acks ([`bus::publish_all`]), so that the
/// notifier's rate is not one publish round trip per message. A customer's messages keep
/// their order: one connection's publishes are stored in the order sent. A delivery that
/// does not decode is poison alone; one whose publish fails is retried alone.
async fn deliver_all(services: &Services, batch: Vec<Delivered>) -> Vec<Result<(), HandleError>> {
    let mut ready = Vec::with_capacity(batch.len());
    let prepared: Vec<Result<(), HandleError>> = batch
        .iter()
        .map(|m| {
            let span = bus::named_message_span(format!("notifier {}", m.subject), m);
            span.in_scope(|| outgoing(m)).map(|o| ready.push(o))
        })
        .collect();
    let mut published = bus::publish_all(&services.js, &ready).await.into_iter();
    prepared
        .into_iter()
        .map(|p| {
            p?;
            published
                .next()
                .unwrap_or_else(|| Err(anyhow::anyhow!("no publish result")))
                // One beyond the server's max_payload never goes out: dead-lettered at once.
                .map_err(HandleError::publish_failed)
        })
        .collect()
}

/// What a delivery becomes: a customer's message on `outbound`, an agent's notification on
/// `notify`, with the current span's trace.
fn outgoing(m: &Delivered) -> Result<bus::Outgoing, HandleError> {
    let tenant =
        TenantId::parse(m.tenant_token()).map_err(|e| HandleError::poison(e.to_string()))?;
    let delivery: Delivery = wire::decode(&m.payload)?;
    match &delivery {
        Delivery::ToCustomer {
            channel, message, ..
        } => telemetry::record_ids(
            Some(&tenant),
            Some(channel),
            Some(&message.conversation_id),
            None,
        ),
        Delivery::ToAgent {
            agent_id,
            notification,
            ..
        } => telemetry::record_ids(
            Some(&tenant),
            None,
            Some(&notification.conversation_id),
            Some(agent_id),
        ),
    }
    let mut headers = HeaderMap::new();
    telemetry::inject_current(&mut headers);
    let (subject, msg_id, payload) = match &delivery {
        Delivery::ToCustomer {
            channel, message, ..
        } => (
            subjects::outbound(&tenant, channel),
            message.message_id.to_string(),
            wire::encode(message),
        ),
        Delivery::ToAgent {
            agent_id,
            notification,
            ..
        } => (
            subjects::notify(&tenant, agent_id),
            notification.notification_id.to_string(),
            wire::encode(notification),
        ),
    };
    Ok(bus::Outgoing {
        subject,
        msg_id,
        headers,
        payload,
    })
}

impl firstline_shared::worker::WorkerConfig for Config {
    fn common(&self) -> &CommonConfig {
        &self.common
    }
}
