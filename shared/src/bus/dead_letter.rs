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

/// Longest header value and reason a [`DeadLetter`] keeps when it must be cut to fit.
const LETTER_FIELD_MAX: usize = 2048;

impl DeadLetter {
    /// The letter, encoded in at most `max_payload` bytes (the server's limit, less what its
    /// headers take): as it is when it fits; else with its reason and header values cut to
    /// [`LETTER_FIELD_MAX`] characters, then its payload cut to what still fits, the
    /// original's size in `payload_bytes`. A dead letter must always be publishable.
    pub fn fit(mut self, max_payload: usize) -> bytes::Bytes {
        let encoded = crate::wire::encode(&self);
        if encoded.len() <= max_payload {
            return encoded;
        }
        self.reason = cut(&self.reason, LETTER_FIELD_MAX);
        for value in self.headers.values_mut() {
            *value = cut(value, LETTER_FIELD_MAX);
        }
        let payload = std::mem::take(&mut self.payload);
        self.payload_bytes = Some(payload.len() as u64);
        // What the rest takes, with room for the cut marker and the size's digits.
        let rest = crate::wire::encode(&self).len() + 32;
        let mut budget = max_payload.saturating_sub(rest);
        let mut end = 0;
        for (i, c) in payload.char_indices() {
            // An upper bound of what serde_json writes for the character.
            let escaped = match c {
                '"' | '\\' => 2,
                c if (c as u32) < 0x20 => 6,
                c => c.len_utf8(),
            };
            if escaped > budget {
                break;
            }
            budget -= escaped;
            end = i + c.len_utf8();
        }
        self.payload = payload[..end].to_owned();
        crate::wire::encode(&self)
    }
}

/// `text`, or its first `max` characters and a marker saying how long it was.
fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}… ({} bytes in all)", &text[..end], text.len()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::Utc;

    use crate::wire::{decode, encode, DeadLetter, Version};

    fn letter(payload: String) -> DeadLetter {
        DeadLetter {
            version: Version,
            reason: "r".repeat(10_000),
            stream: "FL_INBOUND".into(),
            consumer: "ingest-p0".into(),
            subject: "fl.t.inbound.c.0".into(),
            stream_sequence: 7,
            deliveries: 1,
            payload,
            payload_bytes: None,
            headers: BTreeMap::from([("url".to_owned(), "u".repeat(400_000))]),
            at: Utc::now(),
        }
    }

    #[test]
    fn a_dead_letter_keeps_any_bytes_and_fits_the_limit() {
        // It keeps what the pipeline refuses.
        let small = letter("a\u{0}b".into());
        let kept: DeadLetter = decode(&encode(&small)).unwrap();
        assert_eq!(kept.payload, "a\u{0}b");
        // One that fits is left whole.
        let mut fits = small.clone();
        fits.headers.clear();
        assert_eq!(fits.clone().fit(1 << 20), encode(&fits));
        // Beyond the limit: cut, saying how large the original was. Quotes and control
        // characters take more room encoded than in the text.
        for body in ["x".repeat(900_000), "\"\u{1}é".repeat(300_000)] {
            let max = 64 * 1024;
            let bytes = letter(body.clone()).fit(max);
            assert!(bytes.len() <= max, "{} > {max}", bytes.len());
            let cut: DeadLetter = decode(&bytes).unwrap();
            assert_eq!(cut.payload_bytes, Some(body.len() as u64));
            assert!(body.starts_with(&cut.payload));
            assert!(cut.payload.len() > 10_000, "{}", cut.payload.len());
            assert!(cut.reason.len() < 3000 && cut.reason.contains("10000 bytes in all"));
            assert!(cut.headers["url"].contains("400000 bytes in all"));
        }
    }
}
