//! The dispatcher's reads of the waiting queue (SPEC D4, D10, D11), inside the pass's
//! transaction: the distinct classes (skill set x weight), the heads of the classes some ready
//! agent can serve, and the conversations waiting for a responsible agent with room.

use deadpool_postgres::Transaction;
use firstline_shared::domain::{SkillSet, TenantId};

use crate::db::{candidate_from_row, CANDIDATE_COLUMNS};
use crate::plan::Candidate;

pub(crate) const WAITING_CLASSES: &str = "WITH RECURSIVE g(skills, weight) AS (
                 (SELECT required_skills, weight FROM conversations
                   WHERE tenant_id = $1 AND state = 'waiting' ORDER BY required_skills, weight LIMIT 1)
                 UNION ALL
                 SELECT n.required_skills, n.weight FROM g CROSS JOIN LATERAL
                   (SELECT c.required_skills, c.weight FROM conversations c
                     WHERE c.tenant_id = $1 AND c.state = 'waiting'
                       AND (c.required_skills, c.weight) > (g.skills, g.weight)
                     ORDER BY c.required_skills, c.weight LIMIT 1) n)
             SELECT skills, weight FROM g";

/// A class of the waiting queue: the conversations with one skill set (SPEC D4) and one
/// weight (D10). Within a class the score order is the queue order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WaitingClass {
    pub skills: SkillSet,
    pub weight: i32,
}

/// The distinct classes among the tenant's waiting conversations: a skip scan of
/// `conversations_waiting_by_class`, one index probe per class, whatever the queue's length.
pub async fn waiting_classes(
    tx: &Transaction<'_>,
    tenant: &TenantId,
) -> anyhow::Result<Vec<WaitingClass>> {
    let stmt = tx.prepare_cached(WAITING_CLASSES).await?;
    Ok(tx
        .query(&stmt, &[&tenant.as_str()])
        .await?
        .iter()
        .map(|r| WaitingClass {
            skills: SkillSet::new(r.get::<_, Vec<String>>(0)),
            weight: r.get(1),
        })
        .collect())
}

/// One class's slice of the waiting queue to read: `limit` conversations after the first `skip`.
#[derive(Debug)]
pub struct ClassRead<'a> {
    pub class: &'a WaitingClass,
    pub limit: i64,
    pub skip: i64,
}

const SKILLS_SEPARATOR: char = '\u{1f}';

/// The heads of several classes of the waiting queue, each in queue order, in one query.
pub async fn waiting_heads(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    reads: &[ClassRead<'_>],
) -> anyhow::Result<Vec<Candidate>> {
    if reads.is_empty() {
        return Ok(Vec::new());
    }
    // Skill sets differ in length, so each travels as one string (skills hold no control characters).
    let keys: Vec<String> = reads
        .iter()
        .map(|r| r.class.skills.to_vec().join(&SKILLS_SEPARATOR.to_string()))
        .collect();
    let weights: Vec<i32> = reads.iter().map(|r| r.class.weight).collect();
    let limits: Vec<i64> = reads.iter().map(|r| r.limit).collect();
    let skips: Vec<i64> = reads.iter().map(|r| r.skip).collect();
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {CANDIDATE_COLUMNS}
             FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[]) AS g(skills, weight, lim, skip)
             CROSS JOIN LATERAL (
                 SELECT * FROM conversations c
                 WHERE c.tenant_id = $1 AND c.state = 'waiting'
                   AND c.required_skills = string_to_array(g.skills, chr(31))
                   AND c.weight = g.weight
                 ORDER BY c.queued_at, c.id
                 LIMIT g.lim OFFSET g.skip) c"
        ))
        .await?;
    tx.query(&stmt, &[&tenant.as_str(), &keys, &weights, &limits, &skips])
        .await?
        .iter()
        .map(candidate_from_row)
        .collect()
}

/// SPEC D11: a responsible agent's waiting conversations considered per pass, at most. More
/// than that waiting for one agent at once wait their turn in the queue.
pub const RESPONSIBLE_READ: i64 = 100;

/// SPEC D11: the waiting conversations whose responsible agent is one of `agents` (the ready
/// ones with a free slot), up to [`RESPONSIBLE_READ`] each, earliest queued first
/// (`conversations_waiting_by_responsible`).
pub async fn waiting_for_responsible(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    agents: &[&str],
) -> anyhow::Result<Vec<Candidate>> {
    if agents.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {CANDIDATE_COLUMNS}
             FROM unnest($2::text[]) AS a(id)
             CROSS JOIN LATERAL (
                 SELECT * FROM conversations c
                 WHERE c.tenant_id = $1 AND c.state = 'waiting' AND c.responsible_agent = a.id
                 ORDER BY c.queued_at
                 LIMIT {RESPONSIBLE_READ}) c"
        ))
        .await?;
    tx.query(&stmt, &[&tenant.as_str(), &agents])
        .await?
        .iter()
        .map(candidate_from_row)
        .collect()
}
