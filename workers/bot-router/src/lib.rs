//! The bot-router worker: answers customer messages of conversations in a bot state
//! (`fl.<tenant>.bot.<channel>`, from ingest). Minimal for now: a hand-over keyword moves the
//! conversation to `waiting` (SPEC L4) with the tenant's hand-over reply; anything else gets
//! the tenant's bot reply. A message that arrives after the conversation left the bot is
//! not answered (SPEC L5).

use deadpool_postgres::Transaction;
use firstline_shared::bus::{self, ConsumerSpec, Delivered};
use firstline_shared::config::CommonConfig;
use firstline_shared::db::{self, Conversation, Transition};
use firstline_shared::domain::{ConversationState, TenantId};
use firstline_shared::outbox::Outbox;
use firstline_shared::wire::{self, Author, BotWork, Delivery, OutboundMessage, Version};
use firstline_shared::worker::Services;
use firstline_shared::{subjects, telemetry, HandleError};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "firstline-bot-router",
    about = "Answers conversations in a bot state and hands them over"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
}

/// Consumes `FL_BOT` until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let services = Services::start(&config.common, &shutdown).await?;
    let spec = ConsumerSpec::new(subjects::BOT, "bot-router");
    let result = bus::consume(&services.js, &config.common, spec, shutdown, |m| {
        handle(&services, m)
    })
    .await;
    services.close().await;
    result
}

/// SPEC L4: the text is a hand-over keyword (trimmed, case-insensitive; whole message).
pub fn is_handover(text: &str, keywords: &[String]) -> bool {
    let text = text.trim().to_lowercase();
    !text.is_empty() && keywords.iter().any(|k| k.trim().to_lowercase() == text)
}

async fn handle(services: &Services, m: Delivered) -> Result<(), HandleError> {
    let tenant =
        TenantId::parse(m.tenant_token()).map_err(|e| HandleError::poison(e.to_string()))?;
    let work: BotWork = wire::decode(&m.payload)?;
    telemetry::record_ids(Some(&tenant), None, Some(&work.conversation_id), None);
    let mut client = services.pool.get().await?;
    let tx = client.transaction().await?;
    let Some(settings) = db::tenant_settings(&tx, &tenant).await? else {
        return Err(HandleError::poison(format!("unknown tenant {tenant:?}")));
    };
    let Some(mut conversation) =
        db::conversation_for_update(&tx, &tenant, work.conversation_id).await?
    else {
        return Err(HandleError::poison(format!(
            "conversation {} of tenant {tenant} does not exist",
            work.conversation_id
        )));
    };
    if !conversation.state.is_bot() {
        // SPEC L5: it left the bot after this message was routed here.
        tracing::debug!(state = %conversation.state, "conversation left the bot; no reply");
        return Ok(());
    }
    let mut outbox = Outbox::new();
    let reply = if is_handover(&work.text, &settings.handover_keywords) {
        db::transition(
            &tx,
            &mut outbox,
            &mut conversation,
            Transition {
                to: ConversationState::Waiting,
                agent: None,
                reason: "handover_keyword",
            },
        )
        .await?;
        settings.handover_reply
    } else {
        settings.bot_reply
    };
    if !reply_once(&tx, &mut outbox, &conversation, work.message_id, &reply).await? {
        tracing::info!(message = %work.message_id, "already answered");
        tx.rollback().await?;
        return Ok(());
    }
    let staged = outbox.stage(&tx).await?;
    tx.commit().await?;
    staged.publish(&services.js, &client).await;
    Ok(())
}

/// Stores the bot's reply to `in_reply_to` and stages it for the customer; `false` if that
/// message was already answered (a redelivery).
async fn reply_once(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    conversation: &Conversation,
    in_reply_to: Uuid,
    text: &str,
) -> anyhow::Result<bool> {
    let id = Uuid::now_v7();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO messages (id, tenant_id, channel_id, conversation_id, external_id, author, body)
             VALUES ($1, $2, $3, $4, $5, 'bot', $6)
             ON CONFLICT (tenant_id, channel_id, external_id) DO NOTHING
             RETURNING created_at",
        )
        .await?;
    let Some(row) = tx
        .query_opt(
            &stmt,
            &[
                &id,
                &conversation.tenant.as_str(),
                &conversation.channel.as_str(),
                &conversation.id,
                &format!("bot-reply:{in_reply_to}"),
                &text,
            ],
        )
        .await?
    else {
        return Ok(false);
    };
    outbox.push(
        subjects::delivery(&conversation.tenant, "customer"),
        format!("delivery:{id}"),
        &Delivery::ToCustomer {
            version: Version,
            channel: conversation.channel.clone(),
            message: OutboundMessage {
                version: Version,
                message_id: id,
                conversation_id: conversation.id,
                customer_id: conversation.customer_external_id.clone(),
                author: Author::Bot,
                agent_id: None,
                text: text.to_owned(),
                at: row.get(0),
            },
        },
    );
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
    fn handover_keywords_match_whole_trimmed_text_in_any_case() {
        let keywords = vec!["轉真人".to_owned(), "Agent".to_owned()];
        assert!(is_handover("轉真人", &keywords));
        assert!(is_handover("  轉真人\n", &keywords));
        assert!(is_handover("AGENT", &keywords));
        assert!(!is_handover("我想轉真人嗎", &keywords));
        assert!(!is_handover("", &keywords));
        assert!(!is_handover("agents", &keywords));
    }
}
