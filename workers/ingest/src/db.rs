//! The ingest worker's queries.

use chrono::{DateTime, Utc};
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
    /// SPEC D5: the queue priority of the channel's conversations.
    pub priority: i32,
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
            "SELECT required_skills, bot_enabled, priority, survey, welcome_flow IS NOT NULL
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
            priority: r.get(2),
            survey: r
                .get::<_, Option<serde_json::Value>>(3)
                .and_then(|v| serde_json::from_value(v).ok()),
        }))
}

/// A customer row: its id and the name stored for it.
pub struct StoredCustomer {
    pub id: Uuid,
    pub name: Option<String>,
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
             WHERE tenant_id = $1 AND channel_id = $2 AND external_id = $3 FOR UPDATE",
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
            });
        }
        return Ok(StoredCustomer { id, name });
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO customers (id, tenant_id, channel_id, external_id, display_name)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant_id, channel_id, external_id)
             DO UPDATE SET display_name = coalesce(EXCLUDED.display_name, customers.display_name)
             RETURNING id, display_name",
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
    })
}

/// SPEC L1/L9: the customer's open conversation, or a new one (L2: to the bot when the
/// channel's bot takes new conversations, else to `waiting`). The unique index
/// `conversations_one_open_per_customer` backs the customer row lock.
pub async fn open_conversation(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    tenant: &TenantId,
    channel: &ChannelId,
    customer: (&StoredCustomer, &CustomerRef),
    settings: &ChannelSettings,
) -> anyhow::Result<Conversation> {
    let (stored, named) = customer;
    // One round trip for the common case: the open conversation, locked, with what events
    // need of it.
    let find = tx
        .prepare_cached(&format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations c JOIN customers cu ON cu.id = c.customer_id
             WHERE c.customer_id = $1 AND c.state <> 'completed' FOR UPDATE OF c"
        ))
        .await?;
    if let Some(row) = tx.query_opt(&find, &[&stored.id]).await? {
        return db::conversation_from_row(&row);
    }
    let state = crate::set::initial_state(settings);
    let id = Uuid::now_v7();
    // New: the row is written here and locked by its insert; what the rest of the handling
    // needs of it is known without reading it back.
    let insert = tx
        .prepare_cached(
            "INSERT INTO conversations (id, tenant_id, channel_id, customer_id, state, required_skills, priority, bot_at, queued_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7,
                     CASE WHEN $5 IN ('bot', 'script') THEN statement_timestamp() END,
                     CASE WHEN $5 = 'waiting' THEN statement_timestamp() END)
             RETURNING queued_at",
        )
        .await?;
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
                &settings.priority,
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
    db::record_history(
        tx,
        outbox,
        &conversation,
        None,
        Transition {
            to: state,
            agent: None,
            reason: "new_conversation",
        },
    )
    .await?;
    Ok(conversation)
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
             FROM conversations WHERE customer_id = $1 ORDER BY created_at DESC LIMIT 1 FOR UPDATE",
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

// Set-based forms of the queries above, for a whole batch at once (`crate::set`).

/// A customer of a batch: who, and the name their messages give last (if any).
pub struct CustomerKey<'a> {
    pub tenant: &'a TenantId,
    pub channel: &'a ChannelId,
    pub external_id: &'a str,
    pub name: Option<&'a str>,
}

