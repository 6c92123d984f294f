//! End-to-end benchmark (not a test: it prints figures and asserts nothing about speed).
//!
//! In one run on one machine:
//! 1. the ceiling: raw JetStream publishes with acks (async, pipelined; file storage; a
//!    `Nats-Msg-Id` header and the same message size as the load's inbound messages) to a
//!    stream of the same NATS server the pipeline then uses;
//! 2. the relay floor: the same messages through four streams (inbound -> bot work -> delivery
//!    -> outbound, the bot path's streams), each stage a consumer that publishes on and acks, with no database: what the
//!    pipeline's NATS side alone carries on this machine;
//! 3. the pipeline: the four worker binaries (release build) as their own processes, driven by
//!    the load generator (`firstline::load`, the code of `firstline load`) at increasing
//!    offered rates until it does not keep up. Per rate: inbound messages answered per second,
//!    end-to-end latency (publish to the bot's reply on `outbound`, or to the offer on
//!    `notify`), per-hop latency from the database's timestamps, offers/s, and CPU and memory
//!    of every worker (from `/proc/<pid>/stat` and `/proc/<pid>/status`), NATS and Postgres.
//!
//! The last line is one JSON object with every figure. Settings (environment):
//! - `FL_BENCH_RATES` (default `1000,2500,5000,7500,10000,15000`), `FL_BENCH_DURATION` (s, 20),
//!   `FL_BENCH_RAW_N` (messages of the ceiling run, 300000), `FL_PARTITION_BATCH` (the
//!   workers', 64 as in production);
//! - `FL_BENCH_MIX`: `cold` (default: 3 tenants, 2 channels each, most messages open a new
//!   conversation), `steady` (a running desk: about eight messages per conversation, so about
//!   one in six opens one) or `one-channel` (ONE tenant's ONE channel with the bot, every
//!   customer on it: what only the customer key in the subject spreads over instances);
//! - `FL_BENCH_INSTANCES` (default 1): instances of every worker; the JSON line reports the
//!   share of its worker's messages each instance handled (from its `/metrics`);
//! - `FL_BENCH_REPLICAS` (default 1): 3 runs everything, the ceiling and the relay floor
//!   included, on a 3-node JetStream cluster with streams of 3 replicas;
//! - `FL_BENCH_SOAK` (seconds): instead, a memory soak at `FL_BENCH_SOAK_RATE` (2000/s):
//!   RSS of every worker sampled every 10 s, then start, end, max and the slope.
//!
//! - `FL_BENCH_QUICK=1`: the smallest run that still goes through every step (one rate, 200/s
//!   for 3 s, a 5,000-message ceiling, a 200-conversation history); scripts/test runs it so
//!   that the benchmark cannot rot. Its figures mean nothing.
//!
//! Run: `scripts/bench e2e` (or `cargo bench -p firstline-tests --bench e2e`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use firstline::load::{self, LoadOptions, LoadReport};
use firstline_shared::config::CommonConfig;
use firstline_tests::db::TestDb;
use firstline_tests::metrics::{free_addr, handled, scrape};
use firstline_tests::nats::{TestCluster, TestNats};
use firstline_tests::pgstat;
use firstline_tests::workers::WorkerProcess;
use futures::StreamExt;
use serde_json::json;

const WORKERS: [&str; 4] = [
    "firstline-ingest",
    "firstline-bot-router",
    "firstline-dispatcher",
    "firstline-notifier",
];

fn env_f64s(name: &str, default: &str) -> Vec<f64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// utime + stime of a process, in clock ticks (100 per second).
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name is in parentheses and may hold spaces: split after it.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat; `after` starts at field 3.
    let get = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    get(14).unwrap_or(0) + get(15).unwrap_or(0)
}

/// Clock ticks per second of `/proc/<pid>/stat`'s CPU times (USER_HZ: 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// The CPU ticks of the benchmark database's backends, per pid, with their worker's name.
async fn backend_ticks(pg: &tokio_postgres::Client) -> BTreeMap<u32, (String, u64)> {
    pgstat::backends(pg)
        .await
        .into_iter()
        .map(|(name, pid)| (pid, (name, cpu_ticks(pid))))
        .collect()
}

/// Postgres CPU spent by each worker's connections between `before` and `after` (a connection
/// opened in between counts from zero), in ms per message `answered`.
fn backend_cpu_ms_per_msg(
    before: &BTreeMap<u32, (String, u64)>,
    after: &BTreeMap<u32, (String, u64)>,
    answered: u64,
) -> BTreeMap<String, f64> {
    let tick_ms = 1000.0 / TICKS_PER_SECOND;
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for (pid, (name, ticks)) in after {
        let start = before.get(pid).map_or(0, |(_, t)| *t);
        *out.entry(name.clone()).or_default() += ticks.saturating_sub(start) as f64 * tick_ms;
    }
    for ms in out.values_mut() {
        *ms = (*ms / answered.max(1) as f64 * 1000.0).round() / 1000.0;
    }
    out
}

