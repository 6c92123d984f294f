//! Domain types: ids that are safe to put in a NATS subject, skill sets, and the
//! conversation states of SPEC S with the transitions the lifecycle (SPEC L) allows.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Why a value was refused by a checking constructor.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} {value:?}: {why}")]
pub struct InvalidValue {
    pub what: &'static str,
    pub value: String,
    pub why: &'static str,
}

/// Checks a token that becomes one element of a NATS subject: 1 to 64 characters of
/// `A-Z a-z 0-9 _ -`. Dots, spaces and wildcards would change the subject's meaning.
fn check_token(what: &'static str, value: &str) -> Result<(), InvalidValue> {
    let fail = |why| {
        Err(InvalidValue {
            what,
            value: value.to_owned(),
            why,
        })
    };
    if value.is_empty() {
        return fail("must not be empty");
    }
    if value.len() > 64 {
        return fail("must be at most 64 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return fail("may contain only letters, digits, '_' and '-'");
    }
    Ok(())
}

macro_rules! subject_token {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidValue> {
                let value = value.into();
                check_token($what, &value)?;
                Ok(Self(value))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = InvalidValue;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(value)
            }
        }
        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl FromStr for $name {
            type Err = InvalidValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
    };
}

subject_token!(
    /// A tenant: one customer-service organisation. First token of every subject.
    TenantId,
    "tenant id"
);
subject_token!(
    /// A channel of a tenant: a LINE official account, a web-chat widget, a mailbox...
    ChannelId,
    "channel id"
);
subject_token!(
    /// An agent (專員) of a tenant.
    AgentId,
    "agent id"
);

/// A set of skills (技能). SPEC D4: a conversation is offered only to an agent whose
/// skills are a superset of the conversation's required skills.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct SkillSet(BTreeSet<String>);

/// Deserialized through [`SkillSet::new`], so that JSON skills are normalised like stored ones.
impl<'de> Deserialize<'de> for SkillSet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<String>::deserialize(deserializer).map(SkillSet::new)
    }
}

impl SkillSet {
    /// Skills are trimmed and compared case-insensitively (stored lower-case); empty names are dropped.
    pub fn new<I, S>(skills: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        SkillSet(
            skills
                .into_iter()
                .map(|s| {
                    s.as_ref()
                        .trim()
                        .to_lowercase()
                        .replace(char::is_control, "")
                })
                .filter(|s| !s.is_empty())
                .collect(),
        )
    }
    /// SPEC D4: every skill of `required` is in `self`.
    pub fn covers(&self, required: &SkillSet) -> bool {
        required.0.is_subset(&self.0)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn to_vec(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

/// SPEC D10 assignment weight (分派權重): an integer from 1 to [`MAX_WEIGHT`]; a queued
/// conversation's score is `weight x seconds waited`. 1 is the default of a channel.
pub const MAX_WEIGHT: i32 = 1_000_000;

/// Checks a weight given by a person (API, configuration, a bot flow).
pub fn check_weight(weight: i32) -> Result<i32, InvalidValue> {
    if (1..=MAX_WEIGHT).contains(&weight) {
        Ok(weight)
    } else {
        Err(InvalidValue {
            what: "weight",
            value: weight.to_string(),
            why: "must be an integer from 1 to 1000000",
        })
    }
}

/// The weight that replaces the first version's strict channel `priority` (still read from
/// old configurations and API clients): `p + 1`, so priority 0 (the default) is weight 1;
/// negative priorities become 1 (V15 migrated stored priorities the same way).
pub fn weight_from_priority(priority: i32) -> i32 {
    priority.clamp(0, MAX_WEIGHT - 1) + 1
}

/// The states of a conversation (SPEC S).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConversationState {
    /// 對話腳本: in a scripted bot flow.
    Script,
    /// 機器人: the bot is answering.
    Bot,
    /// 等待中: queued for a human, in order.
    Waiting,
    /// 分派中: offered to an agent, waiting for the accept.
    Assigning,
    /// 處理中: an agent accepted and serves the customer.
    Processing,
    /// 已完成: done.
    Completed,
}

impl ConversationState {
    pub const ALL: [ConversationState; 6] = [
        Self::Script,
        Self::Bot,
        Self::Waiting,
        Self::Assigning,
        Self::Processing,
        Self::Completed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Script => "script",
            Self::Bot => "bot",
            Self::Waiting => "waiting",
            Self::Assigning => "assigning",
            Self::Processing => "processing",
            Self::Completed => "completed",
        }
    }

    /// SPEC L5: in `waiting`, `assigning` and `processing` the conversation has left the bot.
    pub fn is_bot(self) -> bool {
        matches!(self, Self::Script | Self::Bot)
    }

    /// The lifecycle's edges (SPEC L2-L8), plus the ones our reading of the open points adds:
    /// `assigning -> waiting` (a declined or expired offer with nobody else to take it is
    /// re-queued only by an explicit decline), `processing -> waiting` (a transfer to skills)
    /// and `processing -> processing` (SPEC D12: a transfer to a named agent, who serves it at
    /// once).
    pub fn can_become(self, to: ConversationState) -> bool {
        use ConversationState::*;
        matches!(
            (self, to),
            (Script, Bot)
                | (Bot, Script)
                | (Script | Bot, Waiting)   // L4 hand-over
                | (Script | Bot, Completed) // L3 the bot finishes it
                | (Waiting, Assigning)      // L6
                | (Assigning, Processing)   // L7
                | (Assigning, Waiting)      // decline with no other agent (README)
                | (Processing, Waiting)     // transfer to skills (README)
                | (Processing, Processing)  // SPEC D12: transfer to a named agent
                | (Waiting | Assigning | Processing, Completed) // L8, and a close by a supervisor
        )
    }
}

impl fmt::Display for ConversationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ConversationState {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| InvalidValue {
                what: "conversation state",
                value: s.to_owned(),
                why: "not one of script, bot, waiting, assigning, processing, completed",
            })
    }
}

