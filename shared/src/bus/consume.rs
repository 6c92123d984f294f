//! The consume loops of unordered consumers (the dispatcher's queue and actions, the
//! notifier, webhooks...): pull, hand the handler one message or a batch, settle each by its
//! outcome ([`super::settle`]). Also what a handler sees of a message, and its span.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::settle::{settle_one, Settle};
use super::{JetStream, Partition};
use crate::config::CommonConfig;
use crate::error::HandleError;
use crate::subjects::{self, StreamSpec};

/// How long one pull request of an unordered consumer lasts before the next replaces it.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The server's heartbeat on an idle pull; missed heartbeats end the pull, and it is made again.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// The first and the longest wait before pulling again after a failed pull.
const PULL_RETRY_MIN: Duration = Duration::from_millis(100);
const PULL_RETRY_MAX: Duration = Duration::from_secs(1);

/// Waits `retry_in` (false: `shutdown` came first) and doubles it, up to [`PULL_RETRY_MAX`].
async fn pause(
    consumer: &'static str,
    shutdown: &CancellationToken,
    retry_in: &mut Duration,
) -> bool {
    crate::metrics::pull_failed(consumer);
    let wait = *retry_in;
    *retry_in = (wait * 2).min(PULL_RETRY_MAX);
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// A durable pull consumer of one stream, as the workers use it.
#[derive(Clone, Debug)]
pub struct ConsumerSpec {
    pub stream: StreamSpec,
    pub durable: &'static str,
    /// Empty: the whole stream.
    pub filter_subject: String,
    /// Messages delivered and not yet acknowledged, at most. 1 keeps the stream's order
    /// whoever consumes and whatever crashes: the next message comes only after this one is
    /// acknowledged, or this one again.
    pub max_ack_pending: i64,
}

impl ConsumerSpec {
    /// The whole stream, many messages in flight.
    pub fn new(stream: StreamSpec, durable: &'static str) -> Self {
        Self {
            stream,
            durable,
            filter_subject: String::new(),
            max_ack_pending: 10_000,
        }
    }
}

/// One message as a handler sees it.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub subject: String,
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
    pub stream_sequence: u64,
    /// 1 on the first delivery.
    pub delivered: i64,
    /// When the server received it from its publisher.
    pub published: chrono::DateTime<Utc>,
    /// The batched partition it came from, when it came from one (see
    /// [`consume_partitioned_batched`]): its batch must continue the partition's mark.
    pub partition: Option<Arc<Partition>>,
}

impl Delivered {
    /// What a handler sees of a JetStream message; an error if it carries no JetStream info.
    pub fn of(m: &jetstream::Message) -> Result<Self, String> {
        let info = m.info().map_err(|e| e.to_string())?;
        Ok(Self {
            subject: m.subject.to_string(),
            payload: m.payload.clone(),
            headers: m.headers.clone(),
            stream_sequence: info.stream_sequence,
            delivered: info.delivered,
            published: info.published,
            partition: None,
        })
    }

    /// The tenant token of the subject (`fl.<tenant>.…`), unchecked.
    pub fn tenant_token(&self) -> &str {
        subjects::split(&self.subject)
            .map(|(t, _, _)| t)
            .unwrap_or("_")
    }
}

/// Pulls from `spec` until `shutdown`, handing each message to `handler` one at a time (the
/// order of the stream is kept within one consumer). The result decides the ack:
/// `Ok` -> ack; [`HandleError::Poison`] -> dead letter + `Term`; [`HandleError::Transient`] ->
/// `Nak` with a growing delay, and dead letter + `Term` on the last allowed delivery.
pub async fn consume<F, Fut>(
    js: &JetStream,
    config: &CommonConfig,
    spec: ConsumerSpec,
    shutdown: CancellationToken,
    mut handler: F,
) -> anyhow::Result<()>
where
    F: FnMut(Delivered) -> Fut,
    Fut: Future<Output = Result<(), HandleError>>,
{
    consume_batched(js, config, spec, 1, shutdown, |mut batch| {
        let one = batch.pop().expect("batches are never empty");
        let fut = handler(one);
        async move { vec![fut.await] }
    })
    .await
}

