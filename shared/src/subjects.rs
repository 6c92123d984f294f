//! Subject names and the JetStream streams that hold them. Tenant first (`fl.<tenant>.…`)
//! so that NATS permissions can fence a tenant to `fl.<tenant>.>` (DESIGN.md).

use crate::domain::{AgentId, ChannelId, TenantId};

pub fn inbound(tenant: &TenantId, channel: &ChannelId) -> String {
    format!("fl.{tenant}.inbound.{channel}")
}
pub fn outbound(tenant: &TenantId, channel: &ChannelId) -> String {
    format!("fl.{tenant}.outbound.{channel}")
}
pub fn presence(tenant: &TenantId, agent: &AgentId) -> String {
    format!("fl.{tenant}.presence.{agent}")
}
pub fn agent_action(tenant: &TenantId, agent: &AgentId) -> String {
    format!("fl.{tenant}.agent.{agent}.action")
}
pub fn notify(tenant: &TenantId, agent: &AgentId) -> String {
    format!("fl.{tenant}.notify.{agent}")
}
pub fn conversation_events(tenant: &TenantId) -> String {
    format!("fl.{tenant}.events.conversation")
}
/// Internal: ingest -> bot-router.
pub fn bot(tenant: &TenantId, channel: &ChannelId) -> String {
    format!("fl.{tenant}.bot.{channel}")
}
/// Internal: the waiting-queue stream; `reason` is `waiting`, `offer` or `capacity`.
pub fn queue(tenant: &TenantId, reason: &str) -> String {
    format!("fl.{tenant}.queue.{reason}")
}
/// Internal: anything -> notifier; `to` is `customer` or `agent`.
pub fn delivery(tenant: &TenantId, to: &str) -> String {
    format!("fl.{tenant}.delivery.{to}")
}
/// Dead letters of the stream `stream`.
pub fn dead_letter(tenant: &str, stream: &str) -> String {
    format!("fl.{tenant}.deadletter.{stream}")
}

/// The raw tokens of a subject `fl.<tenant>.<kind>.<rest…>`. The tenant token is returned
/// unchecked; callers parse it (a bad one is poison).
pub fn split(subject: &str) -> Option<(&str, &str, Vec<&str>)> {
    let mut tokens = subject.split('.');
    if tokens.next()? != "fl" {
        return None;
    }
    let tenant = tokens.next()?;
    let kind = tokens.next()?;
    Some((tenant, kind, tokens.collect()))
}

/// Parses `fl.<tenant>.<kind>.<id>[.<suffix>]` into the tenant and the id token; the error
/// says what was expected (a bad subject is poison).
fn tenant_and_id<'s>(
    subject: &'s str,
    kind: &str,
    suffix: Option<&str>,
) -> Result<(TenantId, &'s str), String> {
    let expected = || {
        let tail = suffix.map(|s| format!(".{s}")).unwrap_or_default();
        format!("subject {subject:?} is not fl.<tenant>.{kind}.<id>{tail}")
    };
    let (tenant, k, rest) = split(subject).ok_or_else(expected)?;
    let id = match (rest.as_slice(), suffix) {
        ([id], None) => *id,
        ([id, s], Some(suffix)) if *s == suffix => *id,
        _ => return Err(expected()),
    };
    if k != kind {
        return Err(expected());
    }
    Ok((TenantId::parse(tenant).map_err(|e| e.to_string())?, id))
}

/// `fl.<tenant>.inbound.<channel>`, as published, or `fl.<tenant>.inbound.<channel>.<partition>`,
/// as stored by `FL_INBOUND` (see [`PARTITIONS`]).
pub fn parse_inbound(subject: &str) -> Result<(TenantId, ChannelId), String> {
    let published = as_published(subject);
    let (tenant, id) = tenant_and_id(&published, "inbound", None)?;
    Ok((tenant, ChannelId::parse(id).map_err(|e| e.to_string())?))
}

/// The subject a message was published on, from the subject a partitioned stream (`FL_INBOUND`,
/// `FL_BOT`) stored it under (which ends in the partition): what a replay publishes to.
pub fn as_published(subject: &str) -> String {
    let tokens: Vec<&str> = subject.split('.').collect();
    match tokens.as_slice() {
        ["fl", _, "inbound" | "bot", _, partition] if partition.parse::<u32>().is_ok() => {
            tokens[..4].join(".")
        }
        _ => subject.to_owned(),
    }
}