/// Finds or creates the batch's customers and locks their rows (as [`upsert_customer`] does
/// one at a time): the stored customer of each key, in the keys' order. Locks are taken in
/// the rows' id order. Three statements at most, whatever the batch's size.
pub async fn upsert_customers(
    tx: &Transaction<'_>,
    keys: &[CustomerKey<'_>],
) -> anyhow::Result<Vec<StoredCustomer>> {
    let tenants: Vec<&str> = keys.iter().map(|k| k.tenant.as_str()).collect();
    let channels: Vec<&str> = keys.iter().map(|k| k.channel.as_str()).collect();
    let externals: Vec<&str> = keys.iter().map(|k| k.external_id).collect();
    // Prepared anew for each batch, so planned with the table as it is (see `open_conversations`).
    let find = tx
        .prepare(
            "SELECT k.i, cu.id, cu.display_name
             FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS k(tenant_id, channel_id, external_id, i)
             JOIN customers cu USING (tenant_id, channel_id, external_id)
             ORDER BY cu.id FOR UPDATE OF cu",
        )
        .await?;
    let mut found: Vec<Option<StoredCustomer>> = keys.iter().map(|_| None).collect();
    for row in tx.query(&find, &[&tenants, &channels, &externals]).await? {
        let i = usize::try_from(row.get::<_, i64>(0) - 1).unwrap_or(usize::MAX);
        if let Some(slot) = found.get_mut(i) {
            *slot = Some(StoredCustomer {
                id: row.get(1),
                name: row.get(2),
            });
        }
    }
    // Returning customers whose messages give another name.
    let (renamed, names): (Vec<Uuid>, Vec<&str>) = keys
        .iter()
        .zip(&found)
        .filter_map(|(k, f)| {
            let f = f.as_ref()?;
            let name = k.name?;
            (f.name.as_deref() != Some(name)).then_some((f.id, name))
        })
        .unzip();
    if !renamed.is_empty() {
        let rename = tx
            .prepare(
                "UPDATE customers cu SET display_name = r.name
                 FROM unnest($1::uuid[], $2::text[]) AS r(id, name) WHERE cu.id = r.id",
            )
            .await?;
        tx.execute(&rename, &[&renamed, &names]).await?;
        for (k, f) in keys.iter().zip(found.iter_mut()) {
            if let (Some(f), Some(name)) = (f.as_mut(), k.name) {
                f.name = Some(name.to_owned());
            }
        }
    }
    // New customers.
    let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
    if !missing.is_empty() {
        let ids: Vec<Uuid> = missing.iter().map(|_| Uuid::now_v7()).collect();
        let tenants: Vec<&str> = missing.iter().map(|&i| keys[i].tenant.as_str()).collect();
        let channels: Vec<&str> = missing.iter().map(|&i| keys[i].channel.as_str()).collect();
        let externals: Vec<&str> = missing.iter().map(|&i| keys[i].external_id).collect();
        let names: Vec<Option<&str>> = missing.iter().map(|&i| keys[i].name).collect();
        let insert = tx
            .prepare_cached(
                "INSERT INTO customers (id, tenant_id, channel_id, external_id, display_name)
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
                 ON CONFLICT (tenant_id, channel_id, external_id)
                 DO UPDATE SET display_name = coalesce(EXCLUDED.display_name, customers.display_name)
                 RETURNING id, tenant_id, channel_id, external_id, display_name",
            )
            .await?;
        let rows = tx
            .query(&insert, &[&ids, &tenants, &channels, &externals, &names])
            .await?;
        for row in rows {
            let (tenant, channel, external): (&str, &str, &str) =
                (row.get(1), row.get(2), row.get(3));
            if let Some(&i) = missing.iter().find(|&&i| {
                keys[i].tenant.as_str() == tenant
                    && keys[i].channel.as_str() == channel
                    && keys[i].external_id == external
            }) {
                found[i] = Some(StoredCustomer {
                    id: row.get(0),
                    name: row.get(4),
                });
            }
        }
    }
    found
        .into_iter()
        .zip(keys)
        .map(|(f, k)| {
            f.ok_or_else(|| {
                anyhow::anyhow!("customer {:?} neither found nor created", k.external_id)
            })
        })
        .collect()
}

/// The open conversations of these customers, locked (in their id order): as
/// [`open_conversation`] finds them, for a whole batch.
pub async fn open_conversations(
    tx: &Transaction<'_>,
    customers: &[Uuid],
) -> anyhow::Result<Vec<Conversation>> {
    // Prepared anew for each batch (one plan per batch, not per message): a cached statement's
    // generic plan, made while the tables were small, read every customer and conversation
    // for each batch once they had grown (a hash join over two sequential scans, seen with
    // auto_explain in the benchmark: 24 ms a batch at 20,000 customers, against well under one).
    let find = tx
        .prepare(&format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations c JOIN customers cu ON cu.id = c.customer_id
             WHERE c.customer_id = ANY($1) AND c.state <> 'completed' ORDER BY c.id FOR UPDATE OF c"
        ))
        .await?;
    tx.query(&find, &[&customers])
        .await?
        .iter()
        .map(db::conversation_from_row)
        .collect()
}

/// A new conversation of a batch: its id and customer.
pub struct NewConversation {
    pub id: Uuid,
    pub customer_id: Uuid,
}

