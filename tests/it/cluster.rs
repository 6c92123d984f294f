//! A NATS JetStream cluster: three `nats-server` processes on loopback. The workers take every
//! node's URL (`FL_NATS_URL`) and create their streams with `FL_STREAM_REPLICAS` replicas.

use std::time::Duration;

use crate::helpers::{assert_each_customer_in_order, TestNats};
use firstline_shared::bus;
use firstline_shared::config::CommonConfig;
use firstline_shared::subjects::ALL_STREAMS;
use firstline_tests::nats::TestCluster;

async fn connect(url: &str) -> bus::JetStream {
    let config = CommonConfig::new(url, "postgres://127.0.0.1/unused");
    let client = tokio::time::timeout(Duration::from_secs(30), bus::connect(&config))
        .await
        .expect("connected within 30 s")
        .expect("connected");
    async_nats::jetstream::new(client)
}

/// With `FL_STREAM_REPLICAS=3`, every stream is stored on three nodes: created so by workers
/// starting together (the create is asked again where a node does not answer), and updated so
/// where it existed with one replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_has_the_replicas_fl_stream_replicas_asks_for() {
    let cluster = TestCluster::start(3).await;
    let js = connect(&cluster.url).await;
    // An older deployment's streams, one replica each.
    bus::ensure_streams_with(&js, 1, 64)
        .await
        .expect("R1 streams");
    // Four workers start at once, asking for three.
    let starting = (0..4).map(|_| {
        let url = cluster.url.clone();
        async move {
            let js = connect(&url).await;
            bus::ensure_streams_with(&js, 3, 64).await
        }
    });
    for result in futures::future::join_all(starting).await {
        result.expect("every worker's ensure_streams succeeds");
    }
    for spec in ALL_STREAMS {
        let mut stream = js.get_stream(spec.name).await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(info.config.num_replicas, 3, "{} asks for three", spec.name);
        let peers = info.cluster.as_ref().map_or(0, |c| c.replicas.len());
        assert_eq!(peers, 2, "{}: a leader and two replicas", spec.name);
    }
}

/// More replicas than a single server can keep is a clear error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_a_single_server_is_a_clear_error() {
    let nats = TestNats::start().await;
    let js = connect(&nats.url).await;
    let e = tokio::time::timeout(
        Duration::from_secs(60),
        bus::ensure_streams_with(&js, 3, 64),
    )
    .await
    .expect("answered within a minute")
    .expect_err("a single server keeps one replica");
    let text = format!("{e:#}");
    assert!(text.contains("FL_STREAM_REPLICAS"), "{text}");
    assert!(text.contains("cluster"), "{text}");
}

/// The cluster of `docker-compose.yml` (profile `cluster`): each node's configuration is valid
/// for the pinned server (the single server's users and fencing, plus the routes).
#[test]
fn the_compose_clusters_node_configuration_is_valid() {
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    for node in ["nats-1", "nats-2", "nats-3"] {
        assert!(
            compose.contains(&format!("\"--name\", \"{node}\"")),
            "docker-compose.yml runs {node}"
        );
        let out = std::process::Command::new(&bin)
            .arg("-t")
            .arg("-c")
            .arg(root.join("config/nats-cluster.conf"))
            .args(["--name", node])
            .output()
            .expect("run nats-server -t");
        assert!(
            out.status.success(),
            "{node}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// R3 survives the loss of a node: the node that leads `FL_INBOUND` is SIGKILLed after 200
/// acknowledged publishes; publishing goes on through the others (after the leader election)
/// and every acknowledged message is in the stream, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_loses_nothing_when_its_leader_node_dies() {
    let mut cluster = TestCluster::start(3).await;
    let js = connect(&cluster.url).await;
    bus::ensure_streams_with(&js, 3, 64)
        .await
        .expect("R3 streams");
    let publish = |i: usize| {
        let js = js.clone();
        async move {
            bus::publish(
                &js,
                "fl.t1.inbound.web".to_owned(),
                &format!("t1:web:m{i}"),
                Default::default(),
                format!("{{\"n\":{i}}}").into(),
            )
            .await
        }
    };
    for i in 0..200 {
        publish(i).await.expect("acknowledged before the kill");
    }
    let mut stream = js.get_stream("FL_INBOUND").await.unwrap();
    let leader = stream
        .info()
        .await
        .unwrap()
        .cluster
        .clone()
        .unwrap()
        .leader
        .unwrap();
    let index: usize = leader
        .trim_start_matches('n')
        .parse()
        .expect("nodes are n0..n2");
    cluster.nodes[index].kill();
    let killed = std::time::Instant::now();
    for i in 200..300 {
        tokio::time::timeout(Duration::from_secs(45), publish(i))
            .await
            .expect("a publish answered within 45 s of the kill")
            .expect("acknowledged after the kill");
    }
    let resumed = killed.elapsed();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 300, "every acknowledged message, once");
    assert_ne!(
        info.cluster.as_ref().and_then(|c| c.leader.as_deref()),
        Some(leader.as_str()),
        "a new leader"
    );
    println!("publishing went on {resumed:?} after the leader was killed");
}

/// The setup of the cluster load: one channel without the bot, so every conversation is
/// queued, offered and (by the desks) accepted.
const LOAD_SETUP: &str = r#"{"tenants":[{"id":"t1","dispatch_cycle_seconds":10,"channels":[
    {"id":"mail","bot_enabled":false}]}]}"#;