/// Like [`consume`], but hands the handler every message already delivered, up to
/// `max_batch`, at once: a worker that can merge work (the dispatcher runs one pass per tenant
/// for a whole batch) does less of it under load, and waits for nothing when idle. The handler
/// returns one result per message, in order; each decides its message's ack as in [`consume`].
pub async fn consume_batched<F, Fut>(
    js: &JetStream,
    config: &CommonConfig,
    spec: ConsumerSpec,
    max_batch: usize,
    shutdown: CancellationToken,
    mut handler: F,
) -> anyhow::Result<()>
where
    F: FnMut(Vec<Delivered>) -> Fut,
    Fut: Future<Output = Vec<Result<(), HandleError>>>,
{
    // The streams exist: every worker runs ensure_streams at start.
    let stream = js.get_stream(spec.stream.name).await.with_context(|| {
        format!(
            "opening stream {} (run ensure_streams first)",
            spec.stream.name
        )
    })?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            spec.durable,
            consumer::pull::Config {
                durable_name: Some(spec.durable.to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(config.ack_wait_secs),
                max_deliver: config.max_deliver,
                max_ack_pending: spec.max_ack_pending,
                filter_subject: spec.filter_subject.clone(),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("creating consumer {}", spec.durable))?;
    tracing::info!(
        stream = spec.stream.name,
        consumer = spec.durable,
        "consuming"
    );
    let pulling = async {
        // After a failed pull, the next waits this long, doubling up to PULL_RETRY_MAX and
        // back to PULL_RETRY_MIN once a message comes. While a consumer has no leader (a
        // node died; the election takes seconds) every pull answers "no responders" at
        // once: pulling again at once spun at thousands of pulls a second, taking the CPU the
        // election and the other workers needed (issue 21's cluster test saw accepts stop
        // for 31 s on two cores).
        let mut retry_in = PULL_RETRY_MIN;
        while !shutdown.is_cancelled() {
            // A short expiry and heartbeats: a pull made to a stream leader that died stalls
            // for at most a few seconds (a missed heartbeat is an error), not for the rest of an
            // outage, and the next pull goes to the new leader.
            let messages = match consumer
                .stream()
                .expires(PULL_EXPIRES)
                .heartbeat(PULL_HEARTBEAT)
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(
                        consumer = spec.durable,
                        "pull failed, retrying in {retry_in:?}: {e:#}"
                    );
                    if !pause(spec.durable, &shutdown, &mut retry_in).await {
                        break;
                    }
                    continue;
                }
            };
            let mut chunks = messages.ready_chunks(max_batch.max(1));
            let mut failed = false;
            loop {
                let chunk = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    next = chunks.next() => next,
                };
                let Some(chunk) = chunk else { break };
                let mut batch = Vec::with_capacity(chunk.len());
                let mut stream_error = false;
                for next in chunk {
                    match next {
                        Ok(m) => match Delivered::of(&m) {
                            Ok(delivered) => batch.push((m, delivered)),
                            Err(e) => tracing::warn!("message without JetStream info: {e}"),
                        },
                        // Missed heartbeats while the server restarts, and the like: pull again.
                        Err(e) => {
                            tracing::warn!(
                                consumer = spec.durable,
                                "message stream error, pulling again in {retry_in:?}: {e:#}"
                            );
                            stream_error = true;
                        }
                    }
                }
                if !batch.is_empty() {
                    retry_in = PULL_RETRY_MIN;
                    settle_batch(js, config, &spec, batch, &mut handler).await?;
                }
                if stream_error {
                    failed = true;
                    break;
                }
            }
            if failed && !pause(spec.durable, &shutdown, &mut retry_in).await {
                break;
            }
        }
        anyhow::Ok(())
    };
    with_lag_reported(&consumer, spec.durable, &shutdown, pulling).await?;
    tracing::info!(consumer = spec.durable, "stopped");
    Ok(())
}

