//! Strays of the partitioned streams: messages stored under a subject that no partition's
//! consumer takes, found and dead-lettered.
//!
//! `FL_INBOUND` and `FL_BOT` rewrite `fl.<t>.<kind>.<c>` to `fl.<t>.<kind>.<c>.<p>` as they
//! store it ([`subjects::PARTITIONS`]), and each partition's consumer takes
//! `fl.*.<kind>.*.<p>`. A publisher can choose a subject the transform leaves alone: a
//! literal wildcard token (`fl.acme.inbound.*`, `fl.acme.inbound.>`) is captured by the stream
//! but not rewritten, so it is stored as published, with four tokens, and no consumer would
//! ever be handed it. No consumer filter can take a literal `>` without taking the whole
//! stream, so each worker of a partitioned stream looks for strays instead: every
//! [`SWEEP_EVERY`], one direct get (`multi_last` of the stream's own four-token pattern,
//! which only untransformed subjects match) lists them; each is dead-lettered with the
//! reason and then removed from the stream. Several instances may sweep at once: the letter
//! is de-duplicated by stream sequence.

use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::dead_letter::{dead_letter_of, Original};
use super::JetStream;
use crate::subjects::StreamSpec;

/// How often a partitioned stream is searched for strays.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Strays looked at in one request, at most.
const BATCH: usize = 100;

/// One stored message that no consumer takes.
#[derive(Debug)]
struct Stray {
    subject: String,
    headers: Option<async_nats::HeaderMap>,
    payload: Bytes,
    stream_sequence: u64,
}

/// Sweeps `stream` for strays every [`SWEEP_EVERY`] until `shutdown`, dead-lettering them as
/// consumer `<prefix>-strays`.
pub async fn sweep_strays(
    js: &JetStream,
    stream: StreamSpec,
    prefix: &str,
    shutdown: CancellationToken,
) {
    let consumer: &'static str = Box::leak(format!("{prefix}-strays").into_boxed_str());
    loop {
        match sweep_once(js, stream, consumer).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                stream = stream.name,
                dead_lettered = n,
                "messages on subjects no consumer takes were dead-lettered"
            ),
            Err(e) => tracing::warn!(stream = stream.name, "looking for strays: {e:#}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
    }
}

/// Dead-letters and removes every stray of `stream`; returns how many.
pub async fn sweep_once(
    js: &JetStream,
    stream: StreamSpec,
    consumer: &'static str,
) -> anyhow::Result<usize> {
    let mut done = 0;
    let mut seen = std::collections::HashSet::new();
    // Each request returns the last stray of each subject: as long as there are more.
    loop {
        let mut strays = last_strays(js, stream).await?;
        // One that could not be removed comes again: it is dead-lettered already.
        strays.retain(|s| seen.insert(s.stream_sequence));
        if strays.is_empty() {
            return Ok(done);
        }
        let handle = js.get_stream_no_info(stream.name).await?;
        for stray in strays {
            let reason = format!(
                "subject {:?} is not fl.<tenant>.<kind>.<id>: a wildcard or empty token, which \
                 {} stores as published and no partition's consumer takes",
                stray.subject, stream.name
            );
            let original = Original {
                subject: &stray.subject,
                headers: stray.headers.as_ref(),
                payload: &stray.payload,
                stream_sequence: stray.stream_sequence,
            };
            dead_letter_of(js, stream.name, consumer, original, 0, &reason).await?;
            // Removed by another sweeper meanwhile: as good.
            let _ = handle.delete_message(stray.stream_sequence).await;
            done += 1;
        }
    }
}

/// The last message of each subject of `stream` that its transform left alone: those match
/// the stream's own (untransformed) subject pattern, which partitioned subjects, one token
/// longer, do not.
async fn last_strays(js: &JetStream, stream: StreamSpec) -> anyhow::Result<Vec<Stray>> {
    let nats = js.client();
    let inbox = nats.new_inbox();
    let mut answers = nats.subscribe(inbox.clone()).await?;
    let request = serde_json::json!({ "multi_last": [stream.subjects], "batch": BATCH });
    nats.publish_with_reply(
        format!("$JS.API.DIRECT.GET.{}", stream.name),
        inbox,
        request.to_string().into(),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut strays = Vec::new();
    loop {
        let answer = tokio::time::timeout_at(deadline, answers.next())
            .await
            .map_err(|_| anyhow::anyhow!("direct get of {}: no end of batch", stream.subjects))?
            .context("direct get: subscription closed")?;
        if let Some(status) = answer.status {
            match status.as_u16() {
                // End of batch, or nothing to send.
                204 | 404 => break,
                other => anyhow::bail!(
                    "direct get of {}: status {other} {}",
                    stream.subjects,
                    answer.description.unwrap_or_default()
                ),
            }
        }
        let header = |name: &str| {
            answer
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let stream_sequence = header("Nats-Sequence")
            .and_then(|v| v.parse::<u64>().ok())
            .context("direct get: an answer without Nats-Sequence")?;
        let subject =
            header("Nats-Subject").context("direct get: an answer without Nats-Subject")?;
        let headers = answer.headers.as_ref().map(publisher_headers);
        strays.push(Stray {
            subject,
            headers,
            payload: answer.payload,
            stream_sequence,
        });
        if strays.len() == BATCH {
            break;
        }
    }
    Ok(strays)
}

/// The headers a direct get answers with (`Nats-Sequence`, `Nats-Subject`...), which the
/// stream adds: what is left is what the publisher sent.
const DIRECT_GET_HEADERS: [&str; 7] = [
    "Nats-Stream",
    "Nats-Sequence",
    "Nats-Subject",
    "Nats-Time-Stamp",
    "Nats-Num-Pending",
    "Nats-Last-Sequence",
    "Nats-UpTo-Sequence",
];

/// The publisher's headers of a direct get's answer.
fn publisher_headers(answer: &async_nats::HeaderMap) -> async_nats::HeaderMap {
    let mut kept = async_nats::HeaderMap::new();
    for (name, values) in answer.iter() {
        let name = name.to_string();
        if DIRECT_GET_HEADERS.contains(&name.as_str()) {
            continue;
        }
        for v in values {
            kept.append(name.as_str(), v.as_str());
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_strays_headers_are_the_publishers_not_the_direct_gets() {
        let mut answer = async_nats::HeaderMap::new();
        for name in DIRECT_GET_HEADERS {
            answer.insert(name, "1");
        }
        answer.insert("Nats-Msg-Id", "line:m1");
        answer.insert("traceparent", "00-abc-def-01");
        let kept = publisher_headers(&answer);
        let names: Vec<String> = kept.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(kept.get("Nats-Msg-Id").unwrap().as_str(), "line:m1");
        assert_eq!(kept.get("traceparent").unwrap().as_str(), "00-abc-def-01");
    }
}
