//! The dispatcher's queries. Every function runs inside the transaction that holds the
//! tenant's advisory lock ([`lock_tenant`]).

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use firstline_shared::domain::{AgentId, SkillSet, TenantId};
use firstline_shared::wire::AgentPresence;
use uuid::Uuid;

use crate::plan::{AgentLoad, Candidate};

/// DESIGN.md: one writer per tenant. Held until the transaction ends; other tenants
/// dispatch in parallel on other connections or instances.
pub async fn lock_tenant(
    tx: &Transaction<'_>,
    tenant: &TenantId,
) -> Result<(), tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached("SELECT pg_advisory_xact_lock(hashtextextended($1, 7254460002))")
        .await?;
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

/// The open offer of `conversation` to `agent`, if any.
pub async fn open_offer(
    tx: &Transaction<'_>,
    conversation: Uuid,
    agent: &AgentId,
) -> Result<Option<Uuid>, tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached(
            "SELECT id FROM offers WHERE conversation_id = $1 AND agent_id = $2 AND status = 'open' FOR UPDATE",
        )
        .await?;
    Ok(tx
        .query_opt(&stmt, &[&conversation, &agent.as_str()])
        .await?
        .map(|r| r.get(0)))
}

/// Ends an open offer: `accepted`, `declined`, `expired` or `revoked`.
pub async fn end_offer(
    tx: &Transaction<'_>,
    offer: Uuid,
    status: &str,
    reason: &str,
) -> Result<(), tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached(
            "UPDATE offers SET status = $2, ended_at = now(), end_reason = $3 WHERE id = $1 AND status = 'open'",
        )
        .await?;
    tx.execute(&stmt, &[&offer, &status, &reason]).await?;
    Ok(())
}

/// An offer whose dispatch cycle ran out.
pub struct ExpiredOffer {
    pub offer_id: Uuid,
    pub conversation_id: Uuid,
    pub agent: AgentId,
}

/// SPEC D8: ends the tenant's open offers whose deadline has passed.
pub async fn expire_due_offers(
    tx: &Transaction<'_>,
    tenant: &TenantId,
) -> anyhow::Result<Vec<ExpiredOffer>> {
    let stmt = tx
        .prepare_cached(
            "UPDATE offers SET status = 'expired', ended_at = now(), end_reason = 'dispatch cycle elapsed'
             WHERE tenant_id = $1 AND status = 'open' AND deadline <= now()
             RETURNING id, conversation_id, agent_id",
        )
        .await?;
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

/// The tenant's online and ready agents with their load (the only ones with places, D3).
pub async fn ready_agents(
    tx: &Transaction<'_>,
    tenant: &TenantId,
) -> anyhow::Result<Vec<AgentLoad>> {
    let stmt = tx
        .prepare_cached(
            "SELECT a.id, a.capacity, a.skills, a.idle_since,
                    (SELECT count(*) FROM conversations c
                      WHERE c.tenant_id = a.tenant_id AND c.agent_id = a.id AND c.state = 'processing'),
                    (SELECT count(*) FROM offers o
                      WHERE o.tenant_id = a.tenant_id AND o.agent_id = a.id AND o.status = 'open')
             FROM agents a WHERE a.tenant_id = $1 AND a.status = 'ready'",
        )
        .await?;
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

/// The conversations that may be offered, in dispatch order (SPEC D5): `waiting`, and
/// `assigning` without an open offer (D7/D8), by priority then time queued. At most `limit`.
pub async fn candidates(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    limit: i64,
) -> anyhow::Result<Vec<Candidate>> {
    let stmt = tx
        .prepare_cached(
            "SELECT c.id, c.required_skills,
                    ARRAY(SELECT o.agent_id FROM offers o WHERE o.conversation_id = c.id AND o.status = 'declined'),
                    ARRAY(SELECT o.agent_id FROM offers o WHERE o.conversation_id = c.id AND o.status = 'expired')
             FROM conversations c
             WHERE c.tenant_id = $1 AND c.state IN ('waiting', 'assigning')
               AND NOT EXISTS (SELECT 1 FROM offers o WHERE o.conversation_id = c.id AND o.status = 'open')
             ORDER BY c.priority DESC, c.queued_at, c.id
             LIMIT $2",
        )
        .await?;
    let parse = |ids: Vec<String>| -> anyhow::Result<Vec<AgentId>> {
        ids.into_iter().map(|a| Ok(AgentId::parse(a)?)).collect()
    };
    tx.query(&stmt, &[&tenant.as_str(), &limit])
        .await?
        .into_iter()
        .map(|r| {
            Ok(Candidate {
                conversation_id: r.get(0),
                required_skills: SkillSet::new(r.get::<_, Vec<String>>(1)),
                declined_by: parse(r.get(2))?,
                expired_for: parse(r.get(3))?,
            })
        })
        .collect()
}

/// Writes an open offer. The trigger `offers_check_agent_limits` and the unique index
/// `offers_one_open_per_conversation` refuse it if it would break SPEC D1 or double-offer.
pub async fn insert_offer(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    offer: Uuid,
    conversation: Uuid,
    agent: &AgentId,
    cycle_seconds: i32,
) -> Result<DateTime<Utc>, tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO offers (id, tenant_id, conversation_id, agent_id, deadline)
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
             RETURNING deadline",
        )
        .await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &offer,
                &tenant.as_str(),
                &conversation,
                &agent.as_str(),
                &f64::from(cycle_seconds),
            ],
        )
        .await?;
    let touch = tx
        .prepare_cached("UPDATE agents SET idle_since = now() WHERE tenant_id = $1 AND id = $2")
        .await?;
    tx.execute(&touch, &[&tenant.as_str(), &agent.as_str()])
        .await?;
    Ok(row.get(0))
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

/// Tenants with something to dispatch or an offer past its deadline: passes to run at start
/// and on the backstop timer (a dispatcher that died may have left them).
pub async fn tenants_needing_a_pass(client: &impl GenericClient) -> anyhow::Result<Vec<TenantId>> {
    let rows = client
        .query(
            "SELECT DISTINCT tenant_id FROM offers WHERE status = 'open' AND deadline <= now()
             UNION
             SELECT DISTINCT c.tenant_id FROM conversations c
              WHERE c.state IN ('waiting', 'assigning')
                AND NOT EXISTS (SELECT 1 FROM offers o WHERE o.conversation_id = c.id AND o.status = 'open')
                AND EXISTS (SELECT 1 FROM agents a WHERE a.tenant_id = c.tenant_id AND a.status = 'ready')",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| Ok(TenantId::parse(r.get::<_, String>(0))?))
        .collect()
}