/// Deadlocks Postgres has detected in the benchmark's database so far.
async fn deadlocks(pg: &tokio_postgres::Client) -> i64 {
    // The statistics of this transaction's snapshot are cleared first, to see the latest.
    let _ = pg.batch_execute("SELECT pg_stat_clear_snapshot()").await;
    pg.query_one(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
        &[],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(0)
}

/// Per name, the share of a core (%) each spent between two readings `seconds` apart.
fn percent(
    t0: &BTreeMap<&'static str, u64>,
    t1: &BTreeMap<&'static str, u64>,
    seconds: f64,
) -> BTreeMap<&'static str, f64> {
    t1.iter()
        .map(|(n, t)| {
            let before = t0.get(n).copied().unwrap_or(0);
            (
                *n,
                t.saturating_sub(before) as f64 / TICKS_PER_SECOND / seconds * 100.0,
            )
        })
        .collect()
}

/// Resident memory in KiB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Processes measured: the four workers, NATS, Postgres (all backends).
struct Procs {
    pids: Vec<(&'static str, u32)>,
    /// The benchmark's Postgres server (its other clusters' processes are not counted).
    postmaster: Option<u32>,
}

impl Procs {
    /// Per name, summed over its instances (and nodes).
    fn ticks(&self) -> BTreeMap<&'static str, u64> {
        let mut t = BTreeMap::new();
        for (n, p) in &self.pids {
            *t.entry(*n).or_insert(0) += cpu_ticks(*p);
        }
        let pg = pgstat::server_pids(self.postmaster);
        t.insert("postgres", pg.into_iter().map(cpu_ticks).sum());
        t
    }
    fn rss(&self) -> BTreeMap<&'static str, u64> {
        let mut m = BTreeMap::new();
        for (n, p) in &self.pids {
            *m.entry(*n).or_insert(0) += rss_kb(*p);
        }
        m
    }
}

/// The consumers whose messages count as a worker's own (`fl_messages_total{consumer=…}`).
fn consumer_prefix(worker: &str) -> &'static str {
    match worker {
        "firstline-ingest" => "ingest-",
        "firstline-bot-router" => "bot-router-",
        "firstline-dispatcher" => "dispatcher-",
        _ => "notifier",
    }
}

