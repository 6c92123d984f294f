//! Dead letters (`FL_DEADLETTER`, subjects `fl.<tenant>.deadletter.<stream>`): list them, and
//! replay them once the cause is fixed (a channel configured, a bug deployed...). A replay
//! publishes the original bytes and headers to the original subject under a new
//! `Nats-Msg-Id` (`replay:<sequence>`), then removes the dead letter. Handlers are
//! idempotent, so replaying a message that was in fact stored changes nothing.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig};
use firstline_shared::bus;
use firstline_shared::subjects::DEAD_LETTERS;
use firstline_shared::wire::{self, DeadLetter};
use futures::StreamExt;

/// Which dead letters: a tenant and a stream (`FL_INBOUND`...), each or both.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub tenant: Option<String>,
    pub stream: Option<String>,
}

impl Filter {
    fn subject(&self) -> String {
        format!(
            "fl.{}.deadletter.{}",
            self.tenant.as_deref().unwrap_or("*"),
            self.stream.as_deref().unwrap_or("*")
        )
    }
}

/// The dead letters matching `filter`, oldest first, with their sequence in `FL_DEADLETTER`.
pub async fn list(
    js: &jetstream::Context,
    filter: &Filter,
    limit: usize,
) -> anyhow::Result<Vec<(u64, DeadLetter)>> {
    let stream = js
        .get_stream(DEAD_LETTERS.name)
        .await
        .context("no dead-letter stream yet")?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: filter.subject(),
            ..Default::default()
        })
        .await?;
    let pending = consumer.cached_info().num_pending as usize;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await?;
    while out.len() < pending.min(limit) {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await
        else {
            break;
        };
        let m = m?;
        let seq = m
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        match wire::decode::<DeadLetter>(&m.payload) {
            Ok(letter) => out.push((seq, letter)),
            Err(e) => tracing::warn!(seq, "unreadable dead letter: {e}"),
        }
    }
    Ok(out)
}

/// Replays the dead letters with these sequences; returns how many were replayed.
pub async fn replay(js: &jetstream::Context, sequences: &[u64]) -> anyhow::Result<usize> {
    let stream = js.get_stream(DEAD_LETTERS.name).await?;
    let mut replayed = 0;
    for &seq in sequences {
        let raw = stream
            .get_raw_message(seq)
            .await
            .with_context(|| format!("dead letter {seq}"))?;
        let letter: DeadLetter = wire::decode(&raw.payload)?;
        if letter.consumer == "webhooks" {
            // A webhook's body is not a message of the pipeline: the API sends it again.
            anyhow::bail!(
                "dead letter {seq} is a webhook delivery; send it again with POST /api/v1/webhooks/<id>/deliveries/{}/retry",
                letter.headers.get("FirstLine-Delivery-Id").map_or("<delivery>", String::as_str)
            );
        }
        if let Some(size) = letter.payload_bytes {
            // Cut to fit the server's max_payload: replaying the beginning would be a new message.
            anyhow::bail!(
                "dead letter {seq} keeps only the first {} of its message's {size} bytes: it cannot be replayed",
                letter.payload.len()
            );
        }
        let mut headers = async_nats::HeaderMap::new();
        for (k, v) in &letter.headers {
            if !k.eq_ignore_ascii_case("Nats-Msg-Id") {
                headers.insert(k.as_str(), v.as_str());
            }
        }
        // An inbound or bot message is stored under its partition; it is replayed as the gateway sent it.
        bus::publish(
            js,
            firstline_shared::subjects::as_published(&letter.stream, &letter.subject),
            &format!("replay:{}:{seq}", DEAD_LETTERS.name),
            headers,
            letter.payload.clone().into(),
        )
        .await?;
        stream.delete_message(seq).await?;
        replayed += 1;
    }
    Ok(replayed)
}
