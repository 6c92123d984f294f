//! The ingest worker: takes every customer message that gateways publish on
//! `fl.<tenant>.inbound.<channel>`, finds or opens the customer's conversation (SPEC L1, L2,
//! L9), stores the message once, and routes it by the conversation's state:
//!
//! | state | route |
//! |---|---|
//! | new, channel's bot on | `bot`, or `script` when the channel has a welcome flow: to the bot-router (L2) |
//! | new, bot off | `waiting`: queued, the dispatcher is woken (L2) |
//! | a rating, after a survey question | stored on the closed conversation (滿意度調查) |
//! | `script`, `bot` | to the bot-router |
//! | `waiting`, `assigning` | stored only: no bot reply, no flow (L5) |
//! | `processing` | to the serving agent, through the notifier |

mod db;

use firstline_shared::batch;
use firstline_shared::bus::Delivered;
use firstline_shared::config::CommonConfig;
use firstline_shared::db as shared_db;
use firstline_shared::domain::{ChannelId, ConversationState, TenantId};
use firstline_shared::outbox::Outbox;
use firstline_shared::partitions::{self, PartitionSet};
use firstline_shared::place_in_line;
use firstline_shared::wire::{
    self, AgentNotification, BotWork, Delivery, InboundMessage, NotificationKind, Version,
};
use firstline_shared::worker::Services;
use firstline_shared::{subjects, telemetry, HandleError};
use std::sync::Arc;
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

/// The inbound partitions: per channel (`fl.<t>.inbound.<channel>`) and per customer
/// (`fl.<t>.inbound.<channel>.<customer key>`).
const PARTITIONS: [PartitionSet; 2] = [
    PartitionSet {
        stream: subjects::INBOUND,
        prefix: "ingest-p",
    },
    PartitionSet {
        stream: subjects::INBOUND_KEYED,
        prefix: "ingest-k",
    },
];

/// Consumes `FL_INBOUND` and `FL_INBOUND_KEYED` until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let services = Services::start(&config.common, &shutdown).await?;
    // The inbound partitions dealt to this instance, each read in order from its mark, up to
    // `partition_batch` messages handled in one transaction: a conversation's messages are
    // handled in order, whichever instance reads them (docs/ordering.md).
    let result = partitions::consume(
        &services,
        &config.common,
        "ingest",
        &PARTITIONS,
        shutdown,
        |batch| handle_batch(&services, batch),
    )
    .await;
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

/// Handles a partition's batch in one transaction ([`batch::in_one_transaction`]): a
/// duplicate's work is rolled back, a poison message alone is dead-lettered, a transient
/// failure stops the batch there.
async fn handle_batch(services: &Services, batch: Vec<Delivered>) -> Vec<Result<(), HandleError>> {
    let read = Read {
        channels: Channels::default(),
        locked: batch::Memo::default(),
        senders: batch.iter().filter_map(sender).collect(),
    };
    let (results, _) = batch::in_one_transaction(
        services,
        "ingest",
        &batch,
        &read,
        customer_key,
        |read, tx, outbox, m| {
            Box::pin(async move { Ok(handle(tx, read, outbox, m).await?.then_some(())) })
        },
    )
    .await;
    results
}

/// What a batch's messages share: the settings of its channels, read once per batch (most
/// batches are of one channel, or of a few: issue 22), and the lock of its senders' open
/// conversations, taken once, in order, before any message locks its own.
struct Read {
    channels: Channels,
    locked: batch::Memo<(), ()>,
    senders: Vec<(String, String, String)>,
}

impl Read {
    /// [`db::lock_open_conversations`] of the batch, once (by the first message that asks; the
    /// others wait for it).
    async fn lock_in_order(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
    ) -> Result<(), HandleError> {
        self.locked
            .get((), || db::lock_open_conversations(tx, &self.senders))
            .await
            .map_err(HandleError::from)
    }
}

type Channels = batch::Memo<(TenantId, ChannelId), Option<Arc<db::ChannelSettings>>>;

/// A message's sender: (tenant, channel, the customer's id on the channel).
fn sender(m: &Delivered) -> Option<(String, String, String)> {
    let (tenant, channel) = subjects::parse_inbound(&m.subject).ok()?;
    let key = customer_key(m)?;
    let (_, customer) = key.split_once('\n')?;
    Some((
        tenant.as_str().to_owned(),
        channel.as_str().to_owned(),
        customer.to_owned(),
    ))
}

