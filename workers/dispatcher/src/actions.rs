//! The agents' actions, applied under the tenant's lock before the pass, in the order the
//! agent sent them (their `FL_ACTIONS` order): accept (SPEC L7), decline (README: back to
//! `waiting`, never offered to that agent again), reply ([`crate::reply`]), close (SPEC L8),
//! transfer (to a named agent straight to them, SPEC D12; to skills back to `waiting`).

use chrono::Utc;
use deadpool_postgres::Transaction;
use firstline_shared::db::{self as shared_db, Transition};
use firstline_shared::domain::{AgentId, ConversationState, TenantId};
use firstline_shared::metrics;
use firstline_shared::outbox::Outbox;
use firstline_shared::wire::{AgentAction, AgentActionKind, CustomerRef, NotificationKind};
use uuid::Uuid;

use crate::db;
use crate::reply::apply_reply;

/// An agent's action and its `FL_ACTIONS` stream sequence.
pub(crate) type Sent = (AgentId, AgentAction, u64);

/// Applies a run of agent actions: one conversation's in order, different conversations'
/// side by side on the transaction's connection (tokio-postgres pipelines their statements,
/// so an accept does not wait for the round trips of the close before it). Their outputs are
/// staged in the actions' order, as if applied one by one.
pub(crate) async fn apply_actions(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    tenant: &TenantId,
    actions: Vec<Sent>,
) -> anyhow::Result<()> {
    let lanes = firstline_shared::batch::lanes(&actions, |(_, action, _)| {
        Some(action.kind.conversation_id())
    });
    let actions = &actions;
    let staged = firstline_shared::batch::in_lanes(lanes, |i| async move {
        let (agent, action, seq) = &actions[i];
        let mut own = Outbox::new();
        apply_action(tx, &mut own, tenant, agent, action, *seq).await?;
        anyhow::Ok(own)
    })
    .await;
    match staged {
        Ok(staged) => {
            for own in staged {
                outbox.append(own);
            }
            Ok(())
        }
        // The failing statement aborts the transaction, and the other lanes' next statements
        // fail with "current transaction is aborted": report the cause.
        Err(mut errors) => {
            let cause = errors
                .iter()
                .position(|e| !aborted_by_another(e))
                .unwrap_or(0);
            Err(errors.swap_remove(cause))
        }
    }
}

fn aborted_by_another(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        == Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION)
}