const LOAD_CUSTOMERS: usize = 30;
const LOAD_PER_CUSTOMER: usize = 12;

/// The database's clock now: offers' times are the database's.
async fn db_now(pg: &tokio_postgres::Client) -> chrono::DateTime<chrono::Utc> {
    pg.query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0)
}

/// The longest time between consecutive `times` within `from..to`, the ends included, and
/// when it began (from `from`).
fn longest_gap(
    times: &[chrono::DateTime<chrono::Utc>],
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) -> (Duration, Duration) {
    let mut points: Vec<_> = std::iter::once(from)
        .chain(times.iter().copied().filter(|t| *t > from && *t < to))
        .chain(std::iter::once(to))
        .collect();
    points.sort();
    let since = |t: chrono::DateTime<chrono::Utc>| (t - from).to_std().unwrap_or_default();
    points
        .windows(2)
        .map(|w| (since(w[1]) - since(w[0]), since(w[0])))
        .max()
        .unwrap_or_default()
}

/// Issue 21: a 3-node cluster, every stream at R3, the four workers as processes given all
/// three URLs. Mid-load, the node leading `FL_INBOUND_KEYED` (the stream the gateway's
/// keyed publishes go to) is SIGKILLed and restarted; once it has caught up, another (the one
/// leading `FL_QUEUE`, else `FL_ACTIONS`) is killed. The gateway's publishes keep succeeding
/// (the longest one, retries included, under 20 s: a leader election and some), offers and
/// accepts keep flowing (no gap of 15 s or more from the first kill to the end of the load: a
/// leader election, a missed heartbeat and a pull retry; issue 21 asks for ~10 s; before the
/// dispatcher published in the background and a window's lost acks cost one timeout, gaps of
/// 25-65 s were seen), and every message is stored exactly once, each customer's in order, no
/// partition stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_offers_and_accepts_keep_flowing_while_leader_nodes_die() {
    use crate::helpers::desk::Desks;
    use crate::helpers::{count, eventually, marks, TestDb, WorkerProcess};
    use firstline_shared::subjects;
    use serde_json::json;
    use std::time::Instant;

    let mut cluster = TestCluster::start(3).await;
    let db = TestDb::create().await;
    firstline_shared::telemetry::init_for_tests();
    let file = firstline::setup::SetupFile::parse(LOAD_SETUP).expect("setup file");
    firstline::setup::configure(&db.url, &file)
        .await
        .expect("configure");
    let mut config = CommonConfig::new(&cluster.url, &db.url);
    config.ack_wait_secs = 5;
    config.max_deliver = 20;
    config.stream_replicas = 3;
    let client = bus::connect(&config).await.expect("connected");
    let js = async_nats::jetstream::new(client.clone());
    bus::ensure_streams_with(&js, 3, config.partitions)
        .await
        .expect("R3 streams");
    let pg = db.connect().await;
    let mut workers: Vec<WorkerProcess> = [
        "firstline-ingest",
        "firstline-bot-router",
        "firstline-dispatcher",
        "firstline-notifier",
    ]
    .into_iter()
    .map(|w| WorkerProcess::start_with(w, &config, &[("FL_STREAM_REPLICAS", "3")]))
    .collect();
    for a in 0..5 {
        let body = json!({"version": 1, "status": "ready", "capacity": 10, "skills": []});
        bus::publish(
            &js,
            format!("fl.t1.presence.a{a}"),
            &uuid::Uuid::new_v4().to_string(),
            Default::default(),
            body.to_string().into(),
        )
        .await
        .expect("presence published");
    }
    let desks = Desks::start(client.clone(), "t1", 0x2545f4914f6cdd1d, (300, 1_000)).await;

    // The gateway: message n of every customer, then n + 1..., on the keyed subject, each
    // published until acknowledged, its latency (retries included) measured.
    let gateway = {
        let js = js.clone();
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            for n in 0..LOAD_PER_CUSTOMER {
                for c in 0..LOAD_CUSTOMERS {
                    let customer = format!("C{c}");
                    let id = format!("c{c}-m{n}");
                    let body = json!({"version": 1, "message_id": id, "customer": {"id": customer}, "text": n.to_string()});
                    let subject =
                        format!("fl.t1.inbound.mail.{}", subjects::customer_key(&customer));
                    let started = Instant::now();
                    while bus::publish(
                        &js,
                        subject.clone(),
                        &format!("t1:mail:{id}"),
                        Default::default(),
                        body.to_string().into(),
                    )
                    .await
                    .is_err()
                    {}
                    slowest = slowest.max(started.elapsed());
                    // The gateway's pace (the scenario: ~30 s of load), not a wait for state.
                    tokio::time::sleep(Duration::from_millis(80)).await;
                }
            }
            slowest
        })
    };

    // The faults, once offers flow.
    eventually("offers accepted", Duration::from_secs(60), || async {
        (count(
            &pg,
            "SELECT count(*) FROM offers WHERE status = 'accepted'",
            &[],
        )
        .await
            >= 5)
            .then_some(())
    })
    .await;
    let first = eventually(
        "FL_INBOUND_KEYED has a leader",
        Duration::from_secs(30),
        || cluster.leader_of(&js, "FL_INBOUND_KEYED"),
    )
    .await;
    let faults_from = db_now(&pg).await;
    cluster.kill(first);
    println!("killed n{first}, the leader of FL_INBOUND_KEYED");
    // Down for 5 s (the scenario), not a wait for state.
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.restart(first).await;
    let restarted = Instant::now();
    eventually(
        "every stream's replicas current again",
        Duration::from_secs(90),
        || async {
            for spec in subjects::ALL_STREAMS {
                if !cluster.all_current(&js, spec.name).await {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    println!(
        "n{first} caught up {:?} after its restart",
        restarted.elapsed()
    );
    let mut second = None;
    for stream in ["FL_QUEUE", "FL_ACTIONS"] {
        if let Some(n) = cluster.leader_of(&js, stream).await.filter(|n| *n != first) {
            println!("killing n{n}, the leader of {stream}");
            second = Some(n);
            break;
        }
    }
    let second = second.unwrap_or_else(|| {
        let n = (first + 1) % 3;
        println!("killing n{n} (n{first} leads FL_QUEUE and FL_ACTIONS)");
        n
    });
    let second_kill = (db_now(&pg).await - faults_from)
        .to_std()
        .unwrap_or_default();
    cluster.kill(second);
    let slowest = gateway.await.unwrap();
    let faults_to = db_now(&pg).await;
    cluster.restart(second).await;

    let total = (LOAD_CUSTOMERS * LOAD_PER_CUSTOMER) as i64;
    eventually(
        "every message stored, every queued conversation offered, every partition read",
        Duration::from_secs(120),
        || async {
            let stored = count(
                &pg,
                "SELECT count(*) FROM messages WHERE author = 'customer'",
                &[],
            )
            .await;
            let not_offered = count(
                &pg,
                "SELECT count(*) FROM conversations c WHERE c.queued_at IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM offers o WHERE o.conversation_id = c.id)",
                &[],
            )
            .await;
            let ends = marks::ends(&js, &pg, config.partitions).await?;
            // 30 customers over 64 keyed partitions: most of them hold messages.
            (stored == total
                && not_offered == 0
                && ends.behind.is_empty()
                && ends.with_messages >= 15)
                .then_some(())
        },
    )
    .await;

    let offered: Vec<chrono::DateTime<chrono::Utc>> = pg
        .query("SELECT created_at FROM offers", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let accepted: Vec<chrono::DateTime<chrono::Utc>> = pg
        .query("SELECT ended_at FROM offers WHERE status = 'accepted'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (offer_gap, offer_gap_at) = longest_gap(&offered, faults_from, faults_to);
    let (accept_gap, accept_gap_at) = longest_gap(&accepted, faults_from, faults_to);
    println!(
        "the slowest publish took {slowest:?}; from the first kill to the end of the load \
         ({:?}; the second kill at {second_kill:?}), the longest gap between offers was \
         {offer_gap:?} (from {offer_gap_at:?}), between accepts {accept_gap:?} (from \
         {accept_gap_at:?}); desks: {}",
        (faults_to - faults_from).to_std().unwrap_or_default(),
        desks.counts.summary()
    );
    assert!(
        slowest < Duration::from_secs(20),
        "a publish took {slowest:?}"
    );
    assert!(
        offer_gap < Duration::from_secs(15) && accept_gap < Duration::from_secs(15),
        "offers stopped for {offer_gap:?}, accepts for {accept_gap:?}"
    );
    assert_eq!(
        count(
            &pg,
            "SELECT count(DISTINCT external_id) FROM messages WHERE author = 'customer'",
            &[]
        )
        .await,
        total,
        "each message stored once"
    );
    assert_each_customer_in_order(&pg, LOAD_CUSTOMERS, LOAD_PER_CUSTOMER, "").await;
    drop(desks);
    for w in &mut workers {
        w.kill();
    }
}

/// Issue 21: an unordered consume loop ([`bus::consume`], the dispatcher's and notifier's)
/// goes on while the node that led its stream (and that it was connected to) stays down: it
/// pulls with a short expiry and heartbeats, so a pull lost with the node is made again at the
/// new leader within seconds. (Issue 21 saw consumers on the client's default pull settings
/// stall for a whole outage; this test did not reproduce that stall: here both recover.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_goes_on_while_its_streams_leader_node_is_down() {
    let mut cluster = TestCluster::start(3).await;
    let js = connect(&cluster.url).await;
    bus::ensure_streams_with(&js, 3, 64)
        .await
        .expect("R3 streams");
    let mut stream = js.get_stream("FL_ACTIONS").await.unwrap();
    let leader = stream.info().await.unwrap().cluster.clone().unwrap().leader;
    let index: usize = leader
        .expect("a leader")
        .trim_start_matches('n')
        .parse()
        .expect("nodes are n0..n2");
    // The consumer's connection goes to the leader's node (the others are learnt from it).
    let leader_url = cluster.nodes[index].url.clone();
    let consumer_js = connect(&leader_url).await;
    let mut config = CommonConfig::new(&leader_url, "postgres://127.0.0.1/unused");
    config.ack_wait_secs = 5;
    let (handled, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let consuming = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            bus::consume(
                &consumer_js,
                &config,
                bus::ConsumerSpec::new(firstline_shared::subjects::ACTIONS, "outage-test"),
                shutdown,
                |m| {
                    let _ = handled.send(String::from_utf8_lossy(&m.payload).into_owned());
                    async { Ok(()) }
                },
            )
            .await
        }
    });
    let publish = |body: &'static str| {
        let js = js.clone();
        async move {
            bus::publish(
                &js,
                "fl.t1.agent.amy.action".to_owned(),
                body,
                Default::default(),
                body.into(),
            )
            .await
        }
    };
    publish("before").await.expect("acknowledged");
    let first = tokio::time::timeout(Duration::from_secs(30), seen.recv()).await;
    assert_eq!(first.expect("handled").as_deref(), Some("before"));

    cluster.nodes[index].kill();
    let killed = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(45), publish("after"))
        .await
        .expect("a publish answered within 45 s of the kill")
        .expect("acknowledged after the kill");
    // The node stays down: the message is handled during the outage ("before" may come
    // again first: its ack can be lost with the node).
    tokio::time::timeout(Duration::from_secs(60), async {
        while seen.recv().await.as_deref() != Some("after") {}
    })
    .await
    .expect("handled while the node is down");
    println!("handled {:?} after the kill", killed.elapsed());
    shutdown.cancel();
    consuming
        .await
        .unwrap()
        .expect("the consume loop ends cleanly");
}

