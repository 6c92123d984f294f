//! The ingest worker: takes every customer message that gateways publish on
//! `fl.<tenant>.inbound.<channel>`, finds or opens the customer's conversation (SPEC L1, L2,
//! L9), stores the message once, and routes it by the conversation's state:
//!
//! | state | route |
//! |---|---|
//! | new, channel's bot on | `bot`: to the bot-router (L2) |
//! | new, bot off | `waiting`: queued, the dispatcher is woken (L2) |
//! | `script`, `bot` | to the bot-router |
//! | `waiting`, `assigning` | stored only: no bot reply, no flow (L5) |
//! | `processing` | to the serving agent, through the notifier |

mod db;

use firstline_shared::bus::{self, ConsumerSpec, Delivered};
use firstline_shared::config::CommonConfig;
use firstline_shared::domain::ConversationState;
use firstline_shared::outbox::Outbox;
use firstline_shared::wire::{
    self, AgentNotification, BotWork, Delivery, InboundMessage, NotificationKind, Version,
};
use firstline_shared::worker::Services;
use firstline_shared::{subjects, telemetry, HandleError};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Settings of the ingest worker.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "firstline-ingest",
    about = "Stores and routes inbound customer messages"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
}

/// The durable consumers of the inbound partitions.
const PARTITION_CONSUMERS: [&str; subjects::INBOUND_PARTITIONS as usize] = [
    "ingest-p0",
    "ingest-p1",
    "ingest-p2",
    "ingest-p3",
    "ingest-p4",
    "ingest-p5",
    "ingest-p6",
    "ingest-p7",
    "ingest-p8",
    "ingest-p9",
    "ingest-p10",
    "ingest-p11",
    "ingest-p12",
    "ingest-p13",
    "ingest-p14",
    "ingest-p15",
];

/// Consumes `FL_INBOUND` until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let services = Services::start(&config.common, &shutdown).await?;
    // One consumer per inbound partition, one message in flight each: the messages of a
    // conversation are handled in order, whichever instance takes them (subjects::INBOUND_PARTITIONS).
    let partitions = PARTITION_CONSUMERS.iter().enumerate().map(|(p, durable)| {
        let spec = ConsumerSpec {
            filter_subject: subjects::inbound_partition_filter(p as u32),
            max_ack_pending: 1,
            ..ConsumerSpec::new(subjects::INBOUND, durable)
        };
        let services = &services;
        bus::consume(
            &services.js,
            &config.common,
            spec,
            shutdown.clone(),
            move |m| handle(services, m),
        )
    });
    let result = futures::future::try_join_all(partitions).await.map(|_| ());
    services.close().await;
    result
}

/// Where an inbound message went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Bot,
    Queued,
    Agent,
}

impl Route {
    fn as_str(self) -> &'static str {
        match self {
            Self::Bot => "bot",
            Self::Queued => "queued",
            Self::Agent => "agent",
        }
    }

    /// The routing table of the module documentation (SPEC L2, L5).
    fn for_state(state: ConversationState) -> Self {
        match state {
            ConversationState::Script | ConversationState::Bot => Self::Bot,
            ConversationState::Waiting | ConversationState::Assigning => Self::Queued,
            ConversationState::Processing => Self::Agent,
            ConversationState::Completed => {
                unreachable!("an inbound message never joins a completed conversation (L9)")
            }
        }
    }
}

async fn handle(services: &Services, m: Delivered) -> Result<(), HandleError> {
    let (tenant, channel) = subjects::parse_inbound(&m.subject).map_err(HandleError::Poison)?;
    let inbound: InboundMessage = wire::decode(&m.payload)?;
    if inbound.message_id.trim().is_empty() {
        return Err(HandleError::poison("inbound-message: message_id is empty"));
    }
    if inbound.customer.id.trim().is_empty() {
        return Err(HandleError::poison("inbound-message: customer.id is empty"));
    }
    telemetry::record_ids(Some(&tenant), Some(&channel), None, None);

    let mut client = services.pool.get().await?;
    let tx = client.transaction().await?;
    let Some(channel_settings) = db::channel(&tx, &tenant, &channel).await? else {
        return Err(HandleError::poison(format!(
            "unknown channel {channel:?} of tenant {tenant:?}: configure it, then replay this dead letter"
        )));
    };
    let mut outbox = Outbox::new();
    let customer_id = db::upsert_customer(&tx, &tenant, &channel, &inbound.customer).await?;
    let conversation = db::open_conversation(
        &tx,
        &mut outbox,
        &tenant,
        &channel,
        customer_id,
        &channel_settings,
    )
    .await?;
    telemetry::record_ids(
        None,
        None,
        Some(&conversation.id),
        conversation.agent_id.as_ref().map(|a| a as _),
    );
    let route = Route::for_state(conversation.state);
    let message_id = Uuid::now_v7();
    let stored =
        db::insert_customer_message(&tx, &conversation, message_id, &inbound, route.as_str())
            .await?;
    if !stored {
        // Published twice (a gateway retry beyond the stream's duplicate window): stored
        // once; the first copy's outputs are already committed to the outbox.
        tracing::info!(
            message_id = inbound.message_id,
            "duplicate inbound message ignored"
        );
        tx.rollback().await?;
        return Ok(());
    }
    match route {
        Route::Bot => outbox.push(
            subjects::bot(&tenant, &channel),
            format!("bot:{message_id}"),
            &BotWork {
                version: Version,
                conversation_id: conversation.id,
                message_id,
                text: inbound.text.clone(),
            },
        ),
        // L5: left the bot; the message waits in the transcript for the agent.
        Route::Queued => {}
        Route::Agent => {
            let agent_id = conversation
                .agent_id
                .clone()
                .ok_or_else(|| anyhow::anyhow!("processing conversation without agent"))?;
            outbox.push(
                subjects::delivery(&tenant, "agent"),
                format!("delivery:{message_id}"),
                &Delivery::ToAgent {
                    version: Version,
                    agent_id,
                    notification: AgentNotification {
                        version: Version,
                        notification_id: message_id,
                        conversation_id: conversation.id,
                        kind: NotificationKind::CustomerMessage {
                            message_id,
                            customer: inbound.customer.clone(),
                            text: inbound.text.clone(),
                            at: inbound.sent_at.unwrap_or_else(chrono::Utc::now),
                        },
                    },
                },
            );
        }
    }
    let staged = outbox.stage(&tx).await?;
    tx.commit().await?;
    staged.publish(&services.js, &client).await;
    tracing::debug!(conversation = %conversation.id, route = route.as_str(), "inbound stored");
    Ok(())
}

impl firstline_shared::worker::WorkerConfig for Config {
    fn common(&self) -> &CommonConfig {
        &self.common
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_follow_the_state() {
        use ConversationState::*;
        assert_eq!(Route::for_state(Bot), Route::Bot);
        assert_eq!(Route::for_state(Script), Route::Bot);
        // SPEC L5: once out of the bot, no bot reply.
        assert_eq!(Route::for_state(Waiting), Route::Queued);
        assert_eq!(Route::for_state(Assigning), Route::Queued);
        assert_eq!(Route::for_state(Processing), Route::Agent);
    }
}
