//! Subject names and the JetStream streams that hold them. Tenant first (`fl.<tenant>.…`)
//! so that NATS permissions can fence a tenant to `fl.<tenant>.>` (DESIGN.md).

use crate::domain::{AgentId, ChannelId, TenantId};

/// `fl.<tenant>.inbound.<channel>`: a gateway's message, ordered with every other message of
/// its channel (`FL_INBOUND`; one channel's traffic is one partition). The slower form: see
/// [`inbound_for_customer`].
pub fn inbound(tenant: &TenantId, channel: &ChannelId) -> String {
    format!("fl.{tenant}.inbound.{channel}")
}
/// `fl.<tenant>.inbound.<channel>.<customer key>`: a gateway's message, ordered with the other
/// messages of its customer only (`FL_INBOUND_KEYED`), so that one busy channel spreads over
/// every partition and every ingest instance. The key is [`customer_key`] of the customer id.
pub fn inbound_for_customer(tenant: &TenantId, channel: &ChannelId, customer: &str) -> String {
    format!("fl.{tenant}.inbound.{channel}.{}", customer_key(customer))
}

/// The subject token of a customer id (README: the gateway contract): the id itself when it
/// is 1 to 64 of `A-Z a-z 0-9 _ -`, else `h` and the first 16 hex digits of the SHA-256 of
/// its UTF-8 bytes. Any rule would do that gives one customer one token: the key only
/// decides which messages are kept in order together.
pub fn customer_key(customer: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if (1..=64).contains(&customer.len()) && customer.chars().all(safe) {
        return customer.to_owned();
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(customer.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("h{hex}")
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
/// Internal: ingest -> bot-router, `fl.<tenant>.bot.<conversation id>`: partitioned by
/// conversation, so that a conversation's bot work is answered in order and conversations
/// spread over the partitions.
pub fn bot(tenant: &TenantId, conversation: &uuid::Uuid) -> String {
    format!("fl.{tenant}.bot.{conversation}")
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

/// The tenant and channel of an inbound subject: `fl.<tenant>.inbound.<channel>` or
/// `fl.<tenant>.inbound.<channel>.<customer key>` as published, or either with the partition
/// after it, as stored ([`StreamSpec::transform`]).
pub fn parse_inbound(subject: &str) -> Result<(TenantId, ChannelId), String> {
    let expected =
        || format!("subject {subject:?} is not fl.<tenant>.inbound.<channel>[.<customer key>]");
    let (tenant, kind, rest) = split(subject).ok_or_else(expected)?;
    if kind != "inbound" || rest.is_empty() || rest.len() > 3 || rest.iter().any(|t| t.is_empty()) {
        return Err(expected());
    }
    Ok((
        TenantId::parse(tenant).map_err(|e| e.to_string())?,
        ChannelId::parse(rest[0]).map_err(|e| e.to_string())?,
    ))
}

/// The subject a message of a partitioned stream was published on, from the subject `stream`
/// stored it under (which ends in the partition): what a replay publishes to.
pub fn as_published(stream: &str, subject: &str) -> String {
    let Some(spec) = ALL_STREAMS
        .iter()
        .find(|s| s.name == stream && s.partitioned)
    else {
        return subject.to_owned();
    };
    let published = spec.subjects.split('.').count();
    let tokens: Vec<&str> = subject.split('.').collect();
    match tokens.split_last() {
        Some((last, rest)) if rest.len() == published && last.parse::<u32>().is_ok() => {
            rest.join(".")
        }
        _ => subject.to_owned(),
    }
}

/// How many partitions each partitioned stream has (`FL_PARTITIONS`) unless told otherwise:
/// enough that one busy channel's customers spread over every instance of a worker.
pub const DEFAULT_PARTITIONS: u32 = 64;

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
    /// Stored partitioned: the stream appends to each subject a hash of its wildcard tokens
    /// (the tenant, the channel, the customer key or conversation), and each partition is
    /// read in order by one instance at a time (docs/ordering.md).
    pub partitioned: bool,
}

impl StreamSpec {
    /// The subject transform of a partitioned stream with `partitions` partitions: each
    /// subject gets `.<p>` appended, p = the server's hash of every wildcard token, mod
    /// `partitions`. `fl.*.inbound.*` becomes
    /// `fl.{{wildcard(1)}}.inbound.{{wildcard(2)}}.{{partition(64,1,2)}}`.
    pub fn transform(&self, partitions: u32) -> Option<(String, String)> {
        if !self.partitioned {
            return None;
        }
        let mut n = 0;
        let tokens: Vec<String> = self
            .subjects
            .split('.')
            .map(|t| match t {
                "*" => {
                    n += 1;
                    format!("{{{{wildcard({n})}}}}")
                }
                t => t.to_owned(),
            })
            .collect();
        let all: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
        let destination = format!(
            "{}.{{{{partition({partitions},{})}}}}",
            tokens.join("."),
            all.join(",")
        );
        Some((self.subjects.to_owned(), destination))
    }
}

/// Gateways' messages on `fl.<t>.inbound.<channel>`, partitioned by (tenant, channel).
pub const INBOUND: StreamSpec = StreamSpec {
    name: "FL_INBOUND",
    subjects: "fl.*.inbound.*",
    max_age_hours: 24 * 7,
    partitioned: true,
};
/// Gateways' messages on `fl.<t>.inbound.<channel>.<customer key>`, partitioned by (tenant,
/// channel, customer key). A stream of its own: a stream has one subject transform.
pub const INBOUND_KEYED: StreamSpec = StreamSpec {
    name: "FL_INBOUND_KEYED",
    subjects: "fl.*.inbound.*.*",
    max_age_hours: 24 * 7,
    partitioned: true,
};
pub const BOT: StreamSpec = StreamSpec {
    name: "FL_BOT",
    subjects: "fl.*.bot.*",
    max_age_hours: 24,
    // By conversation: a flow's steps are answered in the order the customer sent them.
    partitioned: true,
};
/// The waiting-queue stream of DESIGN.md.
pub const QUEUE: StreamSpec = StreamSpec {
    name: "FL_QUEUE",
    subjects: "fl.*.queue.*",
    max_age_hours: 24,
    partitioned: false,
};
/// The agent-presence stream of DESIGN.md.
pub const PRESENCE: StreamSpec = StreamSpec {
    name: "FL_PRESENCE",
    subjects: "fl.*.presence.*",
    max_age_hours: 24,
    partitioned: false,
};
pub const ACTIONS: StreamSpec = StreamSpec {
    name: "FL_ACTIONS",
    subjects: "fl.*.agent.*.action",
    max_age_hours: 24 * 7,
    partitioned: false,
};
pub const DELIVERY: StreamSpec = StreamSpec {
    name: "FL_DELIVERY",
    subjects: "fl.*.delivery.*",
    max_age_hours: 24,
    partitioned: false,
};
pub const OUTBOUND: StreamSpec = StreamSpec {
    name: "FL_OUTBOUND",
    subjects: "fl.*.outbound.*",
    max_age_hours: 24 * 7,
    partitioned: false,
};
pub const NOTIFY: StreamSpec = StreamSpec {
    name: "FL_NOTIFY",
    subjects: "fl.*.notify.*",
    max_age_hours: 24,
    partitioned: false,
};
pub const EVENTS: StreamSpec = StreamSpec {
    name: "FL_EVENTS",
    subjects: "fl.*.events.*",
    max_age_hours: 24 * 7,
    partitioned: false,
};
pub const DEAD_LETTERS: StreamSpec = StreamSpec {
    name: "FL_DEADLETTER",
    subjects: "fl.*.deadletter.*",
    max_age_hours: 24 * 30,
    partitioned: false,
};

pub const ALL_STREAMS: [StreamSpec; 11] = [
    INBOUND,
    INBOUND_KEYED,
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
    fn the_partition_is_part_of_the_stored_subject_only() {
        assert_eq!(
            INBOUND.transform(64).unwrap(),
            (
                "fl.*.inbound.*".to_owned(),
                "fl.{{wildcard(1)}}.inbound.{{wildcard(2)}}.{{partition(64,1,2)}}".to_owned()
            )
        );
        assert_eq!(
            INBOUND_KEYED.transform(128).unwrap().1,
            "fl.{{wildcard(1)}}.inbound.{{wildcard(2)}}.{{wildcard(3)}}.{{partition(128,1,2,3)}}"
        );
        assert_eq!(QUEUE.transform(64), None);
        assert_eq!(partition_filter(&BOT, 3), "fl.*.bot.*.3");
        assert_eq!(
            as_published("FL_BOT", "fl.acme.bot.c-1.15"),
            "fl.acme.bot.c-1"
        );
        assert_eq!(
            parse_inbound("fl.acme.inbound.line.7").unwrap().1.as_str(),
            "line"
        );
        assert_eq!(
            as_published("FL_INBOUND", "fl.acme.inbound.line.7"),
            "fl.acme.inbound.line"
        );
        assert_eq!(
            as_published("FL_INBOUND_KEYED", "fl.acme.inbound.line.u1.7"),
            "fl.acme.inbound.line.u1"
        );
        // A customer key that looks like a partition is not one, on the stream it came from.
        assert_eq!(
            as_published("FL_INBOUND_KEYED", "fl.acme.inbound.line.42"),
            "fl.acme.inbound.line.42"
        );
        assert_eq!(
            as_published("FL_INBOUND", "fl.acme.inbound.line"),
            "fl.acme.inbound.line"
        );
        assert_eq!(as_published("FL_QUEUE", "fl.a.queue.x.1"), "fl.a.queue.x.1");
    }

    #[test]
    fn a_customer_key_is_a_safe_token_and_the_same_for_one_customer() {
        assert_eq!(customer_key("U4af4980629"), "U4af4980629");
        assert_eq!(customer_key("web-visitor_7"), "web-visitor_7");
        let mail = customer_key("amy@example.com");
        assert_eq!(mail, customer_key("amy@example.com"));
        assert_eq!(mail.len(), 17);
        assert!(mail.starts_with('h'), "{mail}");
        assert_ne!(mail, customer_key("bob@example.com"));
        for odd in ["", "a.b", "a b", "*", ">", "客戶", &"x".repeat(65)] {
            let key = customer_key(odd);
            assert!(
                key.chars().all(|c| c.is_ascii_alphanumeric()),
                "{odd:?} -> {key:?}"
            );
        }
        let t = TenantId::parse("acme").unwrap();
        let c = ChannelId::parse("mail").unwrap();
        assert_eq!(
            parse_inbound(&inbound_for_customer(&t, &c, "amy@example.com"))
                .unwrap()
                .1
                .as_str(),
            "mail"
        );
    }

    #[test]
    fn parsers_check_every_token() {
        assert_eq!(
            parse_inbound("fl.acme.inbound.line").unwrap().1.as_str(),
            "line"
        );
        assert!(parse_inbound("fl.acme.inbound").is_err());
        assert!(parse_inbound("fl.acme.inbound.line.k.7.8").is_err());
        assert!(parse_inbound("fl.acme.inbound.line..7").is_err());
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
            inbound_for_customer(&t, &c, "u-1"),
            bot(&t, &uuid::Uuid::nil()),
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
