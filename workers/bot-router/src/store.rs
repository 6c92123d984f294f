//! The bot-router's queries, and the in-memory caches of compiled bot content: a tenant's
//! keyword rules and knowledge base (rebuilt when `tenants.bot_config_version` moves, so every
//! instance sees a change at its next message) and published flow versions (immutable, kept).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deadpool_postgres::Transaction;
use firstline_shared::domain::{ChannelId, TenantId};
use firstline_shared::hours::{AfterHours, BusinessHours, Schedule};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::decide::TenantBot;
use crate::flow::FlowDef;
use crate::kb::{Article, KnowledgeBase};
use crate::keywords::{KeywordMatcher, KeywordRule, MatchKind, RuleReply};

/// A published flow version.
pub type FlowKey = (TenantId, String, i32);

#[derive(Default)]
pub struct Caches {
    tenants: Mutex<HashMap<TenantId, Arc<TenantBot>>>,
    flows: Mutex<HashMap<FlowKey, Arc<FlowDef>>>,
    /// One rebuild at a time: many partitions seeing a new version build it once.
    rebuild: tokio::sync::Mutex<()>,
}

impl Caches {
    /// The tenant's compiled rules and articles at `version`, loaded and built if the cache
    /// holds another version.
    pub async fn tenant(
        &self,
        tx: &Transaction<'_>,
        tenant: &TenantId,
        version: i64,
    ) -> anyhow::Result<Arc<TenantBot>> {
        let cached = || {
            self.tenants
                .lock()
                .expect("cache lock")
                .get(tenant)
                .filter(|b| b.version == version)
                .cloned()
        };
        if let Some(bot) = cached() {
            return Ok(bot);
        }
        let _one = self.rebuild.lock().await;
        if let Some(bot) = cached() {
            return Ok(bot);
        }
        let started = std::time::Instant::now();
        let rules = keyword_rules(tx, tenant).await?;
        let articles = articles(tx, tenant).await?;
        let (n_rules, n_articles) = (rules.len(), articles.len());
        let bot = tokio::task::spawn_blocking(move || {
            // Stored rules were checked when written; one that no longer passes is skipped
            // (and logged) rather than silencing the whole bot.
            let rules = rules
                .into_iter()
                .filter(|r| match r.check() {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!("skipping a stored keyword rule: {e}");
                        false
                    }
                })
                .collect();
            TenantBot {
                version,
                keywords: KeywordMatcher::new(rules).unwrap_or_else(|e| {
                    tracing::warn!("keyword rules unusable: {e}");
                    KeywordMatcher::new(Vec::new()).expect("no rules")
                }),
                kb: KnowledgeBase::new(articles),
            }
        })
        .await?;
        tracing::info!(
            tenant = %tenant,
            version,
            rules = n_rules,
            articles = n_articles,
            ms = started.elapsed().as_millis() as u64,
            "bot content loaded"
        );
        let bot = Arc::new(bot);
        self.tenants
            .lock()
            .expect("cache lock")
            .insert(tenant.clone(), bot.clone());
        Ok(bot)
    }

    /// A published version of a flow (`None`: the latest), with its number.
    pub async fn flow(
        &self,
        tx: &Transaction<'_>,
        tenant: &TenantId,
        flow: &str,
        version: Option<i32>,
    ) -> anyhow::Result<Option<(i32, Arc<FlowDef>)>> {
        if let Some(v) = version {
            let key = (tenant.clone(), flow.to_owned(), v);
            if let Some(def) = self.flows.lock().expect("cache lock").get(&key) {
                return Ok(Some((v, def.clone())));
            }
        }
        let stmt = tx
            .prepare_cached(
                "SELECT version, definition FROM flow_versions
                 WHERE tenant_id = $1 AND flow_id = $2 AND ($3::int IS NULL OR version = $3)
                 ORDER BY version DESC LIMIT 1",
            )
            .await?;
        let Some(row) = tx
            .query_opt(&stmt, &[&tenant.as_str(), &flow, &version])
            .await?
        else {
            return Ok(None);
        };
        let v: i32 = row.get(0);
        let def: FlowDef = serde_json::from_value(row.get(1))
            .map_err(|e| anyhow::anyhow!("stored flow {flow} version {v} is unreadable: {e}"))?;
        let def = Arc::new(def);
        self.flows
            .lock()
            .expect("cache lock")
            .insert((tenant.clone(), flow.to_owned(), v), def.clone());
        Ok(Some((v, def)))
    }
}

