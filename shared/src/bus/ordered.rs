//! The partitioned streams (`FL_INBOUND`, `FL_BOT`), consumed in order per partition: one
//! durable consumer per partition, batches handed to the handler in the stream's order, and
//! the partition's mark in Postgres as the fence ([`crate::batch`]; docs/ordering.md).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, AckKind};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::consume::{consume, no_result, with_lag_reported};
use super::pauses::{pause_partition, Pause, Watch};
use super::settle::{settle_one, Settle};
use super::{ConsumerSpec, Delivered, JetStream};
use crate::config::CommonConfig;
use crate::error::HandleError;
use crate::subjects::{self, StreamSpec};

/// A batched partition: its consumer (also the name of its mark) and its messages.
#[derive(Debug)]
pub struct Partition {
    pub consumer: &'static str,
    pub stream: &'static str,
    pub filter: String,
    /// The mark as this instance last committed it (0: not yet): the stream is asked
    /// about it while the mark is being locked, and the answer used if the mark is still there.
    pub last_mark: std::sync::atomic::AtomicU64,
}

/// The stream sequences of the first `count` messages of `partition` after stream sequence
/// `after`, in order: one direct get of a batch (`$JS.API.DIRECT.GET`, NATS 2.11+), answered
/// with the messages, then an end-of-batch status. Fewer when the partition has fewer.
pub async fn partition_sequences(
    nats: &async_nats::Client,
    partition: &Partition,
    after: u64,
    count: usize,
) -> anyhow::Result<Vec<u64>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let inbox = nats.new_inbox();
    let mut answers = nats.subscribe(inbox.clone()).await?;
    let request = serde_json::json!({
        "seq": after + 1,
        "next_by_subj": partition.filter,
        "batch": count,
    });
    nats.publish_with_reply(
        format!("$JS.API.DIRECT.GET.{}", partition.stream),
        inbox,
        request.to_string().into(),
    )
    .await?;
    let mut sequences = Vec::with_capacity(count);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let answer = tokio::time::timeout_at(deadline, answers.next())
            .await
            .map_err(|_| anyhow::anyhow!("direct get of {}: no end of batch", partition.filter))?
            .ok_or_else(|| anyhow::anyhow!("direct get: subscription closed"))?;
        if let Some(status) = answer.status {
            match status.as_u16() {
                // End of batch, or nothing (more) to send.
                204 | 404 => break,
                other => anyhow::bail!(
                    "direct get of {}: status {other} {}",
                    partition.filter,
                    answer.description.unwrap_or_default()
                ),
            }
        }
        let sequence = answer
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Sequence"))
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .ok_or_else(|| anyhow::anyhow!("direct get: an answer without Nats-Sequence"))?;
        sequences.push(sequence);
        if sequences.len() == count {
            break;
        }
    }
    Ok(sequences)
}

/// Consumes every partition of a partitioned stream (`FL_INBOUND`, `FL_BOT`; see
/// [`subjects::PARTITIONS`]) with durable consumers `<prefix>-p<N>`, one message in flight
/// each: the messages of one (tenant, channel) are handled in the stream's order, whichever
/// instance takes them, and the partitions spread over the instances.
pub async fn consume_partitioned<F, Fut>(
    js: &JetStream,
    config: &CommonConfig,
    stream: StreamSpec,
    prefix: &str,
    shutdown: CancellationToken,
    handler: F,
) -> anyhow::Result<()>
where
    F: Fn(Delivered) -> Fut,
    Fut: Future<Output = Result<(), HandleError>>,
{
    let partitions = partition_specs(js, stream, prefix, 1)
        .await
        .into_iter()
        .map(|spec| consume(js, config, spec, shutdown.clone(), &handler));
    with_strays_swept(js, stream, prefix, &shutdown, async {
        futures::future::try_join_all(partitions).await.map(|_| ())
    })
    .await
}

/// Runs `partitions` with the stream's strays swept beside it ([`super::strays`]): what the
/// partitions' filters cannot take is dead-lettered. The sweeper stops when they end.
async fn with_strays_swept(
    js: &JetStream,
    stream: StreamSpec,
    prefix: &str,
    shutdown: &CancellationToken,
    partitions: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let stop = shutdown.child_token();
    let partitions = async {
        let out = partitions.await;
        stop.cancel();
        out
    };
    let sweeping = super::strays::sweep_strays(js, stream, prefix, stop.clone());
    futures::join!(partitions, sweeping).0
}