/// Runs `work` with the consumer's lag reported beside it, on the same task; the reporter
/// stops when `work` ends (or at `shutdown`), so nothing is left running.
pub(super) async fn with_lag_reported<T>(
    consumer: &consumer::PullConsumer,
    name: &'static str,
    shutdown: &CancellationToken,
    work: impl Future<Output = T>,
) -> T {
    let done = shutdown.child_token();
    let work = async {
        let out = work.await;
        done.cancel();
        out
    };
    let (out, ()) = futures::join!(work, report_lag(consumer.clone(), name, done.clone()));
    out
}

/// Samples the consumer's lag every 5 s for [`crate::metrics::consumer_lag`].
async fn report_lag(
    mut consumer: consumer::PullConsumer,
    name: &'static str,
    shutdown: CancellationToken,
) {
    loop {
        if let Ok(info) = consumer.info().await {
            crate::metrics::consumer_lag(name, info.num_pending, info.num_ack_pending);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Hands `batch` to the handler and settles each message by its outcome; what is to be tried
/// again is `Nak`ed with its delay.
async fn settle_batch<F, Fut>(
    js: &JetStream,
    config: &CommonConfig,
    spec: &ConsumerSpec,
    batch: Vec<(jetstream::Message, Delivered)>,
    handler: &mut F,
) -> anyhow::Result<()>
where
    F: FnMut(Vec<Delivered>) -> Fut,
    Fut: Future<Output = Vec<Result<(), HandleError>>>,
{
    let first = &batch[0].1;
    let span = tracing::info_span!(
        "handle",
        otel.name = %format!("{} {}", spec.durable, first.subject),
        subject = %first.subject,
        stream_sequence = first.stream_sequence,
        delivered = first.delivered,
        batch = batch.len(),
        tenant = tracing::field::Empty,
        channel = tracing::field::Empty,
        conversation = tracing::field::Empty,
        agent = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    crate::telemetry::set_parent_from(&span, first.headers.as_ref());
    let deliveries: Vec<Delivered> = batch.iter().map(|(_, d)| d.clone()).collect();
    let mut results = handler(deliveries).instrument(span.clone()).await;
    results.resize_with(batch.len(), no_result);
    for ((message, d), result) in batch.into_iter().zip(results) {
        let tries = d.delivered;
        let delay = match settle_one(
            js,
            spec,
            (&message, &d),
            tries,
            config.max_deliver,
            &result,
            &span,
        )
        .await?
        {
            Settle::Ack | Settle::DeadLetter(_) => continue,
            Settle::Retry(delay) => delay,
            // An unordered consumer has no older message to wait for: it comes again.
            Settle::Wait(_) => super::backoff(tries),
        };
        if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
            // The message comes again after ack_wait; handlers are idempotent.
            tracing::warn!("nak failed: {e}");
        }
    }
    Ok(())
}

/// The outcome of a message the handler returned no result for: tried again.
pub(super) fn no_result() -> Result<(), HandleError> {
    Err(HandleError::transient(
        "handler returned no result for this message",
    ))
}

/// A span for one message of a partition's batch (named after the partition's consumer,
/// `<prefix>-p<N> <subject>`), child of the trace its publisher started.
pub fn message_span(prefix: &str, m: &Delivered) -> tracing::Span {
    let partition = m.subject.rsplit('.').next().unwrap_or("");
    named_message_span(format!("{prefix}-p{partition} {}", m.subject), m)
}

/// A span named `name` for one message of a batch, child of the trace its publisher started.
pub fn named_message_span(name: String, m: &Delivered) -> tracing::Span {
    let span = tracing::info_span!(
        "handle",
        otel.name = %name,
        subject = %m.subject,
        stream_sequence = m.stream_sequence,
        delivered = m.delivered,
        tenant = tracing::field::Empty,
        channel = tracing::field::Empty,
        conversation = tracing::field::Empty,
        agent = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    crate::telemetry::set_parent_from(&span, m.headers.as_ref());
    span
}
