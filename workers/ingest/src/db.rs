//! The ingest worker's queries.

use deadpool_postgres::Transaction;
use firstline_shared::db::{self, Conversation, Transition, CONVERSATION_COLUMNS};
use firstline_shared::domain::{ChannelId, ConversationState, SkillSet, TenantId};
use firstline_shared::outbox::Outbox;
use firstline_shared::survey::Survey;
use firstline_shared::wire::{CustomerRef, InboundMessage};
use uuid::Uuid;

/// What ingest needs of a channel.
pub struct ChannelSettings {
    pub required_skills: SkillSet,
    /// SPEC L2.
    pub bot_enabled: bool,
    /// SPEC L2: new conversations start in the channel's welcome flow (`script`).
    pub welcome_flow: bool,
    /// SPEC D10: the default assignment weight of the channel's conversations.
    pub weight: i32,
    /// 滿意度調查 settings, when the channel asks.
    pub survey: Option<Survey>,
}

pub async fn channel(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    channel: &ChannelId,
) -> Result<Option<ChannelSettings>, tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached(
            "SELECT required_skills, bot_enabled, weight, survey, welcome_flow IS NOT NULL
             FROM channels WHERE tenant_id = $1 AND id = $2",
        )
        .await?;
    Ok(tx
        .query_opt(&stmt, &[&tenant.as_str(), &channel.as_str()])
        .await?
        .map(|r| ChannelSettings {
            required_skills: SkillSet::new(r.get::<_, Vec<String>>(0)),
            bot_enabled: r.get(1),
            welcome_flow: r.get(4),
            weight: r.get(2),
            survey: r
                .get::<_, Option<serde_json::Value>>(3)
                .and_then(|v| serde_json::from_value(v).ok()),
        }))
}

/// A customer row: its id and the name stored for it.
pub struct StoredCustomer {
    pub id: Uuid,
    pub name: Option<String>,
    /// Created by this message: it has no conversation yet, open or closed.
    pub new: bool,
}

/// Locks the open conversations of `customers` ((tenant, channel, external id): a batch's
/// senders) in the order of their ids, before the batch's messages lock them one by one
/// ([`db::lock_conversations_in_order`] says why). A customer without one is skipped.
pub async fn lock_open_conversations(
    tx: &Transaction<'_>,
    customers: &[(String, String, String)],
) -> Result<(), tokio_postgres::Error> {
    if customers.len() < 2 {
        return Ok(());
    }
    let tenants: Vec<&str> = customers.iter().map(|c| c.0.as_str()).collect();
    let channels: Vec<&str> = customers.iter().map(|c| c.1.as_str()).collect();
    let ids: Vec<&str> = customers.iter().map(|c| c.2.as_str()).collect();
    let stmt = tx
        .prepare_cached(
            "SELECT c.id FROM unnest($1::text[], $2::text[], $3::text[]) AS s(tenant_id, channel_id, external_id)
             JOIN customers cu ON (cu.tenant_id, cu.channel_id, cu.external_id) = (s.tenant_id, s.channel_id, s.external_id)
             JOIN conversations c ON c.customer_id = cu.id AND c.state <> 'completed'
             ORDER BY c.id FOR NO KEY UPDATE OF c",
        )
        .await?;
    tx.execute(&stmt, &[&tenants, &channels, &ids]).await?;
    Ok(())
}

/// Finds or creates the customer and locks their row until the transaction ends: two first
/// messages of one customer, handled at once, are serialized here (SPEC L1).
pub async fn upsert_customer(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    channel: &ChannelId,
    customer: &CustomerRef,
) -> Result<StoredCustomer, tokio_postgres::Error> {
    // A returning customer (the common case): lock the row without writing a new version of
    // it, unless the name changed.
    let find = tx
        .prepare_cached(
            "SELECT id, display_name FROM customers
             WHERE tenant_id = $1 AND channel_id = $2 AND external_id = $3 FOR NO KEY UPDATE",
        )
        .await?;
    if let Some(row) = tx
        .query_opt(&find, &[&tenant.as_str(), &channel.as_str(), &customer.id])
        .await?
    {
        let id: Uuid = row.get(0);
        let name: Option<String> = row.get(1);
        if customer.name.is_some() && customer.name != name {
            let rename = tx
                .prepare_cached("UPDATE customers SET display_name = $2 WHERE id = $1")
                .await?;
            tx.execute(&rename, &[&id, &customer.name]).await?;
            return Ok(StoredCustomer {
                id,
                name: customer.name.clone(),
                new: false,
            });
        }
        return Ok(StoredCustomer {
            id,
            name,
            new: false,
        });
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO customers (id, tenant_id, channel_id, external_id, display_name)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant_id, channel_id, external_id)
             DO UPDATE SET display_name = coalesce(EXCLUDED.display_name, customers.display_name)
             RETURNING id, display_name, xmax = 0",
        )
        .await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &Uuid::now_v7(),
                &tenant.as_str(),
                &channel.as_str(),
                &customer.id,
                &customer.name,
            ],
        )
        .await?;
    Ok(StoredCustomer {
        id: row.get(0),
        name: row.get(1),
        // Inserted (not the conflict's update of a row another transaction just made).
        new: row.get(2),
    })
}

