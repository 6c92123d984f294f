//! A customer's message to FIRST LINE: the documented subject, `Nats-Msg-Id`, and the
//! `inbound-message` body (README: Subjects and messages; docs/api.md).

use async_nats::HeaderMap;
use firstline_shared::bus::{self, JetStream};
use firstline_shared::domain::{ChannelId, TenantId};
use firstline_shared::subjects;
use firstline_shared::wire::{self, CustomerRef, InboundMessage, Version};
use serde::Deserialize;

/// Longest text a customer may send in one message (characters).
pub const MAX_TEXT: usize = 5_000;

/// What a widget sends: a typed message, or a button press (`postback` = the button's
/// payload, `text` = its label, as the inbound schema says).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerMessage {
    /// Chosen by the widget (a UUID); the same id sent again is the same message.
    pub message_id: String,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub postback: Option<String>,
}

impl CustomerMessage {
    /// Why the message cannot be taken, if it cannot.
    pub fn problem(&self) -> Option<String> {
        let id = &self.message_id;
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Some("message_id must be 1-64 characters of A-Z a-z 0-9 _ -".into());
        }
        if self.text.trim().is_empty() && self.postback.is_none() {
            return Some("the message is empty".into());
        }
        if self.text.chars().count() > MAX_TEXT
            || self.postback.as_ref().is_some_and(|p| p.len() > 1_000)
        {
            return Some(format!("a message holds at most {MAX_TEXT} characters"));
        }
        if self.text.contains('\0') || self.postback.as_ref().is_some_and(|p| p.contains('\0')) {
            return Some("a message may not hold a NUL character".into());
        }
        None
    }
}

/// The subject of a customer's message, `fl.<tenant>.inbound.<channel>.<customer key>`
/// (`FL_INBOUND_KEYED`): ordered with that customer's other messages only, so that one busy
/// channel spreads over every ingest partition (README: the gateway contract). Every publish
/// goes through this ONE function.
pub fn inbound_subject(tenant: &TenantId, channel: &ChannelId, customer_id: &str) -> String {
    subjects::inbound_for_customer(tenant, channel, customer_id)
}

/// `Nats-Msg-Id: <tenant>:<channel>:<message id>` (README; DESIGN.md): the stream drops a
/// second publish of the same message, and ingest stores it once.
pub fn msg_id(tenant: &TenantId, channel: &ChannelId, message_id: &str) -> String {
    format!("{tenant}:{channel}:{message_id}")
}

/// The body published for `message` of `customer_id`.
pub fn body(customer_id: &str, message: &CustomerMessage) -> InboundMessage {
    InboundMessage {
        version: Version,
        message_id: message.message_id.clone(),
        customer: CustomerRef {
            id: customer_id.to_owned(),
            name: None,
        },
        text: message.text.clone(),
        sent_at: Some(chrono::Utc::now()),
        postback: message.postback.clone(),
        email: None,
    }
}

/// Publishes a customer's message and waits for the stream's ack, publishing again with the
/// same id while the ack does not come ([`bus::publish`]).
pub async fn publish(
    js: &JetStream,
    tenant: &TenantId,
    channel: &ChannelId,
    customer_id: &str,
    message: &CustomerMessage,
) -> anyhow::Result<()> {
    let mut headers = HeaderMap::new();
    firstline_shared::telemetry::inject_current(&mut headers);
    bus::publish(
        js,
        inbound_subject(tenant, channel, customer_id),
        &msg_id(tenant, channel, &message.message_id),
        headers,
        wire::encode(&body(customer_id, message)),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str, text: &str, postback: Option<&str>) -> CustomerMessage {
        CustomerMessage {
            message_id: id.into(),
            text: text.into(),
            postback: postback.map(Into::into),
        }
    }

    #[test]
    fn the_documented_subject_id_and_body() {
        let t = TenantId::parse("acme").unwrap();
        let c = ChannelId::parse("webchat").unwrap();
        assert_eq!(
            inbound_subject(&t, &c, "anon-1"),
            "fl.acme.inbound.webchat.anon-1"
        );
        // A customer id that is no subject token is hashed into one (`subjects::customer_key`).
        let odd = inbound_subject(&t, &c, "客戶 1");
        assert!(
            odd.starts_with("fl.acme.inbound.webchat.h") && odd.split('.').count() == 5,
            "{odd}"
        );
        assert_eq!(msg_id(&t, &c, "m-1"), "acme:webchat:m-1");
        let press = body("member-1", &message("m-2", "查訂單", Some("orders")));
        let json = serde_json::to_value(&press).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["customer"]["id"], "member-1");
        assert_eq!(json["text"], "查訂單");
        assert_eq!(json["postback"], "orders");
        // What ingest decodes.
        wire::decode::<InboundMessage>(&wire::encode(&press)).unwrap();
    }

    #[test]
    fn bad_messages_are_named() {
        assert!(message("m-1", "hi", None).problem().is_none());
        assert!(message("m-1", "", Some("p")).problem().is_none());
        assert!(message("", "hi", None).problem().is_some());
        assert!(message("a.b", "hi", None).problem().is_some());
        assert!(message("m-1", "  ", None).problem().is_some());
        assert!(message("m-1", &"x".repeat(MAX_TEXT + 1), None)
            .problem()
            .is_some());
        assert!(message("m-1", "a\0b", None).problem().is_some());
    }
}
