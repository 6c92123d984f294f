//! The metrics of every worker, served for Prometheus on `FL_METRICS_ADDR` (`/metrics`).
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `fl_messages_total` | counter | consumer, outcome (`ok`, `retry`, `dead_letter`) | messages handled |
//! | `fl_dead_letters_total` | counter | stream, consumer | messages dead-lettered |
//! | `fl_consumer_pending` | gauge | consumer | messages in the stream not yet delivered to the consumer (lag) |
//! | `fl_consumer_ack_pending` | gauge | consumer | delivered, not yet acknowledged |
//! | `fl_partitions_held` | gauge | group | partitions this instance holds and reads (docs/ordering.md) |
//! | `fl_partition_restarts_total` | counter | consumer | a partition's reader started again from the mark |
//! | `fl_pull_errors_total` | counter | consumer | pulls of an unordered consumer that failed (no leader, a node lost...) and were made again after a wait |
//! | `fl_conversations` | gauge | tenant, state | open conversations by state (the dispatcher samples it) |
//! | `fl_offers_total` | counter | tenant | offers made |
//! | `fl_offers_expired_total` | counter | tenant | offers not accepted within the dispatch cycle (SPEC D8) |
//! | `fl_enqueue_to_offer_seconds` | histogram | tenant | from entering `waiting` to the offer |
//! | `fl_offer_to_accept_seconds` | histogram | tenant | from the offer to the agent's accept |

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Serves `/metrics` on `addr` for this process. Call once, inside the Tokio runtime.
pub fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let latency = [
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        300.0,
    ];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)?
        .install()?;
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    Ok(())
}

pub fn message_handled(consumer: &'static str, outcome: &'static str) {
    counter!("fl_messages_total", "consumer" => consumer, "outcome" => outcome).increment(1);
}

pub fn dead_lettered(stream: &'static str, consumer: &'static str) {
    counter!("fl_dead_letters_total", "stream" => stream, "consumer" => consumer).increment(1);
}

/// A partition's reader made its consumer again from the mark (a delivery lost in transit, a
/// consumer lost with a server).
pub fn partition_restarted(partition: &'static str) {
    counter!("fl_partition_restarts_total", "consumer" => partition).increment(1);
}

/// A pull of an unordered consumer failed and is made again after a wait.
pub fn pull_failed(consumer: &'static str) {
    counter!("fl_pull_errors_total", "consumer" => consumer).increment(1);
}

/// How many partitions of `worker` this instance reads now.
pub fn partitions_held(worker: &'static str, n: usize) {
    gauge!("fl_partitions_held", "group" => worker).set(n as f64);
}

/// A partition's batch committed (ingest, bot-router): `path` is `lanes` (its messages side by
/// side, no savepoints) or `one_by_one` (with a savepoint each, after the lanes failed; README:
/// Scaling out); `split`: a combined batch of several partitions that could not commit whole,
/// run again per partition (each of those counted again as `lanes` or `one_by_one`).
pub fn batch_handled(consumer: &'static str, path: &'static str) {
    counter!("fl_batches_total", "consumer" => consumer, "path" => path).increment(1);
}

/// A transaction that handled the batches of `partitions` partitions at once (group commit,
/// `partitions::combine`).
pub fn batches_combined(partitions: usize) {
    histogram!("fl_partition_batches_combined").record(partitions as f64);
}

/// A dispatcher transaction that applied `submissions` hand-ins (batches, timer passes) at once.
pub fn dispatch_combined(submissions: usize) {
    histogram!("fl_dispatch_combined_submissions").record(submissions as f64);
}

pub fn consumer_lag(consumer: &'static str, pending: u64, ack_pending: usize) {
    gauge!("fl_consumer_pending", "consumer" => consumer).set(pending as f64);
    gauge!("fl_consumer_ack_pending", "consumer" => consumer).set(ack_pending as f64);
}

pub fn conversations(tenant: &str, state: &str, count: i64) {
    gauge!("fl_conversations", "tenant" => tenant.to_owned(), "state" => state.to_owned())
        .set(count as f64);
}

pub fn offer_made(tenant: &str, since_queued: Option<Duration>) {
    counter!("fl_offers_total", "tenant" => tenant.to_owned()).increment(1);
    if let Some(d) = since_queued {
        histogram!("fl_enqueue_to_offer_seconds", "tenant" => tenant.to_owned())
            .record(d.as_secs_f64());
    }
}

pub fn offers_expired(tenant: &str, n: usize) {
    if n > 0 {
        counter!("fl_offers_expired_total", "tenant" => tenant.to_owned()).increment(n as u64);
    }
}

pub fn offer_accepted(tenant: &str, since_offered: Duration) {
    histogram!("fl_offer_to_accept_seconds", "tenant" => tenant.to_owned())
        .record(since_offered.as_secs_f64());
}

/// A bot answer, by where it came from (keyword, article, flow, fallback, closed, handover).
pub fn bot_replied(tenant: &str, source: &'static str) {
    counter!("fl_bot_replies_total", "tenant" => tenant.to_owned(), "source" => source)
        .increment(1);
}
