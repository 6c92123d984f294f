//! An agent's reply (`type: reply`): applied by the dispatcher with the agent's other actions,
//! in `FL_ACTIONS` order and in the same transaction, so that a reply sent just before a close
//! is stored and goes out before the close completes the conversation (and before the
//! survey question the close may send). See docs/dispatch.md, "An agent's actions in order".
//!
//! When a redelivery comes out of order (an instance died with the reply in hand), the reply
//! is judged by the conversation's state at the reply's own stream sequence: the close or
//! transfer that ended an assignment records its sequence and agent (in the same update as its
//! transition, `firstline_shared::db::transition_ending`), and a
//! reply of that agent sent before it still goes out, once.

use deadpool_postgres::Transaction;
use firstline_shared::db::Conversation;
use firstline_shared::domain::AgentId;
use firstline_shared::outbox::Outbox;
use firstline_shared::subjects;
use firstline_shared::wire::{Author, Delivery, OutboundMessage, Version};
use uuid::Uuid;

/// Where the conversation's last assignment ended: whose it was and the stream sequence of
/// the close or transfer that ended it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ended {
    pub agent: AgentId,
    pub seq: u64,
}

/// Whether `agent`'s reply at stream sequence `seq` goes out: the agent serves the
/// conversation now, or served it until an end that came after the reply in the stream.
pub(crate) fn may_reply(
    serving_now: bool,
    ended: Option<&Ended>,
    agent: &AgentId,
    seq: u64,
) -> bool {
    serving_now || ended.is_some_and(|e| e.agent == *agent && seq < e.seq)
}

/// Applies `agent`'s reply `text` (action `action_id`, at stream sequence `seq`) to the locked
/// `conversation`: stores it in the transcript and stages its delivery to the customer (through
/// the notifier, as every message to a customer goes: one stream, so in the order staged), or
/// stages the `action_rejected` notification. A redelivered reply is applied once.
pub(crate) async fn apply_reply(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    agent: &AgentId,
    action_id: Uuid,
    seq: u64,
    conversation: &Conversation,
    text: &str,
) -> anyhow::Result<()> {
    let tenant = &conversation.tenant;
    let serving_now = conversation.is_served_by(agent);
    let ended = if serving_now {
        None
    } else {
        ended(tx, conversation.id).await?
    };
    if !may_reply(serving_now, ended.as_ref(), agent, seq) {
        outbox.reject_action(
            tenant,
            agent,
            conversation.id,
            action_id,
            &conversation.not_served_reason(),
        );
        return Ok(());
    }
    let id = Uuid::now_v7();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO messages (id, tenant_id, channel_id, conversation_id, external_id, author, agent_id, body)
             VALUES ($1, $2, $3, $4, $5, 'agent', $6, $7)
             ON CONFLICT (tenant_id, channel_id, external_id) DO NOTHING
             RETURNING created_at",
        )
        .await?;
    let row = tx
        .query_opt(
            &stmt,
            &[
                &id,
                &tenant.as_str(),
                &conversation.channel.as_str(),
                &conversation.id,
                &format!("action:{action_id}"),
                &agent.as_str(),
                &text,
            ],
        )
        .await?;
    let Some(row) = row else {
        return Ok(()); // this reply was applied already
    };
    outbox.push(
        subjects::delivery(tenant, "customer"),
        format!("delivery:{id}"),
        &Delivery::ToCustomer {
            version: Version,
            channel: conversation.channel.clone(),
            message: OutboundMessage {
                version: Version,
                message_id: id,
                conversation_id: conversation.id,
                customer_id: conversation.customer_external_id.clone(),
                author: Author::Agent,
                agent_id: Some(agent.clone()),
                text: text.to_owned(),
                buttons: Vec::new(),
                image_url: None,
                at: row.get(0),
            },
        },
    );
    Ok(())
}

async fn ended(tx: &Transaction<'_>, conversation_id: Uuid) -> anyhow::Result<Option<Ended>> {
    let stmt = tx
        .prepare_cached("SELECT ended_agent, ended_action_seq FROM conversations WHERE id = $1")
        .await?;
    let row = tx.query_one(&stmt, &[&conversation_id]).await?;
    let (agent, seq): (Option<String>, Option<i64>) = (row.get(0), row.get(1));
    Ok(match (agent, seq) {
        (Some(agent), Some(seq)) => Some(Ended {
            agent: AgentId::parse(agent)?,
            seq: u64::try_from(seq).unwrap_or(0),
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(a: &str) -> AgentId {
        AgentId::parse(a).unwrap()
    }

    #[test]
    fn a_reply_goes_out_if_sent_while_its_agent_served() {
        let amy = agent("amy");
        let ended = Ended {
            agent: amy.clone(),
            seq: 10,
        };
        // Serving now: whatever came before.
        assert!(may_reply(true, None, &amy, 3));
        // Closed at 10: a reply sent at 9 (handled late) goes out, one sent at 11 does not.
        assert!(may_reply(false, Some(&ended), &amy, 9));
        assert!(!may_reply(false, Some(&ended), &amy, 11));
        assert!(!may_reply(false, Some(&ended), &amy, 10));
        // Another agent's reply before amy's end was never theirs to send.
        assert!(!may_reply(false, Some(&ended), &agent("ben"), 9));
        // Never served (waiting, assigning, in the bot): refused.
        assert!(!may_reply(false, None, &amy, 9));
    }
}
