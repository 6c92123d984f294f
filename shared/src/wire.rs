//! The wire contract: every JSON body that travels on NATS, versioned.
//!
//! Every body has `"version": 1`. A body with another version, bad JSON or a missing
//! field cannot be handled and is dead-lettered with the reason ([`decode`]). Each type
//! here has a JSON Schema in `schemas/`, generated from these types ([`all_schemas`]) and
//! kept equal to them by a test.
//!
//! Tagged bodies (`AgentAction`, `AgentNotification`, `Delivery`) carry a `"type"` field.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::domain::{AgentId, ChannelId, ConversationState, SkillSet};

mod presence;
pub use presence::{AgentPresence, AgentPresenceMessage, AgentPresenceV1, AgentStatusV1};

/// The `version` field: serializes as the number `N` and refuses any other number.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Version<const N: u8>;

/// Version 1: the current version of every message but [`AgentPresence`].
pub type V1 = Version<1>;
/// Version 2 of a message (so far only [`AgentPresence`], SPEC S2).
pub type V2 = Version<2>;

impl<const N: u8> fmt::Debug for Version<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{N}")
    }
}

impl<const N: u8> Serialize for Version<N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(N)
    }
}

impl<'de, const N: u8> Deserialize<'de> for Version<N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let got = serde_json::Value::deserialize(deserializer)?;
        if got.as_u64() == Some(u64::from(N)) {
            Ok(Version)
        } else {
            Err(serde::de::Error::custom(format_args!(
                "unsupported version {got}: this build understands version {N}"
            )))
        }
    }
}

impl<const N: u8> JsonSchema for Version<N> {
    fn schema_name() -> Cow<'static, str> {
        format!("Version{N}").into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({
            "description": "Version of the message format.",
            "type": "integer",
            "const": N,
        })
    }
}

/// Why a body could not be decoded. Always poison: the same bytes never decode later.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode {message}: {reason}")]
pub struct DecodeError {
    pub message: &'static str,
    pub reason: String,
}

/// Decodes a body, naming the message and the serde error (field, line and column). A text
/// with a NUL character (`\u0000`) is refused too, naming its field: Postgres cannot store
/// one, so the message could never be handled (except in [`DeadLetter`], which keeps any bytes).
pub fn decode<T: WireMessage>(payload: &[u8]) -> Result<T, DecodeError> {
    let message = serde_json::from_slice(payload).map_err(|e| DecodeError {
        message: T::NAME,
        reason: e.to_string(),
    })?;
    // JSON can carry a NUL only escaped: the cheap scan finds every candidate, and the field
    // is looked for only then (`\\u0000`, an escaped backslash, is no NUL).
    if T::REFUSES_NUL && payload.windows(6).any(|w| w == b"\\u0000") {
        if let Some(field) = field_with_nul(payload) {
            return Err(DecodeError {
                message: T::NAME,
                reason: format!(
                    "field `{field}` contains a NUL character (\\u0000), which no text may hold"
                ),
            });
        }
    }
    Ok(message)
}

/// The path (`customer.name`, `buttons[0].label`) of the first string of a JSON body that
/// holds a NUL character, if any.
fn field_with_nul(payload: &[u8]) -> Option<String> {
    fn walk(value: &serde_json::Value, path: &str) -> Option<String> {
        match value {
            serde_json::Value::String(s) => s.contains('\0').then(|| path.to_owned()),
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v, &format!("{path}[{i}]"))),
            serde_json::Value::Object(fields) => fields.iter().find_map(|(k, v)| {
                let path = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if k.contains('\0') {
                    return Some(path);
                }
                walk(v, &path)
            }),
            _ => None,
        }
    }
    walk(&serde_json::from_slice(payload).ok()?, "")
}

/// Encodes a body. Our types always serialize.
pub fn encode<T: WireMessage>(message: &T) -> bytes::Bytes {
    serde_json::to_vec(message)
        .expect("wire messages serialize")
        .into()
}

/// A message of the wire contract, with the name of its schema file.
pub trait WireMessage: Serialize + DeserializeOwned + JsonSchema {
    /// The schema's file stem in `schemas/`.
    const NAME: &'static str;
    /// Whether [`decode`] refuses a text holding a NUL character.
    const REFUSES_NUL: bool = true;
}

macro_rules! wire_messages {
    ($($ty:ty => $name:literal $([refuses_nul: $nul:expr])?),* $(,)?) => {
        $(impl WireMessage for $ty {
            const NAME: &'static str = $name;
            $(const REFUSES_NUL: bool = $nul;)?
        })*
        /// Every message's schema, by file stem: the source of `schemas/*.schema.json`.
        pub fn all_schemas() -> Vec<(&'static str, Schema)> {
            vec![$(($name, schemars::schema_for!($ty))),*]
        }
    };
}

