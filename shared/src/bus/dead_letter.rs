//! Dead letters: a message that can never be handled, or whose deliveries ran out, is published
//! to `fl.<tenant>.deadletter.<stream>` with the reason (README: Operations), then `Term`-acked.
//! A letter always fits in the server's `max_payload`: the original's bytes are cut when they
//! must be ([`DeadLetter::fit`]).

use std::collections::BTreeMap;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::Utc;

use super::{publish, ConsumerSpec, JetStream};
use crate::subjects;
use crate::wire::{DeadLetter, Version};

/// Room left in a message for the headers the publish adds (`Nats-Msg-Id`...).
const HEADER_ROOM: usize = 1024;

/// The largest body this client may publish with a few headers: the server's `max_payload`
/// less [`HEADER_ROOM`].
pub fn max_body(js: &JetStream) -> usize {
    js.client()
        .server_info()
        .max_payload
        .saturating_sub(HEADER_ROOM)
        .max(HEADER_ROOM)
}

/// Publishes the dead letter of `message` (its payload, headers and `reason`); de-duplicated
/// by stream, consumer and stream sequence, so a retried dead-lettering stores one letter.
pub async fn dead_letter(
    js: &JetStream,
    spec: &ConsumerSpec,
    message: &jetstream::Message,
    stream_sequence: u64,
    deliveries: i64,
    reason: &str,
) -> anyhow::Result<()> {
    let original = Original {
        subject: message.subject.as_str(),
        headers: message.headers.as_ref(),
        payload: &message.payload,
        stream_sequence,
    };
    dead_letter_of(
        js,
        spec.stream.name,
        spec.durable,
        original,
        deliveries,
        reason,
    )
    .await
}

/// A stored message, as a dead letter tells of it.
#[derive(Clone, Copy, Debug)]
pub struct Original<'a> {
    pub subject: &'a str,
    pub headers: Option<&'a HeaderMap>,
    pub payload: &'a Bytes,
    pub stream_sequence: u64,
}

/// Publishes the dead letter of `original`, a message of `stream` that `consumer` could not
/// handle; de-duplicated by stream, consumer and stream sequence.
pub async fn dead_letter_of(
    js: &JetStream,
    stream: &'static str,
    consumer: &'static str,
    original: Original<'_>,
    deliveries: i64,
    reason: &str,
) -> anyhow::Result<()> {
    let headers: BTreeMap<String, String> = original
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|(k, v)| {
            let v = v.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ");
            (k.to_string(), v)
        })
        .collect();
    crate::metrics::dead_lettered(stream, consumer);
    let tenant = subjects::split(original.subject)
        .map(|(t, _, _)| t)
        .filter(|t| crate::domain::TenantId::parse(*t).is_ok())
        .unwrap_or("_")
        .to_owned();
    let letter = DeadLetter {
        version: Version,
        reason: reason.to_owned(),
        stream: stream.to_owned(),
        consumer: consumer.to_owned(),
        subject: original.subject.to_owned(),
        stream_sequence: original.stream_sequence,
        deliveries: deliveries.max(0) as u64,
        payload: String::from_utf8_lossy(original.payload).into_owned(),
        payload_bytes: None,
        headers,
        at: Utc::now(),
    };
    let msg_id = format!("dl:{stream}:{consumer}:{}", original.stream_sequence);
    publish(
        js,
        subjects::dead_letter(&tenant, stream),
        &msg_id,
        HeaderMap::new(),
        letter.fit(max_body(js)),
    )
    .await
    .map(|_| ())
}
