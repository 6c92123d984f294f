//! Presence messages (`fl.<tenant>.presence.<agent>`), in two versions: version 2 with the
//! statuses of SPEC S2 (ready, away with a reason, logged out), and version 1, from before
//! S2, still read (`not_ready` is away, `offline` is logged out).

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use super::{Version, V1, V2};
use crate::domain::{AgentStatus, SkillSet};

/// `fl.<tenant>.presence.<agent>`, published by the agent desktop or the API: the current
/// form of a presence message, version 2, with the statuses of SPEC S2 (`ready`, `away` with
/// a reason, `logged_out`). Publish it as [`AgentPresenceMessage::V2`].
///
/// `capacity` and `skills` replace the stored values when present and keep them when absent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentPresence {
    pub version: V2,
    /// SPEC S2 (服務狀態): ready (就緒), away (離開) or logged_out (登出).
    pub status: AgentStatus,
    /// Why the agent is away (break, meeting...), shown on dashboards; kept only with `away`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// SPEC capacity (服務上限): conversations the agent may hold in `processing` at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    /// SPEC D4: the agent's skills.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skills: Option<SkillSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// A presence message as published before SPEC S2 (version 1), still accepted: `not_ready`
/// reads as `away`, `offline` as `logged_out`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentPresenceV1 {
    pub version: V1,
    pub status: AgentStatusV1,
    /// Why the agent is not ready (break, meeting...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skills: Option<SkillSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// The statuses of a version 1 presence message (before SPEC S2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatusV1 {
    Ready,
    /// Now `away`.
    NotReady,
    /// Now `logged_out`.
    Offline,
}

impl From<AgentStatusV1> for AgentStatus {
    fn from(s: AgentStatusV1) -> Self {
        match s {
            AgentStatusV1::Ready => Self::Ready,
            AgentStatusV1::NotReady => Self::Away,
            AgentStatusV1::Offline => Self::LoggedOut,
        }
    }
}

/// `fl.<tenant>.presence.<agent>`: a presence message of either version, told apart by its
/// `version` field. Version 2 ([`AgentPresence`]) has the statuses of SPEC S2 (`ready`,
/// `away` with a reason, `logged_out`); version 1 ([`AgentPresenceV1`], before S2) is still
/// read, `not_ready` as `away` and `offline` as `logged_out`. Consumers decode this and take
/// [`AgentPresenceMessage::current`].
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum AgentPresenceMessage {
    V2(AgentPresence),
    V1(AgentPresenceV1),
}

impl AgentPresenceMessage {
    /// The message in its current form: a version 1 status is renamed (SPEC S2), and a
    /// reason is kept only for an agent who is away.
    pub fn current(self) -> AgentPresence {
        let mut p = match self {
            Self::V2(p) => p,
            Self::V1(p) => AgentPresence {
                version: Version,
                status: p.status.into(),
                reason: p.reason,
                capacity: p.capacity,
                skills: p.skills,
                display_name: p.display_name,
            },
        };
        if p.status != AgentStatus::Away {
            p.reason = None;
        }
        p
    }
}

impl From<AgentPresence> for AgentPresenceMessage {
    fn from(p: AgentPresence) -> Self {
        Self::V2(p)
    }
}

impl<'de> Deserialize<'de> for AgentPresenceMessage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        let Some(version) = value.get("version") else {
            return Err(D::Error::missing_field("version"));
        };
        match version.as_u64() {
            Some(2) => serde_json::from_value(value).map(Self::V2),
            Some(1) => serde_json::from_value(value).map(Self::V1),
            _ => {
                return Err(D::Error::custom(format_args!(
                    "unsupported version {version}: this build understands versions 1 and 2"
                )))
            }
        }
        .map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode, encode};

    /// SPEC S2: a version 2 presence carries the product's statuses; a version 1 one (before
    /// S2) is still read, its statuses renamed; each version refuses the other's names.
    #[test]
    fn presence_reads_both_versions_with_the_products_statuses() {
        let read =
            |body: &str| decode::<AgentPresenceMessage>(body.as_bytes()).map(|m| m.current());
        let away = read(r#"{"version":2,"status":"away","reason":"meeting"}"#).unwrap();
        assert_eq!(
            (away.status, away.reason.as_deref()),
            (AgentStatus::Away, Some("meeting"))
        );
        let old =
            read(r#"{"version":1,"status":"not_ready","reason":"lunch","capacity":4}"#).unwrap();
        assert_eq!(
            (old.status, old.reason.as_deref(), old.capacity),
            (AgentStatus::Away, Some("lunch"), Some(4))
        );
        assert_eq!(
            read(r#"{"version":1,"status":"offline"}"#).unwrap().status,
            AgentStatus::LoggedOut
        );
        assert_eq!(
            read(r#"{"version":2,"status":"logged_out"}"#)
                .unwrap()
                .status,
            AgentStatus::LoggedOut
        );
        let ready = read(r#"{"version":2,"status":"ready","reason":"left over"}"#).unwrap();
        assert_eq!(
            (ready.status, ready.reason),
            (AgentStatus::Ready, None),
            "a reason only when away"
        );
        for (body, why) in [
            (
                r#"{"version":2,"status":"not_ready"}"#,
                "unknown variant `not_ready`",
            ),
            (r#"{"version":1,"status":"away"}"#, "unknown variant `away`"),
            (r#"{"version":3,"status":"ready"}"#, "unsupported version 3"),
            (r#"{"status":"ready"}"#, "missing field `version`"),
        ] {
            let e = read(body).unwrap_err();
            assert!(e.reason.contains(why), "{body}: {e}");
            assert_eq!(e.message, "agent-presence");
        }
        let sent = AgentPresenceMessage::from(away.clone());
        let bytes = encode(&sent);
        assert!(std::str::from_utf8(&bytes)
            .unwrap()
            .contains(r#""version":2"#));
        assert_eq!(
            decode::<AgentPresenceMessage>(&bytes).unwrap().current(),
            away
        );
    }
}
