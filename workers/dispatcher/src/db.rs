//! The dispatcher's queries. Every function runs inside the transaction that holds the
//! tenant's advisory lock ([`lock_tenant`]).

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use firstline_shared::db::{conversation_from_row, Conversation, CONVERSATION_COLUMNS};
use firstline_shared::domain::{AgentId, ConversationState, SkillSet, TenantId};
use firstline_shared::wire::AgentPresence;
use uuid::Uuid;

use crate::plan::{AgentLoad, Candidate, PlannedOffer};

const LOCK_TENANT: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 7254460002))";

/// Prepares (in one round trip, and only once per connection) the statements a transaction
/// and its pass send together: the lock with the settings read, then the expiry with the
/// reads of the agents, orphans and queue classes. Once prepared, a statement goes out when
/// its future is first polled, so `futures::join!` sends them in its order, and the
/// connection runs them in that order: the expiry before the counts and orphans that depend
/// on it, the lock before anything else.
pub async fn prepare_pipelined(tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    futures::future::try_join_all(
        [
            LOCK_TENANT,
            firstline_shared::db::TENANT_SETTINGS,
            EXPIRE_DUE_OFFERS,
            READY_AGENTS,
            ORPHANED_ASSIGNING,
            crate::queue::WAITING_CLASSES,
        ]
        .map(|sql| tx.prepare_cached(sql)),
    )
    .await
    .map(|_| ())
}

/// DESIGN.md: one writer per tenant. Held until the transaction ends; other tenants
/// dispatch in parallel on other connections or instances.
pub async fn lock_tenant(
    tx: &Transaction<'_>,
    tenant: &TenantId,
) -> Result<(), tokio_postgres::Error> {
    let stmt = tx.prepare_cached(LOCK_TENANT).await?;
    tx.execute(&stmt, &[&tenant.as_str()]).await?;
    Ok(())
}