/// Issue 21 (the CI run where accepts stopped for 31 s): while a consumer has no leader (its
/// leader's node died, the election takes seconds), every pull answers "no responders" at
/// once. The consume loop waits before pulling again (0.1 s, doubling to 2 s) rather than
/// spinning at thousands of pulls a second on the CPU the election and the other workers need
/// (every run of the test above showed one consumer spinning so, before). The notifier, as a
/// process, is given one node's address; its stream's and consumer's leaders are moved onto
/// that node, which is killed; the notifier goes on, and counts few failed pulls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_without_a_leader_waits_between_pulls() {
    use crate::helpers::{eventually, TestDb, WorkerProcess};
    use firstline_tests::metrics::{free_addr, scrape, value};

    let mut cluster = TestCluster::start(3).await;
    let db = TestDb::create().await;
    let home = 0;
    let mut config = CommonConfig::new(&cluster.nodes[home].url, &db.url);
    config.stream_replicas = 3;
    let js = connect(&cluster.url).await;
    bus::ensure_streams_with(&js, 3, config.partitions)
        .await
        .expect("R3 streams");
    let metrics = free_addr();
    let mut notifier = WorkerProcess::start_with(
        "firstline-notifier",
        &config,
        &[
            ("FL_STREAM_REPLICAS", "3"),
            ("FL_METRICS_ADDR", &metrics.to_string()),
        ],
    );
    let leaders = || async {
        let node = |leader: Option<String>| {
            leader.and_then(|l| l.trim_start_matches('n').parse::<usize>().ok())
        };
        let mut stream = js.get_stream("FL_DELIVERY").await.ok()?;
        let of_stream = node(stream.info().await.ok()?.cluster.clone()?.leader)?;
        let info = stream.consumer_info("notifier").await.ok()?;
        Some((of_stream, node(info.cluster.and_then(|c| c.leader))?))
    };
    eventually("the notifier's consumer", Duration::from_secs(60), leaders).await;
    // Both leaders onto the notifier's node (a step down elects another).
    let mut placed = false;
    for _ in 0..40 {
        let step_down = match leaders().await {
            Some((s, c)) if s == home && c == home => {
                placed = true;
                break;
            }
            Some((s, _)) if s != home => "$JS.API.STREAM.LEADER.STEPDOWN.FL_DELIVERY",
            Some(_) => "$JS.API.CONSUMER.LEADER.STEPDOWN.FL_DELIVERY.notifier",
            None => "",
        };
        if !step_down.is_empty() {
            let _ = js.client().request(step_down, "".into()).await;
        }
        // The election after a step down (the scenario's setup), then look again.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        placed,
        "FL_DELIVERY's and the notifier's leaders moved onto n{home}"
    );

    cluster.kill(home);
    let killed = std::time::Instant::now();
    // A malformed delivery during the outage: the notifier dead-letters it once it pulls again.
    tokio::time::timeout(Duration::from_secs(45), async {
        while bus::publish(
            &js,
            "fl.t1.delivery.agent".to_owned(),
            "during-the-outage",
            Default::default(),
            "not json".into(),
        )
        .await
        .is_err()
        {}
    })
    .await
    .expect("a publish acknowledged within 45 s of the kill");
    eventually(
        "the notifier handles a message while n0 is down",
        Duration::from_secs(60),
        || async {
            value(
                &scrape(metrics).await,
                "fl_messages_total{consumer=\"notifier\"",
            )
            .filter(|n| *n >= 1.0)
        },
    )
    .await;
    let outage = killed.elapsed();
    let failed = value(
        &scrape(metrics).await,
        "fl_pull_errors_total{consumer=\"notifier\"",
    )
    .unwrap_or(0.0);
    println!("the notifier went on {outage:?} after the kill; {failed} failed pulls");
    assert!(
        failed < 20.0 + 2.0 * outage.as_secs_f64(),
        "{failed} failed pulls in {outage:?}: the consume loop spins while its consumer has no leader"
    );
    notifier.kill();
}
