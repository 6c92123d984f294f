//! Crash tests: the four workers run as their own processes under load; each kind is
//! SIGKILLed mid-load and restarted, then the NATS server itself is killed and restarted.
//! The checker: every inbound message the gateway published is stored exactly once, every one
//! reached the bot or the queue as its conversation's state says, and nothing is left
//! unpublished in the outbox.

use std::time::Duration;

use crate::helpers::{
    count, eventually, wait_for_count, TestApp, TestDb, TestNats, TestPostgres, WorkerProcess,
};
use firstline_shared::bus;
use serde_json::json;

const SETUP: &str = r#"{"tenants":[{"id":"t1","dispatch_cycle_seconds":30,"channels":[
    {"id":"line","bot_enabled":true},{"id":"mail","bot_enabled":false}]}]}"#;
const CUSTOMERS: usize = 30;
const PER_CUSTOMER: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_stored_once_through_worker_crashes_and_a_nats_restart() {
    let mut app = TestApp::without_workers(SETUP).await;
    let config = app.config.clone();
    let mut workers: Vec<WorkerProcess> = [
        "firstline-ingest",
        "firstline-bot-router",
        "firstline-dispatcher",
        "firstline-notifier",
    ]
    .into_iter()
    .map(|name| WorkerProcess::start(name, &config))
    .collect();
    // Five agents, 3 offer places each (SPEC D1): room for the 15 `mail` conversations.
    for a in 0..5 {
        app.presence("t1", &format!("a{a}"), "ready", 10, &[]).await;
    }

    // The gateway: 600 messages, 30 customers, about 100 per second.
    let gateway = tokio::spawn(gateway_load(app.js.clone(), Duration::from_millis(10)));

    // Kill each kind of worker mid-load, and restart it; then the NATS server. The sleeps are
    // the fault schedule over the gateway's ~6 s of load (the scenario), not waits for state.
    for worker in workers.iter_mut() {
        tokio::time::sleep(Duration::from_millis(700)).await;
        worker.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        worker.restart();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.nats.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    app.nats.restart();
    gateway.await.unwrap();

    let total = (CUSTOMERS * PER_CUSTOMER) as i64;
    let pg = &app.pg;
    wait_for_count(
        pg,
        "every message stored",
        Duration::from_secs(90),
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        total,
    )
    .await;
    // Exactly once: one row per gateway message id (the unique key makes more impossible;
    // the count above makes fewer impossible), and one open conversation per customer.
    let distinct = count(
        pg,
        "SELECT count(DISTINCT external_id) FROM messages WHERE author = 'customer'",
        &[],
    )
    .await;
    assert_eq!(distinct, total);
    let conversations = count(pg, "SELECT count(*) FROM conversations", &[]).await;
    assert_eq!(
        conversations, CUSTOMERS as i64,
        "one conversation per customer"
    );
    // Every message on a bot channel got its bot reply while in the bot (the bot-router was
    // killed too): on `line`, each customer's first message is answered by the bot.
    wait_for_count(
        pg,
        "the bot answered each line customer",
        Duration::from_secs(60),
        // (not counting the place in line, told to the queued `mail` customers)
        "SELECT count(DISTINCT conversation_id) FROM messages WHERE author = 'bot' AND external_id NOT LIKE 'place:%'",
        (CUSTOMERS / 2) as i64,
    )
    .await;
    // The waiting `mail` conversations were offered despite the dispatcher's and the
    // notifier's deaths, and the outbox drained.
    wait_for_count(
        pg,
        "mail conversations offered",
        Duration::from_secs(60),
        "SELECT count(DISTINCT conversation_id) FROM offers",
        (CUSTOMERS / 2) as i64,
    )
    .await;
    wait_for_count(
        pg,
        "the outbox drained",
        Duration::from_secs(30),
        "SELECT count(*) FROM outbox",
        0,
    )
    .await;
    assert_each_conversation_in_order(pg, CUSTOMERS, PER_CUSTOMER).await;
    let offers = app.stored("FL_NOTIFY", "fl.t1.notify.*").await;
    let offer_notes = offers.iter().filter(|n| n["type"] == "offer").count();
    assert_eq!(offer_notes, CUSTOMERS / 2, "each offer notified once");
}

/// Graceful shutdown: SIGTERM mid-load makes a worker stop pulling, finish the message in
/// hand and exit cleanly, at once; a new instance goes on where it stopped, nothing lost or
/// doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_worker_cleanly_mid_load_and_a_new_one_goes_on() {
    let app = TestApp::without_workers(SETUP).await;
    let mut ingest = WorkerProcess::start("firstline-ingest", &app.config);
    for i in 0..300 {
        let body = json!({"version": 1, "message_id": format!("g{i}"), "customer": {"id": format!("G{}", i % 10)}, "text": "x"});
        app.publish_json(
            "fl.t1.inbound.mail",
            Some(&format!("mail:g{i}")),
            &body.to_string(),
        )
        .await;
    }
    eventually("ingest busy", Duration::from_secs(20), || async {
        (count(&app.pg, "SELECT count(*) FROM messages", &[]).await > 0).then_some(())
    })
    .await;
    let status = ingest
        .terminate(Duration::from_secs(10))
        .expect("exited within 10 s of SIGTERM");
    assert!(status.success(), "a clean exit, not {status:?}");
    let stored_at_stop = count(
        &app.pg,
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        &[],
    )
    .await;

    ingest.restart();
    // The old instance released its partitions as it stopped: the new one takes them at its
    // first round and reads each from its mark (docs/ordering.md). The bound is for a stall,
    // not for speed.
    wait_for_count(
        &app.pg,
        "all 300 stored",
        Duration::from_secs(120),
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        300,
    )
    .await;
    assert!(stored_at_stop <= 300);
    assert_eq!(
        count(
            &app.pg,
            "SELECT count(DISTINCT external_id) FROM messages WHERE author = 'customer'",
            &[]
        )
        .await,
        300
    );
}

