//! Scaling out (issue 21; docs/ordering.md): the partitions of `FL_INBOUND_KEYED` and `FL_BOT`
//! are dealt over the live instances of ingest and of the bot-router, so that one tenant's one
//! busy channel is shared by every instance; an instance that dies has its partitions taken over
//! within about a lease; one that joins gets a share. Every message is stored once and each
//! conversation in order throughout. The workers run as processes; their shares come from
//! their own `/metrics`.

use std::time::{Duration, Instant};

use crate::helpers::{assert_each_customer_in_order, count, eventually, TestApp, WorkerProcess};
use firstline_shared::{bus, subjects};
use firstline_tests::metrics::{free_addr, handled, scrape, value};
use serde_json::json;

/// One tenant, one channel with the bot on.
const SETUP: &str = r#"{"tenants":[{"id":"t1","channels":[{"id":"line","bot_enabled":true}]}]}"#;
const CUSTOMERS: usize = 200;

/// An instance of a worker with its metrics address.
struct Instance {
    process: WorkerProcess,
    metrics: std::net::SocketAddr,
}

impl Instance {
    fn start(name: &'static str, app: &TestApp) -> Self {
        let metrics = free_addr();
        let process = WorkerProcess::start_with(
            name,
            &app.config,
            &[("FL_METRICS_ADDR", &metrics.to_string())],
        );
        Self { process, metrics }
    }

    async fn handled(&self, consumer: &str) -> f64 {
        handled(&scrape(self.metrics).await, consumer)
    }

    async fn partitions_held(&self) -> f64 {
        value(&scrape(self.metrics).await, "fl_partitions_held").unwrap_or(0.0)
    }
}

/// Messages `from..to` of every customer, interleaved (texts are the numbers), on the keyed
/// subject, as a gateway publishes them, `pause` apart; `at(i)` runs before the i-th publish.
async fn wave(app: &TestApp, from: usize, to: usize, pause: Duration, mut at: impl FnMut(usize)) {
    let mut i = 0;
    for n in from..to {
        for c in 0..CUSTOMERS {
            at(i);
            i += 1;
            let customer = format!("U{c}");
            let id = format!("{customer}-{n}");
            let body = json!({"version": 1, "message_id": id, "customer": {"id": customer}, "text": n.to_string()});
            let subject = format!("fl.t1.inbound.line.{}", subjects::customer_key(&customer));
            bus::publish(
                &app.js,
                subject,
                &format!("t1:line:{id}"),
                Default::default(),
                body.to_string().into(),
            )
            .await
            .expect("published");
            // The gateway's pace (the scenario), not a wait for state.
            tokio::time::sleep(pause).await;
        }
    }
}

/// Waits until `n` customer messages are stored and as many bot answers given, then checks
/// each customer's messages are stored once, in the order sent.
async fn all_stored_in_order(app: &TestApp, n: usize, within: Duration) {
    eventually("every message stored and answered", within, || async {
        let stored = count(
            &app.pg,
            "SELECT count(*) FROM messages WHERE author = 'customer'",
            &[],
        )
        .await;
        let answered = count(
            &app.pg,
            "SELECT count(*) FROM messages WHERE author = 'bot'",
            &[],
        )
        .await;
        (stored == n as i64 && answered == n as i64).then_some(())
    })
    .await;
    assert_each_customer_in_order(&app.pg, CUSTOMERS, n / CUSTOMERS, "").await;
}

fn share(mine: f64, other: f64) -> f64 {
    mine / (mine + other).max(1.0)
}