/// SPEC L1/L9: the customer's open conversation, or a new one (L2: to the bot when the
/// channel's bot takes new conversations, else to `waiting`). The unique index
/// `conversations_one_open_per_customer` backs the customer row lock. The flag says whether
/// the conversation is new.
pub async fn open_conversation(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    tenant: &TenantId,
    channel: &ChannelId,
    customer: (&StoredCustomer, &CustomerRef),
    settings: &ChannelSettings,
) -> anyhow::Result<(Conversation, bool)> {
    let (stored, named) = customer;
    // One round trip for the common case: the open conversation, locked, with what events
    // need of it (`FOR NO KEY UPDATE`: see `db::conversation_for_update`). A customer created
    // by this message has none: no statement whose answer is known.
    if !stored.new {
        let find = tx
            .prepare_cached(&format!(
                "SELECT {CONVERSATION_COLUMNS} FROM conversations c JOIN customers cu ON cu.id = c.customer_id
                 WHERE c.customer_id = $1 AND c.state <> 'completed' FOR NO KEY UPDATE OF c"
            ))
            .await?;
        if let Some(row) = tx.query_opt(&find, &[&stored.id]).await? {
            return Ok((db::conversation_from_row(&row)?, false));
        }
    }
    let state = if settings.bot_enabled && settings.welcome_flow {
        ConversationState::Script
    } else if settings.bot_enabled {
        ConversationState::Bot
    } else {
        ConversationState::Waiting
    };
    let id = Uuid::now_v7();
    // New: the row is written here and locked by its insert; what the rest of the handling
    // needs of it is known without reading it back. Its history row is inserted by the same
    // statement (one statement less per new conversation, issue 22).
    let insert = tx
        .prepare_cached(
            "WITH c AS (
                 INSERT INTO conversations (id, tenant_id, channel_id, customer_id, state, required_skills, weight, bot_at, queued_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7,
                         CASE WHEN $5 IN ('bot', 'script') THEN statement_timestamp() END,
                         CASE WHEN $5 = 'waiting' THEN statement_timestamp() END)
                 RETURNING id, state, queued_at),
             h AS (
                 INSERT INTO conversation_transitions (conversation_id, from_state, to_state, agent_id, reason)
                 SELECT id, NULL, state, NULL, $8 FROM c
                 RETURNING id, at)
             SELECT c.queued_at, h.id, h.at FROM c CROSS JOIN h",
        )
        .await?;
    let transition = Transition {
        to: state,
        agent: None,
        reason: "new_conversation",
    };
    let row = tx
        .query_one(
            &insert,
            &[
                &id,
                &tenant.as_str(),
                &channel.as_str(),
                &stored.id,
                &state.as_str(),
                &settings.required_skills.to_vec(),
                &settings.weight,
                &transition.reason,
            ],
        )
        .await?;
    let conversation = Conversation {
        id,
        tenant: tenant.clone(),
        channel: channel.clone(),
        customer_id: stored.id,
        customer_external_id: named.id.clone(),
        customer_name: stored.name.clone(),
        state,
        agent_id: None,
        required_skills: settings.required_skills.clone(),
        queued_at: row.get(0),
    };
    db::stage_event(
        outbox,
        &conversation,
        None,
        transition,
        row.get(1),
        row.get(2),
    );
    Ok((conversation, true))
}

/// Stores the customer's message; `false` when this (tenant, channel, message id) is
/// already stored (DESIGN.md: the unique key behind `Nats-Msg-Id`). `created_at` is the time
/// of the insert, not of the transaction's start: a batch's transaction may start, then wait
/// for its partition's mark behind another instance's batch of older messages (README:
/// Scaling out), and its messages must still sort after those.
pub async fn insert_customer_message(
    tx: &Transaction<'_>,
    conversation: &Conversation,
    id: Uuid,
    inbound: &InboundMessage,
    routed_to: &str,
) -> Result<bool, tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO messages (id, tenant_id, channel_id, conversation_id, external_id, author, body, routed_to, sent_at, created_at)
             VALUES ($1, $2, $3, $4, $5, 'customer', $6, $7, $8, clock_timestamp())
             ON CONFLICT (tenant_id, channel_id, external_id) DO NOTHING",
        )
        .await?;
    let n = tx
        .execute(
            &stmt,
            &[
                &id,
                &conversation.tenant.as_str(),
                &conversation.channel.as_str(),
                &conversation.id,
                &inbound.message_id,
                &inbound.text,
                &routed_to,
                &inbound.sent_at,
            ],
        )
        .await?;
    Ok(n == 1)
}

/// The customer's latest conversation, locked, if it is `completed` with a survey question
/// sent less than `window_minutes` ago and not yet answered (and no conversation is open).
pub async fn awaiting_rating(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    customer_id: Uuid,
    window_minutes: u32,
) -> anyhow::Result<Option<Conversation>> {
    let stmt = tx
        .prepare_cached(
            "SELECT id, state = 'completed' AND survey_sent_at IS NOT NULL AND rating IS NULL
                    AND survey_sent_at > statement_timestamp() - make_interval(mins => $2)
             FROM conversations WHERE customer_id = $1 ORDER BY created_at DESC LIMIT 1 FOR NO KEY UPDATE",
        )
        .await?;
    let window = i32::try_from(window_minutes).unwrap_or(i32::MAX);
    match tx.query_opt(&stmt, &[&customer_id, &window]).await? {
        Some(row) if row.get::<_, bool>(1) => {
            db::conversation_for_update(tx, tenant, row.get(0)).await
        }
        _ => Ok(None),
    }
}

/// Stores the rating on the conversation it answers.
pub async fn store_rating(
    tx: &Transaction<'_>,
    conversation: Uuid,
    rating: i16,
) -> anyhow::Result<()> {
    let stmt = tx
        .prepare_cached(
            "UPDATE conversations SET rating = $2, rated_at = statement_timestamp() WHERE id = $1",
        )
        .await?;
    tx.execute(&stmt, &[&conversation, &rating]).await?;
    Ok(())
}