/// The consumers of a partitioned stream, `<prefix>-p0` … `-p15`, each filtered to its
/// partition. The single durable consumer of a version from before partitioning would keep its
/// backlog forever: it is removed (nothing happens when there is none).
async fn partition_specs(
    js: &JetStream,
    stream: StreamSpec,
    prefix: &str,
    max_ack_pending: i64,
) -> Vec<ConsumerSpec> {
    if let Ok(s) = js.get_stream(stream.name).await {
        if s.delete_consumer(prefix).await.is_ok() {
            tracing::info!(
                consumer = prefix,
                "removed the unpartitioned consumer of an older version"
            );
        }
    }
    (0..subjects::PARTITIONS)
        .map(|p| {
            // Durable names live as long as the consumers: a handful of bytes per start.
            let durable: &'static str = Box::leak(format!("{prefix}-p{p}").into_boxed_str());
            ConsumerSpec {
                filter_subject: subjects::partition_filter(&stream, p),
                max_ack_pending,
                ..ConsumerSpec::new(stream, durable)
            }
        })
        .collect()
}

/// Like [`consume_partitioned`], but each partition hands its handler up to `max_batch`
/// messages at once, in the stream's order, so that a worker can handle them in one
/// transaction. Order still holds per partition, whatever fails and however many instances
/// run:
///
/// - Each partition's consumer has `max_ack_pending = max_batch` and a priority group with
///   the `pinned_client` policy: the server delivers a partition to one instance at a time
///   (its pinned client). Another instance takes over only after the pinned one has pulled
///   nothing for `ack_wait + 10 s`, by which time the messages the old one held have been
///   given back for redelivery, and redeliveries come first.
/// - A message whose handling fails transiently is not `Nak`ed (newer messages could then
///   overtake it): this instance keeps it, and every message after it, and hands them to the
///   handler again after a growing delay (0.5 s … 30 s), telling the server it is still
///   working on them. After `FL_MAX_DELIVER` attempts the first is dead-lettered and the
///   rest go on.
/// - A poison message is dead-lettered at once; the others of its batch are handled.
/// - A delivery that never arrived (a jump in the consumer's delivery sequence) pauses the
///   partition, without handling what came after it, until everything sent has been given
///   back for redelivery (`ack_wait`) and the pin has lapsed: the server then sends them
///   again in the stream's order.
/// - Whatever gets past these, the batch's transaction does not: each delivery carries its
///   [`Partition`], and [`crate::batch::in_one_transaction`] handles a batch only as far as it
///   continues the partition's mark; what must wait for an older message is left
///   unacknowledged and the partition pauses as for a missed delivery.
///
/// With `max_batch <= 1` this is [`consume_partitioned`].
pub async fn consume_partitioned_batched<F, Fut>(
    js: &JetStream,
    config: &CommonConfig,
    stream: StreamSpec,
    prefix: &str,
    max_batch: usize,
    shutdown: CancellationToken,
    handler: F,
) -> anyhow::Result<()>
where
    F: Fn(Vec<Delivered>) -> Fut,
    Fut: Future<Output = Vec<Result<(), HandleError>>>,
{
    if max_batch <= 1 {
        return consume_partitioned(js, config, stream, prefix, shutdown, |m| {
            let fut = handler(vec![m]);
            async move { fut.await.pop().unwrap_or_else(no_result) }
        })
        .await;
    }
    let partitions = partition_specs(js, stream, prefix, max_batch as i64)
        .await
        .into_iter()
        .map(|spec| consume_in_order(js, config, spec, max_batch, shutdown.clone(), &handler));
    with_strays_swept(js, stream, prefix, &shutdown, async {
        futures::future::try_join_all(partitions).await.map(|_| ())
    })
    .await
}

/// The priority group of ordered, batched consumers.
const PINNED_GROUP: &str = "fl";

/// The stream sequence up to which every message of `partition` is acknowledged (its
/// consumer's ack floor).
pub async fn ack_floor(js: &JetStream, partition: &Partition) -> anyhow::Result<u64> {
    Ok(js
        .get_stream_no_info(partition.stream)
        .await?
        .consumer_info(partition.consumer)
        .await?
        .ack_floor
        .stream_sequence)
}

