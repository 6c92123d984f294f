//! NATS JetStream: connecting, creating streams and consumers idempotently, publishing with a
//! de-duplication id, and the consume loop whose handler's result decides the ack.
//!
//! DESIGN.md facts applied here: publish with `Nats-Msg-Id` and treat an ack timeout as
//! "unknown" (republish with the same id); explicit acks; a message that can never be handled
//! is `Term`-acked and dead-lettered with the reason, and so is one whose deliveries ran out.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::CommonConfig;
use crate::error::HandleError;
use crate::subjects::{self, StreamSpec, ALL_STREAMS};
use crate::wire::{self, DeadLetter, Version};

pub use async_nats::jetstream::Context as JetStream;

/// Connects to NATS; the client reconnects by itself, forever.
pub async fn connect(config: &CommonConfig) -> anyhow::Result<async_nats::Client> {
    let mut options = async_nats::ConnectOptions::new();
    // `nats://user:password@host`: the client parses it but does not send it by itself.
    let from_url = config.nats_url.split(',').find_map(|url| {
        let addr: async_nats::ServerAddr = url.trim().parse().ok()?;
        Some((addr.username()?.to_owned(), addr.password()?.to_owned()))
    });
    let login = match (&config.nats_user, &config.nats_password) {
        (Some(user), Some(password)) => Some((user.clone(), password.clone())),
        _ => from_url,
    };
    if let Some((user, password)) = login {
        options = options.user_and_password(user, password);
    }
    if let Some(seed) = &config.nats_nkey_seed {
        options = options.nkey(seed.clone());
    }
    if let Some(path) = &config.nats_creds {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("reading NATS credentials {}", path.display()))?;
    }
    if let Some(ca) = &config.nats_tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if config.nats_tls_required {
        options = options.require_tls(true);
    }
    options
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .connect(config.nats_url.as_str())
        .await
        .with_context(|| format!("connecting to NATS at {}", config.nats_url))
}

/// Creates every stream of [`ALL_STREAMS`], or updates it to this build's configuration.
/// Safe to run from every instance at every start ([`crate::worker::Services::start`] does).
pub async fn ensure_streams(js: &JetStream) -> anyhow::Result<()> {
    for spec in ALL_STREAMS {
        ensure_stream(js, spec).await?;
    }
    Ok(())
}

