//! Postgres: the pool, the migrations, and the queries several workers share (loading a
//! conversation, recording a state transition with its event). Each worker keeps its own
//! queries in its own `db` module.

use std::str::FromStr;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction};
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::config::CommonConfig;
use crate::domain::{AgentId, ChannelId, ConversationState, SkillSet, TenantId};
use crate::outbox::Outbox;
use crate::service_level::{QueueEnd, QueuedConversation};
use crate::subjects;
use crate::wire::{Author, Delivery, OutboundMessage, QuickReply, Version};

mod transition;
pub use transition::{stage_event, transition, transition_ending, Transition};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// A connection pool. Connections are opened lazily and re-opened after a Postgres restart.
pub fn pool(config: &CommonConfig) -> anyhow::Result<Pool> {
    let mut pg: tokio_postgres::Config = config
        .database_url
        .parse()
        .context("parsing the database URL")?;
    // Appended to what the URL's own `options` say, so that those still apply.
    let options = format!(
        "{} -c plan_cache_mode={}",
        pg.get_options().unwrap_or_default(),
        config.db_plan_cache_mode
    );
    pg.options(options.trim_start());
    // `pg_stat_activity` (and a profile of Postgres's CPU by backend) tells the workers apart
    // by the program's name, unless the URL names the connections itself.
    if pg.get_application_name().is_none() {
        if let Some(name) = program_name() {
            pg.application_name(&name);
        }
    }
    let manager = deadpool_postgres::Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.db_pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(std::time::Duration::from_secs(10)))
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .build()
        .context("building the Postgres pool")
}

/// The running program's file name (`firstline-ingest`...), for `application_name`.
fn program_name() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.file_stem()?.to_str()?.to_owned())
}

/// Applies the migrations in `shared/migrations/`, once even when several processes start
/// together (a session advisory lock on a dedicated connection, closed afterwards).
pub async fn migrate(database_url: &str) -> anyhow::Result<()> {
    let (mut client, connection) = tokio_postgres::connect(database_url, NoTls)
        .await
        .context("connecting to Postgres to migrate")?;
    let conn = tokio::spawn(connection);
    client
        .execute("SELECT pg_advisory_lock(7254460001)", &[])
        .await?;
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .context("running migrations")?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "migration applied");
    }
    drop(client);
    let _ = conn.await;
    Ok(())
}