/// Applies a presence message unless a later one (received later by the server) was
/// applied already. The agent is created on first presence. Returns whether it was applied.
pub async fn apply_presence(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    agent: &AgentId,
    presence: &AgentPresence,
    published: DateTime<Utc>,
) -> Result<bool, tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO agents AS a (tenant_id, id, display_name, skills, capacity, status, status_reason, presence_at)
             VALUES ($1, $2, coalesce($3::text, ''), coalesce($4::text[], '{}'), coalesce($5::int, 10), $6, $7, $8)
             ON CONFLICT (tenant_id, id) DO UPDATE SET
                 display_name = coalesce($3, a.display_name),
                 skills = coalesce($4, a.skills),
                 capacity = coalesce($5, a.capacity),
                 status = $6,
                 status_reason = $7,
                 status_since = CASE WHEN a.status = $6 THEN a.status_since ELSE now() END,
                 idle_since = CASE WHEN a.status <> 'ready' AND $6 = 'ready' THEN now() ELSE a.idle_since END,
                 presence_at = $8
             WHERE a.presence_at <= $8
             RETURNING 1",
        )
        .await?;
    let skills = presence.skills.as_ref().map(SkillSet::to_vec);
    let capacity = presence.capacity.map(|c| c.min(1000) as i32);
    let rows = tx
        .query(
            &stmt,
            &[
                &tenant.as_str(),
                &agent.as_str(),
                &presence.display_name,
                &skills,
                &capacity,
                &presence.status.as_str(),
                &presence.reason,
                &published,
            ],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// Ends the open offer of `conversation` to `agent` as `status` (`accepted`, `declined`)
/// and returns it with when it was made; `None` if there is none. One statement: it is sent
/// together with the conversation's lock (both are answered in order).
pub async fn end_open_offer(
    tx: &Transaction<'_>,
    conversation: Uuid,
    agent: &AgentId,
    status: &str,
    reason: &str,
) -> Result<Option<(Uuid, DateTime<Utc>)>, tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached(
            "UPDATE offers SET status = $3, ended_at = statement_timestamp(), end_reason = $4
             WHERE conversation_id = $1 AND agent_id = $2 AND status = 'open'
             RETURNING id, created_at",
        )
        .await?;
    Ok(tx
        .query_opt(&stmt, &[&conversation, &agent.as_str(), &status, &reason])
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// Open conversations by tenant and state, for the `fl_conversations` gauge.
pub async fn conversation_counts(
    client: &impl GenericClient,
) -> Result<Vec<(String, String, i64)>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT tenant_id, state, count(*) FROM conversations WHERE state <> 'completed' GROUP BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// An offer whose dispatch cycle ran out.
pub struct ExpiredOffer {
    pub offer_id: Uuid,
    pub conversation_id: Uuid,
    pub agent: AgentId,
}

const EXPIRE_DUE_OFFERS: &str = "UPDATE offers SET status = 'expired', ended_at = statement_timestamp(), end_reason = 'dispatch cycle elapsed'
             WHERE tenant_id = $1 AND status = 'open' AND deadline <= statement_timestamp()
             RETURNING id, conversation_id, agent_id";

/// SPEC D8: ends the tenant's open offers whose deadline has passed.
pub async fn expire_due_offers(
    tx: &Transaction<'_>,
    tenant: &TenantId,
) -> anyhow::Result<Vec<ExpiredOffer>> {
    let stmt = tx.prepare_cached(EXPIRE_DUE_OFFERS).await?;
    tx.query(&stmt, &[&tenant.as_str()])
        .await?
        .iter()
        .map(|r| {
            Ok(ExpiredOffer {
                offer_id: r.get(0),
                conversation_id: r.get(1),
                agent: AgentId::parse(r.get::<_, String>(2))?,
            })
        })
        .collect()
}

// The counts are computed once each (MATERIALIZED): on a young table whose statistics say
// "1 row", the planner otherwise re-ran both per agent (a nested loop: 29 ms a pass with 100
// agents, seen in the e2e benchmark).
const READY_AGENTS: &str =
    "WITH p AS MATERIALIZED (SELECT agent_id, count(*) AS n FROM conversations
                         WHERE tenant_id = $1 AND state = 'processing' GROUP BY agent_id),
                  o AS MATERIALIZED (SELECT agent_id, count(*) AS n FROM offers
                         WHERE tenant_id = $1 AND status = 'open' GROUP BY agent_id)
             SELECT a.id, a.capacity, a.skills, a.idle_since, coalesce(p.n, 0), coalesce(o.n, 0)
             FROM agents a
             LEFT JOIN p ON p.agent_id = a.id
             LEFT JOIN o ON o.agent_id = a.id
             WHERE a.tenant_id = $1 AND a.status = 'ready'";

/// The tenant's online and ready agents with their load (the only ones with places, D3).
pub async fn ready_agents(
    tx: &Transaction<'_>,
    tenant: &TenantId,
) -> anyhow::Result<Vec<AgentLoad>> {
    let stmt = tx.prepare_cached(READY_AGENTS).await?;
    tx.query(&stmt, &[&tenant.as_str()])
        .await?
        .iter()
        .map(|r| {
            Ok(AgentLoad {
                id: AgentId::parse(r.get::<_, String>(0))?,
                ready: true,
                capacity: r.get::<_, i32>(1).max(0) as u32,
                skills: SkillSet::new(r.get::<_, Vec<String>>(2)),
                idle_since: r.get(3),
                processing: r.get::<_, i64>(4) as u32,
                open_offers: r.get::<_, i64>(5) as u32,
            })
        })
        .collect()
}

/// The columns [`candidate_from_row`] reads, with `c` the conversation.
macro_rules! candidate_columns {
    () => {
        "c.id, c.required_skills, c.weight, c.queued_at, c.excluded_agents, c.responsible_agent"
    };
}
pub(crate) const CANDIDATE_COLUMNS: &str = candidate_columns!();

pub(crate) fn candidate_from_row(r: &tokio_postgres::Row) -> anyhow::Result<Candidate> {
    let agent = |id: String| AgentId::parse(id).map_err(anyhow::Error::from);
    Ok(Candidate {
        conversation_id: r.get(0),
        required_skills: SkillSet::new(r.get::<_, Vec<String>>(1)),
        weight: r.get(2),
        queued_at: r.get(3),
        declined_by: r
            .get::<_, Vec<String>>(4)
            .into_iter()
            .map(agent)
            .collect::<anyhow::Result<_>>()?,
        expired_for: Vec::new(),
        responsible: r.get::<_, Option<String>>(5).map(agent).transpose()?,
        responsible_only: false,
    })
}

const ORPHANED_ASSIGNING: &str = concat!(
    "SELECT ",
    candidate_columns!(),
    " FROM conversations c
     WHERE c.tenant_id = $1 AND c.state = 'assigning'
       AND NOT EXISTS (SELECT 1 FROM offers o
                       WHERE o.conversation_id = c.id AND o.status = 'open' OFFSET 0)"
);

/// `assigning` conversations without an open offer: their offer expired and nobody took
/// them yet (SPEC D7/D8). Few; all of them are candidates of every pass.
///
/// `OFFSET 0` keeps the `NOT EXISTS` a probe of `offers_one_open_per_conversation` per
/// assigning conversation. As an anti join, the plan cached for the prepared statement while
/// the tables were small (a nested loop re-reading every open offer for each conversation)
/// cost 9 ms a pass at 300 assigning conversations and 900 open offers, against 0.6 ms.
pub async fn orphaned_assigning(
    tx: &Transaction<'_>,
    tenant: &TenantId,
) -> anyhow::Result<Vec<Candidate>> {
    let stmt = tx.prepare_cached(ORPHANED_ASSIGNING).await?;
    tx.query(&stmt, &[&tenant.as_str()])
        .await?
        .iter()
        .map(candidate_from_row)
        .collect()
}

/// Marks whether the tenant may have orphaned `assigning` conversations (V6); written only
/// when it changes.
pub async fn set_orphans_possible(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    possible: bool,
) -> Result<(), tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached("UPDATE tenants SET orphans_possible = $2 WHERE id = $1")
        .await?;
    tx.execute(&stmt, &[&tenant.as_str(), &possible]).await?;
    Ok(())
}