/// Creates the stream, or updates it to this configuration (a new version may change it).
async fn ensure_stream(js: &JetStream, spec: StreamSpec) -> anyhow::Result<()> {
    let config = stream::Config {
        name: spec.name.to_owned(),
        subjects: vec![spec.subjects.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::from_secs(spec.max_age_hours * 3600),
        duplicate_window: Duration::from_secs(120),
        // Direct gets answer the partition mark's question (`partition_sequences`).
        allow_direct: true,
        subject_transform: spec
            .transform
            .map(|(source, destination)| stream::SubjectTransform {
                source: source.to_owned(),
                destination: destination.to_owned(),
            }),
        ..Default::default()
    };
    js.create_or_update_stream(config)
        .await
        .with_context(|| format!("creating stream {}", spec.name))?;
    Ok(())
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

/// Publishes `payload` to `subject` with `Nats-Msg-Id: msg_id` and waits for the stream's ack.
/// An ack that does not come is "unknown": it publishes again with the same id, which the
/// stream drops if the first one was stored. Returns whether the stream saw a duplicate.
pub async fn publish(
    js: &JetStream,
    subject: String,
    msg_id: &str,
    mut headers: HeaderMap,
    payload: Bytes,
) -> anyhow::Result<bool> {
    headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = match js
            .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
            .await
        {
            Ok(ack) => ack.await.map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(ack) => return Ok(ack.duplicate),
            Err(e) if attempt < 8 => {
                tracing::warn!(%subject, msg_id, attempt, "publish not acknowledged, retrying: {e:#}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return Err(e.context(format!("publishing {msg_id} to {subject}")));
            }
        }
    }
}

/// Publishes an agent's action on `fl.<tenant>.agent.<agent>.action`, as a desktop does: with
/// `Nats-Msg-Id` = its `action_id` (so it is applied once) and the current trace context.
pub async fn publish_action(
    js: &JetStream,
    tenant: &crate::domain::TenantId,
    agent: &crate::domain::AgentId,
    action: &wire::AgentAction,
) -> anyhow::Result<()> {
    let mut headers = HeaderMap::new();
    crate::telemetry::inject_current(&mut headers);
    publish(
        js,
        subjects::agent_action(tenant, agent),
        &action.action_id.to_string(),
        headers,
        wire::encode(action),
    )
    .await
    .map(|_| ())
}

/// One message to publish with [`publish_all`].
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub subject: String,
    pub msg_id: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// How many publishes [`publish_all`] has in flight at once. The client holds a permit per
/// unacknowledged publish (5,000 per context, shared by every task), and waits for one when
/// none is left: sending a whole large batch before reading any ack would wait forever.
const PUBLISH_WINDOW: usize = 256;

/// Publishes `messages` pipelined: sends a window of them, in order, then collects the
/// stream's acks (one round trip per window instead of one per message). A message whose ack
/// does not come is published again on its own, with the same id, as [`publish`] does.
/// Returns, per message, whether it is stored.
pub async fn publish_all(js: &JetStream, messages: &[Outgoing]) -> Vec<anyhow::Result<()>> {
    let mut results = Vec::with_capacity(messages.len());
    for window in messages.chunks(PUBLISH_WINDOW) {
        let mut pending = Vec::with_capacity(window.len());
        for m in window {
            let mut headers = m.headers.clone();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, m.msg_id.as_str());
            pending.push(
                js.publish_with_headers(m.subject.clone(), headers, m.payload.clone())
                    .await,
            );
        }
        for (m, sent) in window.iter().zip(pending) {
            let acked = match sent {
                Ok(ack) => ack.await.map(|_| ()).map_err(anyhow::Error::from),
                Err(e) => Err(e.into()),
            };
            results.push(match acked {
                Ok(()) => Ok(()),
                Err(_) => publish(
                    js,
                    m.subject.clone(),
                    &m.msg_id,
                    m.headers.clone(),
                    m.payload.clone(),
                )
                .await
                .map(|_| ()),
            });
        }
    }
    results
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
    futures::future::try_join_all(partitions).await.map(|_| ())
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
            async move {
                fut.await.pop().unwrap_or_else(|| {
                    Err(HandleError::Transient(anyhow::anyhow!(
                        "handler returned no result"
                    )))
                })
            }
        })
        .await;
    }
    let partitions = partition_specs(js, stream, prefix, max_batch as i64)
        .await
        .into_iter()
        .map(|spec| consume_in_order(js, config, spec, max_batch, shutdown.clone(), &handler));
    futures::future::try_join_all(partitions).await.map(|_| ())
}

/// The priority group of ordered, batched consumers.
const PINNED_GROUP: &str = "fl";

/// Watches a pull consumer's delivery sequence for deliveries that never arrived.
#[derive(Debug, Default)]
struct DeliveryGaps {
    last: Option<u64>,
}

/// What one delivery's consumer sequence says, next to the ones seen before it.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// The one after the last seen.
    Next,
    /// The first seen, or one that went back (a server that restarted from a consumer state
    /// older than what it sent, and now sends again everything after that point): nothing
    /// before it was seen, so the deliveries it follows must be asked about.
    Fresh,
    /// This many deliveries before it never arrived.
    Missed(u64),
}

impl DeliveryGaps {
    fn see(&mut self, seq: u64) -> Seen {
        match self.last {
            Some(last) if seq > last + 1 => Seen::Missed(seq - last - 1),
            Some(last) if seq == last + 1 => {
                self.last = Some(seq);
                Seen::Next
            }
            _ => {
                self.last = Some(seq);
                Seen::Fresh
            }
        }
    }
}