/// Opens conversations of one channel (as [`open_conversation`] does for a customer without
/// one) and writes their first history rows. Returns, per conversation in order, when it was
/// queued and its history row (id, time) for the event.
#[allow(clippy::type_complexity)]
pub async fn insert_conversations(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    channel: &ChannelId,
    state: ConversationState,
    settings: &ChannelSettings,
    new: &[NewConversation],
) -> anyhow::Result<Vec<(Option<DateTime<Utc>>, i64, DateTime<Utc>)>> {
    let ids: Vec<Uuid> = new.iter().map(|n| n.id).collect();
    let customers: Vec<Uuid> = new.iter().map(|n| n.customer_id).collect();
    let insert = tx
        .prepare_cached(
            "INSERT INTO conversations (id, tenant_id, channel_id, customer_id, state, required_skills, priority, bot_at, queued_at)
             SELECT n.id, $3, $4, n.customer_id, $5, $6, $7,
                    CASE WHEN $5 IN ('bot', 'script') THEN statement_timestamp() END,
                    CASE WHEN $5 = 'waiting' THEN statement_timestamp() END
             FROM unnest($1::uuid[], $2::uuid[]) AS n(id, customer_id)
             RETURNING id, queued_at",
        )
        .await?;
    let rows = tx
        .query(
            &insert,
            &[
                &ids,
                &customers,
                &tenant.as_str(),
                &channel.as_str(),
                &state.as_str(),
                &settings.required_skills.to_vec(),
                &settings.priority,
            ],
        )
        .await?;
    let queued: std::collections::HashMap<Uuid, Option<DateTime<Utc>>> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let history = tx
        .prepare_cached(
            "INSERT INTO conversation_transitions (conversation_id, from_state, to_state, agent_id, reason)
             SELECT id, NULL, $2, NULL, 'new_conversation' FROM unnest($1::uuid[]) WITH ORDINALITY AS n(id, i)
             ORDER BY i
             RETURNING conversation_id, id, at",
        )
        .await?;
    let recorded: std::collections::HashMap<Uuid, (i64, DateTime<Utc>)> = tx
        .query(&history, &[&ids, &state.as_str()])
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    ids.iter()
        .map(|id| {
            let (transition, at) = *recorded
                .get(id)
                .ok_or_else(|| anyhow::anyhow!("no history row for new conversation {id}"))?;
            Ok((queued.get(id).copied().flatten(), transition, at))
        })
        .collect()
}

/// A customer message of a batch, to store.
pub struct NewMessage<'a> {
    pub id: Uuid,
    pub conversation: &'a Conversation,
    pub inbound: &'a InboundMessage,
    pub routed_to: &'static str,
}

/// Stores a batch's customer messages in their order (as [`insert_customer_message`] does,
/// `created_at` the time of each row's insert). Returns how many were new: fewer than given
/// when one was stored already (a duplicate).
pub async fn insert_customer_messages(
    tx: &Transaction<'_>,
    messages: &[NewMessage<'_>],
) -> Result<u64, tokio_postgres::Error> {
    let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
    let tenants: Vec<&str> = messages
        .iter()
        .map(|m| m.conversation.tenant.as_str())
        .collect();
    let channels: Vec<&str> = messages
        .iter()
        .map(|m| m.conversation.channel.as_str())
        .collect();
    let conversations: Vec<Uuid> = messages.iter().map(|m| m.conversation.id).collect();
    let externals: Vec<&str> = messages
        .iter()
        .map(|m| m.inbound.message_id.as_str())
        .collect();
    let bodies: Vec<&str> = messages.iter().map(|m| m.inbound.text.as_str()).collect();
    let routes: Vec<&str> = messages.iter().map(|m| m.routed_to).collect();
    let sent: Vec<Option<DateTime<Utc>>> = messages.iter().map(|m| m.inbound.sent_at).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO messages (id, tenant_id, channel_id, conversation_id, external_id, author, body, routed_to, sent_at, created_at)
             SELECT id, tenant_id, channel_id, conversation_id, external_id, 'customer', body, routed_to, sent_at, clock_timestamp()
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::text[], $7::text[], $8::timestamptz[])
                  WITH ORDINALITY AS m(id, tenant_id, channel_id, conversation_id, external_id, body, routed_to, sent_at, i)
             ORDER BY i
             ON CONFLICT (tenant_id, channel_id, external_id) DO NOTHING",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &ids,
            &tenants,
            &channels,
            &conversations,
            &externals,
            &bodies,
            &routes,
            &sent,
        ],
    )
    .await
}