/// Two ingest and two bot-router instances, the second of each started while the first is
/// already busy: each handles between a quarter and three quarters of its worker's messages
/// of ONE tenant's ONE channel. Then the second ones are SIGKILLed mid-load: the first take
/// their partitions over and every message is stored within 60 s, in order. A third ingest
/// instance started later gets a share too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_busy_channel_is_shared_by_every_instance_and_a_dead_ones_share_is_taken_over() {
    let app = TestApp::without_workers(SETUP).await;
    let ingest_a = Instance::start("firstline-ingest", &app);
    let bot_a = Instance::start("firstline-bot-router", &app);
    let mut later = None;
    // 2,000 messages over about 15 s; the second instances start after the first 100.
    wave(&app, 0, 10, Duration::from_millis(7), |i| {
        if i == 100 {
            later = Some((
                Instance::start("firstline-ingest", &app),
                Instance::start("firstline-bot-router", &app),
            ));
        }
    })
    .await;
    let (mut ingest_b, mut bot_b) = later.expect("started");
    all_stored_in_order(&app, 2000, Duration::from_secs(90)).await;
    let (ia, ib) = (
        ingest_a.handled("ingest-").await,
        ingest_b.handled("ingest-").await,
    );
    let (ba, bb) = (
        bot_a.handled("bot-router-").await,
        bot_b.handled("bot-router-").await,
    );
    println!(
        "ingest: {ia} + {ib} messages ({:.0} % / {:.0} %); bot-router: {ba} + {bb} ({:.0} % / {:.0} %)",
        100.0 * share(ia, ib),
        100.0 * share(ib, ia),
        100.0 * share(ba, bb),
        100.0 * share(bb, ba)
    );
    assert_eq!(ia + ib, 2000.0, "every inbound message handled once");
    assert_eq!(ba + bb, 2000.0, "every bot work handled once");
    for (worker, s) in [("ingest", share(ib, ia)), ("bot-router", share(bb, ba))] {
        assert!(
            (0.25..=0.75).contains(&s),
            "the second {worker} instance handled {:.0} % of the messages",
            100.0 * s
        );
    }

    // 1,000 more; the second instances are killed a third of the way in.
    wave(&app, 10, 15, Duration::from_millis(5), |i| {
        if i == 333 {
            ingest_b.process.kill();
            bot_b.process.kill();
        }
    })
    .await;
    let killed = Instant::now();
    all_stored_in_order(&app, 3000, Duration::from_secs(60)).await;
    println!("after the kill: all stored in {:?}", killed.elapsed());

    // A third instance joins and is dealt partitions of its own.
    let ingest_c = Instance::start("firstline-ingest", &app);
    eventually(
        "the third instance holds partitions",
        Duration::from_secs(30),
        || async { (ingest_c.partitions_held().await > 0.0).then_some(()) },
    )
    .await;
    wave(&app, 15, 18, Duration::ZERO, |_| {}).await;
    all_stored_in_order(&app, 3600, Duration::from_secs(60)).await;
    let c = ingest_c.handled("ingest-").await;
    println!("the third ingest instance handled {c} of the last 600");
    assert!(c > 0.0, "the third instance took a share");
    drop((ingest_a, bot_a));
}

/// With the default lease, a SIGKILLed instance's partitions are read again by the survivor
/// within about a lease and a quarter (5 s + 1.25 s), not after an ack wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_partitions_are_taken_over_within_about_a_lease() {
    let app = TestApp::without_workers(SETUP).await;
    assert_eq!(app.config.partition_lease_secs, 5.0, "the default lease");
    let a = Instance::start("firstline-ingest", &app);
    let mut b = Instance::start("firstline-ingest", &app);
    let _bot = Instance::start("firstline-bot-router", &app);
    let started = Instant::now();
    eventually(
        "both instances hold partitions",
        Duration::from_secs(30),
        || async {
            let (ha, hb) = (a.partitions_held().await, b.partitions_held().await);
            (ha > 0.0 && hb > 0.0 && ha + hb == 128.0).then_some(())
        },
    )
    .await;
    println!(
        "both instances dealt partitions after {:?}",
        started.elapsed()
    );
    b.process.kill();
    let killed = Instant::now();
    // One message of every customer: some go to the partitions the dead instance held.
    wave(&app, 0, 1, Duration::ZERO, |_| {}).await;
    all_stored_in_order(&app, CUSTOMERS, Duration::from_secs(60)).await;
    let took = killed.elapsed();
    println!("the dead instance's partitions were taken over and drained in {took:?}");
    assert!(
        took < Duration::from_secs(30),
        "taken over in {took:?}: expected about a lease (5 s) and a quarter"
    );
    assert_eq!(
        a.partitions_held().await,
        128.0,
        "the survivor holds every partition"
    );
    println!("test body done after {:?}", started.elapsed());
}