/// Why a partition stops pulling for a while.
#[derive(Debug, PartialEq, Eq)]
enum Pause {
    /// Deliveries to this instance that never arrived.
    Missed(u64),
    /// An older message of the partition, at this stream sequence, is still delivered to
    /// another client and not acknowledged: the pin moved while it held it (a server restart
    /// forgets pins, say), and it comes again only after `ack_wait`. `None`: the server could
    /// not be asked, which is taken as a yes.
    Outstanding(Option<u64>),
    /// The batch's transaction found that it does not continue the partition's mark: the
    /// message at this stream sequence is not handled yet ([`crate::batch`]).
    Fenced(u64),
}

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

/// The partition's first message not yet acknowledged, if it comes before `stream_sequence`
/// (a fresh delivery of this instance's): an older delivery is then still out with another
/// client. The next message of the partition after its ack floor is the oldest one that is
/// not acknowledged. Asked once per fresh pull, so it costs two requests per partition and
/// start.
async fn older_delivery_outstanding(
    js: &JetStream,
    partition: &Partition,
    stream_sequence: u64,
) -> anyhow::Result<Option<u64>> {
    let floor = ack_floor(js, partition).await?;
    let oldest = partition_sequences(&js.client(), partition, floor, 1)
        .await?
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no message of {} after {floor}", partition.filter))?;
    Ok((oldest < stream_sequence).then_some(oldest))
}