/// Creates the database named in `database_url` if it does not exist (the demo and tests).
pub async fn create_database_if_missing(database_url: &str) -> anyhow::Result<()> {
    let config: tokio_postgres::Config = database_url.parse()?;
    let name = config
        .get_dbname()
        .context("the database URL names no database")?
        .to_owned();
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, connection) = admin
        .connect(NoTls)
        .await
        .context("connecting to Postgres")?;
    tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        if let Err(e) = client
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await
        {
            // Another process may have created it meanwhile.
            if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) {
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// A tenant's settings.
#[derive(Clone, Debug)]
pub struct TenantSettings {
    pub id: TenantId,
    /// SPEC D8.
    pub dispatch_cycle_seconds: i32,
    /// SPEC D1.
    pub offer_limit: i32,
    pub handover_keywords: Vec<String>,
    /// What the bot says when nothing matches.
    pub bot_reply: String,
    pub handover_reply: String,
    /// A knowledge-base article answers when its score reaches this.
    pub kb_min_score: f64,
    /// Moves with every change of keyword rules, articles or published flows.
    pub bot_config_version: i64,
    /// The dispatcher's: `assigning` conversations without an open offer may exist (V6).
    pub orphans_possible: bool,
}

pub const TENANT_SETTINGS: &str =
    "SELECT dispatch_cycle_seconds, offer_limit, handover_keywords, bot_reply, handover_reply,
            kb_min_score, bot_config_version, orphans_possible
     FROM tenants WHERE id = $1";

pub async fn tenant_settings(
    client: &impl deadpool_postgres::GenericClient,
    tenant: &TenantId,
) -> Result<Option<TenantSettings>, tokio_postgres::Error> {
    let stmt = client.prepare_cached(TENANT_SETTINGS).await?;
    let row = client.query_opt(&stmt, &[&tenant.as_str()]).await?;
    Ok(row.map(|r| TenantSettings {
        id: tenant.clone(),
        dispatch_cycle_seconds: r.get(0),
        offer_limit: r.get(1),
        handover_keywords: r.get(2),
        bot_reply: r.get(3),
        handover_reply: r.get(4),
        kb_min_score: f64::from(r.get::<_, f32>(5)),
        bot_config_version: r.get(6),
        orphans_possible: r.get(7),
    }))
}

/// SPEC D8: the dispatch cycles a tenant may set, in seconds.
pub const DISPATCH_CYCLE_SECONDS: std::ops::RangeInclusive<i32> = 5..=86_400;
/// SPEC D1: the offer limits a tenant may set.
pub const OFFER_LIMIT: std::ops::RangeInclusive<i32> = 1..=50;
/// SPEC SL: the service-level thresholds T a tenant may set, in seconds (default 20).
pub const SERVICE_LEVEL_SECONDS: std::ops::RangeInclusive<i32> = 1..=3600;

/// A change of a tenant's settings: a field left `None` keeps its stored value. Callers check
/// the values first (each names the problem its own way).
#[derive(Clone, Debug, Default)]
pub struct TenantSettingsPatch {
    pub name: Option<String>,
    /// SPEC D8, in [`DISPATCH_CYCLE_SECONDS`].
    pub dispatch_cycle_seconds: Option<i32>,
    /// SPEC D1, in [`OFFER_LIMIT`].
    pub offer_limit: Option<i32>,
    /// SPEC L4: whole messages that hand over to an agent.
    pub handover_keywords: Option<Vec<String>>,
    /// What the bot says when nothing matches.
    pub bot_reply: Option<String>,
    pub handover_reply: Option<String>,
    /// A knowledge-base article answers when its score reaches this (0..1].
    pub kb_min_score: Option<f32>,
    /// SPEC SL: the threshold T, in [`SERVICE_LEVEL_SECONDS`].
    pub service_level_seconds: Option<i32>,
    /// The customer's place in line ([`crate::place_in_line`]): what a waiting customer asks
    /// with, and the texts told (with `{position}`, `{minutes}`).
    pub queue_position_keywords: Option<Vec<String>>,
    pub queue_position_reply: Option<String>,
    pub queue_position_reply_no_estimate: Option<String>,
    /// SPEC D11: the last agent who served a customer counts as responsible when none is set.
    pub last_agent_responsible: Option<bool>,
}

/// The one writer of a tenant's settings (the API's `PATCH /api/v1/settings`,
/// `firstline configure` and `firstline bot load` all call it). Returns the rows changed:
/// 0 when the tenant does not exist.
pub async fn update_tenant_settings(
    client: &impl tokio_postgres::GenericClient,
    tenant: &TenantId,
    patch: &TenantSettingsPatch,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE tenants SET
                 name = coalesce($2, name),
                 dispatch_cycle_seconds = coalesce($3, dispatch_cycle_seconds),
                 offer_limit = coalesce($4, offer_limit),
                 handover_keywords = coalesce($5, handover_keywords),
                 bot_reply = coalesce($6, bot_reply),
                 handover_reply = coalesce($7, handover_reply),
                 kb_min_score = coalesce($8, kb_min_score),
                 service_level_seconds = coalesce($9, service_level_seconds),
                 queue_position_keywords = coalesce($10, queue_position_keywords),
                 queue_position_reply = coalesce($11, queue_position_reply),
                 queue_position_reply_no_estimate = coalesce($12, queue_position_reply_no_estimate),
                 last_agent_responsible = coalesce($13, last_agent_responsible)
             WHERE id = $1",
            &[
                &tenant.as_str(),
                &patch.name,
                &patch.dispatch_cycle_seconds,
                &patch.offer_limit,
                &patch.handover_keywords,
                &patch.bot_reply,
                &patch.handover_reply,
                &patch.kb_min_score,
                &patch.service_level_seconds,
                &patch.queue_position_keywords,
                &patch.queue_position_reply,
                &patch.queue_position_reply_no_estimate,
                &patch.last_agent_responsible,
            ],
        )
        .await
}

/// A conversation with what events and notifications need to say about it.
#[derive(Clone, Debug)]
pub struct Conversation {
    pub id: Uuid,
    pub tenant: TenantId,
    pub channel: ChannelId,
    pub customer_id: Uuid,
    pub customer_external_id: String,
    pub customer_name: Option<String>,
    pub state: ConversationState,
    pub agent_id: Option<AgentId>,
    pub required_skills: SkillSet,
    pub queued_at: Option<DateTime<Utc>>,
}

/// The columns [`conversation_from_row`] reads, with `c` the conversation and `cu` its customer.
pub const CONVERSATION_COLUMNS: &str =
    "c.id, c.tenant_id, c.channel_id, c.customer_id, cu.external_id, cu.display_name,
     c.state, c.agent_id, c.required_skills, c.queued_at";

pub fn conversation_from_row(row: &tokio_postgres::Row) -> anyhow::Result<Conversation> {
    Ok(Conversation {
        id: row.get(0),
        tenant: TenantId::parse(row.get::<_, String>(1))?,
        channel: ChannelId::parse(row.get::<_, String>(2))?,
        customer_id: row.get(3),
        customer_external_id: row.get(4),
        customer_name: row.get(5),
        state: ConversationState::from_str(row.get(6))?,
        agent_id: row
            .get::<_, Option<String>>(7)
            .map(AgentId::parse)
            .transpose()?,
        required_skills: SkillSet::new(row.get::<_, Vec<String>>(8)),
        queued_at: row.get(9),
    })
}

