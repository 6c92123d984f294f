//! Dispatcher benchmark (not a test: it prints figures and asserts nothing about speed).
//!
//! For 100, 1,000 and 5,000 ready agents (capacity 10, so 3 offer slots each, SPEC D1) and
//! 1,000, 10,000 and 100,000 waiting conversations, on a real Postgres and NATS:
//!
//! - offers/s: timed dispatch passes; between passes, untimed, every offered conversation is
//!   accepted and finished so that the agents have room again. Each pass writes its offers,
//!   state changes, history, events and notifications, and publishes them to NATS.
//! - enqueue-to-offer latency: the queue holds the waiting conversations, all needing a skill
//!   no agent has (so every pass must look past them); the dispatcher runs as in production,
//!   consuming the waiting-queue stream. One conversation an agent can take is queued at a time
//!   (committed, then its queue signal published, as ingest does), and the time until its offer
//!   reaches the notifier's stream is recorded.
//!
//! Run: `scripts/bench` (or `cargo bench -p firstline-tests --bench dispatch`; `FL_BENCH_QUICK=1`
//! for a short run; `FL_BENCH_AGENTS=1000 FL_BENCH_WAITING=100000` for chosen sizes;
//! `FL_BENCH_WEIGHTS=1,2,5,1000` gives the waiting conversations these assignment weights in
//! turn, SPEC D10, default all 1). The last line is one JSON object with every figure.

use std::time::{Duration, Instant};

use firstline_dispatcher::Dispatcher;
use firstline_shared::config::CommonConfig;
use firstline_shared::domain::TenantId;
use firstline_shared::worker::Services;
use firstline_tests::db::TestDb;
use firstline_tests::nats::TestNats;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SETUP: &str = r#"{"tenants":[{"id":"bench","dispatch_cycle_seconds":3600,"offer_limit":3,
    "channels":[{"id":"c","bot_enabled":false}]}]}"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    firstline_shared::telemetry::init_for_tests();
    let quick = std::env::var_os("FL_BENCH_QUICK").is_some();
    // FL_BENCH_AGENTS=1000 FL_BENCH_WAITING=100000: only these sizes (comma-separated lists).
    let list = |var: &str, default: &[i64]| -> Vec<i64> {
        std::env::var(var)
            .ok()
            .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
            .unwrap_or_else(|| default.to_vec())
    };
    let agent_counts = list(
        "FL_BENCH_AGENTS",
        if quick {
            &[100, 1_000]
        } else {
            &[100, 1_000, 5_000]
        },
    );
    let waiting_counts = list(
        "FL_BENCH_WAITING",
        if quick {
            &[1_000, 10_000]
        } else {
            &[1_000, 10_000, 100_000]
        },
    );
    let latency_samples = if quick { 100 } else { 300 };
    let weights = list("FL_BENCH_WEIGHTS", &[1]);
    let weights = format!(
        "ARRAY[{}]::int[]",
        weights
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );

    let nats = TestNats::start().await;
    let db = TestDb::create().await;
    let file = firstline::setup::SetupFile::parse(SETUP)?;
    firstline::setup::configure(&db.url, &file).await?;
    let pg = db.connect().await;
    let config = CommonConfig::new(&nats.url, &db.url);
    let tenant = TenantId::parse("bench")?;

    println!(
        "dispatcher benchmark: {} cores, Postgres and NATS on this machine; waiting weights {weights}",
        num_cpus()
    );
    println!(
        "{:>7} {:>8} | {:>9} {:>10} {:>11} | {:>8} {:>8} {:>8}",
        "agents", "waiting", "offers", "offers/s", "µs/offer", "p50 ms", "p99 ms", "max ms"
    );
    let mut rows = Vec::new();
    for &agents in &agent_counts {
        for &waiting in &waiting_counts {
            let (offers, secs) =
                throughput(&config, &pg, &tenant, agents, waiting, &weights).await?;
            let latency = latency(
                &config,
                &nats,
                &pg,
                &tenant,
                (agents, waiting, &weights),
                latency_samples,
            )
            .await?;
            let per_s = offers as f64 / secs;
            println!(
                "{agents:>7} {waiting:>8} | {offers:>9} {per_s:>10.0} {:>11.1} | {:>8.2} {:>8.2} {:>8.2}",
                1e6 * secs / offers as f64,
                latency.value_at_quantile(0.5) as f64 / 1000.0,
                latency.value_at_quantile(0.99) as f64 / 1000.0,
                latency.max() as f64 / 1000.0,
            );
            rows.push(json!({
                "agents": agents, "waiting": waiting, "weights": weights, "offers": offers, "offers_per_s": per_s.round(),
                "enqueue_to_offer_p50_ms": latency.value_at_quantile(0.5) as f64 / 1000.0,
                "enqueue_to_offer_p99_ms": latency.value_at_quantile(0.99) as f64 / 1000.0,
            }));
        }
    }
    println!("{}", json!({ "dispatcher_benchmark": rows }));
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Empties the tenant's data and creates `agents` ready agents and `waiting` conversations
/// requiring `skills` (`{}`: anyone can take them), with the `weights` (an SQL array) in turn.
async fn reset(
    pg: &tokio_postgres::Client,
    agents: i64,
    waiting: i64,
    skills: &str,
    weights: &str,
) -> anyhow::Result<()> {
    pg.batch_execute(&format!(
        "TRUNCATE offers, conversation_transitions, messages, conversations, customers, agents, api_tokens, outbox;
         INSERT INTO agents (tenant_id, id, capacity, status, idle_since)
           SELECT 'bench', 'a' || i, 10, 'ready', now() - make_interval(secs => i) FROM generate_series(1, {agents}) i;
         INSERT INTO customers (id, tenant_id, channel_id, external_id)
           SELECT gen_random_uuid(), 'bench', 'c', 'w' || i FROM generate_series(1, {waiting}) i;
         INSERT INTO conversations (id, tenant_id, channel_id, customer_id, state, required_skills, weight, queued_at)
           SELECT gen_random_uuid(), 'bench', 'c', cu.id, 'waiting', '{skills}', w[1 + (n % cardinality(w))::int],
                  now() - make_interval(secs => {waiting}) + make_interval(secs => n)
           FROM (SELECT id, row_number() OVER () AS n FROM customers) cu, (SELECT {weights} AS w) ws;
         ANALYZE;"
    ))
    .await?;
    Ok(())
}