/// The customer a message is from (its subject names the tenant and channel): one customer's
/// messages are handled in order, different customers' side by side.
fn customer_key(m: &Delivered) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct From<'a> {
        #[serde(borrow)]
        customer: Customer<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Customer<'a> {
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
    }
    let from: From = serde_json::from_slice(&m.payload).ok()?;
    Some(format!("{}\n{}", m.subject, from.customer.id))
}

/// One inbound message, in the batch's transaction (`tx` is its savepoint). `Ok(false)`:
/// nothing to keep (a duplicate), roll the savepoint back.
async fn handle(
    tx: &deadpool_postgres::Transaction<'_>,
    read: &Read,
    outbox: &mut Outbox,
    m: &Delivered,
) -> Result<bool, HandleError> {
    let (tenant, channel) = subjects::parse_inbound(&m.subject).map_err(HandleError::Poison)?;
    let inbound: InboundMessage = wire::decode(&m.payload)?;
    if inbound.message_id.trim().is_empty() {
        return Err(HandleError::poison("inbound-message: message_id is empty"));
    }
    if inbound.customer.id.trim().is_empty() {
        return Err(HandleError::poison("inbound-message: customer.id is empty"));
    }
    telemetry::record_ids(Some(&tenant), Some(&channel), None, None);

    read.lock_in_order(tx).await?;
    let settings = read
        .channels
        .get((tenant.clone(), channel.clone()), || async {
            Ok::<_, tokio_postgres::Error>(db::channel(tx, &tenant, &channel).await?.map(Arc::new))
        })
        .await?;
    let Some(channel_settings) = settings else {
        return Err(HandleError::poison(format!(
            "unknown channel {channel:?} of tenant {tenant:?}: configure it, then replay this dead letter"
        )));
    };
    let customer = db::upsert_customer(tx, &tenant, &channel, &inbound.customer).await?;
    // A survey answer is for an earlier conversation: a new customer has none.
    if let Some(survey) = channel_settings.survey.as_ref().filter(|_| !customer.new) {
        if let Some(rating) = survey.rating(&inbound.text, inbound.postback.as_deref()) {
            if let Some(answered) =
                db::awaiting_rating(tx, &tenant, customer.id, survey.window_minutes).await?
            {
                // 滿意度調查: the answer belongs to the closed conversation (README: survey).
                let message_id = Uuid::now_v7();
                if db::insert_customer_message(tx, &answered, message_id, &inbound, "survey")
                    .await?
                {
                    db::store_rating(tx, answered.id, rating).await?;
                    if let Some(thanks) = &survey.thanks {
                        shared_db::send_bot_message(
                            tx,
                            outbox,
                            &answered,
                            &format!("survey-thanks:{}", answered.id),
                            &shared_db::BotSays::text(thanks.clone()),
                        )
                        .await?;
                    }
                }
                tracing::info!(conversation = %answered.id, rating, "survey answered");
                return Ok(true);
            }
        }
    }
    let (conversation, created) = db::open_conversation(
        tx,
        outbox,
        &tenant,
        &channel,
        (&customer, &inbound.customer),
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
        db::insert_customer_message(tx, &conversation, message_id, &inbound, route.as_str())
            .await?;
    if !stored {
        // Published twice (a gateway retry beyond the stream's duplicate window): stored
        // once; the first copy's outputs are already committed to the outbox.
        tracing::info!(
            message_id = inbound.message_id,
            "duplicate inbound message ignored"
        );
        return Ok(false);
    }
    match route {
        Route::Bot => outbox.push(
            subjects::bot(&tenant, &conversation.id),
            format!("bot:{message_id}"),
            &BotWork {
                version: Version,
                conversation_id: conversation.id,
                message_id,
                text: inbound.text.clone(),
                postback: inbound.postback.clone(),
                email: inbound.email.clone(),
            },
        ),
        // L5: left the bot; the message waits in the transcript for the agent. The customer
        // is told their place in line when queued, and when they ask (README).
        Route::Queued => {
            let asked = (!created).then_some(inbound.text.as_str());
            place_in_line::tell(
                tx,
                outbox,
                &conversation,
                asked,
                &format!("place:{message_id}"),
            )
            .await?;
        }
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
    tracing::debug!(conversation = %conversation.id, route = route.as_str(), "inbound stored");
    Ok(true)
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