/// Per-conversation order with two ingest instances, one SIGKILLed mid-load (and not
/// restarted): every message stored once, and each conversation's messages stored in the
/// order the customer sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ingest_instances_one_killed_keep_each_conversations_order() {
    const CHANNELS: usize = 8;
    const CUSTOMERS_PER_CHANNEL: usize = 4;
    const MESSAGES: usize = 20;
    let channels: Vec<String> = (0..CHANNELS)
        .map(|c| format!(r#"{{"id":"ch{c}","bot_enabled":false}}"#))
        .collect();
    let setup = format!(
        r#"{{"tenants":[{{"id":"t1","channels":[{}]}}]}}"#,
        channels.join(",")
    );
    let app = TestApp::without_workers(&setup).await;
    let mut first = WorkerProcess::start("firstline-ingest", &app.config);
    let _second = WorkerProcess::start("firstline-ingest", &app.config);

    let total = CHANNELS * CUSTOMERS_PER_CHANNEL * MESSAGES;
    let mut sent = 0;
    for n in 0..MESSAGES {
        for ch in 0..CHANNELS {
            for cu in 0..CUSTOMERS_PER_CHANNEL {
                let id = format!("ch{ch}-cu{cu}-n{n}");
                let body = json!({"version": 1, "message_id": id, "customer": {"id": format!("cu{cu}")}, "text": format!("{n}")});
                app.publish_json(
                    &format!("fl.t1.inbound.ch{ch}"),
                    Some(&format!("ch{ch}:{id}")),
                    &body.to_string(),
                )
                .await;
                sent += 1;
                if sent == total / 3 {
                    first.kill();
                }
            }
        }
        // The gateway's pace (the scenario), not a wait for state.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let pg = &app.pg;
    wait_for_count(
        pg,
        "every message stored",
        Duration::from_secs(90),
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        total as i64,
    )
    .await;
    assert_eq!(
        count(
            pg,
            "SELECT count(DISTINCT external_id) FROM messages WHERE author = 'customer'",
            &[]
        )
        .await,
        total as i64
    );
    let rows = pg
        .query(
            "SELECT conversation_id, body FROM messages WHERE author = 'customer' ORDER BY conversation_id, created_at, id",
            &[],
        )
        .await
        .unwrap();
    let mut order: std::collections::HashMap<uuid::Uuid, Vec<usize>> =
        std::collections::HashMap::new();
    for r in &rows {
        order
            .entry(r.get(0))
            .or_default()
            .push(r.get::<_, String>(1).parse().unwrap());
    }
    assert_eq!(
        order.len(),
        CHANNELS * CUSTOMERS_PER_CHANNEL,
        "one conversation per customer"
    );
    for (conversation, sequence) in &order {
        assert_eq!(
            *sequence,
            (0..MESSAGES).collect::<Vec<_>>(),
            "conversation {conversation} out of order"
        );
    }
}

/// The gateway of the crash tests: PER_CUSTOMER messages from each of CUSTOMERS customers
/// (even ones on `line`, with the bot; odd ones on `mail`), texts 0, 1, 2… per customer, each
/// with its Nats-Msg-Id and published until acknowledged (through a NATS restart too).
async fn gateway_load(js: async_nats::jetstream::Context, pause: Duration) {
    for i in 0..PER_CUSTOMER {
        for c in 0..CUSTOMERS {
            let channel = if c % 2 == 0 { "line" } else { "mail" };
            let id = format!("c{c}-m{i}");
            let body = json!({"version": 1, "message_id": id, "customer": {"id": format!("C{c}")}, "text": format!("{i}")});
            while bus::publish(
                &js,
                format!("fl.t1.inbound.{channel}"),
                &format!("t1:{channel}:{id}"),
                Default::default(),
                body.to_string().into(),
            )
            .await
            .is_err()
            {
                // The gateway's retry back-off while NATS is down, not a wait for state.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // The gateway's pace (the scenario), not a wait for state.
            tokio::time::sleep(pause).await;
        }
    }
}

/// Each customer's conversation holds its messages in the order sent (texts 0, 1, 2…).
async fn assert_each_conversation_in_order(
    pg: &tokio_postgres::Client,
    conversations: usize,
    messages: usize,
) {
    let rows = pg
        .query(
            "SELECT conversation_id, body FROM messages WHERE author = 'customer'
             ORDER BY conversation_id, created_at, id",
            &[],
        )
        .await
        .unwrap();
    let mut order: std::collections::HashMap<uuid::Uuid, Vec<usize>> =
        std::collections::HashMap::new();
    for r in &rows {
        order
            .entry(r.get(0))
            .or_default()
            .push(r.get::<_, String>(1).parse().unwrap());
    }
    assert_eq!(order.len(), conversations, "one conversation per customer");
    for (conversation, sequence) in &order {
        assert_eq!(
            *sequence,
            (0..messages).collect::<Vec<_>>(),
            "conversation {conversation} out of order"
        );
    }
}

/// Postgres crashes mid-load (`pg_ctl stop -m immediate`) and comes back: the workers retry
/// with back-off, reconnect, and every message is stored once, in order, nothing
/// dead-lettered, the outbox drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_stored_once_and_in_order_through_a_postgres_crash() {
    let postgres = TestPostgres::start().await;
    let db = TestDb::create_on(&postgres.url).await;
    // The default max_deliver (20): retries outlast the outage.
    let mut app = TestApp::without_workers_configured(TestNats::start().await, db, SETUP, |c| {
        c.max_deliver = 20
    })
    .await;
    let worker = firstline::run_all(app.config.clone(), app.shutdown.clone());
    app.spawn_worker(worker);
    for a in 0..5 {
        app.presence("t1", &format!("a{a}"), "ready", 10, &[]).await;
    }
    let gateway = tokio::spawn(gateway_load(app.js.clone(), Duration::from_millis(5)));
    // The crash 1 s into the load and a 2 s outage (the scenario), not waits for state.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    postgres.crash();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    postgres.restart().await;
    gateway.await.unwrap();

    let pg = app.db.connect().await; // the test's own connection died with the server
    let total = (CUSTOMERS * PER_CUSTOMER) as i64;
    wait_for_count(
        &pg,
        "every message stored",
        Duration::from_secs(120),
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        total,
    )
    .await;
    assert_eq!(
        count(
            &pg,
            "SELECT count(DISTINCT external_id) FROM messages WHERE author = 'customer'",
            &[]
        )
        .await,
        total
    );
    assert_each_conversation_in_order(&pg, CUSTOMERS, PER_CUSTOMER).await;
    wait_for_count(
        &pg,
        "the outbox drained",
        Duration::from_secs(60),
        "SELECT count(*) FROM outbox",
        0,
    )
    .await;
    assert!(
        app.stored("FL_DEADLETTER", "fl.*.deadletter.*")
            .await
            .is_empty(),
        "nothing dead-lettered"
    );
}