/// Timed passes until the queue is empty or 30,000 offers are made.
async fn throughput(
    config: &CommonConfig,
    pg: &tokio_postgres::Client,
    tenant: &TenantId,
    agents: i64,
    waiting: i64,
    weights: &str,
) -> anyhow::Result<(usize, f64)> {
    reset(pg, agents, waiting, "{}", weights).await?;
    let shutdown = CancellationToken::new();
    let services = Services::start(config, &shutdown).await?;
    let dispatcher = Dispatcher::new(services);
    let mut offers = 0usize;
    let mut timed = Duration::ZERO;
    while offers < 30_000 && (offers as i64) < waiting {
        let t0 = Instant::now();
        let report = dispatcher
            .pass_for(tenant)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        timed += t0.elapsed();
        offers += report.offered;
        if report.offered == 0 {
            break;
        }
        // Untimed: the agents accept and finish everything offered, freeing their slots.
        pg.batch_execute(
            "UPDATE offers SET status = 'accepted', ended_at = now(), end_reason = 'bench' WHERE status = 'open';
             UPDATE conversations SET state = 'completed', completed_at = now() WHERE state = 'assigning';",
        )
        .await?;
    }
    shutdown.cancel();
    Ok((offers, timed.as_secs_f64()))
}

/// Enqueue-to-offer latency through NATS with the dispatcher running, `samples` times.
async fn latency(
    config: &CommonConfig,
    nats: &TestNats,
    pg: &tokio_postgres::Client,
    tenant: &TenantId,
    (agents, waiting, weights): (i64, i64, &str),
    samples: usize,
) -> anyhow::Result<Histogram<u64>> {
    reset(pg, agents, waiting, "{nobody}", weights).await?;
    let client = async_nats::connect(&nats.url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut offers = client
        .subscribe(format!("fl.{tenant}.delivery.agent"))
        .await?;
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(firstline_dispatcher::run(
        firstline_dispatcher::Config::new(config.clone()),
        shutdown.clone(),
    ));
    // Let the dispatcher create its consumers and make its first passes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for i in 0..samples {
        if i % (agents as usize * 3).max(1) == 0 && i > 0 {
            // Free the slots used so far, so that an agent always has room.
            pg.batch_execute(
                "UPDATE offers SET status = 'accepted', ended_at = now(), end_reason = 'bench' WHERE status = 'open';
                 UPDATE conversations SET state = 'completed', completed_at = now() WHERE state = 'assigning';",
            )
            .await?;
        }
        let id = Uuid::now_v7();
        let t0 = Instant::now();
        pg.execute(
            "WITH cu AS (INSERT INTO customers (id, tenant_id, channel_id, external_id)
                         VALUES (gen_random_uuid(), 'bench', 'c', $2) RETURNING id)
             INSERT INTO conversations (id, tenant_id, channel_id, customer_id, state, queued_at)
             SELECT $1, 'bench', 'c', cu.id, 'waiting', now() FROM cu",
            &[&id, &format!("l{i}")],
        )
        .await?;
        let signal = json!({"version": 1, "conversation_id": id, "reason": "bench"}).to_string();
        js.publish(format!("fl.{tenant}.queue.waiting"), signal.into())
            .await?
            .await?;
        let needle = id.to_string();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), offers.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("subscription closed"))?;
            if String::from_utf8_lossy(&m.payload).contains(&needle) {
                break;
            }
        }
        histogram.record(t0.elapsed().as_micros().max(1) as u64)?;
    }
    shutdown.cancel();
    let _ = worker.await;
    Ok(histogram)
}