async fn keyword_rules(
    tx: &Transaction<'_>,
    tenant: &TenantId,
) -> anyhow::Result<Vec<KeywordRule>> {
    let rows = tx
        .query(
            "SELECT id, priority, match_kind, pattern, channels, reply FROM keyword_rules WHERE tenant_id = $1",
            &[&tenant.as_str()],
        )
        .await?;
    let mut rules = Vec::with_capacity(rows.len());
    for r in rows {
        let id: String = r.get(0);
        let kind = match r.get::<_, &str>(2) {
            "exact" => MatchKind::Exact,
            "contains" => MatchKind::Contains,
            _ => MatchKind::Regex,
        };
        let reply: RuleReply = match serde_json::from_value(r.get(5)) {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(rule = id, "skipping a stored keyword rule: reply: {e}");
                continue;
            }
        };
        rules.push(KeywordRule {
            id,
            priority: r.get(1),
            kind,
            pattern: r.get(3),
            channels: r
                .get::<_, Vec<String>>(4)
                .into_iter()
                .filter_map(|c| ChannelId::parse(c).ok())
                .collect(),
            reply,
        });
    }
    Ok(rules)
}

async fn articles(tx: &Transaction<'_>, tenant: &TenantId) -> anyhow::Result<Vec<Article>> {
    let rows = tx
        .query(
            "SELECT id, title, body, tags FROM kb_articles WHERE tenant_id = $1 ORDER BY id",
            &[&tenant.as_str()],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| Article {
            id: r.get(0),
            title: r.get(1),
            body: r.get(2),
            tags: r.get(3),
        })
        .collect())
}

/// What the bot needs of a channel.
pub struct ChannelBot {
    pub welcome_flow: Option<String>,
    pub hours: Option<Schedule>,
    pub after_hours: AfterHours,
}

pub async fn channel(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    channel: &ChannelId,
) -> anyhow::Result<ChannelBot> {
    let stmt = tx
        .prepare_cached(
            "SELECT welcome_flow, business_hours FROM channels WHERE tenant_id = $1 AND id = $2",
        )
        .await?;
    let row = tx
        .query_opt(&stmt, &[&tenant.as_str(), &channel.as_str()])
        .await?
        .ok_or_else(|| anyhow::anyhow!("channel {channel} of tenant {tenant} is gone"))?;
    let hours: Option<BusinessHours> = row
        .get::<_, Option<Value>>(1)
        .and_then(|v| serde_json::from_value(v).ok());
    let after_hours = hours
        .as_ref()
        .map(|h| h.after_hours_handover)
        .unwrap_or_default();
    let hours = hours.and_then(|h| match h.compile() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(channel = %channel, "ignoring stored business hours: {e}");
            None
        }
    });
    Ok(ChannelBot {
        welcome_flow: row.get(0),
        hours,
        after_hours,
    })
}

/// A conversation's place in its flow.
pub struct FlowState {
    pub flow: Option<(String, i32)>,
    pub step: Option<String>,
    pub vars: Map<String, Value>,
}

pub async fn flow_state(tx: &Transaction<'_>, conversation: Uuid) -> anyhow::Result<FlowState> {
    let stmt = tx
        .prepare_cached(
            "SELECT flow_id, flow_version, flow_step, flow_vars FROM conversations WHERE id = $1",
        )
        .await?;
    let row = tx.query_one(&stmt, &[&conversation]).await?;
    let flow = match (
        row.get::<_, Option<String>>(0),
        row.get::<_, Option<i32>>(1),
    ) {
        (Some(f), Some(v)) => Some((f, v)),
        _ => None,
    };
    let vars = match row.get::<_, Value>(3) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    Ok(FlowState {
        flow,
        step: row.get(2),
        vars,
    })
}

