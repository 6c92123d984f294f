//! A conversation's state changes (SPEC S, L): the row, its history row and the event, each
//! change one statement.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use uuid::Uuid;

use super::Conversation;
use crate::domain::{AgentId, ConversationState};
use crate::outbox::Outbox;
use crate::subjects;
use crate::wire::{ConversationEvent, QueueSignal, Version};

/// One state change (SPEC S, L).
#[derive(Clone, Copy, Debug)]
pub struct Transition<'a> {
    pub to: ConversationState,
    /// The agent offered (assigning) or serving (processing); `None` keeps the stored one.
    pub agent: Option<&'a AgentId>,
    pub reason: &'a str,
}

/// Moves `conversation` to `t.to`: updates the row and its transition timestamp, appends the
/// history row, and stages the `events.conversation` event (and, on entering `waiting`, the
/// waiting-queue signal that wakes the dispatcher). Refuses an edge the lifecycle does not have.
pub async fn transition(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    conversation: &mut Conversation,
    t: Transition<'_>,
) -> anyhow::Result<()> {
    transition_ending(tx, outbox, conversation, t, None).await
}

/// [`transition`], and records in the same row version that `ended`'s agent's assignment
/// ended with their action at that stream sequence (a close or transfer: the dispatcher judges
/// that agent's late replies by it, workers/dispatcher/src/reply.rs).
///
/// One statement: the row's update and the history row's insert (a data-modifying `WITH`), and
/// one new version of the row for both the state and the end (issue 22: the end was a second
/// update of the row, and every version of a conversation costs an entry in each of its
/// indexes, the state being in their predicates).
pub async fn transition_ending(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    conversation: &mut Conversation,
    t: Transition<'_>,
    ended: Option<(&AgentId, u64)>,
) -> anyhow::Result<()> {
    let from = conversation.state;
    anyhow::ensure!(
        from.can_become(t.to),
        "conversation {} cannot go from {from} to {}",
        conversation.id,
        t.to
    );
    let agent = t
        .agent
        .or(conversation.agent_id.as_ref())
        .map(|a| a.as_str());
    let stmt = tx
        .prepare_cached(
            "WITH u AS (
                 UPDATE conversations SET
                     state = $2,
                     agent_id = CASE WHEN $2 IN ('waiting', 'assigning') THEN NULL ELSE $3 END,
                     updated_at = statement_timestamp(),
                     bot_at = CASE WHEN $2 IN ('bot', 'script') THEN coalesce(bot_at, statement_timestamp()) ELSE bot_at END,
                     queued_at = CASE WHEN $2 = 'waiting' THEN coalesce(queued_at, statement_timestamp()) ELSE queued_at END,
                     assigning_at = CASE WHEN $2 = 'assigning' THEN statement_timestamp() ELSE assigning_at END,
                     processing_at = CASE WHEN $2 = 'processing' THEN statement_timestamp() ELSE processing_at END,
                     accepted_at = CASE WHEN $2 = 'processing' THEN coalesce(accepted_at, statement_timestamp()) ELSE accepted_at END,
                     completed_at = CASE WHEN $2 = 'completed' THEN statement_timestamp() ELSE completed_at END,
                     closed_by = CASE WHEN $2 = 'completed' THEN $4 ELSE closed_by END,
                     ended_agent = CASE WHEN $6::bigint IS NULL THEN ended_agent ELSE $5 END,
                     ended_action_seq = coalesce($6::bigint, ended_action_seq)
                 WHERE id = $1
                 RETURNING id, queued_at),
             h AS (
                 INSERT INTO conversation_transitions (conversation_id, from_state, to_state, agent_id, reason)
                 SELECT id, $7, $2, $3, $4 FROM u
                 RETURNING id, at)
             SELECT u.queued_at, h.id, h.at FROM u CROSS JOIN h",
        )
        .await?;
    let (ended_agent, ended_seq) = match ended {
        Some((agent, seq)) => (Some(agent.as_str()), Some(end_seq_column(seq))),
        None => (None, None),
    };
    let row = tx
        .query_one(
            &stmt,
            &[
                &conversation.id,
                &t.to.as_str(),
                &agent,
                &t.reason,
                &ended_agent,
                &ended_seq,
                &from.as_str(),
            ],
        )
        .await?;
    conversation.queued_at = row.get(0);
    stage_event(outbox, conversation, Some(from), t, row.get(1), row.get(2));
    conversation.state = t.to;
    if !matches!(
        t.to,
        ConversationState::Waiting | ConversationState::Assigning
    ) {
        conversation.agent_id = agent.map(AgentId::parse).transpose()?;
    }
    Ok(())
}

/// A stream sequence as `ended_action_seq` stores it (bigint; beyond it, the largest).
fn end_seq_column(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Stages the `events.conversation` event of history row `transition_id` (and, on entering
/// `waiting`, the waiting-queue signal that wakes the dispatcher).
pub fn stage_event(
    outbox: &mut Outbox,
    conversation: &Conversation,
    from: Option<ConversationState>,
    t: Transition<'_>,
    transition_id: i64,
    at: DateTime<Utc>,
) {
    let agent = t.agent.or(conversation.agent_id.as_ref());
    // SPEC D12: a transfer from one agent to another names both (`conversation` is as it was
    // before the change).
    let from_agent = conversation
        .agent_id
        .as_ref()
        .filter(|old| {
            from == Some(ConversationState::Processing)
                && t.to == ConversationState::Processing
                && agent != Some(*old)
        })
        .cloned();
    // The event id derives from the history row, so a replayed outbox row is deduplicated.
    let event_id = Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("transition:{transition_id}").as_bytes(),
    );
    outbox.push(
        subjects::conversation_events(&conversation.tenant),
        format!("event:{event_id}"),
        &ConversationEvent {
            version: Version,
            event_id,
            conversation_id: conversation.id,
            channel: conversation.channel.clone(),
            customer_id: conversation.customer_external_id.clone(),
            from,
            to: t.to,
            agent_id: agent.cloned(),
            from_agent_id: from_agent,
            reason: t.reason.to_owned(),
            at,
        },
    );
    if t.to == ConversationState::Waiting {
        outbox.push(
            subjects::queue(&conversation.tenant, "waiting"),
            format!("queue:{event_id}"),
            &QueueSignal {
                version: Version,
                conversation_id: Some(conversation.id),
                reason: t.reason.to_owned(),
            },
        );
    }
}