/// The share of its worker's messages each instance handled so far, per worker.
async fn shares(instances: &[(&'static str, std::net::SocketAddr)]) -> serde_json::Value {
    let mut per_worker: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (worker, addr) in instances {
        let n = handled(&scrape(*addr).await, consumer_prefix(worker));
        per_worker.entry(short(worker)).or_default().push(n);
    }
    let out: serde_json::Map<String, serde_json::Value> = per_worker
        .into_iter()
        .map(|(w, counts)| {
            let total: f64 = counts.iter().sum::<f64>().max(1.0);
            let shares: Vec<f64> = counts
                .iter()
                .map(|c| (c / total * 1000.0).round() / 1000.0)
                .collect();
            (w.to_owned(), json!({"messages": counts, "shares": shares}))
        })
        .collect();
    serde_json::Value::Object(out)
}

fn short(name: &str) -> &str {
    name.strip_prefix("firstline-").unwrap_or(name)
}

/// Raw JetStream publishes with acks: the ceiling.
async fn raw_ceiling(
    js: &jetstream::Context,
    payload: bytes::Bytes,
    n: usize,
    replicas: usize,
    max_inflight: usize,
) -> f64 {
    let _ = js.delete_stream("RAW_CEILING").await;
    js.create_stream(jetstream::stream::Config {
        name: "RAW_CEILING".into(),
        subjects: vec!["raw.>".into()],
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        // As FL_INBOUND's (shared/src/bus/streams.rs).
        duplicate_window: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .expect("create the ceiling stream");
    // Before the clock starts, one publish acknowledged: on a cluster the new stream's leader
    // is elected after the create answers, and publishes meanwhile find no responder.
    let ready = Instant::now();
    loop {
        let probe = js.publish("raw.probe", payload.clone()).await;
        if let Ok(ack) = probe {
            if ack.await.is_ok() {
                break;
            }
        }
        assert!(
            ready.elapsed() < Duration::from_secs(30),
            "the ceiling stream takes no publish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<jetstream::context::PublishAckFuture>(20_000);
    let acks = tokio::spawn(async move {
        let mut inflight = futures::stream::FuturesUnordered::new();
        let mut errors = 0u64;
        loop {
            tokio::select! {
                next = rx.recv(), if inflight.len() < max_inflight => match next {
                    Some(f) => inflight.push(std::future::IntoFuture::into_future(f)),
                    None => break,
                },
                Some(r) = inflight.next(), if !inflight.is_empty() => errors += r.is_err() as u64,
            }
        }
        while let Some(r) = inflight.next().await {
            errors += r.is_err() as u64;
        }
        errors
    });
    let start = Instant::now();
    for i in 0..n {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("raw:b0:{i}").as_str(),
        );
        let ack = js
            .publish_with_headers(format!("raw.{}", i % 16), headers, payload.clone())
            .await
            .expect("publish");
        tx.send(ack).await.expect("ack collector");
    }
    drop(tx);
    let errors = acks.await.expect("ack collector");
    let rate = n as f64 / start.elapsed().as_secs_f64();
    assert_eq!(errors, 0, "raw publishes not acknowledged");
    let _ = js.delete_stream("RAW_CEILING").await;
    rate
}

/// The broker's share of the pipeline, without the database: messages relayed through four
/// streams as the pipeline's bot path relays them (inbound -> bot work -> delivery ->
/// outbound: ingest, bot-router and notifier each consume one and publish to the next), each
/// stage a durable pull consumer that publishes to the next stream, waits for the publish
/// acks and then acks what it consumed (at least once, like the workers' outbox). Returns
/// messages/s through all four streams: what the fixed shape's NATS side can carry here, with
/// every message of a stage in one process and no Postgres.
async fn relay_floor(
    js: &jetstream::Context,
    payload: bytes::Bytes,
    n: usize,
    replicas: usize,
) -> f64 {
    const STAGES: [&str; 4] = ["RELAY_IN", "RELAY_BOT", "RELAY_DELIVERY", "RELAY_OUT"];
    for (i, name) in STAGES.iter().enumerate() {
        let _ = js.delete_stream(*name).await;
        js.create_stream(jetstream::stream::Config {
            name: (*name).into(),
            subjects: vec![format!("relay.{i}.>")],
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .expect("create a relay stream");
    }
    let consumer = |i: usize| {
        let js = js.clone();
        async move {
            js.get_stream(STAGES[i])
                .await
                .expect("relay stream")
                .create_consumer(jetstream::consumer::pull::Config {
                    durable_name: Some(format!("relay-{i}")),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    max_ack_pending: 4096,
                    ..Default::default()
                })
                .await
                .expect("relay consumer")
        }
    };
    let mut stages = Vec::new();
    for i in 0..STAGES.len() {
        let c = consumer(i).await;
        let js = js.clone();
        let last = i + 1 == STAGES.len();
        stages.push(tokio::spawn(async move {
            let mut chunks = c.messages().await.expect("relay pull").ready_chunks(256);
            let mut seen = 0usize;
            while seen < n {
                let Some(chunk) = chunks.next().await else {
                    break;
                };
                let msgs: Vec<_> = chunk.into_iter().filter_map(Result::ok).collect();
                if !last {
                    let mut acks = Vec::with_capacity(msgs.len());
                    for m in &msgs {
                        let next = m.subject.replacen(
                            &format!("relay.{i}."),
                            &format!("relay.{}.", i + 1),
                            1,
                        );
                        acks.push(
                            js.publish(next, m.payload.clone())
                                .await
                                .expect("relay publish"),
                        );
                    }
                    for a in acks {
                        a.await.expect("relay publish ack");
                    }
                }
                for m in &msgs {
                    m.ack().await.expect("relay ack");
                }
                seen += msgs.len();
            }
        }));
    }
    let start = Instant::now();
    let mut acks = std::collections::VecDeque::new();
    for i in 0..n {
        acks.push_back(
            js.publish(format!("relay.0.{}", i % 16), payload.clone())
                .await
                .expect("publish"),
        );
        if acks.len() >= 4096 {
            acks.pop_front().unwrap().await.expect("publish ack");
        }
    }
    for a in acks {
        a.await.expect("publish ack");
    }
    for s in stages {
        s.await.expect("relay stage");
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    for name in STAGES {
        let _ = js.delete_stream(name).await;
    }
    rate
}

/// Per-hop latency (ms) from the database: publish -> stored by ingest (the message's
/// `sent_at` to its row's `created_at`, the transaction's start), stored -> bot reply stored,
/// queued -> offered.
async fn hops(
    pg: &tokio_postgres::Client,
    since: chrono::DateTime<chrono::Utc>,
) -> serde_json::Value {
    let q = |sql: &'static str| async move {
        let row = pg.query_one(sql, &[&since]).await.expect(sql);
        let v: Option<Vec<f64>> = row.get(0);
        v.unwrap_or_default()
    };
    let stored = q("SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM m.created_at - m.sent_at) * 1000)
                    FROM messages m WHERE m.author = 'customer' AND m.sent_at >= $1").await;
    let bot = q("SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM r.created_at - m.created_at) * 1000)
                 FROM messages m JOIN messages r ON r.tenant_id = m.tenant_id AND r.channel_id = m.channel_id
                   AND r.external_id = 'bot-reply:' || m.id || ':0'
                 WHERE m.author = 'customer' AND m.sent_at >= $1").await;
    let offer = q("SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM o.created_at - c.queued_at) * 1000)
                   FROM offers o JOIN conversations c ON c.id = o.conversation_id WHERE o.created_at >= $1").await;
    // How many of the step's messages opened a conversation (the mix: cold or steady).
    let opened: i64 = pg
        .query_one(
            "SELECT count(*) FROM conversations WHERE created_at >= $1",
            &[&since],
        )
        .await
        .expect("conversations opened")
        .get(0);
    let pair = |v: &[f64]| json!({"p50_ms": v.first().copied().unwrap_or(f64::NAN), "p99_ms": v.get(1).copied().unwrap_or(f64::NAN)});
    json!({
        "publish_to_stored": pair(&stored),
        "stored_to_bot_reply_stored": pair(&bot),
        "queued_to_offered": pair(&offer),
        "conversations_opened": opened,
    })
}

/// The load of one step: the mix of `FL_BENCH_MIX` ([`load::Mix`]) at `rate` for `duration`.
fn options(rate: f64, duration: f64) -> LoadOptions {
    let mut opts = LoadOptions {
        rate,
        duration: Duration::from_secs_f64(duration),
        agents: 100,
        capacity: 10,
        accept_delay: Duration::from_millis(200),
        close_after: Duration::from_millis(500),
        progress: Some(Duration::from_secs(5)),
        drain: Duration::from_secs(20),
        prefix: "bench".into(),
        ..LoadOptions::default()
    };
    load::Mix::parse(&mix())
        .expect("FL_BENCH_MIX is cold, steady or one-channel")
        .apply(&mut opts);
    opts
}

fn mix() -> String {
    std::env::var("FL_BENCH_MIX").unwrap_or_else(|_| "cold".into())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let quick = std::env::var_os("FL_BENCH_QUICK").is_some();
    let rates = env_f64s(
        "FL_BENCH_RATES",
        if quick {
            "200"
        } else {
            "1000,2500,5000,7500,10000,15000"
        },
    );
    let duration = env_f64("FL_BENCH_DURATION", if quick { 3.0 } else { 20.0 });
    let raw_n = env_f64("FL_BENCH_RAW_N", if quick { 5_000.0 } else { 300_000.0 }) as usize;
    let soak = env_f64("FL_BENCH_SOAK", 0.0);

    let instances = env_f64("FL_BENCH_INSTANCES", 1.0).max(1.0) as usize;
    let replicas = env_f64("FL_BENCH_REPLICAS", 1.0) as usize;
    assert!(
        ["cold", "steady", "one-channel"].contains(&mix().as_str()),
        "FL_BENCH_MIX is cold, steady or one-channel"
    );
    // One server, or a 3-node cluster for R3 (every node on this machine).
    let (nats, cluster) = if replicas > 1 {
        let c = TestCluster::start(3).await;
        (None, Some(c))
    } else {
        (Some(TestNats::start().await), None)
    };
    let nats_url = match (&nats, &cluster) {
        (Some(n), _) => n.url.clone(),
        (_, Some(c)) => c.url.clone(),
        _ => unreachable!(),
    };
    let nats_pids: Vec<u32> = match (&nats, &cluster) {
        (Some(n), _) => vec![n.pid()],
        (_, Some(c)) => c.nodes.iter().map(|n| n.pid()).collect(),
        _ => unreachable!(),
    };
    let db = TestDb::create().await;
    let pg = db.connect().await;
    let client = async_nats::connect(nats_url.split(',').collect::<Vec<_>>())
        .await
        .expect("connect");
    let js = jetstream::new(client.clone());

    let sample = options(1000.0, duration);
    let payload = sample.sample_payload();
    println!(
        "machine: {} cores, {}; mix {}, {instances} instance(s) of every worker, {} stream replica(s)",
        num_cores(),
        load_average(),
        mix(),
        replicas
    );
    let raw = raw_ceiling(&js, payload.clone(), raw_n, replicas, 20_000).await;
    println!(
        "raw JetStream ceiling: {raw:.0} msgs/s ({raw_n} async publishes with acks, {} bytes, file storage, Nats-Msg-Id)",
        payload.len()
    );
    // On the cluster, the ceiling of a one-replica stream too, in the same run: what R3 costs
    // the broker (README: operations, R1 and R3).
    let raw_r1 = if replicas > 1 {
        let r1 = raw_ceiling(&js, payload.clone(), raw_n, 1, 20_000).await;
        println!(
            "raw JetStream ceiling on the same cluster at R1: {r1:.0} msgs/s (R{replicas}: {:.2} of it)",
            raw / r1
        );
        Some(r1)
    } else {
        None
    };
    // On one server, the ceiling of a server that syncs every write before its ack
    // (`sync_interval: always`), in the same run: what that protection costs.
    let raw_sync_always = if replicas == 1 {
        let synced = TestNats::start_with_config("jetstream { sync_interval: always }", None).await;
        let synced_js = jetstream::new(async_nats::connect(&synced.url).await.expect("connect"));
        let r = raw_ceiling(
            &synced_js,
            payload.clone(),
            raw_n / 10,
            1,
            // An fsync per write: a few thousand a second, so fewer in flight than the
            // client's 5 s ack timeout would let expire.
            1_000,
        )
        .await;
        println!(
            "raw JetStream ceiling with sync_interval: always: {r:.0} msgs/s ({:.2} of the default's; {} publishes, 1,000 in flight)",
            r / raw,
            raw_n / 10
        );
        Some(r)
    } else {
        None
    };
    let relay_n = (raw_n / 3).max(1000);
    let relay = relay_floor(&js, payload.clone(), relay_n, replicas).await;
    println!(
        "relay floor: {relay:.0} msgs/s through 4 JetStream streams with no database ({relay_n} messages: publish, then per stream consume -> publish to the next -> ack)"
    );

    sample
        .configure(&db.url)
        .await
        .expect("configure the load tenants");
    // A desk that has been running: plans and index sizes of real tables (README).
    let history = env_f64("FL_BENCH_HISTORY", if quick { 200.0 } else { 20_000.0 }) as usize;
    let h = firstline::history::seed(&db.url, &sample, history)
        .await
        .expect("seed the history");
    println!(
        "history: {} completed conversations ({history} per tenant), {} messages, {} offers, written in {:.1} s",
        h.conversations, h.messages, h.offers, h.seconds
    );
    let mut config = CommonConfig::new(&nats_url, &db.url);
    config.stream_replicas = replicas;
    // Batched partitions, the default (README: Scaling out); FL_PARTITION_BATCH=1 to compare.
    config.partition_batch = env_f64("FL_PARTITION_BATCH", 64.0) as usize;
    config.partition_transactions = env_f64("FL_PARTITION_TRANSACTIONS", 2.0) as usize;
    println!(
        "workers: FL_PARTITION_BATCH={} FL_PARTITION_TRANSACTIONS={}",
        config.partition_batch, config.partition_transactions
    );
    let replicas_env = replicas.to_string();
    let mut workers: Vec<WorkerProcess> = Vec::new();
    let mut pids: Vec<(&'static str, u32)> = Vec::new();
    let mut metrics: Vec<(&'static str, std::net::SocketAddr)> = Vec::new();
    for name in WORKERS {
        for _ in 0..instances {
            let addr = free_addr();
            let w = WorkerProcess::start_with(
                name,
                &config,
                &[
                    ("FL_METRICS_ADDR", &addr.to_string()),
                    ("FL_STREAM_REPLICAS", &replicas_env),
                ],
            );
            pids.push((name, w.pid().expect("running")));
            metrics.push((name, addr));
            workers.push(w);
        }
    }
    for pid in &nats_pids {
        pids.push(("nats-server", *pid));
    }
    let procs = Procs {
        pids,
        postmaster: pgstat::postmaster_pid(&pg).await,
    };
    // FL_BENCH_PG_TOP=N: the N statements that took longest in each step, per message.
    let pg_top = env_f64("FL_BENCH_PG_TOP", 0.0) as usize;
    let statements = match pg_top {
        0 => None,
        _ => Some(pgstat::Statements::start(&pg).await),
    };
    // Warm up: consumers created, caches filled, every agent ready.
    let mut warm = options(200.0, 3.0);
    warm.progress = None;
    let w = load::run(client.clone(), &warm, Default::default())
        .await
        .expect("warm-up");
    println!(
        "warm-up: {} sent, {} answered, p99 {:.1} ms",
        w.sent, w.answered, w.e2e.p99_ms
    );

    // Statistics as autovacuum would have them on a system that has been running: a fresh
    // database's say "empty" and mislead the planner.
    pg.batch_execute("VACUUM ANALYZE")
        .await
        .expect("vacuum analyze");

    if soak > 0.0 {
        return run_soak(
            &client,
            &procs,
            env_f64("FL_BENCH_SOAK_RATE", 2000.0),
            soak,
            (raw, relay),
        )
        .await;
    }

    // Idle: what every process spends with the workers running and no message offered (their
    // polls, leases and sweeps, Postgres's background writers); a step's per-message figures
    // carry this share too, largest at the lowest rate.
    let idle_seconds = if quick { 1.0 } else { 5.0 };
    let i0 = procs.ticks();
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(idle_seconds)).await;
    let idle = percent(&i0, &procs.ticks(), idle_started.elapsed().as_secs_f64());
    println!(
        "idle ({idle_seconds:.0} s, no load): {}",
        idle.iter()
            .map(|(n, c)| format!("{} {c:.1} %", short(n)))
            .collect::<Vec<_>>()
            .join("  ")
    );

    let mut rows = Vec::new();
    for &rate in &rates {
        println!(
            "--- offered {rate:.0} msgs/s for {duration:.0} s ({})",
            load_average()
        );
        let opts = options(rate, duration);
        if let Some(s) = &statements {
            s.reset(&pg).await;
        }
        let deadlocks_before = deadlocks(&pg).await;
        let b0 = backend_ticks(&pg).await;
        let t0 = procs.ticks();
        let started = Instant::now();
        let report = load::run(client.clone(), &opts, Default::default())
            .await
            .expect("load run");
        let elapsed = started.elapsed().as_secs_f64();
        let t1 = procs.ticks();
        let by_worker = backend_cpu_ms_per_msg(&b0, &backend_ticks(&pg).await, report.answered);
        let rss = procs.rss();
        let cpu = percent(&t0, &t1, elapsed);
        let mut hop = hops(&pg, report.started_at).await;
        load::print_report(&report);
        // Deadlocks between the workers' transactions: each costs a batch and a second.
        let step_deadlocks = deadlocks(&pg).await - deadlocks_before;
        println!("deadlocks: {step_deadlocks}");
        hop["deadlocks"] = json!(step_deadlocks);
        println!(
            "postgres CPU by connection (ms per message answered): {}",
            by_worker
                .iter()
                .map(|(n, ms)| format!("{} {ms:.3}", short(n)))
                .collect::<Vec<_>>()
                .join("  ")
        );
        hop["pg_cpu_ms_per_msg_by_worker"] = json!(by_worker);
        println!(
            "conversations opened: {} ({:.2} per inbound message)",
            hop["conversations_opened"],
            hop["conversations_opened"].as_f64().unwrap_or(0.0) / (report.sent.max(1) as f64)
        );
        if let Some(s) = &statements {
            if let Some(p) = s.profile(&pg, report.sent as f64, pg_top).await {
                print!("{}", p.table(150));
                hop["pg_statements"] = serde_json::to_value(&p).unwrap_or_default();
            }
        }
        let kept = report.kept_up();
        rows.push((report, cpu, rss, hop, kept));
        if !kept {
            println!("did not keep up at {rate:.0} msgs/s: stopping");
            break;
        }
    }

    println!();
    println!("raw JetStream ceiling: {raw:.0} msgs/s; relay floor (4 streams, no database): {relay:.0} msgs/s");
    println!(
        "{:>7} {:>7} {:>7} {:>4} | {:>7} {:>7} {:>7} | {:>7} | {:>6} {:>6} {:>6} | {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} | {:>5} {:>5} {:>5} {:>5}",
        "offered", "sent/s", "answ/s", "ok", "p50 ms", "p95 ms", "p99 ms", "offer/s", "h1 p99", "h2 p99", "q p99",
        "%ing", "%bot", "%disp", "%noti", "%nats", "%pg", "MBing", "MBbot", "MBdis", "MBnot"
    );
    for (r, cpu, rss, hop, kept) in &rows {
        let c = |n: &str| cpu.get(n).copied().unwrap_or(0.0);
        let m = |n: &str| rss.get(n).copied().unwrap_or(0) as f64 / 1024.0;
        let h = |k: &str| hop[k]["p99_ms"].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>7.0} {:>7.0} {:>7.0} {:>4} | {:>7.2} {:>7.2} {:>7.2} | {:>7.0} | {:>6.1} {:>6.1} {:>6.1} | {:>5.0} {:>5.0} {:>5.0} {:>5.0} {:>5.0} {:>5.0} | {:>5.0} {:>5.0} {:>5.0} {:>5.0}",
            r.offered_rate,
            r.sent as f64 / r.send_seconds,
            r.answered_per_s,
            if *kept { "yes" } else { "no" },
            r.e2e.p50_ms,
            r.e2e.p95_ms,
            r.e2e.p99_ms,
            r.offers_per_s,
            h("publish_to_stored"),
            h("stored_to_bot_reply_stored"),
            h("queued_to_offered"),
            c("firstline-ingest"),
            c("firstline-bot-router"),
            c("firstline-dispatcher"),
            c("firstline-notifier"),
            c("nats-server"),
            c("postgres"),
            m("firstline-ingest"),
            m("firstline-bot-router"),
            m("firstline-dispatcher"),
            m("firstline-notifier"),
        );
    }
    println!("h1 = publish -> stored by ingest, h2 = stored -> bot reply stored, q = queued -> offered (database timestamps); %pg = every postgres process of the server");
    // Sustained: the best answered rate among the rates that kept up.
    let best = rows
        .iter()
        .filter(|r| r.4)
        .max_by(|a, b| a.0.answered_per_s.total_cmp(&b.0.answered_per_s));
    let saturated = rows.iter().map(|r| r.0.answered_per_s).fold(0.0, f64::max);
    let at_5000 = rows
        .iter()
        .find(|r| (r.0.offered_rate - 5000.0).abs() < 1.0)
        .map(|r| r.0.e2e.p99_ms);
    let pipeline = best.map(|r| r.0.answered_per_s).unwrap_or(0.0);
    let p99 = best.map(|r| r.0.e2e.p99_ms).unwrap_or(f64::NAN);
    // Postgres's CPU time per message answered, at the highest rate kept up: its share of a
    // core over the step (every postgres process), in ms per second, over messages per second.
    let pg_cpu_ms_per_msg = best
        .map(|r| r.1.get("postgres").copied().unwrap_or(f64::NAN) * 10.0 / r.0.answered_per_s)
        .map(|v| (v * 1000.0).round() / 1000.0);
    // The same at the step that answered most, kept up or not (a slow hour keeps up with none).
    let pg_cpu_at_most = rows
        .iter()
        .max_by(|a, b| a.0.answered_per_s.total_cmp(&b.0.answered_per_s))
        .map(|r| r.1.get("postgres").copied().unwrap_or(f64::NAN) * 10.0 / r.0.answered_per_s)
        .map(|v| (v * 1000.0).round() / 1000.0);
    // The same over what Postgres spends idle: the cost the messages themselves add.
    let idle_pg = idle.get("postgres").copied().unwrap_or(0.0);
    let pg_cpu_over_idle = best
        .map(|r| {
            (r.1.get("postgres").copied().unwrap_or(f64::NAN) - idle_pg) * 10.0 / r.0.answered_per_s
        })
        .map(|v| (v * 1000.0).round() / 1000.0);
    println!(
        "Postgres CPU at the step that answered most: {} ms per message",
        pg_cpu_at_most
            .map(|v| format!("{v:.3}"))
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "sustained {pipeline:.0} msgs/s (kept up), most answered {saturated:.0} msgs/s; ratio to the raw ceiling {:.3}, to the relay floor {:.3}; Postgres CPU {} ms per message ({} over idle); p99 at that rate {p99:.2} ms; p99 at 5,000/s offered: {}",
        pipeline / raw,
        pipeline / relay,
        pg_cpu_ms_per_msg.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into()),
        pg_cpu_over_idle.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into()),
        at_5000.map(|v| format!("{v:.2} ms")).unwrap_or_else(|| "not run".into())
    );
    let instance_shares = shares(&metrics).await;
    println!("messages per instance and shares: {instance_shares}");
    let steps: Vec<serde_json::Value> = rows
        .iter()
        .map(|(r, cpu, rss, hop, kept)| {
            json!({"offered": r.offered_rate, "kept_up": kept, "report": r, "cpu_percent": cpu, "rss_kb": rss, "hops": hop})
        })
        .collect();
    println!(
        "{}",
        json!({
            "pipeline_msgs_per_s": pipeline.round(),
            "raw_jetstream_msgs_per_s": raw.round(),
            "raw_jetstream_r1_same_cluster_msgs_per_s": raw_r1.map(f64::round),
            "raw_jetstream_sync_always_msgs_per_s": raw_sync_always.map(f64::round),
            "relay_4_streams_msgs_per_s": relay.round(),
            "ratio": (pipeline / raw * 1000.0).round() / 1000.0,
            "ratio_to_relay_floor": (pipeline / relay * 1000.0).round() / 1000.0,
            "pg_cpu_ms_per_msg": pg_cpu_ms_per_msg,
            "pg_cpu_ms_per_msg_at_most_answered": pg_cpu_at_most,
            "pg_cpu_ms_per_msg_over_idle": pg_cpu_over_idle,
            "idle_cpu_percent": idle,
            "mix": mix(),
            "instances_per_worker": instances,
            "stream_replicas": replicas,
            "instance_shares": instance_shares,
            "p99_ms": p99,
            "p99_ms_at_5000": at_5000,
            "most_answered_msgs_per_s": saturated.round(),
            "message_bytes": payload.len(),
            "cores": num_cores(),
            "steps": steps,
        })
    );
    drop(workers);
}

async fn run_soak(
    client: &async_nats::Client,
    procs: &Procs,
    rate: f64,
    seconds: f64,
    (raw, relay): (f64, f64),
) {
    println!("--- memory soak: {rate:.0} msgs/s for {seconds:.0} s, RSS every 10 s");
    let mut opts = options(rate, seconds);
    opts.progress = Some(Duration::from_secs(60));
    let load = tokio::spawn({
        let client = client.clone();
        async move { load::run(client, &opts, Default::default()).await }
    });
    let start = Instant::now();
    let mut samples: Vec<(f64, BTreeMap<&'static str, u64>)> = Vec::new();
    while !load.is_finished() {
        let rss = procs.rss();
        let t = start.elapsed().as_secs_f64();
        println!(
            "{t:>6.0}s  {}",
            rss.iter()
                .map(|(n, kb)| format!("{} {:.1} MB", short(n), *kb as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join("  ")
        );
        samples.push((t, rss));
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let report: LoadReport = load.await.expect("soak task").expect("soak load");
    load::print_report(&report);
    let mut summary = serde_json::Map::new();
    for (name, _) in &procs.pids {
        let series: Vec<(f64, f64)> = samples
            .iter()
            .map(|(t, r)| (*t, r.get(name).copied().unwrap_or(0) as f64 / 1024.0))
            .collect();
        // Ignore the first minute (allocator and caches warming up) for the slope.
        let steady: Vec<(f64, f64)> = series.iter().copied().filter(|(t, _)| *t >= 60.0).collect();
        let slope = slope_per_minute(if steady.len() >= 3 { &steady } else { &series });
        // And over the second half: growth that levels off (a working set reached) shows
        // here as near zero, a leak as the same slope.
        let half = series.last().map(|s| s.0 / 2.0).unwrap_or(0.0);
        let late: Vec<(f64, f64)> = series.iter().copied().filter(|(t, _)| *t >= half).collect();
        let late_slope = slope_per_minute(if late.len() >= 3 { &late } else { &series });
        let start_mb = series.first().map(|s| s.1).unwrap_or(0.0);
        let end_mb = series.last().map(|s| s.1).unwrap_or(0.0);
        let max_mb = series.iter().map(|s| s.1).fold(0.0, f64::max);
        println!(
            "{:>14}: start {start_mb:.1} MB, end {end_mb:.1} MB, max {max_mb:.1} MB, slope after the first minute {slope:+.3} MB/min, over the second half {late_slope:+.3} MB/min",
            short(name)
        );
        summary.insert(
            short(name).to_owned(),
            json!({"start_mb": start_mb, "end_mb": end_mb, "max_mb": max_mb, "slope_mb_per_min": slope, "second_half_slope_mb_per_min": late_slope}),
        );
    }
    println!(
        "{}",
        json!({
            "soak_seconds": seconds, "rate": rate,
            "pipeline_msgs_per_s": report.answered_per_s.round(),
            "raw_jetstream_msgs_per_s": raw.round(),
            "relay_4_streams_msgs_per_s": relay.round(),
            "ratio": (report.answered_per_s / raw * 1000.0).round() / 1000.0,
            "p99_ms": report.e2e.p99_ms,
            "sent": report.sent, "answered": report.answered,
            "rss": summary,
        })
    );
}

/// Least-squares slope of (seconds, MB), in MB per minute.
fn slope_per_minute(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let num: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let den: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if den == 0.0 {
        0.0
    } else {
        num / den * 60.0
    }
}

fn num_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| {
            let v: Vec<&str> = s.split_whitespace().take(3).collect();
            format!("load average {}", v.join(" "))
        })
        .unwrap_or_default()
}