/// Stores the conversation's flow position (`None`: out of any flow) and marks it active.
pub async fn save_flow(
    tx: &Transaction<'_>,
    conversation: Uuid,
    flow: Option<(&str, i32)>,
    step: Option<&str>,
    vars: &Map<String, Value>,
) -> anyhow::Result<()> {
    let stmt = tx
        .prepare_cached(
            "UPDATE conversations SET flow_id = $2, flow_version = $3, flow_step = $4, flow_vars = $5,
                 bot_active_at = statement_timestamp()
             WHERE id = $1",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &conversation,
            &flow.map(|f| f.0),
            &flow.map(|f| f.1),
            &step,
            &Value::Object(vars.clone()),
        ],
    )
    .await?;
    Ok(())
}

/// Marks the conversation active with the bot now (idle completion counts from here). A mark
/// less than a second old is left as it is: idle completion is counted in seconds
/// (`bot_idle_seconds`), and a conversation's first answer (marked when ingest opened it) or a
/// quick exchange then costs no new row version, nor an index entry in `conversations_bot_idle`.
pub async fn touch(tx: &Transaction<'_>, conversation: Uuid) -> anyhow::Result<()> {
    let stmt = tx
        .prepare_cached(
            "UPDATE conversations SET bot_active_at = statement_timestamp()
             WHERE id = $1 AND bot_active_at < statement_timestamp() - interval '1 second'",
        )
        .await?;
    tx.execute(&stmt, &[&conversation]).await?;
    Ok(())
}

/// Marks the customer message handled: `None` if it already was (a redelivery), else whether
/// the conversation's activity mark is a second old or more, so that [`touch`] runs only when
/// it would change something (one statement answers both; the conversation is locked).
pub async fn claim_message(
    tx: &Transaction<'_>,
    message: Uuid,
    conversation: Uuid,
) -> anyhow::Result<Option<bool>> {
    let stmt = tx
        .prepare_cached(
            "UPDATE messages SET bot_handled_at = statement_timestamp()
             WHERE id = $1 AND bot_handled_at IS NULL
             RETURNING coalesce((SELECT bot_active_at < statement_timestamp() - interval '1 second'
                                 FROM conversations WHERE id = $2), true)",
        )
        .await?;
    Ok(tx
        .query_opt(&stmt, &[&message, &conversation])
        .await?
        .map(|r| r.get(0)))
}

/// Sets the skills a hand-over asks for (SPEC D4): the conversation no longer follows its
/// channel's.
pub async fn require_skills(
    tx: &Transaction<'_>,
    conversation: Uuid,
    skills: &firstline_shared::domain::SkillSet,
) -> anyhow::Result<()> {
    let stmt = tx
        .prepare_cached(
            "UPDATE conversations SET required_skills = $2, skills_from_channel = false WHERE id = $1",
        )
        .await?;
    tx.execute(&stmt, &[&conversation, &skills.to_vec()])
        .await?;
    Ok(())
}

/// SPEC D10: a flow's condition step set the conversation's assignment weight.
pub async fn set_weight(
    tx: &Transaction<'_>,
    conversation: Uuid,
    weight: i32,
) -> anyhow::Result<()> {
    let stmt = tx
        .prepare_cached("UPDATE conversations SET weight = $2 WHERE id = $1")
        .await?;
    tx.execute(&stmt, &[&conversation, &weight]).await?;
    Ok(())
}

/// Conversations with the bot idle past their channel's `bot_idle_seconds`, locked (others
/// skipped: another instance or a message handler has them).
pub async fn idle_conversations(
    tx: &Transaction<'_>,
    limit: i64,
) -> anyhow::Result<Vec<(TenantId, Uuid)>> {
    let rows = tx
        .query(
            "SELECT c.tenant_id, c.id FROM conversations c
             JOIN channels ch ON ch.tenant_id = c.tenant_id AND ch.id = c.channel_id
             WHERE c.state IN ('bot', 'script') AND ch.bot_idle_seconds IS NOT NULL
               AND c.bot_active_at < statement_timestamp() - make_interval(secs => ch.bot_idle_seconds)
             ORDER BY c.bot_active_at
             LIMIT $1
             FOR UPDATE OF c SKIP LOCKED",
            &[&limit],
        )
        .await?;
    rows.into_iter()
        .map(|r| Ok((TenantId::parse(r.get::<_, String>(0))?, r.get(1))))
        .collect()
}