wire_messages! {
    InboundMessage => "inbound-message",
    AgentPresenceMessage => "agent-presence",
    AgentAction => "agent-action",
    AgentNotification => "agent-notification",
    OutboundMessage => "outbound-message",
    ConversationEvent => "conversation-event",
    BotWork => "bot-work",
    QueueSignal => "queue-signal",
    Delivery => "delivery",
    // A dead letter keeps the original's bytes, whatever they are.
    DeadLetter => "dead-letter" [refuses_nul: false],
    WebhookDelivery => "webhook-delivery",
}

/// The customer as the channel knows them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CustomerRef {
    /// The channel's own id for the customer (a LINE user id, a chat visitor id, an address...).
    pub id: String,
    /// A display name, when the channel has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `fl.<tenant>.inbound.<channel>.<customer key>` (ordered per customer: spread over every
/// ingest instance) or `fl.<tenant>.inbound.<channel>` (ordered per channel, slower), published
/// by a gateway: a customer's message. The customer key is the customer id when it is 1-64 of
/// `A-Z a-z 0-9 _ -`, else `h` and the first 16 hex digits of the SHA-256 of the id.
///
/// The gateway sets the header `Nats-Msg-Id: <tenant>:<channel>:<message_id>`; with or without
/// it the message is stored once (unique on tenant, channel, message_id). `FL_INBOUND` keeps
/// ids 100 ms only, so that the old form `<channel>:<message_id>` cannot drop another
/// tenant's message with the same id sent later (docs/operations.md). SPEC L1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InboundMessage {
    pub version: V1,
    /// The channel's id of this message; unique within the channel.
    pub message_id: String,
    pub customer: CustomerRef,
    /// The text the customer typed (may be empty for a sticker or an attachment).
    #[serde(default)]
    pub text: String,
    /// When the customer sent it, by the channel's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime<Utc>>,
    /// A button press (postback): the `payload` of the [`QuickReply`] the customer chose. The
    /// gateway puts the button's label (or what the channel shows) in `text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postback: Option<String>,
    /// An e-mail's headers, from an e-mail gateway (the body goes in `text`). Optional and
    /// added in version 1: a consumer that does not know it ignores it. Bot flows' condition
    /// steps can match on them (SPEC D10: urgent mail gets a higher assignment weight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<EmailHeaders>,
}

/// The headers of an inbound e-mail that routing may look at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EmailHeaders {
    #[serde(default)]
    pub subject: String,
    /// The sender's address (`From`), e.g. `ada@example.com` or `Ada <ada@example.com>`.
    #[serde(default)]
    pub from: String,
    /// The recipients (`To` and `Cc`): which of the tenant's addresses it was sent to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
}

/// `fl.<tenant>.agent.<agent>.action`, published by the agent desktop or the API.
/// Publish with `Nats-Msg-Id: <action_id>`; an action is applied once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentAction {
    pub version: V1,
    /// Chosen by the client; makes the action idempotent.
    pub action_id: Uuid,
    #[serde(flatten)]
    pub kind: AgentActionKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentActionKind {
    /// SPEC L7: take the offered conversation.
    Accept { conversation_id: Uuid },
    /// Refuse the offer: it is re-dispatched at once, never to the same agent (README).
    Decline {
        conversation_id: Uuid,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A message to the customer of a conversation the agent is serving.
    Reply { conversation_id: Uuid, text: String },
    /// SPEC L8: the problem is solved.
    Close { conversation_id: Uuid },
    /// Hands a conversation the agent is serving to another agent or back to the queue.
    /// With `to_agent` (SPEC D12), straight to that agent, `processing`, whatever their status
    /// (ready, away, logged out) and load; `skills`, if given too, become what it requires
    /// should it go back to the queue later. Without `to_agent` (README: transfer), back to
    /// `waiting` at its place for agents with `skills` (else its current skills), never
    /// offered back to the agent who transferred it.
    Transfer {
        conversation_id: Uuid,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_agent: Option<AgentId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        skills: Option<SkillSet>,
    },
}

impl AgentActionKind {
    pub fn conversation_id(&self) -> Uuid {
        match self {
            Self::Accept { conversation_id }
            | Self::Decline {
                conversation_id, ..
            }
            | Self::Reply {
                conversation_id, ..
            }
            | Self::Close { conversation_id }
            | Self::Transfer {
                conversation_id, ..
            } => *conversation_id,
        }
    }
}

/// `fl.<tenant>.notify.<agent>`, published by the notifier for the agent's desktop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentNotification {
    pub version: V1,
    pub notification_id: Uuid,
    pub conversation_id: Uuid,
    #[serde(flatten)]
    pub kind: NotificationKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NotificationKind {
    /// SPEC 分派: a conversation is offered to you; accept before `deadline` (SPEC D8).
    Offer {
        offer_id: Uuid,
        channel: ChannelId,
        customer: CustomerRef,
        required_skills: SkillSet,
        deadline: DateTime<Utc>,
    },
    /// The offer is withdrawn (timed out, taken back); do not accept it.
    OfferRevoked { offer_id: Uuid, reason: String },
    /// Your accept went through: the conversation is yours (`processing`).
    Assigned { offer_id: Uuid },
    /// A customer message in a conversation you serve.
    CustomerMessage {
        message_id: Uuid,
        customer: CustomerRef,
        text: String,
        at: DateTime<Utc>,
    },
    /// The conversation is `completed`.
    Closed,
    /// Your transfer went through: the conversation is no longer yours. With `to_agent`, that
    /// agent serves it now (SPEC D12: `processing`); without, it is back in the queue for
    /// agents with `required_skills`.
    Transferred {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_agent: Option<AgentId>,
        required_skills: SkillSet,
    },
    /// SPEC D12: `from_agent` transferred a conversation to you, and you serve it now
    /// (`processing`), whatever your status and load: a deliberate act of a colleague, with no
    /// offer to accept. Read its transcript and reply as to any conversation you serve.
    TransferredToYou {
        from_agent: AgentId,
        channel: ChannelId,
        customer: CustomerRef,
        required_skills: SkillSet,
    },
    /// An action of yours could not be applied.
    ActionRejected { action_id: Uuid, reason: String },
}

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Author {
    Customer,
    Bot,
    Agent,
}

impl Author {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Bot => "bot",
            Self::Agent => "agent",
        }
    }
}