/// Whether a delivery (`seen` against the ones before it) must wait: a pause, or `None` to
/// handle it. A fresh one asks the server, unless the partition has just paused.
async fn pause_before(
    seen: Seen,
    just_paused: bool,
    js: &JetStream,
    partition: &Partition,
    stream_sequence: u64,
) -> Option<Pause> {
    match seen {
        Seen::Next => None,
        Seen::Missed(n) => Some(Pause::Missed(n)),
        Seen::Fresh if just_paused => None,
        Seen::Fresh => match older_delivery_outstanding(js, partition, stream_sequence).await {
            Ok(older) => older.map(|seq| Pause::Outstanding(Some(seq))),
            Err(e) => {
                tracing::warn!(
                    consumer = partition.consumer,
                    "asking for the ack floor failed: {e:#}"
                );
                Some(Pause::Outstanding(None))
            }
        },
    }
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
    // Created, or updated from an older version's settings (one message in flight, no pin).
    let consumer: consumer::PullConsumer =
        match stream.create_consumer(consumer_config.clone()).await {
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
    tracing::info!(
        stream = spec.stream.name,
        consumer = spec.durable,
        max_batch,
        "consuming in order, batched"
    );
    tokio::spawn(report_lag(consumer.clone(), spec.durable, shutdown.clone()));
    let partition = Arc::new(Partition {
        consumer: spec.durable,
        stream: spec.stream.name,
        filter: spec.filter_subject.clone(),
        last_mark: Default::default(),
    });

    // Every delivery of this consumer, redeliveries too, takes the next consumer sequence: a
    // jump from the last one this instance saw is a delivery that never arrived (lost in
    // transit while the server restarted, say). It comes again only after `ack_wait`, and
    // newer messages must not be handled before it (a conversation's order: README, Scaling out).
    // A fresh start has no last one to compare with: there the consumer's ack floor tells
    // whether an older delivery is still out with another client.
    let mut gaps = DeliveryGaps::default();
    // Right after a pause everything sent before it has come back for redelivery and comes
    // first: the fresh start needs no question then (nor could an answer that stays wrong,
    // such as a floor that a server does not move, stall the partition twice).
    let mut just_paused = false;
    while !shutdown.is_cancelled() {
        let messages = match consumer
            .stream()
            .max_messages_per_batch(max_batch)
            .expires(Duration::from_secs(5))
            .heartbeat(Duration::from_secs(2))
            .group(PINNED_GROUP)
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(consumer = spec.durable, "pull failed, retrying: {e:#}");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut chunks = messages.ready_chunks(max_batch);
        let mut pause = None;
        loop {
            let chunk = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = chunks.next() => next,
            };
            let Some(chunk) = chunk else { break };
            let mut batch = Vec::with_capacity(chunk.len());
            for next in chunk {
                match next {
                    Ok(m) => match m.info().map(|i| (i.consumer_sequence, i.stream_sequence)) {
                        Ok((seq, stream_seq)) if pause.is_none() => {
                            let seen = gaps.see(seq);
                            pause =
                                pause_before(seen, just_paused, js, &partition, stream_seq).await;
                            if pause.is_some() {
                                continue;
                            }
                            just_paused = false;
                            match Delivered::of(&m) {
                                Ok(mut delivered) => {
                                    delivered.partition = Some(partition.clone());
                                    batch.push((m, delivered));
                                }
                                Err(e) => tracing::warn!("message without JetStream info: {e}"),
                            }
                        }
                        // After a pause is called: left unacknowledged, to come again in order.
                        Ok(_) => {}
                        Err(e) => tracing::warn!("message without JetStream info: {e}"),
                    },
                    // Missed heartbeats while the server restarts, and the like. The pull
                    // stream goes on by itself (it ends after a terminal error): keep it, as
                    // dropping it would drop the messages it holds, and newer ones could then
                    // be delivered before those come again.
                    Err(e) => {
                        tracing::warn!(consumer = spec.durable, "message stream error: {e:#}");
                    }
                }
            }
            if !batch.is_empty() {
                // Older than what called the pause: handled as usual.
                let waits_for =
                    settle_in_order(js, config, &spec, batch, handler, &shutdown).await?;
                if let (None, Some(expected)) = (&pause, waits_for) {
                    pause = Some(Pause::Fenced(expected));
                }
            }
            if pause.is_some() {
                break;
            }
        }
        let Some(pause) = pause else { continue };
        // Stop pulling (dropping the pull stream) until everything delivered and not acked,
        // the missed or outstanding delivery first, has been given back for redelivery and
        // this instance's pin has lapsed: then the server redelivers them, in the stream's
        // order, before anything newer, to whichever instance pulls next.
        drop(chunks);
        let pause_for = consumer_config.priority_timeout + Duration::from_secs(1);
        let reason = match pause {
            Pause::Missed(missed) => {
                tracing::warn!(
                    consumer = spec.durable,
                    missed,
                    pause_secs = pause_for.as_secs(),
                    "deliveries missed: pausing this partition so that they come again first"
                );
                "missed"
            }
            Pause::Outstanding(older) => {
                tracing::warn!(
                    consumer = spec.durable,
                    stream_sequence = ?older,
                    pause_secs = pause_for.as_secs(),
                    "an older delivery is still out with another client: pausing this \
                     partition so that it comes again first"
                );
                "outstanding"
            }
            Pause::Fenced(expected) => {
                tracing::warn!(
                    consumer = spec.durable,
                    stream_sequence = expected,
                    pause_secs = pause_for.as_secs(),
                    "a batch does not continue the partition's mark: pausing this partition \
                     until the older message comes again"
                );
                "fenced"
            }
        };
        crate::metrics::delivery_gap(spec.durable, reason);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause_for) => {}
        }
        gaps = DeliveryGaps::default();
        just_paused = true;
    }
    tracing::info!(consumer = spec.durable, "stopped");
    Ok(())
}