/// Fills in who declined each candidate and whose offer of it expired.
pub async fn attach_offer_history(
    tx: &Transaction<'_>,
    queue: &mut [Candidate],
) -> anyhow::Result<()> {
    if queue.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = queue.iter().map(|c| c.conversation_id).collect();
    let stmt = tx
        .prepare_cached(
            "SELECT conversation_id, agent_id, status FROM offers
             WHERE conversation_id = ANY($1) AND status IN ('declined', 'expired')",
        )
        .await?;
    let rows = tx.query(&stmt, &[&ids]).await?;
    if rows.is_empty() {
        return Ok(());
    }
    let index: std::collections::HashMap<Uuid, usize> =
        ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    for r in rows {
        let c = &mut queue[index[&r.get::<_, Uuid>(0)]];
        let agent = AgentId::parse(r.get::<_, String>(1))?;
        match r.get::<_, &str>(2) {
            "declined" => c.declined_by.push(agent),
            _ => c.expired_for.push(agent),
        }
    }
    Ok(())
}

/// A conversation just offered, with what its event and the agent's notification say.
pub struct Offered {
    pub offer_id: Uuid,
    pub agent: AgentId,
    pub conversation: Conversation,
    /// `waiting`, or `assigning` for a re-dispatch after an expired offer.
    pub from: ConversationState,
    pub transition_id: i64,
    pub at: DateTime<Utc>,
    pub deadline: DateTime<Utc>,
}

