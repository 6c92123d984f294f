//! One held partition, read in order from its mark: a consumer of this instance's own
//! (ephemeral, no acks) starting right after the mark, its messages handed to the handler in
//! batches, each batch committed with the mark moved ([`crate::batch`]). Nothing is left
//! unacknowledged on the server and nothing waits for a redelivery: what is handled is what
//! the mark says, and a reader that starts again starts after it.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Partition;
use crate::bus::dead_letter::{dead_letter_of, Original};
use crate::bus::{settle, Delivered, Settle};
use crate::config::CommonConfig;
use crate::error::HandleError;
use crate::worker::Services;

/// Why a reader ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    /// Asked to stop (the partition goes to another instance, or shutdown): between batches.
    Stopped,
    /// The partition's mark is not where this reader left it (another instance's reader moved
    /// it): this reader must not go on (the supervisor starts a new one if it still holds it).
    Fenced,
}

/// What a reader needs.
pub(super) struct Reader<'a, F> {
    pub services: &'a Services,
    pub config: &'a CommonConfig,
    pub partition: Arc<Partition>,
    pub max_batch: usize,
    pub handler: &'a F,
    pub stop: CancellationToken,
}

/// Pull requests expire after this: a consumer lost with a server (a restart, a cluster node
/// gone) is noticed within about this and the heartbeats.
const PULL_EXPIRY: Duration = Duration::from_secs(5);
const HEARTBEAT: Duration = Duration::from_secs(2);