/// `fl.<tenant>.outbound.<channel>`, published by the notifier for the gateway to deliver.
/// `Nats-Msg-Id` is `message_id`: a gateway that sees it twice sends it once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OutboundMessage {
    pub version: V1,
    pub message_id: Uuid,
    pub conversation_id: Uuid,
    /// To whom: the channel's id of the customer.
    pub customer_id: String,
    pub author: Author,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    pub text: String,
    /// Quick-reply buttons to show under the text (bot messages); a press comes back as an
    /// inbound message with `postback` = the button's `payload`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buttons: Vec<QuickReply>,
    /// An image to show with the text (bot messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    pub at: DateTime<Utc>,
}

/// A quick-reply button of an outbound message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QuickReply {
    /// What the button shows.
    pub label: String,
    /// What comes back in `postback` when the customer presses it.
    pub payload: String,
}

/// `fl.<tenant>.events.conversation`: one state change of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConversationEvent {
    pub version: V1,
    pub event_id: Uuid,
    pub conversation_id: Uuid,
    pub channel: ChannelId,
    pub customer_id: String,
    /// `null` when the conversation was created.
    pub from: Option<ConversationState>,
    pub to: ConversationState,
    /// The agent offered or serving, where there is one (after a transfer to a named agent,
    /// the one who serves it now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    /// On a transfer from one agent to another (`processing` -> `processing`, SPEC D12): the
    /// agent who served it until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_agent_id: Option<AgentId>,
    /// What caused it: `new_conversation`, `handover` (a hand-over keyword), `handover_after_hours`,
    /// `bot_idle`, `offered`, `reoffered`, `accepted`, `declined`, `transferred`, `closed_by_agent`...
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// Internal, `fl.<tenant>.bot.<channel>`: a customer message for the bot (ingest -> bot-router).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BotWork {
    pub version: V1,
    pub conversation_id: Uuid,
    pub message_id: Uuid,
    pub text: String,
    /// The pressed button's payload, when the message is a postback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postback: Option<String>,
    /// The e-mail's headers, when it came from an e-mail gateway (for flow conditions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<EmailHeaders>,
}

/// Internal, `fl.<tenant>.queue.<reason>`: the waiting queue or the offers of a tenant
/// changed; the dispatcher runs a pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QueueSignal {
    pub version: V1,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<Uuid>,
    pub reason: String,
}

/// Internal, `fl.<tenant>.delivery.<customer|agent>`: something the notifier delivers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Delivery {
    /// To the customer through the gateway of `channel`.
    ToCustomer {
        version: V1,
        channel: ChannelId,
        message: OutboundMessage,
    },
    /// To an agent's desktop.
    ToAgent {
        version: V1,
        agent_id: AgentId,
        notification: AgentNotification,
    },
}