/// Locks `ids`' conversations (those that exist) in the order of their ids, in one statement:
/// a batch's first lock, taken before its messages lock them one by one (each lane in its own
/// order), so that two workers' batches over the same conversations (ingest's and the
/// bot-router's, group commit) wait for each other instead of deadlocking (issue 22: a
/// deadlock cost a second, `deadlock_timeout`, and the batch).
pub async fn lock_conversations_in_order(
    tx: &Transaction<'_>,
    ids: &[Uuid],
) -> Result<(), tokio_postgres::Error> {
    if ids.len() < 2 {
        return Ok(());
    }
    let stmt = tx
        .prepare_cached(
            "SELECT id FROM conversations WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
        )
        .await?;
    tx.execute(&stmt, &[&ids]).await?;
    Ok(())
}

/// Loads a conversation of `tenant` and locks its row until the transaction ends, so that
/// two handlers never change one conversation at once. `FOR NO KEY UPDATE` (no handler changes
/// a conversation's id): it excludes every other handler's lock as `FOR UPDATE` does, but not
/// the `FOR KEY SHARE` of the foreign-key checks of rows inserted for the conversation
/// (messages, transitions) by another worker's transaction, which `FOR UPDATE` made wait for
/// the whole batch (issue 22: a lock convoy between ingest and the bot-router).
pub async fn conversation_for_update(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    id: Uuid,
) -> anyhow::Result<Option<Conversation>> {
    let sql = format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations c JOIN customers cu ON cu.id = c.customer_id
         WHERE c.id = $1 AND c.tenant_id = $2 FOR NO KEY UPDATE OF c"
    );
    let stmt = tx.prepare_cached(&sql).await?;
    tx.query_opt(&stmt, &[&id, &tenant.as_str()])
        .await?
        .map(|r| conversation_from_row(&r))
        .transpose()
}

impl Conversation {
    /// Whether `agent` is serving it (`processing` with them): only they may reply, close or
    /// transfer it.
    pub fn is_served_by(&self, agent: &AgentId) -> bool {
        self.state == ConversationState::Processing && self.agent_id.as_ref() == Some(agent)
    }

    /// Why an action that needs [`Conversation::is_served_by`] is refused.
    pub fn not_served_reason(&self) -> String {
        format!(
            "you are not serving this conversation (it is {})",
            self.state
        )
    }
}

/// What the bot (or the survey) says to a customer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BotSays {
    pub text: String,
    pub buttons: Vec<QuickReply>,
    pub image_url: Option<String>,
}

impl BotSays {
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            ..Self::default()
        }
    }
}

/// Stores a bot message in the conversation and stages it for the customer's channel. Its
/// `created_at` is the insert's time, as a customer message's is: a reply in the transaction
/// that stored the customer's message (the place in line, a survey's thanks) sorts after it.
/// `external_id` makes it idempotent: `false` if a message with that id is already stored
/// (a redelivery of what caused it).
pub async fn send_bot_message(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    conversation: &Conversation,
    external_id: &str,
    says: &BotSays,
) -> anyhow::Result<bool> {
    let id = Uuid::now_v7();
    let attachments = (!says.buttons.is_empty() || says.image_url.is_some())
        .then(|| serde_json::json!({ "buttons": says.buttons, "image_url": says.image_url }));
    let stmt = tx
        .prepare_cached(
            "INSERT INTO messages (id, tenant_id, channel_id, conversation_id, external_id, author, body, attachments, created_at)
             VALUES ($1, $2, $3, $4, $5, 'bot', $6, $7, clock_timestamp())
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
                &external_id,
                &says.text,
                &attachments,
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
                text: says.text.clone(),
                buttons: says.buttons.clone(),
                image_url: says.image_url.clone(),
                at: row.get(0),
            },
        },
    );
    Ok(true)
}

/// SPEC SL: the conversations of `tenant` queued in `[start, end)`, one row each, read by an
/// index-only scan of `conversations_service_level` (V14).
pub const QUEUED_BETWEEN: &str =
    "SELECT channel_id, queued_at, accepted_at, completed_at FROM conversations
     WHERE tenant_id = $1 AND queued_at >= $2 AND queued_at < $3 AND queued_at IS NOT NULL";

/// The rows of [`QUEUED_BETWEEN`], with how each wait ended: the first accept, else the
/// completion (it left the queue without an agent), else still waiting.
pub async fn queued_between(
    client: &impl deadpool_postgres::GenericClient,
    tenant: &TenantId,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Vec<QueuedConversation>, tokio_postgres::Error> {
    let stmt = client.prepare_cached(QUEUED_BETWEEN).await?;
    let rows = client
        .query(&stmt, &[&tenant.as_str(), &start, &end])
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let accepted: Option<DateTime<Utc>> = r.get(2);
            let completed: Option<DateTime<Utc>> = r.get(3);
            QueuedConversation {
                channel: r.get(0),
                queued_at: r.get(1),
                end: match (accepted, completed) {
                    (Some(at), _) => QueueEnd::Accepted(at),
                    (None, Some(at)) => QueueEnd::Left(at),
                    (None, None) => QueueEnd::Waiting,
                },
            }
        })
        .collect())
}