/// Hands `batch` to the handler and acks in order; keeps what failed transiently, with
/// everything after it, and tries again (see [`consume_partitioned_batched`]). A message that
/// must wait for an older one ([`HandleError::waits_for`]) is not retried in hand: it is left
/// unacknowledged with everything after it, and its wait is returned (the partition pauses).
async fn settle_in_order<F, Fut>(
    js: &JetStream,
    config: &CommonConfig,
    spec: &ConsumerSpec,
    mut held: Vec<(jetstream::Message, Delivered)>,
    handler: &F,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<u64>>
where
    F: Fn(Vec<Delivered>) -> Fut,
    Fut: Future<Output = Vec<Result<(), HandleError>>>,
{
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
        results.resize_with(held.len(), || {
            Err(HandleError::Transient(anyhow::anyhow!(
                "handler returned no result for this message"
            )))
        });
        let mut rest = Vec::new();
        let mut failure = None;
        let mut waits_for = None;
        for ((message, d), result) in held.into_iter().zip(results) {
            if failure.is_some() || waits_for.is_some() {
                rest.push((message, d));
                continue;
            }
            if let Err(e) = &result {
                waits_for = e.waits_for();
                if waits_for.is_some() {
                    rest.push((message, d));
                    continue;
                }
            }
            let tries = d.delivered + attempts;
            match result {
                Ok(()) => {
                    crate::metrics::message_handled(spec.durable, "ok");
                    if let Err(e) = message.ack_with(AckKind::Ack).await {
                        tracing::warn!("ack failed: {e}");
                    }
                }
                Err(HandleError::Poison(reason)) => {
                    crate::metrics::message_handled(spec.durable, "dead_letter");
                    span.in_scope(|| tracing::warn!(%reason, "dead-lettering poison message"));
                    dead_letter(js, spec, &message, d.stream_sequence, tries, &reason).await?;
                    let _ = message.ack_with(AckKind::Term).await;
                }
                Err(HandleError::Transient(e)) if tries >= config.max_deliver => {
                    crate::metrics::message_handled(spec.durable, "dead_letter");
                    let reason = format!("gave up after {tries} attempts: {e:#}");
                    span.in_scope(
                        || tracing::error!(%reason, consumer = spec.durable, "dead-lettering"),
                    );
                    dead_letter(js, spec, &message, d.stream_sequence, tries, &reason).await?;
                    let _ = message.ack_with(AckKind::Term).await;
                    // The next ones start their own count.
                    attempts = 0;
                }
                Err(HandleError::Transient(e)) => {
                    crate::metrics::message_handled(spec.durable, "retry");
                    span.in_scope(|| {
                        tracing::warn!("transient failure, will retry in order: {e:#}")
                    });
                    failure = Some(tries);
                    rest.push((message, d));
                }
            }
        }
        if waits_for.is_some() {
            // Left unacknowledged: they come again after the older one.
            return Ok(waits_for);
        }
        held = rest;
        let Some(tries) = failure else { continue };
        attempts += 1;
        // 0.5 s, 1 s, 2 s… up to 30 s, telling the server the messages are in hand.
        let backoff =
            Duration::from_millis(250 << tries.clamp(1, 7) as u32).min(Duration::from_secs(30));
        let tick = Duration::from_secs(config.ack_wait_secs.max(1)) / 3;
        let until = tokio::time::Instant::now() + backoff;
        loop {
            for (m, _) in &held {
                let _ = m.ack_with(AckKind::Progress).await;
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // Given back in order; whoever pulls next takes them first.
                    for (m, _) in &held {
                        let _ = m.ack_with(AckKind::Nak(None)).await;
                    }
                    return Ok(None);
                }
                _ = tokio::time::sleep(tick.min(until - now)) => {}
            }
        }
    }
    Ok(None)
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
    tokio::spawn(report_lag(consumer.clone(), spec.durable, shutdown.clone()));

    while !shutdown.is_cancelled() {
        let messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(consumer = spec.durable, "pull failed, retrying: {e:#}");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut chunks = messages.ready_chunks(max_batch.max(1));
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
                        tracing::warn!(consumer = spec.durable, "message stream error: {e:#}");
                        stream_error = true;
                    }
                }
            }
            if !batch.is_empty() {
                settle_batch(js, config, &spec, batch, &mut handler).await?;
            }
            if stream_error {
                break;
            }
        }
    }
    tracing::info!(consumer = spec.durable, "stopped");
    Ok(())
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
    // What the ack decision needs, read once in the consume loop, kept before the handler
    // takes the messages.
    let deliveries: Vec<(u64, i64)> = batch
        .iter()
        .map(|(_, d)| (d.stream_sequence, d.delivered))
        .collect();
    let (messages, delivered): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    let n = messages.len();
    let mut results = handler(delivered).instrument(span.clone()).await;
    results.resize_with(n, || {
        Err(HandleError::Transient(anyhow::anyhow!(
            "handler returned no result for this message"
        )))
    });
    for ((message, result), (stream_sequence, delivered)) in
        messages.into_iter().zip(results).zip(deliveries)
    {
        let outcome = match &result {
            Ok(()) => "ok",
            Err(HandleError::Transient(_)) if delivered < config.max_deliver => "retry",
            Err(_) => "dead_letter",
        };
        crate::metrics::message_handled(spec.durable, outcome);
        let ack = match result {
            Ok(()) => AckKind::Ack,
            Err(HandleError::Poison(reason)) => {
                span.in_scope(|| tracing::warn!(%reason, "dead-lettering poison message"));
                dead_letter(js, spec, &message, stream_sequence, delivered, &reason).await?;
                AckKind::Term
            }
            Err(HandleError::Transient(e)) if delivered >= config.max_deliver => {
                let reason = format!("gave up after {delivered} deliveries: {e:#}");
                span.in_scope(|| tracing::error!(%reason, consumer = spec.durable, max_deliver = config.max_deliver, "dead-lettering"));
                dead_letter(js, spec, &message, stream_sequence, delivered, &reason).await?;
                AckKind::Term
            }
            Err(HandleError::Transient(e)) => {
                span.in_scope(|| tracing::warn!("transient failure, will retry: {e:#}"));
                // 0.5 s, 1 s, 2 s… up to 30 s.
                let backoff = Duration::from_millis(250 << delivered.clamp(1, 7) as u32);
                AckKind::Nak(Some(backoff.min(Duration::from_secs(30))))
            }
        };
        if let Err(e) = message.ack_with(ack).await {
            // The message comes again after ack_wait; handlers are idempotent.
            tracing::warn!("ack failed: {e}");
        }
    }
    Ok(())
}

