//! The notifier worker: the one place that talks to gateways and agent desktops.
//!
//! - Deliveries (`fl.<tenant>.delivery.*`, from the other workers): a message for a customer
//!   goes out on `fl.<tenant>.outbound.<channel>`; a notification for an agent (offer,
//!   revocation, customer message...) on `fl.<tenant>.notify.<agent>`.
//! - Agent replies (`fl.<tenant>.agent.<agent>.action` with `type: reply`): stored in the
//!   transcript and sent to the customer, only from the agent serving the conversation.
//!   Accept, decline and close belong to the dispatcher, which owns agents' load.
//!
//! Every publish carries a fixed `Nats-Msg-Id` (the message or notification id), so a
//! redelivered delivery reaches the gateway or desktop once.

use async_nats::HeaderMap;
use firstline_shared::bus::{self, ConsumerSpec, Delivered};
use firstline_shared::config::CommonConfig;
use firstline_shared::db;
use firstline_shared::domain::TenantId;
use firstline_shared::outbox::Outbox;
use firstline_shared::wire::{
    self, AgentAction, AgentActionKind, Author, Delivery, OutboundMessage, Version,
};
use firstline_shared::worker::Services;
use firstline_shared::{subjects, telemetry, HandleError};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "firstline-notifier",
    about = "Delivers to gateways and agent desktops; stores agent replies"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
}

/// Consumes `FL_DELIVERY` and the replies of `FL_ACTIONS` until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let services = Services::start(&config.common, &shutdown).await?;
    let deliveries = bus::consume_batched(
        &services.js,
        &config.common,
        ConsumerSpec::new(subjects::DELIVERY, "notifier"),
        DELIVERY_BATCH,
        shutdown.clone(),
        |batch| deliver_all(&services, batch),
    );
    let replies = bus::consume(
        &services.js,
        &config.common,
        ConsumerSpec::new(subjects::ACTIONS, "notifier-actions"),
        shutdown,
        |m| reply(&services, m),
    );
    let result = tokio::try_join!(deliveries, replies).map(|_| ());
    services.close().await;
    result
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

async fn reply(services: &Services, m: Delivered) -> Result<(), HandleError> {
    let (tenant, agent) = subjects::parse_agent_action(&m.subject).map_err(HandleError::Poison)?;
    let action: AgentAction = wire::decode(&m.payload)?;
    telemetry::record_ids(
        Some(&tenant),
        None,
        Some(&action.kind.conversation_id()),
        Some(&agent),
    );
    let AgentActionKind::Reply {
        conversation_id,
        text,
    } = action.kind
    else {
        return Ok(()); // the dispatcher's
    };
    let mut client = services.pool.get().await?;
    let tx = client.transaction().await?;
    let mut outbox = Outbox::new();
    let conversation = db::conversation_for_update(&tx, &tenant, conversation_id).await?;
    let Some(conversation) = conversation.filter(|c| c.is_served_by(&agent)) else {
        outbox.reject_action(
            &tenant,
            &agent,
            conversation_id,
            action.action_id,
            "you are not serving this conversation",
        );
        let staged = outbox.stage(&tx).await?;
        tx.commit().await?;
        staged.publish(&services.js, &client).await;
        return Ok(());
    };
    let id = Uuid::now_v7();
    let row = tx
        .query_opt(
            "INSERT INTO messages (id, tenant_id, channel_id, conversation_id, external_id, author, agent_id, body)
             VALUES ($1, $2, $3, $4, $5, 'agent', $6, $7)
             ON CONFLICT (tenant_id, channel_id, external_id) DO NOTHING
             RETURNING created_at",
            &[
                &id,
                &tenant.as_str(),
                &conversation.channel.as_str(),
                &conversation.id,
                &format!("action:{}", action.action_id),
                &agent.as_str(),
                &text,
            ],
        )
        .await?;
    let Some(row) = row else {
        return Ok(()); // this action was applied already
    };
    outbox.push(
        subjects::outbound(&tenant, &conversation.channel),
        id.to_string(),
        &OutboundMessage {
            version: Version,
            message_id: id,
            conversation_id: conversation.id,
            customer_id: conversation.customer_external_id.clone(),
            author: Author::Agent,
            agent_id: Some(agent),
            text,
            buttons: Vec::new(),
            image_url: None,
            at: row.get(0),
        },
    );
    let staged = outbox.stage(&tx).await?;
    tx.commit().await?;
    staged.publish(&services.js, &client).await;
    Ok(())
}

impl firstline_shared::worker::WorkerConfig for Config {
    fn common(&self) -> &CommonConfig {
        &self.common
    }
}
