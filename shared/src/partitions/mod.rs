//! The partitioned streams (`FL_INBOUND`, `FL_INBOUND_KEYED`, `FL_BOT`), read in order per
//! partition, the partitions dealt evenly over a worker's live instances (docs/ordering.md):
//!
//! - Every instance says it is alive in Postgres (`worker_instances`) a few times per lease,
//!   and deals the partitions over the live instances ([`assign`]): all compute the same deal.
//! - It holds the partitions dealt to it by a lease (`partition_leases`), renewed with the
//!   heartbeat; one no longer dealt to it is let go (after the batch in
//!   hand), and taken by the instance it is dealt to. A dead instance's leases lapse and its
//!   partitions are taken over within about a lease and a quarter.
//! - Each held partition is read by a reader of its own ([`reader`]) from its mark on, with
//!   a consumer that this instance creates for it, in batches. A batch's transaction locks the
//!   mark's row and commits only if the mark is where this reader left it ([`crate::batch`]),
//!   moving it in the same transaction: so a partition's messages are committed in the
//!   stream's order, each once, whoever held it before and however it ended, even if two
//!   readers ever read it at once (a lease that lapsed under a live instance): the first to
//!   commit moves the mark, the other finds it moved and stops.

mod assign;
mod combine;
mod lease;
mod reader;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

pub use assign::assign;
pub use lease::Member;

use crate::bus::{Delivered, JetStream};
use crate::config::CommonConfig;
use crate::error::HandleError;
use crate::subjects::{self, StreamSpec};
use crate::worker::Services;
use combine::Combiner;
use reader::{End, Reader};

/// A held partition, as its reader and the batch's transaction see it.
#[derive(Debug)]
pub struct Partition {
    /// Its name: the mark's row, the lease, the metrics' `consumer` label (`ingest-p7`).
    pub consumer: &'static str,
    pub stream: &'static str,
    /// The stored subjects of the partition (`fl.*.inbound.*.7`).
    pub filter: String,
    /// Every message up to this stream sequence is handled: the mark as this instance holds
    /// it, checked by each batch's transaction and moved by it.
    pub mark: AtomicU64,
}

/// The partitions of one stream for one worker: `<prefix><n>`, n in 0..FL_PARTITIONS.
#[derive(Clone, Copy, Debug)]
pub struct PartitionSet {
    pub stream: StreamSpec,
    /// `ingest-p`: the partitions are `ingest-p0`, `ingest-p1`…
    pub prefix: &'static str,
}

impl PartitionSet {
    fn names(&self, partitions: u32) -> Vec<(&'static str, String)> {
        (0..partitions)
            .map(|n| {
                // Names live as long as the process: a few bytes per partition, once.
                let name: &'static str = Box::leak(format!("{}{n}", self.prefix).into_boxed_str());
                (name, subjects::partition_filter(&self.stream, n))
            })
            .collect()
    }
}

/// Reads every partition of `sets` dealt to this instance of `worker`, handing the handler up
/// to `FL_PARTITION_BATCH` messages of one partition at a time, in the stream's order, until
/// `shutdown`; then lets them go for the other instances to take at once.
pub async fn consume<F, Fut>(
    services: &Services,
    config: &CommonConfig,
    worker: &'static str,
    sets: &[PartitionSet],
    shutdown: CancellationToken,
    handler: F,
) -> anyhow::Result<()>
where
    F: Fn(Vec<Delivered>) -> Fut + Sync,
    Fut: Future<Output = Vec<Result<(), HandleError>>> + Send,
{
    let mut filters = HashMap::new();
    let mut streams = HashMap::new();
    // Each stream's partitions are dealt on their own, so that each stream's load is even.
    let mut dealt_together = Vec::new();
    for set in sets {
        let mut names = Vec::new();
        for (name, filter) in set.names(config.partitions) {
            filters.insert(name, filter);
            streams.insert(name, set.stream.name);
            names.push(name);
        }
        dealt_together.push(names);
    }
    let names: Vec<&'static str> = dealt_together.concat();
    let floors = older_consumers(&services.js, sets, config.partitions).await;
    let all: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    lease::ensure_marks(&services.pool, &all, &floors).await?;
    let lease = Duration::from_secs_f64(config.partition_lease_secs.clamp(0.5, 300.0));
    let member = Member {
        worker,
        instance: format!(
            "{worker}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ),
        lease,
    };
    tracing::info!(
        instance = member.instance,
        partitions = names.len(),
        ?lease,
        "dealing partitions over the live instances"
    );
    // Group commit: the batches of partitions that are ready at once share a transaction.
    let combiner = Combiner::new(
        &handler,
        config.partition_transactions,
        config.partition_batch.max(1) * 4,
    );
    let combined = |batch| combiner.handle(batch);
    let supervisor = Supervisor {
        services,
        config,
        member: &member,
        sets: &dealt_together,
        filters: &filters,
        streams: &streams,
        handler: &combined,
    };
    let strays = shutdown.child_token();
    let sweeping = futures::future::join_all(sets.iter().map(|set| {
        crate::bus::strays::sweep_strays(&services.js, set.stream, worker, strays.clone())
    }));
    let supervising = async {
        let out = supervisor.run(&shutdown).await;
        strays.cancel();
        out
    };
    let (out, _) = futures::join!(supervising, sweeping);
    if let Err(e) = member.leave(&services.pool).await {
        tracing::warn!("leaving (the leases lapse instead): {e:#}");
    }
    out
}

/// The durable consumers of a version before leases (`<prefix><n>` pinned, or one
/// unpartitioned consumer per stream), removed; their ack floors, for the marks (every message
/// up to a floor is handled or dead-lettered).
async fn older_consumers(
    js: &JetStream,
    sets: &[PartitionSet],
    partitions: u32,
) -> Vec<(String, u64)> {
    let mut floors = Vec::new();
    for set in sets {
        let Ok(stream) = js.get_stream_no_info(set.stream.name).await else {
            continue;
        };
        let old = set.prefix.trim_end_matches("-p").trim_end_matches('-');
        let names = std::iter::once(old.to_owned())
            .chain((0..partitions.max(16)).map(|n| format!("{}{n}", set.prefix)));
        for name in names {
            let Ok(info) = stream.consumer_info(&name).await else {
                continue;
            };
            if info.config.durable_name.is_none() {
                continue;
            }
            if name != old {
                floors.push((name.clone(), info.ack_floor.stream_sequence));
            }
            if stream.delete_consumer(&name).await.is_ok() {
                tracing::info!(
                    consumer = name,
                    "removed the durable consumer of an older version"
                );
            }
        }
    }
    floors
}

/// The supervisor of one instance's partitions: every quarter of a lease, a round (heartbeat,
/// deal, hold), then readers started for the partitions newly held and stopped for those
/// dealt elsewhere or lost.
struct Supervisor<'a, F> {
    services: &'a Services,
    config: &'a CommonConfig,
    member: &'a Member,
    /// The partitions of each stream, dealt stream by stream.
    sets: &'a [Vec<&'static str>],
    filters: &'a HashMap<&'static str, String>,
    streams: &'a HashMap<&'static str, &'static str>,
    handler: &'a F,
}