/// `FL_INBOUND` and `FL_BOT` are stored partitioned by tenant and channel: the stream rewrites
/// `fl.<t>.<kind>.<c>` to `fl.<t>.<kind>.<c>.<p>`, p = a hash of (t, c) mod this. Ingest and
/// the bot-router consume each partition with one message in flight at a time, so the messages
/// of a conversation (which is within one channel) are handled in order, by whichever
/// instance, even across crashes; the partitions spread over the instances.
pub const PARTITIONS: u32 = 16;

/// The consumer filter of one partition of a partitioned stream.
pub fn partition_filter(stream: &StreamSpec, partition: u32) -> String {
    format!("{}.{partition}", stream.subjects)
}

/// `fl.<tenant>.presence.<agent>`.
pub fn parse_presence(subject: &str) -> Result<(TenantId, AgentId), String> {
    let (tenant, id) = tenant_and_id(subject, "presence", None)?;
    Ok((tenant, AgentId::parse(id).map_err(|e| e.to_string())?))
}

/// `fl.<tenant>.agent.<agent>.action`.
pub fn parse_agent_action(subject: &str) -> Result<(TenantId, AgentId), String> {
    let (tenant, id) = tenant_and_id(subject, "agent", Some("action"))?;
    Ok((tenant, AgentId::parse(id).map_err(|e| e.to_string())?))
}

/// One JetStream stream: its name and the subjects it captures.
#[derive(Clone, Copy, Debug)]
pub struct StreamSpec {
    pub name: &'static str,
    pub subjects: &'static str,
    /// How long messages are kept (hours). Consumers ack; streams keep history for replay.
    pub max_age_hours: u64,
    /// A subject transform applied as messages are stored: (source, destination).
    pub transform: Option<(&'static str, &'static str)>,
}

pub const INBOUND: StreamSpec = StreamSpec {
    name: "FL_INBOUND",
    subjects: "fl.*.inbound.*",
    max_age_hours: 24 * 7,
    // partition(16, tenant, channel): keep in step with PARTITIONS.
    transform: Some((
        "fl.*.inbound.*",
        "fl.{{wildcard(1)}}.inbound.{{wildcard(2)}}.{{partition(16,1,2)}}",
    )),
};
pub const BOT: StreamSpec = StreamSpec {
    name: "FL_BOT",
    subjects: "fl.*.bot.*",
    max_age_hours: 24,
    // Like FL_INBOUND: a flow's steps are answered in the order the customer sent them.
    transform: Some((
        "fl.*.bot.*",
        "fl.{{wildcard(1)}}.bot.{{wildcard(2)}}.{{partition(16,1,2)}}",
    )),
};
/// The waiting-queue stream of DESIGN.md.
pub const QUEUE: StreamSpec = StreamSpec {
    name: "FL_QUEUE",
    subjects: "fl.*.queue.*",
    max_age_hours: 24,
    transform: None,
};
/// The agent-presence stream of DESIGN.md.
pub const PRESENCE: StreamSpec = StreamSpec {
    name: "FL_PRESENCE",
    subjects: "fl.*.presence.*",
    max_age_hours: 24,
    transform: None,
};
pub const ACTIONS: StreamSpec = StreamSpec {
    name: "FL_ACTIONS",
    subjects: "fl.*.agent.*.action",
    max_age_hours: 24 * 7,
    transform: None,
};
pub const DELIVERY: StreamSpec = StreamSpec {
    name: "FL_DELIVERY",
    subjects: "fl.*.delivery.*",
    max_age_hours: 24,
    transform: None,
};
pub const OUTBOUND: StreamSpec = StreamSpec {
    name: "FL_OUTBOUND",
    subjects: "fl.*.outbound.*",
    max_age_hours: 24 * 7,
    transform: None,
};
pub const NOTIFY: StreamSpec = StreamSpec {
    name: "FL_NOTIFY",
    subjects: "fl.*.notify.*",
    max_age_hours: 24,
    transform: None,
};
pub const EVENTS: StreamSpec = StreamSpec {
    name: "FL_EVENTS",
    subjects: "fl.*.events.*",
    max_age_hours: 24 * 7,
    transform: None,
};
pub const DEAD_LETTERS: StreamSpec = StreamSpec {
    name: "FL_DEADLETTER",
    subjects: "fl.*.deadletter.*",
    max_age_hours: 24 * 30,
    transform: None,
};