async fn dead_letter(
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

#[cfg(test)]
mod tests {
    use super::{DeliveryGaps, Seen};

    #[test]
    fn consecutive_deliveries_are_no_gap() {
        let mut g = DeliveryGaps::default();
        assert_eq!(g.see(7), Seen::Fresh);
        for seq in 8..20 {
            assert_eq!(g.see(seq), Seen::Next);
        }
    }

    #[test]
    fn a_jump_counts_the_missed_deliveries_and_keeps_watching_from_before_it() {
        let mut g = DeliveryGaps::default();
        assert_eq!(g.see(1), Seen::Fresh);
        assert_eq!(g.see(2), Seen::Next);
        // 3 and 4 never arrived.
        assert_eq!(g.see(5), Seen::Missed(2));
        // Until the consume loop starts again, everything later is a gap too.
        assert_eq!(g.see(6), Seen::Missed(3));
    }

    #[test]
    fn going_back_starts_the_count_again() {
        // A server restarted from an older consumer state sends again from there: what came
        // before that point has to be asked about, as at a start.
        let mut g = DeliveryGaps::default();
        assert_eq!(g.see(10), Seen::Fresh);
        assert_eq!(g.see(8), Seen::Fresh);
        assert_eq!(g.see(9), Seen::Next);
        assert_eq!(g.see(11), Seen::Missed(1));
        let mut g = DeliveryGaps::default();
        g.see(4);
        assert_eq!(g.see(4), Seen::Fresh, "the same one again");
    }
}