/// What a round found.
struct Round {
    /// Dealt to this instance.
    dealt: BTreeSet<&'static str>,
    /// Held by this instance now, with the marks.
    held: HashMap<String, u64>,
}

impl<F, Fut> Supervisor<'_, F>
where
    F: Fn(Vec<Delivered>) -> Fut + Sync,
    Fut: Future<Output = Vec<Result<(), HandleError>>> + Send,
{
    async fn run(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut running: HashMap<&'static str, CancellationToken> = HashMap::new();
        let mut readers: FuturesUnordered<BoxFuture<'_, (&'static str, End)>> =
            FuturesUnordered::new();
        let mut ticker = tokio::time::interval(self.member.lease / 4);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round: Option<BoxFuture<'_, anyhow::Result<Round>>> = None;
        // Let go at the next round: readers that stopped because the partition is dealt
        // elsewhere.
        let mut to_release: Vec<&'static str> = Vec::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some((name, end)) = readers.next(), if !readers.is_empty() => {
                    running.remove(name);
                    crate::metrics::partitions_held(self.member.worker, running.len());
                    if end == End::Stopped {
                        to_release.push(name);
                    }
                }
                out = async { round.as_mut().expect("a round").await }, if round.is_some() => {
                    round = None;
                    match out {
                        Ok(found) => self.apply(found, &mut running, &mut readers),
                        Err(e) => tracing::warn!("partition round failed (trying again): {e:#}"),
                    }
                }
                _ = ticker.tick(), if round.is_none() => {
                    let releasing = std::mem::take(&mut to_release);
                    let running: Vec<&'static str> = running.keys().copied().collect();
                    round = Some(self.round(releasing, running).boxed());
                }
            }
        }
        for stop in running.values() {
            stop.cancel();
        }
        while readers.next().await.is_some() {}
        Ok(())
    }

    /// Releases what stopped, says this instance is alive, deals, and holds what is dealt to it
    /// and what its readers still read.
    async fn round(
        &self,
        releasing: Vec<&'static str>,
        running: Vec<&'static str>,
    ) -> anyhow::Result<Round> {
        let pool = &self.services.pool;
        if !releasing.is_empty() {
            self.member.release(pool, &releasing).await?;
        }
        let live = self.member.heartbeat(pool).await?;
        let live: Vec<&str> = live.iter().map(String::as_str).collect();
        let me = self.member.instance.as_str();
        let dealt: BTreeSet<&'static str> = self
            .sets
            .iter()
            .flat_map(|names| assign(names, &live))
            .filter(|(_, owner)| *owner == me)
            .map(|(p, _)| p)
            .collect();
        let wanted: BTreeSet<&str> = dealt.iter().copied().chain(running).collect();
        let wanted: Vec<&str> = wanted.into_iter().collect();
        let held = self.member.hold(pool, &wanted).await?.into_iter().collect();
        Ok(Round { dealt, held })
    }

    /// Stops the readers of partitions lost or dealt elsewhere, starts readers for those dealt
    /// here and now held.
    fn apply<'s>(
        &'s self,
        found: Round,
        running: &mut HashMap<&'static str, CancellationToken>,
        readers: &mut FuturesUnordered<BoxFuture<'s, (&'static str, End)>>,
    ) {
        for (name, stop) in running.iter() {
            if !found.held.contains_key(*name) {
                tracing::warn!(partition = name, "lost the lease: stopping at once");
                stop.cancel();
            } else if !found.dealt.contains(name) {
                stop.cancel();
            }
        }
        for &name in &found.dealt {
            let Some(&mark) = found.held.get(name) else {
                continue;
            };
            if running.contains_key(name) {
                continue;
            }
            let stop = CancellationToken::new();
            running.insert(name, stop.clone());
            let partition = Arc::new(Partition {
                consumer: name,
                stream: self.streams[name],
                filter: self.filters[name].clone(),
                mark: AtomicU64::new(mark),
            });
            let reader = Reader {
                services: self.services,
                config: self.config,
                partition,
                max_batch: self.config.partition_batch.max(1),
                handler: self.handler,
                stop,
            };
            readers.push(async move { (name, reader.run().await) }.boxed());
        }
        crate::metrics::partitions_held(self.member.worker, running.len());
    }
}