pub const ALL_STREAMS: [StreamSpec; 10] = [
    INBOUND,
    BOT,
    QUEUE,
    PRESENCE,
    ACTIONS,
    DELIVERY,
    OUTBOUND,
    NOTIFY,
    EVENTS,
    DEAD_LETTERS,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_tenant_first() {
        let t = TenantId::parse("acme").unwrap();
        let c = ChannelId::parse("line").unwrap();
        let a = AgentId::parse("amy").unwrap();
        assert_eq!(inbound(&t, &c), "fl.acme.inbound.line");
        assert_eq!(agent_action(&t, &a), "fl.acme.agent.amy.action");
        assert_eq!(
            split("fl.acme.agent.amy.action"),
            Some(("acme", "agent", vec!["amy", "action"]))
        );
        assert_eq!(split("other.acme.x"), None);
    }

    #[test]
    fn the_inbound_partition_is_part_of_the_stored_subject_only() {
        assert_eq!(
            INBOUND
                .transform
                .unwrap()
                .1
                .matches("partition(16,")
                .count(),
            1
        );
        assert_eq!(PARTITIONS, 16);
        assert_eq!(partition_filter(&BOT, 3), "fl.*.bot.*.3");
        assert_eq!(as_published("fl.acme.bot.line.15"), "fl.acme.bot.line");
        assert_eq!(
            parse_inbound("fl.acme.inbound.line.7").unwrap().1.as_str(),
            "line"
        );
        assert_eq!(
            as_published("fl.acme.inbound.line.7"),
            "fl.acme.inbound.line"
        );
        assert_eq!(as_published("fl.acme.inbound.line"), "fl.acme.inbound.line");
        assert!(parse_inbound("fl.acme.inbound.line.x").is_err());
    }

    #[test]
    fn parsers_check_every_token() {
        assert_eq!(
            parse_inbound("fl.acme.inbound.line").unwrap().1.as_str(),
            "line"
        );
        assert!(parse_inbound("fl.acme.inbound").is_err());
        assert!(parse_inbound("fl.acme.outbound.line").is_err());
        assert!(parse_inbound("fl.a.b.inbound.line").is_err());
        assert!(parse_presence("fl.acme.presence.amy").is_ok());
        let (t, a) = parse_agent_action("fl.acme.agent.amy.action").unwrap();
        assert_eq!((t.as_str(), a.as_str()), ("acme", "amy"));
        assert!(parse_agent_action("fl.acme.agent.amy.other").is_err());
        assert!(parse_agent_action("fl.acme.agent.amy").is_err());
    }

    #[test]
    fn every_subject_falls_in_exactly_one_stream() {
        let t = TenantId::parse("t").unwrap();
        let c = ChannelId::parse("c").unwrap();
        let a = AgentId::parse("a").unwrap();
        let subjects = [
            inbound(&t, &c),
            outbound(&t, &c),
            presence(&t, &a),
            agent_action(&t, &a),
            notify(&t, &a),
            conversation_events(&t),
            bot(&t, &c),
            queue(&t, "waiting"),
            delivery(&t, "agent"),
            dead_letter("t", "FL_INBOUND"),
        ];
        for subject in subjects {
            let matching: Vec<_> = ALL_STREAMS
                .iter()
                .filter(|s| matches_pattern(s.subjects, &subject))
                .collect();
            assert_eq!(matching.len(), 1, "{subject}: {matching:?}");
        }
    }

    fn matches_pattern(pattern: &str, subject: &str) -> bool {
        let p: Vec<_> = pattern.split('.').collect();
        let s: Vec<_> = subject.split('.').collect();
        p.len() == s.len() && p.iter().zip(&s).all(|(p, s)| *p == "*" || p == s)
    }
}