/// The consumer of one ordered partition, created, or updated from an older version's
/// settings (one message in flight, no pin); with the time after which its pin lapses.
async fn ordered_consumer(
    js: &JetStream,
    config: &CommonConfig,
    spec: &ConsumerSpec,
) -> anyhow::Result<(consumer::PullConsumer, Duration)> {
    let stream = js.get_stream(spec.stream.name).await.with_context(|| {
        format!(
            "opening stream {} (run ensure_streams first)",
            spec.stream.name
        )
    })?;
    let ack_wait = Duration::from_secs(config.ack_wait_secs);
    let consumer_config = consumer::pull::Config {
        durable_name: Some(spec.durable.to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver: config.max_deliver,
        max_ack_pending: spec.max_ack_pending,
        filter_subject: spec.filter_subject.clone(),
        priority_groups: vec![PINNED_GROUP.to_owned()],
        priority_policy: consumer::PriorityPolicy::PinnedClient,
        priority_timeout: ack_wait + Duration::from_secs(10),
        ..Default::default()
    };
    let consumer = match stream.create_consumer(consumer_config.clone()).await {
        Ok(c) => c,
        Err(e) => {
            // A consumer whose priority policy cannot be changed in place: replace it. Its
            // unacknowledged messages come again (handlers are idempotent).
            tracing::warn!(consumer = spec.durable, "recreating consumer: {e:#}");
            let info = stream.consumer_info(spec.durable).await.ok();
            let _ = stream.delete_consumer(spec.durable).await;
            let mut config = consumer_config.clone();
            if let Some(info) = info {
                config.deliver_policy = consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: info.ack_floor.stream_sequence + 1,
                };
            }
            stream
                .create_consumer(config)
                .await
                .with_context(|| format!("creating consumer {}", spec.durable))?
        }
    };
    Ok((consumer, consumer_config.priority_timeout))
}

async fn consume_in_order<F, Fut>(
    js: &JetStream,
    config: &CommonConfig,
    spec: ConsumerSpec,
    max_batch: usize,
    shutdown: CancellationToken,
    handler: &F,
) -> anyhow::Result<()>
where
    F: Fn(Vec<Delivered>) -> Fut,
    Fut: Future<Output = Vec<Result<(), HandleError>>>,
{
    let (consumer, priority_timeout) = ordered_consumer(js, config, &spec).await?;
    tracing::info!(
        stream = spec.stream.name,
        consumer = spec.durable,
        max_batch,
        "consuming in order, batched"
    );
    let partition = Arc::new(Partition {
        consumer: spec.durable,
        stream: spec.stream.name,
        filter: spec.filter_subject.clone(),
        last_mark: Default::default(),
    });
    let pull = Pull {
        js,
        config,
        spec: &spec,
        consumer: &consumer,
        partition: &partition,
        max_batch,
        shutdown: &shutdown,
    };
    let consuming = async {
        let mut watch = Watch::default();
        while !shutdown.is_cancelled() {
            let Some(pause) = pull.until_pause(handler, &mut watch).await? else {
                continue;
            };
            // Not pulling (the pull stream is dropped) until everything delivered and not
            // acked, the missed or outstanding delivery first, has been given back for
            // redelivery and this instance's pin has lapsed: then the server redelivers them,
            // in the stream's order, before anything newer, to whichever instance pulls next.
            pause_partition(
                &spec,
                pause,
                priority_timeout + Duration::from_secs(1),
                &shutdown,
            )
            .await;
            watch.paused();
        }
        anyhow::Ok(())
    };
    with_lag_reported(&consumer, spec.durable, &shutdown, consuming).await?;
    tracing::info!(consumer = spec.durable, "stopped");
    Ok(())
}

/// One ordered partition's pulling: what [`Pull::until_pause`] needs.
struct Pull<'a> {
    js: &'a JetStream,
    config: &'a CommonConfig,
    spec: &'a ConsumerSpec,
    consumer: &'a consumer::PullConsumer,
    partition: &'a Arc<Partition>,
    max_batch: usize,
    shutdown: &'a CancellationToken,
}

