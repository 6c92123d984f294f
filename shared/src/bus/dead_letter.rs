//! Dead letters: a message that can never be handled, or whose deliveries ran out, is published
//! to `fl.<tenant>.deadletter.<stream>` with the reason (README: Operations), then `Term`-acked.

use std::collections::BTreeMap;

use async_nats::jetstream;
use async_nats::HeaderMap;
use chrono::Utc;

use super::{publish, ConsumerSpec, JetStream};
use crate::subjects;
use crate::wire::{self, DeadLetter, Version};

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
    let headers: BTreeMap<String, String> = message
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|(k, v)| {
            let v = v.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ");
            (k.to_string(), v)
        })
        .collect();
    crate::metrics::dead_lettered(spec.stream.name, spec.durable);
    let subject = message.subject.to_string();
    let tenant = subjects::split(&subject)
        .map(|(t, _, _)| t)
        .filter(|t| crate::domain::TenantId::parse(*t).is_ok())
        .unwrap_or("_")
        .to_owned();
    let letter = DeadLetter {
        version: Version,
        reason: reason.to_owned(),
        stream: spec.stream.name.to_owned(),
        consumer: spec.durable.to_owned(),
        subject,
        stream_sequence,
        deliveries: deliveries.max(0) as u64,
        payload: String::from_utf8_lossy(&message.payload).into_owned(),
        headers,
        at: Utc::now(),
    };
    let msg_id = format!(
        "dl:{}:{}:{}",
        spec.stream.name, spec.durable, stream_sequence
    );
    publish(
        js,
        subjects::dead_letter(&tenant, spec.stream.name),
        &msg_id,
        HeaderMap::new(),
        wire::encode(&letter),
    )
    .await
    .map(|_| ())
}