impl<F, Fut> Reader<'_, F>
where
    F: Fn(Vec<Delivered>) -> Fut,
    Fut: Future<Output = Vec<Result<(), HandleError>>>,
{
    /// Reads and handles the partition until stopped or fenced.
    pub(super) async fn run(self) -> End {
        let p = &self.partition;
        tracing::info!(partition = p.consumer, mark = p.mark(), "reading partition");
        let end = loop {
            if self.stop.is_cancelled() {
                break End::Stopped;
            }
            match self.read_from(p.mark() + 1).await {
                Ok(Some(end)) => break end,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(partition = p.consumer, "reading again shortly: {e:#}");
                    tokio::select! {
                        _ = self.stop.cancelled() => break End::Stopped,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        crate::metrics::consumer_lag(p.consumer, 0, 0);
        tracing::info!(
            partition = p.consumer,
            ?end,
            mark = p.mark(),
            "partition let go"
        );
        end
    }

    /// One consumer's life: from stream sequence `from` until the reader ends (`Some`) or
    /// the consumer must be made again (`None`: its messages stopped coming in sequence, or
    /// the server lost it).
    async fn read_from(&self, from: u64) -> anyhow::Result<Option<End>> {
        let p = &self.partition;
        let stream = self.services.js.get_stream_no_info(p.stream).await?;
        let mut consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                filter_subject: p.filter.clone(),
                // Removed by the server if this process dies without removing it.
                inactive_threshold: Duration::from_secs(60),
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the reader of {}", p.consumer))?;
        let name = consumer.cached_info().name.clone();
        let out = self.read(&consumer).await;
        let _ = consumer.info().await;
        if let Err(e) = stream.delete_consumer(&name).await {
            tracing::debug!(partition = p.consumer, "removing reader {name}: {e}");
        }
        out
    }

    async fn read(&self, consumer: &consumer::PullConsumer) -> anyhow::Result<Option<End>> {
        let p = &self.partition;
        let messages = consumer
            .stream()
            .max_messages_per_batch(self.max_batch)
            .expires(PULL_EXPIRY)
            .heartbeat(HEARTBEAT)
            .messages()
            .await?;
        let mut chunks = messages.ready_chunks(self.max_batch);
        // A consumer of this reader's own sends each message once, numbered from 1: a number
        // skipped is a message lost in transit, and everything after it must wait.
        let mut next_number = 1u64;
        loop {
            let chunk = tokio::select! {
                _ = self.stop.cancelled() => return Ok(Some(End::Stopped)),
                next = chunks.next() => next,
            };
            let Some(chunk) = chunk else { return Ok(None) };
            let mut batch = Vec::with_capacity(chunk.len());
            let mut broken = None;
            for next in chunk {
                let m = match next {
                    Ok(m) => m,
                    Err(e) => {
                        broken = Some(format!("{e:#}"));
                        break;
                    }
                };
                let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                if info.consumer_sequence != next_number {
                    broken = Some(format!(
                        "delivery {} came where {next_number} was due",
                        info.consumer_sequence
                    ));
                    break;
                }
                next_number += 1;
                crate::metrics::consumer_lag(p.consumer, info.pending, 0);
                let mut delivered = Delivered::of(&m).map_err(anyhow::Error::msg)?;
                delivered.partition = Some(p.clone());
                batch.push(delivered);
            }
            if !batch.is_empty() {
                if let Some(end) = self.settle_in_order(batch).await {
                    return Ok(Some(end));
                }
            }
            if let Some(why) = broken {
                // Made again from the mark: whatever was lost comes again, in order.
                tracing::warn!(partition = p.consumer, "reading again from the mark: {why}");
                crate::metrics::partition_restarted(p.consumer);
                return Ok(None);
            }
        }
    }

    /// Hands `held` to the handler until every message is settled: handled, or dead-lettered
    /// (poison, or out of tries), the mark moved past it. A transient failure keeps the message
    /// and every one after it, tried again after a growing delay. `Some` when the reader must
    /// end before that.
    async fn settle_in_order(&self, mut held: Vec<Delivered>) -> Option<End> {
        let p = &self.partition;
        // Tries of the first message held.
        let mut tries: i64 = 0;
        while !held.is_empty() {
            tries += 1;
            let span = tracing::info_span!(
                "batch",
                otel.name = %format!("{} batch", p.consumer),
                consumer = p.consumer,
                batch = held.len(),
            );
            let mut results = (self.handler)(held.clone()).instrument(span.clone()).await;
            results.resize_with(held.len(), || {
                Err(HandleError::transient("the handler gave no result"))
            });
            // The batch's commit moved the mark over the handled messages before the first
            // that was not; the rest is settled here, in order.
            let mut retry = None;
            for (i, (m, result)) in held.iter().zip(&results).enumerate() {
                let attempt = if i == 0 { tries } else { 1 };
                match settle(result, attempt, self.config.max_deliver) {
                    Settle::Ack => crate::metrics::message_handled(p.consumer, "ok"),
                    Settle::DeadLetter(reason) => {
                        crate::metrics::message_handled(p.consumer, "dead_letter");
                        span.in_scope(
                            || tracing::warn!(%reason, partition = p.consumer, "dead-lettering"),
                        );
                        if let Err(e) = self.dead_letter(m, attempt, &reason).await {
                            span.in_scope(|| tracing::warn!("dead letter not sent yet: {e:#}"));
                            retry = Some((i, crate::bus::backoff(attempt)));
                            break;
                        }
                    }
                    Settle::Retry(delay) => {
                        crate::metrics::message_handled(p.consumer, "retry");
                        if let Err(e) = result {
                            span.in_scope(
                                || tracing::warn!(retry_in = ?delay, "transient failure: {e:#}"),
                            );
                        }
                        retry = Some((i, delay));
                        break;
                    }
                    Settle::Wait(_) => return Some(End::Fenced),
                }
            }
            let settled = retry.map_or(held.len(), |(i, _)| i);
            if let Some(last) = held[..settled].last() {
                if let Err(end) = self.advance(last.stream_sequence).await {
                    return Some(end);
                }
            }
            let (i, delay) = retry?;
            if i > 0 {
                // The first try of the message now first was this one.
                tries = 1;
            }
            held.drain(..i);
            tokio::select! {
                _ = self.stop.cancelled() => return Some(End::Stopped),
                _ = tokio::time::sleep(delay) => {}
            }
        }
        None
    }

    /// Moves the mark to `sequence` if the batch's commit did not (messages settled after it:
    /// dead letters, and the handled ones after them). Fenced if the mark is not where this
    /// reader left it.
    async fn advance(&self, sequence: u64) -> Result<(), End> {
        let p = &self.partition;
        let mark = p.mark();
        if sequence <= mark {
            return Ok(());
        }
        loop {
            match p.advance(&self.services.pool, mark, sequence).await {
                Ok(true) => return Ok(()),
                Ok(false) => return Err(End::Fenced),
                Err(e) => {
                    tracing::warn!(partition = p.consumer, "moving the mark: {e:#}");
                    tokio::select! {
                        _ = self.stop.cancelled() => return Err(End::Stopped),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// Publishes the dead letter of `m` before the mark passes it (a crash in between sends it
    /// again, de-duplicated by its id).
    async fn dead_letter(&self, m: &Delivered, tries: i64, reason: &str) -> anyhow::Result<()> {
        let p = &self.partition;
        let original = Original {
            subject: &m.subject,
            headers: m.headers.as_ref(),
            payload: &m.payload,
            stream_sequence: m.stream_sequence,
        };
        dead_letter_of(
            &self.services.js,
            p.stream,
            p.consumer,
            original,
            tries,
            reason,
        )
        .await
    }
}

impl Partition {
    /// The mark as this instance holds it.
    pub fn mark(&self) -> u64 {
        self.mark.load(Ordering::Relaxed)
    }

    /// Moves the mark from `from` to `to`, if it is still at `from`.
    async fn advance(
        &self,
        pool: &deadpool_postgres::Pool,
        from: u64,
        to: u64,
    ) -> anyhow::Result<bool> {
        let client = pool.get().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE partition_marks SET stream_sequence = $3
                 WHERE consumer = $1 AND stream_sequence = $2",
            )
            .await?;
        let moved = client
            .execute(&stmt, &[&self.consumer, &(from as i64), &(to as i64)])
            .await?;
        if moved == 1 {
            self.mark.store(to, Ordering::Relaxed);
        }
        Ok(moved == 1)
    }
}