/// Writes the planned offers in a handful of statements: conversations to `assigning`, the
/// offers (checked row by row by the D1 trigger and the one-open-offer index), their history
/// rows, and the agents' idle time. A conversation that left the queue meanwhile is skipped.
pub async fn write_offers(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    cycle_seconds: i32,
    planned: &[PlannedOffer],
) -> anyhow::Result<Vec<Offered>> {
    if planned.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = planned.iter().map(|p| p.conversation_id).collect();
    // The rows are found by primary key and their state checked after: with the state in the
    // scan, the generic plan (statistics in which waiting and assigning are rare) read every
    // open conversation through `conversations_one_open_per_customer` and filtered the ids,
    // 1.6 ms a pass at 2,000 msgs/s, growing with the open conversations.
    let moved = tx
        .prepare_cached(&format!(
            "WITH old AS (
                 SELECT {CONVERSATION_COLUMNS} FROM conversations c JOIN customers cu ON cu.id = c.customer_id
                 WHERE c.id = ANY($2) AND c.tenant_id = $1
                 FOR NO KEY UPDATE OF c)
             UPDATE conversations c SET state = 'assigning', agent_id = NULL, assigning_at = now(), updated_at = now()
             FROM old WHERE c.id = old.id AND old.state IN ('waiting', 'assigning')
             RETURNING old.*"
        ))
        .await?;
    let rows = tx.query(&moved, &[&tenant.as_str(), &ids]).await?;
    let mut conversations: std::collections::HashMap<Uuid, Conversation> = rows
        .iter()
        .map(|r| conversation_from_row(r).map(|c| (c.id, c)))
        .collect::<anyhow::Result<_>>()?;
    let planned: Vec<&PlannedOffer> = planned
        .iter()
        .filter(|p| conversations.contains_key(&p.conversation_id))
        .collect();
    let offer_ids: Vec<Uuid> = planned.iter().map(|_| Uuid::now_v7()).collect();
    let conv_ids: Vec<Uuid> = planned.iter().map(|p| p.conversation_id).collect();
    let agents: Vec<&str> = planned.iter().map(|p| p.agent.as_str()).collect();
    let froms: Vec<&str> = planned
        .iter()
        .map(|p| conversations[&p.conversation_id].state.as_str())
        .collect();
    let reasons: Vec<&str> = froms
        .iter()
        .map(|f| {
            if *f == "waiting" {
                "offered"
            } else {
                "reoffered"
            }
        })
        .collect();
    if planned.is_empty() {
        return Ok(Vec::new());
    }
    // The offers, their history rows and the agents' idle times in one round trip: prepared
    // first, they go out in this order (the offers' D1 check first: if it fails, the others
    // fail as aborted and its error is the one returned).
    let insert = tx
        .prepare_cached(
            "INSERT INTO offers (id, tenant_id, conversation_id, agent_id, created_at, deadline)
             SELECT o.id, $1, o.conversation_id, o.agent_id, statement_timestamp(),
                    statement_timestamp() + make_interval(secs => $5)
             FROM unnest($2::uuid[], $3::uuid[], $4::text[]) AS o(id, conversation_id, agent_id)
             RETURNING deadline",
        )
        .await?;
    let history = tx
        .prepare_cached(
            "INSERT INTO conversation_transitions (conversation_id, from_state, to_state, agent_id, reason)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
             RETURNING conversation_id, id, at",
        )
        .await?;
    let touch = tx
        .prepare_cached(
            "UPDATE agents SET idle_since = now() WHERE tenant_id = $1 AND id = ANY($2)",
        )
        .await?;
    let to: Vec<&str> = vec!["assigning"; planned.len()];
    let cycle = f64::from(cycle_seconds);
    let tenant_id = tenant.as_str();
    let insert_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&tenant_id, &offer_ids, &conv_ids, &agents, &cycle];
    let history_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&conv_ids, &froms, &to, &agents, &reasons];
    let touch_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&tenant_id, &agents];
    let (inserted, written, touched) = futures::join!(
        tx.query(&insert, &insert_params),
        tx.query(&history, &history_params),
        tx.execute(&touch, &touch_params)
    );
    let (inserted, written, _) = (inserted?, written?, touched?);
    let Some(deadline) = inserted.first().map(|r| r.get::<_, DateTime<Utc>>(0)) else {
        anyhow::bail!("the offers were not written");
    };
    let mut transitions: std::collections::HashMap<Uuid, (i64, DateTime<Utc>)> = written
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut offered = Vec::with_capacity(planned.len());
    for (p, offer_id) in planned.into_iter().zip(offer_ids) {
        let conversation = conversations
            .remove(&p.conversation_id)
            .expect("moved above");
        let (transition_id, at) = transitions
            .remove(&p.conversation_id)
            .expect("history written above");
        offered.push(Offered {
            offer_id,
            agent: p.agent.clone(),
            from: conversation.state,
            conversation,
            transition_id,
            at,
            deadline,
        });
    }
    Ok(offered)
}