impl Pull<'_> {
    /// Pulls and hands the partition's batches to the handler until a pause is called (and
    /// returned), the pull stream ends, or shutdown.
    async fn until_pause<F, Fut>(
        &self,
        handler: &F,
        watch: &mut Watch,
    ) -> anyhow::Result<Option<Pause>>
    where
        F: Fn(Vec<Delivered>) -> Fut,
        Fut: Future<Output = Vec<Result<(), HandleError>>>,
    {
        let messages = match self
            .consumer
            .stream()
            .max_messages_per_batch(self.max_batch)
            .expires(Duration::from_secs(5))
            .heartbeat(Duration::from_secs(2))
            .group(PINNED_GROUP)
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(consumer = self.spec.durable, "pull failed, retrying: {e:#}");
                tokio::select! {
                    _ = self.shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                return Ok(None);
            }
        };
        let mut chunks = messages.ready_chunks(self.max_batch);
        let mut pause = None;
        loop {
            let chunk = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                next = chunks.next() => next,
            };
            let Some(chunk) = chunk else { break };
            let batch = self.admit(chunk, watch, &mut pause).await;
            if !batch.is_empty() {
                // Older than what called the pause: handled as usual.
                let waits_for = self.settle_in_order(batch, handler).await?;
                if let (None, Some(expected)) = (&pause, waits_for) {
                    pause = Some(Pause::Fenced(expected));
                }
            }
            if pause.is_some() {
                break;
            }
        }
        Ok(pause)
    }

    /// The deliveries of `chunk` to hand over: those before the first that calls a pause.
    /// That one and all after it are left unacknowledged, to come again in order.
    async fn admit<E: std::fmt::Display>(
        &self,
        chunk: Vec<Result<jetstream::Message, E>>,
        watch: &mut Watch,
        pause: &mut Option<Pause>,
    ) -> Vec<(jetstream::Message, Delivered)> {
        let mut batch = Vec::with_capacity(chunk.len());
        for next in chunk {
            match next {
                Ok(m) => match m.info().map(|i| (i.consumer_sequence, i.stream_sequence)) {
                    Ok((seq, stream_seq)) if pause.is_none() => {
                        *pause = watch.admit(self.js, self.partition, seq, stream_seq).await;
                        if pause.is_some() {
                            continue;
                        }
                        match Delivered::of(&m) {
                            Ok(mut delivered) => {
                                delivered.partition = Some(self.partition.clone());
                                batch.push((m, delivered));
                            }
                            Err(e) => tracing::warn!("message without JetStream info: {e}"),
                        }
                    }
                    // After a pause is called: left unacknowledged, to come again in order.
                    Ok(_) => {}
                    Err(e) => tracing::warn!("message without JetStream info: {e}"),
                },
                // Missed heartbeats while the server restarts, and the like. The pull stream
                // goes on by itself (it ends after a terminal error): keep it, as dropping it
                // would drop the messages it holds, and newer ones could then be delivered
                // before those come again.
                Err(e) => {
                    tracing::warn!(consumer = self.spec.durable, "message stream error: {e:#}");
                }
            }
        }
        batch
    }

    /// Hands `held` to the handler and settles it in order ([`super::settle`]); keeps what is
    /// to be retried, with everything after it, and hands them over again after the delay. A
    /// message that must wait for an older one ([`Settle::Wait`]) is not retried in hand: it
    /// is left unacknowledged with everything after it, and its wait is returned (the
    /// partition pauses).
    async fn settle_in_order<F, Fut>(
        &self,
        mut held: Vec<(jetstream::Message, Delivered)>,
        handler: &F,
    ) -> anyhow::Result<Option<u64>>
    where
        F: Fn(Vec<Delivered>) -> Fut,
        Fut: Future<Output = Vec<Result<(), HandleError>>>,
    {
        let spec = self.spec;
        // Tries in hand of the first message held, beyond its deliveries.
        let mut attempts: i64 = 0;
        while !held.is_empty() {
            let span = tracing::info_span!(
                "batch",
                otel.name = %format!("{} batch", spec.durable),
                consumer = spec.durable,
                batch = held.len(),
            );
            let deliveries: Vec<Delivered> = held.iter().map(|(_, d)| d.clone()).collect();
            let mut results = handler(deliveries).instrument(span.clone()).await;
            results.resize_with(held.len(), no_result);
            let mut rest = Vec::new();
            let mut retry = None;
            let mut waits_for = None;
            for ((message, d), result) in held.into_iter().zip(results) {
                if retry.is_some() || waits_for.is_some() {
                    rest.push((message, d));
                    continue;
                }
                let tries = d.delivered + attempts;
                let max_deliver = self.config.max_deliver;
                let one = (&message, &d);
                match settle_one(self.js, spec, one, tries, max_deliver, &result, &span).await? {
                    Settle::Ack => {}
                    Settle::DeadLetter(_) => {
                        // After one that used up its tries, the next ones start their own count.
                        if result.as_ref().is_err_and(HandleError::is_transient) {
                            attempts = 0;
                        }
                    }
                    Settle::Retry(delay) => {
                        retry = Some(delay);
                        rest.push((message, d));
                    }
                    Settle::Wait(expected) => {
                        waits_for = Some(expected);
                        rest.push((message, d));
                    }
                }
            }
            if waits_for.is_some() {
                // Left unacknowledged: they come again after the older one.
                return Ok(waits_for);
            }
            held = rest;
            let Some(delay) = retry else { continue };
            attempts += 1;
            if !self.hold_for(&held, delay).await {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// Keeps `held` in hand for `delay`, telling the server every third of `ack_wait` that
    /// they are being worked on. False at shutdown, when they are given back (`Nak`), in
    /// order: whoever pulls next takes them first.
    async fn hold_for(&self, held: &[(jetstream::Message, Delivered)], delay: Duration) -> bool {
        let tick = Duration::from_secs(self.config.ack_wait_secs.max(1)) / 3;
        let until = tokio::time::Instant::now() + delay;
        loop {
            for (m, _) in held {
                let _ = m.ack_with(AckKind::Progress).await;
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return true;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    for (m, _) in held {
                        let _ = m.ack_with(AckKind::Nak(None)).await;
                    }
                    return false;
                }
                _ = tokio::time::sleep(tick.min(until - now)) => {}
            }
        }
    }
}
