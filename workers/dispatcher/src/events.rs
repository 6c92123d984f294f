//! The events the dispatcher consumes, one per message of the waiting-queue, presence and
//! agent-action streams, read from its subject and payload; applied in order under the
//! tenant's lock (see [`crate::dispatcher`]).

use chrono::{DateTime, Utc};
use firstline_shared::bus::Delivered;
use firstline_shared::domain::{AgentId, TenantId};
use firstline_shared::wire::{self, AgentAction, AgentPresence, AgentPresenceMessage, QueueSignal};
use firstline_shared::{subjects, HandleError};

/// One event of a tenant, applied under its lock before the pass.
#[derive(Clone, Debug)]
pub(crate) enum Event {
    /// The waiting queue changed; only the pass is needed.
    Queue,
    Presence {
        agent: AgentId,
        presence: AgentPresence,
        published: DateTime<Utc>,
    },
    Action {
        agent: AgentId,
        action: AgentAction,
        /// Its `FL_ACTIONS` stream sequence: the order the agent sent it in.
        seq: u64,
    },
}

/// Which stream a batch comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Source {
    Queue,
    Presence,
    Actions,
}

/// The tenant and event of one message of `source`'s stream; one that cannot be read is poison.
pub(crate) fn parse_event(source: Source, m: &Delivered) -> Result<(TenantId, Event), HandleError> {
    let poison = HandleError::Poison;
    match source {
        Source::Queue => {
            let tenant = TenantId::parse(m.tenant_token()).map_err(|e| poison(e.to_string()))?;
            let _signal: QueueSignal = wire::decode(&m.payload)?;
            Ok((tenant, Event::Queue))
        }
        Source::Presence => {
            let (tenant, agent) = subjects::parse_presence(&m.subject).map_err(poison)?;
            // Either version; SPEC S2 names from here on.
            let presence = wire::decode::<AgentPresenceMessage>(&m.payload)?.current();
            Ok((
                tenant,
                Event::Presence {
                    agent,
                    presence,
                    published: m.published,
                },
            ))
        }
        Source::Actions => {
            let (tenant, agent) = subjects::parse_agent_action(&m.subject).map_err(poison)?;
            let action: AgentAction = wire::decode(&m.payload)?;
            let seq = m.stream_sequence;
            Ok((tenant, Event::Action { agent, action, seq }))
        }
    }
}