/// A transfer (README, SPEC D12): `from` is never offered the conversation again; `skills`,
/// if given, become what it requires. Returns what it requires then.
pub async fn prepare_transfer(
    tx: &Transaction<'_>,
    conversation: Uuid,
    from: &AgentId,
    skills: Option<&SkillSet>,
) -> anyhow::Result<SkillSet> {
    let stmt = tx
        .prepare_cached(
            "UPDATE conversations SET
                 excluded_agents = CASE WHEN $2 = ANY(excluded_agents) THEN excluded_agents
                                        ELSE array_append(excluded_agents, $2) END,
                 required_skills = coalesce($3, required_skills),
                 skills_from_channel = skills_from_channel AND $3::text[] IS NULL
             WHERE id = $1
             RETURNING required_skills",
        )
        .await?;
    let skills = skills.map(SkillSet::to_vec);
    let row = tx
        .query_one(&stmt, &[&conversation, &from.as_str(), &skills])
        .await?;
    Ok(SkillSet::new(row.get::<_, Vec<String>>(0)))
}

/// Whether the tenant has agent `agent` (any status: SPEC D12 transfers to logged-out agents).
pub async fn agent_exists(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    agent: &AgentId,
) -> Result<bool, tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached("SELECT 1 FROM agents WHERE tenant_id = $1 AND id = $2")
        .await?;
    Ok(tx
        .query_opt(&stmt, &[&tenant.as_str(), &agent.as_str()])
        .await?
        .is_some())
}

/// The earliest deadline of the tenant's open offers: when the next pass is due (D8).
pub async fn next_deadline(
    tx: &Transaction<'_>,
    tenant: &TenantId,
) -> Result<Option<DateTime<Utc>>, tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached("SELECT min(deadline) FROM offers WHERE tenant_id = $1 AND status = 'open'")
        .await?;
    Ok(tx.query_one(&stmt, &[&tenant.as_str()]).await?.get(0))
}

/// Tenants with an offer past its deadline, or with ready agents and something queued: passes
/// to run at start and on the backstop timer (a dispatcher that died may have left them).
/// One index probe per tenant, whatever the queues' lengths.
pub async fn tenants_needing_a_pass(client: &impl GenericClient) -> anyhow::Result<Vec<TenantId>> {
    let rows = client
        .query(
            "SELECT t.id FROM tenants t
             WHERE EXISTS (SELECT 1 FROM offers o WHERE o.tenant_id = t.id AND o.status = 'open' AND o.deadline <= statement_timestamp())
                OR (EXISTS (SELECT 1 FROM agents a WHERE a.tenant_id = t.id AND a.status = 'ready')
                    AND (EXISTS (SELECT 1 FROM conversations c WHERE c.tenant_id = t.id AND c.state = 'waiting')
                         OR EXISTS (SELECT 1 FROM conversations c WHERE c.tenant_id = t.id AND c.state = 'assigning'
                                     AND NOT EXISTS (SELECT 1 FROM offers o WHERE o.conversation_id = c.id AND o.status = 'open'))))",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| Ok(TenantId::parse(r.get::<_, String>(0))?))
        .collect()
}
