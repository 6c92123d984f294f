//! One dispatch pass for a tenant (SPEC D1-D9), inside its locked transaction: expire the
//! offers past their dispatch cycle (D8), read the ready agents and the heads of the queue they
//! can serve, decide with [`crate::plan::plan`] (pure: D1-D6), write and stage the offers.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use firstline_shared::db::{self as shared_db, TenantSettings, Transition};
use firstline_shared::domain::ConversationState;
use firstline_shared::metrics;
use firstline_shared::outbox::Outbox;
use firstline_shared::wire::{self, NotificationKind};
use uuid::Uuid;

use crate::{db, plan, queue};

/// What one pass did.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    pub expired: usize,
    pub offered: usize,
    /// The earliest deadline of the tenant's open offers, for the timer (SPEC D8).
    pub next_deadline: Option<DateTime<Utc>>,
    /// How many hand-ins (batches, timer or backstop passes) the transaction applied at once.
    pub together: usize,
}

/// Reads of the queue one pass may make before it stops (only repeated declines need more
/// than one: see [`pass`]).
const MAX_ROUNDS: usize = 8;

/// One dispatch pass for a tenant, inside its locked transaction.
///
/// The waiting queue is read by class, a class being the conversations of one skill set and
/// one weight (SPEC D4, D10): within a class the score order (weight x time waited) is the
/// queue order. A class is read only if a ready agent with a free slot covers its skills, and
/// only as many of its heads as those agents have free slots; the heads of all classes are
/// merged by score at the pass's `now`. That is exact: at most that many of a class can be
/// offered in the pass, and its heads are its best-scored. So the cost of a pass follows the
/// offers it makes and the number of classes, not the queue's length. A conversation skipped
/// because the free agents declined it can leave room in its class; then the next heads are
/// read, for up to [`MAX_ROUNDS`] rounds.
pub async fn pass(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    settings: &TenantSettings,
) -> anyhow::Result<PassReport> {
    let tenant = &settings.id;
    let mut report = PassReport::default();
    // The pass's first reads in one round trip, after the expiry they depend on (see
    // db::prepare_pipelined). The waiting groups are read even if no agent turns out to
    // have room (one index probe per group).
    db::prepare_pipelined(tx).await?;
    let orphans_now = async {
        match settings.orphans_possible {
            true => db::orphaned_assigning(tx, tenant).await.map(Some),
            false => Ok(None),
        }
    };
    let (expired, agents, orphans_now, classes) = futures::join!(
        db::expire_due_offers(tx, tenant),
        db::ready_agents(tx, tenant),
        orphans_now,
        queue::waiting_classes(tx, tenant)
    );
    // The first failure is the cause; the statements after it fail as aborted.
    let (expired, mut agents, orphans_now, classes) = (expired?, agents?, orphans_now?, classes?);
    // SPEC D8: offers past the dispatch cycle end; their conversations stay `assigning`
    // (D7) and are re-offered below, to another suitable agent first.
    for expired in expired {
        report.expired += 1;
        outbox.notify_agent(
            tenant,
            &expired.agent,
            expired.conversation_id,
            Uuid::new_v5(&expired.offer_id, b"revoked"),
            NotificationKind::OfferRevoked {
                offer_id: expired.offer_id,
                reason: "not accepted within the dispatch cycle".into(),
            },
        );
    }
    metrics::offers_expired(tenant.as_str(), report.expired);
    let offer_limit = settings.offer_limit.max(1) as u32;
    // Orphans (assigning, no open offer: D7) come only from expiries; looked for while the
    // tenant may have some (V6), and the mark kept for the next pass while some are left.
    let orphans_possible = settings.orphans_possible || report.expired > 0;
    let mut orphans_left = orphans_possible;
    if agents.iter().any(|a| a.free_slots(offer_limit) > 0) {
        let mut orphans = match orphans_now {
            Some(orphans) => orphans,
            // Expired in this pass, the tenant marked clear before it.
            None if orphans_possible => db::orphaned_assigning(tx, tenant).await?,
            None => Vec::new(),
        };
        let mut unplaced: HashSet<Uuid> = orphans.iter().map(|c| c.conversation_id).collect();
        let mut read: HashMap<&queue::WaitingClass, i64> = HashMap::new();
        let mut exhausted: HashSet<&queue::WaitingClass> = HashSet::new();
        let mut planned_all = Vec::new();
        // SPEC D10: one instant for every score of the pass.
        let now = Utc::now();
        let mut first_round = true;
        for _ in 0..MAX_ROUNDS {
            let reads: Vec<queue::ClassRead> = classes
                .iter()
                .filter(|c| !exhausted.contains(c))
                .filter_map(|c| {
                    let free: u32 = agents
                        .iter()
                        .filter(|a| a.skills.covers(&c.skills))
                        .map(|a| a.free_slots(offer_limit))
                        .sum();
                    (free > 0).then(|| queue::ClassRead {
                        class: c,
                        limit: i64::from(free),
                        skip: read.get(c).copied().unwrap_or(0),
                    })
                })
                .collect();
            if reads.is_empty() && orphans.is_empty() {
                break;
            }
            let mut queue = queue::waiting_heads(tx, tenant, &reads).await?;
            for r in &reads {
                let got = queue
                    .iter()
                    .filter(|c| c.required_skills == r.class.skills && c.weight == r.class.weight)
                    .count() as i64;
                *read.entry(r.class).or_default() += got;
                if got < r.limit {
                    exhausted.insert(r.class);
                }
            }
            // A conversation read beyond the heads for its responsible agent (below) and
            // planned in an earlier round can come up again among the next heads.
            queue.retain(|c| {
                !planned_all
                    .iter()
                    .any(|p: &plan::PlannedOffer| p.conversation_id == c.conversation_id)
            });
            if first_round {
                // SPEC D11: the conversations waiting for a responsible agent with room, which
                // the heads may not reach; a conversation read both ways is kept once.
                first_round = false;
                let free: Vec<&str> = agents
                    .iter()
                    .filter(|a| a.free_slots(offer_limit) > 0)
                    .map(|a| a.id.as_str())
                    .collect();
                let theirs = queue::waiting_for_responsible(tx, tenant, &free).await?;
                // Read beyond the heads: only for their responsible agent (plan's first step).
                let seen: HashSet<Uuid> = queue.iter().map(|c| c.conversation_id).collect();
                queue.extend(
                    theirs
                        .into_iter()
                        .filter(|c| !seen.contains(&c.conversation_id))
                        .map(|mut c| {
                            c.responsible_only = true;
                            c
                        }),
                );
            }
            queue.append(&mut orphans);
            queue.sort_by_key(|c| c.order_key(now));
            db::attach_offer_history(tx, &mut queue).await?;
            let planned = plan::plan(&agents, &queue, offer_limit);
            if planned.is_empty() {
                break;
            }
            for p in &planned {
                if let Some(a) = agents.iter_mut().find(|a| a.id == p.agent) {
                    a.open_offers += 1;
                }
            }
            planned_all.extend(planned);
        }
        for offered in
            db::write_offers(tx, tenant, settings.dispatch_cycle_seconds, &planned_all).await?
        {
            report.offered += 1;
            unplaced.remove(&offered.conversation.id);
            stage_offer(outbox, offered);
        }
        orphans_left = !unplaced.is_empty();
    }
    if orphans_left != settings.orphans_possible {
        db::set_orphans_possible(tx, tenant, orphans_left).await?;
    }
    report.next_deadline = db::next_deadline(tx, tenant).await?;
    Ok(report)
}

/// The event (`waiting -> assigning`, or `reoffered`) and the agent's offer notification.
fn stage_offer(outbox: &mut Outbox, offered: db::Offered) {
    let db::Offered {
        offer_id,
        agent,
        conversation,
        from,
        transition_id,
        at,
        deadline,
    } = offered;
    let since_queued = conversation
        .queued_at
        .map(|q| (at - q).to_std().unwrap_or_default());
    metrics::offer_made(conversation.tenant.as_str(), since_queued);
    let reason = if from == ConversationState::Waiting {
        "offered"
    } else {
        "reoffered"
    };
    shared_db::stage_event(
        outbox,
        &conversation,
        Some(from),
        Transition {
            to: ConversationState::Assigning,
            agent: Some(&agent),
            reason,
        },
        transition_id,
        at,
    );
    outbox.notify_agent(
        &conversation.tenant,
        &agent,
        conversation.id,
        offer_id,
        NotificationKind::Offer {
            offer_id,
            channel: conversation.channel.clone(),
            customer: wire::CustomerRef {
                id: conversation.customer_external_id.clone(),
                name: conversation.customer_name.clone(),
            },
            required_skills: conversation.required_skills.clone(),
            deadline,
        },
    );
}