/// The body the API POSTs to a tenant's webhook URLs for one conversation event, signed as
/// Standard Webhooks says (`webhook-id`, `webhook-timestamp`, `webhook-signature`) and, for one
/// more version, in the `FirstLine-Signature` header (docs/api.md). The same on every try.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookDelivery {
    pub version: V1,
    /// The event's id: a receiver drops a second delivery of the same id.
    pub id: Uuid,
    /// `conversation.<state>`: the state the conversation went into.
    #[serde(rename = "type")]
    pub kind: String,
    pub tenant: String,
    /// When the change happened (the event's `at`).
    pub created_at: DateTime<Utc>,
    pub data: ConversationEvent,
}

/// `fl.<tenant>.deadletter.<stream>`: a message that can never be handled, with the reason.
/// The original bytes are kept, so it can be inspected and replayed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeadLetter {
    pub version: V1,
    pub reason: String,
    pub stream: String,
    pub consumer: String,
    pub subject: String,
    pub stream_sequence: u64,
    pub deliveries: u64,
    /// The original body, as text (invalid UTF-8 replaced); only its beginning when
    /// `payload_bytes` is set.
    pub payload: String,
    /// Set when `payload` holds only the beginning of the original body, which was this many
    /// bytes: the whole letter would not fit in the server's `max_payload`. Such a letter
    /// tells what arrived but cannot be replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_bytes: Option<u64>,
    pub headers: BTreeMap<String, String>,
    pub at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_decodes_a_gateways_hand_written_json() {
        let body =
            r#"{"version":1,"message_id":"m1","customer":{"id":"U1","name":"小明"},"text":"你好"}"#;
        let m: InboundMessage = decode(body.as_bytes()).unwrap();
        assert_eq!(m.customer.name.as_deref(), Some("小明"));
        assert_eq!(m.text, "你好");
    }

    #[test]
    fn decode_errors_name_the_problem() {
        let bad_json = decode::<InboundMessage>(b"{not json").unwrap_err();
        assert!(
            bad_json.reason.contains("key must be a string"),
            "{bad_json}"
        );
        let missing =
            decode::<InboundMessage>(br#"{"version":1,"customer":{"id":"U1"}}"#).unwrap_err();
        assert!(
            missing.reason.contains("missing field `message_id`"),
            "{missing}"
        );
        let version =
            decode::<InboundMessage>(br#"{"version":2,"message_id":"m","customer":{"id":"U1"}}"#)
                .unwrap_err();
        assert!(
            version.reason.contains("unsupported version 2"),
            "{version}"
        );
        assert_eq!(version.message, "inbound-message");
    }

    #[test]
    fn actions_are_tagged_by_type() {
        let id = Uuid::nil();
        let body = format!(
            r#"{{"version":1,"action_id":"{id}","type":"reply","conversation_id":"{id}","text":"hi"}}"#
        );
        let a: AgentAction = decode(body.as_bytes()).unwrap();
        assert_eq!(
            a.kind,
            AgentActionKind::Reply {
                conversation_id: id,
                text: "hi".into()
            }
        );
        let round: AgentAction = decode(&encode(&a)).unwrap();
        assert_eq!(round, a);
        let unknown = format!(r#"{{"version":1,"action_id":"{id}","type":"dance"}}"#);
        assert!(decode::<AgentAction>(unknown.as_bytes())
            .unwrap_err()
            .reason
            .contains("unknown variant `dance`"));
    }

    #[test]
    fn a_nul_character_is_refused_naming_its_field() {
        let inbound =
            br#"{"version":1,"message_id":"m1","customer":{"id":"U1"},"text":"a\u0000b"}"#;
        let e = decode::<InboundMessage>(inbound).unwrap_err();
        assert_eq!(e.message, "inbound-message");
        assert!(e.reason.contains("field `text`"), "{e}");
        assert!(e.reason.contains("NUL"), "{e}");
        let name = br#"{"version":1,"message_id":"m1","customer":{"id":"U1","name":"\u0000"}}"#;
        let e = decode::<InboundMessage>(name).unwrap_err();
        assert!(e.reason.contains("field `customer.name`"), "{e}");
        let id = Uuid::nil();
        let reply = format!(
            r#"{{"version":1,"action_id":"{id}","type":"reply","conversation_id":"{id}","text":"x\u0000"}}"#
        );
        let e = decode::<AgentAction>(reply.as_bytes()).unwrap_err();
        assert!(e.reason.contains("field `text`"), "{e}");
        let presence = br#"{"version":1,"status":"not_ready","reason":"lunch\u0000"}"#;
        let e = decode::<AgentPresenceMessage>(presence).unwrap_err();
        assert!(e.reason.contains("field `reason`"), "{e}");
        // An escaped backslash followed by "u0000" is text, not a NUL.
        let text = br#"{"version":1,"message_id":"m1","customer":{"id":"U1"},"text":"C:\\u0000"}"#;
        assert_eq!(decode::<InboundMessage>(text).unwrap().text, "C:\\u0000");
    }
}