/// Applies accept (SPEC L7), decline (README), reply, close (SPEC L8) or transfer of `agent`,
/// sent at stream sequence `seq`.
async fn apply_action(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    tenant: &TenantId,
    agent: &AgentId,
    action: &AgentAction,
    seq: u64,
) -> anyhow::Result<()> {
    let conversation_id = action.kind.conversation_id();
    let reject = |outbox: &mut Outbox, reason: &str| {
        outbox.reject_action(tenant, agent, conversation_id, action.action_id, reason)
    };
    // An accept or decline ends the agent's open offer in the same round trip as the
    // conversation's lock. Their order does not matter: both run under the tenant's lock,
    // and only this worker writes offers.
    let ending = match &action.kind {
        AgentActionKind::Accept { .. } => Some(("accepted", "accepted")),
        AgentActionKind::Decline { reason, .. } => {
            Some(("declined", reason.as_deref().unwrap_or("declined")))
        }
        _ => None,
    };
    let lock = shared_db::conversation_for_update(tx, tenant, conversation_id);
    let (conversation, offer) = match ending {
        Some((status, reason)) => {
            let end = db::end_open_offer(tx, conversation_id, agent, status, reason);
            let (conversation, offer) = futures::join!(lock, end);
            (conversation?, offer?)
        }
        None => (lock.await?, None),
    };
    let Some(mut conversation) = conversation else {
        reject(outbox, "no such conversation");
        return Ok(());
    };
    match &action.kind {
        AgentActionKind::Accept { .. } | AgentActionKind::Decline { .. } => {
            let Some((offer, offered_at)) = offer else {
                reject(
                    outbox,
                    &format!(
                        "no open offer of this conversation for you (it is {})",
                        conversation.state
                    ),
                );
                return Ok(());
            };
            if let AgentActionKind::Decline { .. } = &action.kind {
                // Back in the queue at its place; the pass re-dispatches it at once, never
                // to this agent again.
                shared_db::transition(
                    tx,
                    outbox,
                    &mut conversation,
                    Transition {
                        to: ConversationState::Waiting,
                        agent: None,
                        reason: "declined",
                    },
                )
                .await?;
                return Ok(());
            }
            metrics::offer_accepted(
                tenant.as_str(),
                (Utc::now() - offered_at).to_std().unwrap_or_default(),
            );
            shared_db::transition(
                tx,
                outbox,
                &mut conversation,
                Transition {
                    to: ConversationState::Processing,
                    agent: Some(agent),
                    reason: "accepted",
                },
            )
            .await?;
            outbox.notify_agent(
                tenant,
                agent,
                conversation_id,
                Uuid::new_v5(&offer, b"assigned"),
                NotificationKind::Assigned { offer_id: offer },
            );
        }
        AgentActionKind::Close { .. } => {
            if !conversation.is_served_by(agent) {
                reject(outbox, &conversation.not_served_reason());
                return Ok(());
            }
            // A reply of this agent handled after the close is judged by its sequence.
            shared_db::transition_ending(
                tx,
                outbox,
                &mut conversation,
                Transition {
                    to: ConversationState::Completed,
                    agent: Some(agent),
                    reason: "closed_by_agent",
                },
                Some((agent, seq)),
            )
            .await?;
            // 滿意度調查, if the channel asks one: after every reply sent before the close
            // (applied before it, in this lane), so after them on `outbound` too.
            firstline_shared::survey::ask(tx, outbox, &conversation).await?;
            outbox.notify_agent(
                tenant,
                agent,
                conversation_id,
                Uuid::new_v5(&action.action_id, b"closed"),
                NotificationKind::Closed,
            );
        }
        AgentActionKind::Transfer {
            to_agent, skills, ..
        } => {
            if !conversation.is_served_by(agent) {
                reject(outbox, &conversation.not_served_reason());
                return Ok(());
            }
            if to_agent.as_ref() == Some(agent) {
                reject(
                    outbox,
                    "a conversation cannot be transferred to the agent serving it",
                );
                return Ok(());
            }
            if let Some(to) = to_agent {
                if !db::agent_exists(tx, tenant, to).await? {
                    reject(outbox, &format!("to_agent: no agent {to}"));
                    return Ok(());
                }
            }
            let required_skills =
                db::prepare_transfer(tx, conversation_id, agent, skills.as_ref()).await?;
            // SPEC D12: to a named agent, straight into their `processing`, whatever their
            // status and load (no offer, no capacity check: a deliberate act of a colleague;
            // their free slots are then 0, so they get no new offers until under capacity).
            // Else back to `waiting` at its place, for agents with the skills (README).
            let to_state = match to_agent {
                Some(_) => ConversationState::Processing,
                None => ConversationState::Waiting,
            };
            // A reply of the former agent sent before the transfer still goes out (reply.rs).
            shared_db::transition_ending(
                tx,
                outbox,
                &mut conversation,
                Transition {
                    to: to_state,
                    agent: to_agent.as_ref(),
                    reason: "transferred",
                },
                Some((agent, seq)),
            )
            .await?;
            outbox.notify_agent(
                tenant,
                agent,
                conversation_id,
                Uuid::new_v5(&action.action_id, b"transferred"),
                NotificationKind::Transferred {
                    to_agent: to_agent.clone(),
                    required_skills: required_skills.clone(),
                },
            );
            if let Some(to) = to_agent {
                outbox.notify_agent(
                    tenant,
                    to,
                    conversation_id,
                    Uuid::new_v5(&action.action_id, b"transferred_to_you"),
                    NotificationKind::TransferredToYou {
                        from_agent: agent.clone(),
                        channel: conversation.channel.clone(),
                        customer: CustomerRef {
                            id: conversation.customer_external_id.clone(),
                            name: conversation.customer_name.clone(),
                        },
                        required_skills,
                    },
                );
            }
        }
        AgentActionKind::Reply { text, .. } => {
            apply_reply(
                tx,
                outbox,
                agent,
                action.action_id,
                seq,
                &conversation,
                text,
            )
            .await?;
        }
    }
    Ok(())
}