/// An agent's service status (服務狀態), SPEC S2, with the product's names: `ready` (就緒),
/// `away` (離開, online but taking no new work, with a reason: break, meeting...) and
/// `logged_out` (登出). Only ready agents are offered conversations (SPEC D1-D3); away and
/// logged-out agents keep the conversations they serve. Before S2 the names were `not_ready`
/// and `offline`: version 1 presence messages and the API still accept them
/// ([`crate::wire::AgentStatusV1`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// 就緒: may be offered conversations.
    Ready,
    /// 離開: signed in, offered nothing new; the reason says why (break, meeting...).
    Away,
    /// 登出: signed out.
    LoggedOut,
}

impl AgentStatus {
    pub const ALL: [Self; 3] = [Self::Ready, Self::Away, Self::LoggedOut];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Away => "away",
            Self::LoggedOut => "logged_out",
        }
    }
    pub fn is_online(self) -> bool {
        self != Self::LoggedOut
    }
    /// SPEC S2: only a ready agent is offered conversations.
    pub fn takes_offers(self) -> bool {
        self == Self::Ready
    }
}

impl FromStr for AgentStatus {
    type Err = InvalidValue;
    /// The product's names, and the names before SPEC S2 (`not_ready`, `offline`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ready" => Ok(Self::Ready),
            "away" | "not_ready" => Ok(Self::Away),
            "logged_out" | "offline" => Ok(Self::LoggedOut),
            _ => Err(InvalidValue {
                what: "agent status",
                value: s.to_owned(),
                why: "not one of ready, away, logged_out (or the older not_ready, offline)",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_refuse_what_would_break_a_subject() {
        assert!(TenantId::parse("acme").is_ok());
        assert!(ChannelId::parse("line-main_2").is_ok());
        for bad in ["", "a.b", "a b", "*", ">", "租戶", &"x".repeat(65)] {
            let err = TenantId::parse(bad).unwrap_err();
            assert_eq!(err.what, "tenant id");
        }
    }

    #[test]
    fn ids_deserialize_through_the_check() {
        let err = serde_json::from_str::<AgentId>("\"a.b\"").unwrap_err();
        assert!(err.to_string().contains("invalid agent id"), "{err}");
    }

    #[test]
    fn skills_are_normalised_and_covered_as_sets() {
        let agent = SkillSet::new([" English", "billing", "VIP"]);
        assert!(agent.covers(&SkillSet::new(["english", "vip"])));
        assert!(agent.covers(&SkillSet::default()));
        assert!(!agent.covers(&SkillSet::new(["english", "日本語"])));
        assert_eq!(SkillSet::new(["a", " ", "A"]).len(), 1);
        let from_json: SkillSet = serde_json::from_str(r#"["English ", "VIP"]"#).unwrap();
        assert!(from_json.covers(&SkillSet::new(["english", "vip"])));
    }

    #[test]
    fn lifecycle_edges_follow_the_flowchart() {
        use ConversationState::*;
        // SPEC L2-L8
        assert!(Bot.can_become(Waiting));
        assert!(Bot.can_become(Completed));
        assert!(Waiting.can_become(Assigning));
        assert!(Assigning.can_become(Processing));
        assert!(Processing.can_become(Completed));
        // L5: a conversation that left the bot never goes back to it.
        for s in [Waiting, Assigning, Processing, Completed] {
            assert!(!s.can_become(Bot) && !s.can_become(Script));
        }
        // L9: completed is final; the next message opens a new conversation.
        for s in ConversationState::ALL {
            assert!(!Completed.can_become(s));
        }
        // L6/L7: no skipping the offer.
        assert!(!Waiting.can_become(Processing));
        // Transfers: to skills back to the queue, to a named agent straight to them (SPEC D12).
        assert!(Processing.can_become(Waiting));
        assert!(Processing.can_become(Processing));
        // No other state goes to itself.
        for s in [Script, Bot, Waiting, Assigning, Completed] {
            assert!(!s.can_become(s), "{s} -> {s}");
        }
    }

    proptest! {
        #[test]
        fn state_names_round_trip(i in 0usize..6) {
            let s = ConversationState::ALL[i];
            prop_assert_eq!(s.as_str().parse::<ConversationState>().unwrap(), s);
            prop_assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{}\"", s.as_str()));
        }
    }

    /// SPEC S2: the product's names round-trip; the names before S2 still parse, to the same
    /// statuses; only ready takes offers, only logged out is offline.
    #[test]
    fn agent_statuses_have_the_products_names_and_read_the_old_ones() {
        for s in AgentStatus::ALL {
            assert_eq!(s.as_str().parse::<AgentStatus>().unwrap(), s);
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(
            "not_ready".parse::<AgentStatus>().unwrap(),
            AgentStatus::Away
        );
        assert_eq!(
            "offline".parse::<AgentStatus>().unwrap(),
            AgentStatus::LoggedOut
        );
        assert!("busy".parse::<AgentStatus>().is_err());
        let takes: Vec<_> = AgentStatus::ALL
            .into_iter()
            .filter(|s| s.takes_offers())
            .collect();
        assert_eq!(takes, [AgentStatus::Ready]);
        assert!(AgentStatus::Away.is_online() && !AgentStatus::LoggedOut.is_online());
    }
}
