//! The load generator against the real workers, and batched partitions: a partition's
//! backlog is handled in batches (one transaction each) with each conversation's order kept,
//! a malformed message dead-lettered alone, duplicates stored once.

use std::time::Duration;

use crate::helpers::{count, eventually, holds_for, wait_for_count, TestApp};
use firstline::load::{self, LoadOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_the_load_generator_sends_is_handled() {
    let opts = LoadOptions {
        rate: 100.0,
        duration: Duration::from_secs(3),
        tenants: 2,
        channels: 1,
        customers: 40,
        bot_share: 0.6,
        handover_share: 0.2,
        agents: 5,
        capacity: 10,
        accept_delay: Duration::from_millis(100),
        close_after: Duration::from_millis(200),
        progress: None,
        drain: Duration::from_secs(30),
        prefix: "lt".into(),
        ..LoadOptions::default()
    };
    let app = TestApp::spawn(&opts.setup_json()).await;
    let report = load::run(app.client.clone(), &opts, Default::default())
        .await
        .expect("load run");
    load::print_report(&report);
    assert!(report.sent >= 250, "sent {}", report.sent);
    assert_eq!(report.send_errors, 0);
    assert_eq!(report.unanswered_replies, 0, "every bot question answered");
    assert_eq!(report.unanswered_offers, 0, "every queued customer offered");
    assert_eq!(
        report.answered, report.sent,
        "one answer per message (hand-overs: the reply; direct: the offer)"
    );
    // Stored once each.
    let stored = count(
        &app.pg,
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        &[],
    )
    .await;
    assert_eq!(stored as u64, report.sent);
    // Every hand-over and direct customer got an offer.
    let offered = count(
        &app.pg,
        "SELECT count(DISTINCT conversation_id) FROM offers",
        &[],
    )
    .await;
    assert_eq!(offered as u64, report.handover_sent + report.direct_sent);
}

/// `firstline load --history`: a desk's past written before the load (README, Load
/// generator). Each past conversation is whole (customer, transitions from the first state to
/// `completed`, messages, its accepted offer, the tables analyzed), and the load on top of it
/// is served as on an empty desk: the past's customers are not the load's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_is_served_on_top_of_a_desks_history() {
    let opts = LoadOptions {
        rate: 50.0,
        duration: Duration::from_secs(2),
        tenants: 2,
        channels: 1,
        customers: 20,
        agents: 5,
        accept_delay: Duration::from_millis(50),
        close_after: Duration::from_millis(100),
        progress: None,
        drain: Duration::from_secs(30),
        prefix: "hist".into(),
        ..LoadOptions::default()
    };
    let app = TestApp::spawn(&opts.setup_json()).await;
    let seeded = firstline::history::seed(&app.config.database_url, &opts, 300)
        .await
        .expect("history");
    assert_eq!(seeded.conversations, 600);
    assert_eq!(seeded.offers, 600);
    // Bot channels: customer, hand-over reply, agent; the others: customer, agent.
    assert_eq!(seeded.messages, 600 * 3 - 300);
    let q = |sql: &'static str| count(&app.pg, sql, &[]);
    assert_eq!(
        q("SELECT count(*) FROM conversations WHERE state = 'completed'").await,
        600
    );
    // Every past conversation's history starts at its first state and ends completed, its
    // offer accepted by the agent who served it.
    assert_eq!(
        q("SELECT count(*) FROM conversations c
           WHERE (SELECT array_agg(t.to_state ORDER BY t.at) FROM conversation_transitions t
                   WHERE t.conversation_id = c.id)
                 = CASE WHEN c.channel_id LIKE 'b%'
                        THEN ARRAY['bot', 'waiting', 'assigning', 'processing', 'completed']
                        ELSE ARRAY['waiting', 'assigning', 'processing', 'completed'] END
             AND EXISTS (SELECT 1 FROM offers o WHERE o.conversation_id = c.id
                          AND o.status = 'accepted' AND o.agent_id = c.agent_id)")
        .await,
        600
    );
    // Only the bot handled the customer messages of bot channels.
    assert_eq!(
        q("SELECT count(*) FROM messages
           WHERE author = 'customer' AND (bot_handled_at IS NOT NULL) <> (channel_id LIKE 'b%')")
        .await,
        0
    );
    assert!(
        q("SELECT coalesce(max(reltuples), 0)::bigint FROM pg_class WHERE relname = 'offers'")
            .await
            >= 600,
        "the tables are analyzed"
    );

    let report = load::run(app.client.clone(), &opts, Default::default())
        .await
        .expect("load run");
    assert_eq!(report.send_errors, 0);
    assert_eq!(report.unanswered_replies, 0);
    assert_eq!(report.unanswered_offers, 0);
    assert_eq!(report.answered, report.sent);
    let new_offers = q("SELECT count(*) FROM offers WHERE status <> 'accepted' OR created_at > now() - interval '10 min'").await;
    assert!(
        new_offers as u64 >= report.handover_sent + report.direct_sent,
        "the load's conversations offered"
    );
}

const SETUP: &str = r#"{"tenants":[{"id":"t1","channels":[{"id":"mail","bot_enabled":false}]}]}"#;

/// A backlog published before ingest starts, so that partitions hand over full batches.
async fn backlog_app() -> TestApp {
    let mut app = TestApp::without_workers(SETUP).await;
    app.config.partition_batch = 64;
    app
}

fn start_ingest(app: &mut TestApp) {
    let worker = firstline_ingest::run(
        firstline_ingest::Config {
            common: app.config.clone(),
        },
        app.shutdown.clone(),
    );
    app.spawn_worker(worker);
}

async fn texts_in_order(app: &TestApp, customer: &str) -> Vec<String> {
    app.pg
        .query(
            "SELECT m.body FROM messages m JOIN customers c ON c.id = (
                 SELECT customer_id FROM conversations WHERE id = m.conversation_id)
             WHERE c.external_id = $1 AND m.author = 'customer'
             ORDER BY m.created_at, m.id",
            &[&customer],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_keeps_each_conversations_order() {
    let mut app = backlog_app().await;
    // 5 customers, 40 messages each, interleaved, all on one channel (one partition).
    for i in 0..40 {
        for c in 0..5 {
            app.customer_says("t1", "mail", &format!("U{c}"), &i.to_string())
                .await;
        }
    }
    start_ingest(&mut app);
    wait_for_count(
        &app.pg,
        "all stored",
        Duration::from_secs(30),
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        200,
    )
    .await;
    // They were handled in batches: several messages share a transaction (the rows' xmin).
    let transactions = count(
        &app.pg,
        "SELECT count(DISTINCT xmin::text) FROM messages WHERE author = 'customer'",
        &[],
    )
    .await;
    assert!(
        transactions < 100,
        "200 messages in {transactions} transactions: not batched"
    );
    for c in 0..5 {
        let texts = texts_in_order(&app, &format!("U{c}")).await;
        let expected: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        assert_eq!(texts, expected, "customer U{c} in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_in_a_batch_is_dead_lettered_alone() {
    let mut app = backlog_app().await;
    for i in 0..10 {
        app.customer_says("t1", "mail", "U1", &i.to_string()).await;
    }
    app.publish_json("fl.t1.inbound.mail", Some("mail:bad"), "{not json")
        .await;
    app.publish_json(
        "fl.t1.inbound.mail",
        Some("mail:no-customer"),
        r#"{"version":1,"message_id":"m-x","text":"no customer"}"#,
    )
    .await;
    for i in 10..20 {
        app.customer_says("t1", "mail", "U1", &i.to_string()).await;
    }
    start_ingest(&mut app);
    wait_for_count(
        &app.pg,
        "the good ones stored",
        Duration::from_secs(30),
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        20,
    )
    .await;
    let expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(texts_in_order(&app, "U1").await, expected);
    let letters = eventually("two dead letters", Duration::from_secs(10), || async {
        let l = app
            .stored("FL_DEADLETTER", "fl.*.deadletter.FL_INBOUND")
            .await;
        (l.len() == 2).then_some(l)
    })
    .await;
    assert!(letters
        .iter()
        .any(|l| l["payload"] == "{not json" && l["deliveries"] == 1));
    assert!(letters
        .iter()
        .any(|l| l["reason"].as_str().unwrap().contains("customer")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_in_a_batch_are_stored_once() {
    let mut app = backlog_app().await;
    let body = |id: &str, text: &str| {
        format!(r#"{{"version":1,"message_id":"{id}","customer":{{"id":"U1"}},"text":"{text}"}}"#)
    };
    // The same gateway message three times: without Nats-Msg-Id (the stream keeps every
    // copy, the database must refuse them), and once more with one.
    for _ in 0..2 {
        app.publish_json("fl.t1.inbound.mail", None, &body("m-1", "first"))
            .await;
    }
    app.publish_json("fl.t1.inbound.mail", None, &body("m-2", "second"))
        .await;
    app.publish_json(
        "fl.t1.inbound.mail",
        Some("mail:m-1"),
        &body("m-1", "first"),
    )
    .await;
    app.publish_json("fl.t1.inbound.mail", None, &body("m-3", "third"))
        .await;
    start_ingest(&mut app);
    wait_for_count(
        &app.pg,
        "three stored",
        Duration::from_secs(30),
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        3,
    )
    .await;
    // Give a wrongly stored copy the time to appear.
    holds_for("each stored once", Duration::from_millis(500), || async {
        texts_in_order(&app, "U1").await == ["first", "second", "third"]
    })
    .await;
    let conversations = count(&app.pg, "SELECT count(*) FROM conversations", &[]).await;
    assert_eq!(conversations, 1);
}

/// A store left by a version with one message in flight per partition (no priority group):
/// the batched consumers take over its consumers, position included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_consumers_of_an_older_version_are_taken_over() {
    use async_nats::jetstream::consumer;
    use firstline_shared::subjects;
    let mut app = backlog_app().await;
    let stream = app.js.get_stream("FL_INBOUND").await.unwrap();
    for p in 0..subjects::PARTITIONS {
        let durable = format!("ingest-p{p}");
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(durable),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(app.config.ack_wait_secs),
                max_deliver: app.config.max_deliver,
                max_ack_pending: 1,
                filter_subject: subjects::partition_filter(&subjects::INBOUND, p),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for i in 0..5 {
        app.customer_says("t1", "mail", "U1", &i.to_string()).await;
    }
    start_ingest(&mut app);
    wait_for_count(
        &app.pg,
        "stored by the batched consumers",
        Duration::from_secs(30),
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        5,
    )
    .await;
    let expected: Vec<String> = (0..5).map(|i| i.to_string()).collect();
    assert_eq!(texts_in_order(&app, "U1").await, expected);
    let info = stream.consumer_info("ingest-p0").await.unwrap();
    assert_eq!(
        info.config.max_ack_pending,
        app.config.partition_batch as i64
    );
}

/// Starts an ingest process, has `customer` say `text` on t1/mail and waits until it is
/// stored; returns the process and the partition consumer that delivered it (its pin, if any).
async fn ingest_with_one_stored(
    app: &TestApp,
    customer: &str,
    text: &str,
) -> (crate::helpers::WorkerProcess, String, Option<String>) {
    use firstline_shared::subjects;
    let ingest = crate::helpers::WorkerProcess::start("firstline-ingest", &app.config);
    app.customer_says("t1", "mail", customer, text).await;
    wait_for_count(
        &app.pg,
        "the first stored",
        Duration::from_secs(30),
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        1,
    )
    .await;
    let stream = app.js.get_stream("FL_INBOUND").await.unwrap();
    for p in 0..subjects::PARTITIONS {
        let durable = format!("ingest-p{p}");
        let info = stream.consumer_info(&durable).await.unwrap();
        if info.delivered.consumer_sequence > 0 {
            let pin = info.priority_groups[0].pinned_client_id.clone();
            return (ingest, durable, pin);
        }
    }
    panic!("no partition delivered the first message");
}

/// Pulls one delivery of `durable` as another client of the priority group would (with `pin`,
/// as the pinned one), never to acknowledge it; returns its text.
async fn take_one_delivery(app: &TestApp, durable: &str, pin: Option<&str>) -> String {
    use futures::StreamExt;
    let inbox = app.client.new_inbox();
    let mut taken = app.client.subscribe(inbox.clone()).await.unwrap();
    let mut request = serde_json::json!({"batch": 1, "expires": 2_000_000_000u64, "group": "fl"});
    if let Some(pin) = pin {
        request["id"] = pin.into();
    }
    app.client
        .publish_with_reply(
            format!("$JS.API.CONSUMER.MSG.NEXT.FL_INBOUND.{durable}"),
            inbox,
            request.to_string().into(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(5), taken.next())
        .await
        .expect("a delivery for the pull")
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&delivery.payload).unwrap();
    body["text"].as_str().unwrap().to_owned()
}

/// Waits until `n` customer messages are stored, then checks U1's four came in order.
async fn u1_stored_in_order(app: &TestApp, n: i64) {
    wait_for_count(
        &app.pg,
        "all stored",
        Duration::from_secs(60),
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        n,
    )
    .await;
    assert_eq!(
        texts_in_order(app, "U1").await,
        vec!["0", "1", "2", "3"],
        "the delivery that was out first"
    );
}

/// A delivery lost in transit (here: taken by another client with the worker's pin, as a
/// message the server sent while the connection broke) is noticed by the gap in the
/// consumer's delivery sequence: the partition pauses until the server gives it back, so the
/// newer messages behind it are not stored first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_lost_in_transit_is_waited_for_before_newer_messages() {
    let app = backlog_app().await;
    let (mut ingest, durable, pin) = ingest_with_one_stored(&app, "U1", "0").await;
    let pin = pin.expect("the worker is pinned");

    // Freeze the worker until its pull request has expired (5 s), the pin still its own.
    let pid = ingest.pid().unwrap().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig}");
    };
    signal("-STOP");
    let stream = app.js.get_stream("FL_INBOUND").await.unwrap();
    eventually(
        "the frozen worker's pull request expired",
        Duration::from_secs(20),
        || async {
            let info = stream.consumer_info(&durable).await.unwrap();
            (info.num_waiting == 0).then_some(())
        },
    )
    .await;
    for text in ["1", "2", "3"] {
        app.customer_says("t1", "mail", "U1", text).await;
    }
    // "1" is delivered under the worker's pin, and never reaches it.
    let taken = take_one_delivery(&app, &durable, Some(&pin)).await;
    assert_eq!(taken, "1", "the delivery taken is the oldest");
    signal("-CONT");

    u1_stored_in_order(&app, 4).await;
    ingest.kill();
}

/// The pin lost while another client holds a delivery (a restarted server forgets pins; here
/// the pin is taken away with the unpin API): a freshly started instance is pinned at once and
/// sent the newer messages, while the older one is still out. It notices from the consumer's
/// ack floor, pauses, and takes them all again in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_still_out_when_the_pin_moves_is_waited_for_by_a_fresh_instance() {
    let app = backlog_app().await;
    let (mut first, durable, _) = ingest_with_one_stored(&app, "U0", "warm").await;
    first.kill();
    let stream = app.js.get_stream("FL_INBOUND").await.unwrap();
    stream.unpin_consumer(&durable, "fl").await.unwrap();

    // Another client (an instance about to crash) is pinned and holds "0".
    app.customer_says("t1", "mail", "U1", "0").await;
    assert_eq!(take_one_delivery(&app, &durable, None).await, "0");
    // Its pin is lost, the delivery still out.
    stream.unpin_consumer(&durable, "fl").await.unwrap();
    for text in ["1", "2", "3"] {
        app.customer_says("t1", "mail", "U1", text).await;
    }
    let mut fresh = crate::helpers::WorkerProcess::start("firstline-ingest", &app.config);

    u1_stored_in_order(&app, 5).await;
    fresh.kill();
}

/// The partition mark (shared/src/batch.rs), on its own: whatever a partition's instance is
/// delivered, its transaction handles a batch only as far as it continues the partition right
/// after the mark, moves the mark with it, and tells the rest to wait for the missing message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_handled_only_as_far_as_it_continues_its_partition() {
    use async_nats::jetstream::consumer;
    use firstline_shared::batch;
    use firstline_shared::bus::{Delivered, Partition};
    use firstline_shared::subjects;
    use firstline_shared::worker::Services;
    use futures::StreamExt;
    use std::sync::Arc;

    let app = TestApp::without_workers(SETUP).await;
    let services = Services::start(&app.config, &app.shutdown).await.unwrap();
    let mut sequences = Vec::new();
    for text in ["0", "1", "2", "3", "4"] {
        let ack = app
            .js
            .publish("fl.t1.inbound.mail", text.to_owned().into())
            .await
            .unwrap()
            .await
            .unwrap();
        sequences.push(ack.sequence);
    }
    let stream = app.js.get_stream("FL_INBOUND").await.unwrap();
    let subject = stream.get_raw_message(sequences[0]).await.unwrap().subject;
    let p: u32 = subject.rsplit('.').next().unwrap().parse().unwrap();
    let durable: &'static str = Box::leak(format!("ingest-p{p}").into_boxed_str());
    let filter = subjects::partition_filter(&subjects::INBOUND, p);
    let raw = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(durable.to_owned()),
            filter_subject: filter.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let partition = Arc::new(Partition {
        consumer: durable,
        stream: "FL_INBOUND",
        filter,
        last_mark: Default::default(),
    });
    // What a batch's transaction committed, message by message.
    app.pg
        .batch_execute("CREATE TABLE handled (stream_sequence bigint NOT NULL)")
        .await
        .unwrap();
    let run = |indexes: &[usize]| {
        let batch: Vec<Delivered> = indexes
            .iter()
            .map(|&i| Delivered {
                subject: subject.to_string(),
                payload: Default::default(),
                headers: None,
                stream_sequence: sequences[i],
                delivered: 1,
                published: chrono::Utc::now(),
                partition: Some(partition.clone()),
            })
            .collect();
        let (services, pg) = (&services, &app.pg);
        async move {
            pg.batch_execute("DELETE FROM handled").await.unwrap();
            let (results, _) = batch::in_one_transaction(
                services,
                "ingest",
                &batch,
                &(),
                |_| None,
                |_, tx, _, m| {
                    Box::pin(async move {
                        tx.execute(
                            "INSERT INTO handled VALUES ($1)",
                            &[&(m.stream_sequence as i64)],
                        )
                        .await?;
                        Ok(Some(()))
                    })
                },
            )
            .await;
            let committed: Vec<u64> = pg
                .query("SELECT stream_sequence FROM handled ORDER BY 1", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, i64>(0) as u64)
                .collect();
            let outcome: Vec<Option<u64>> = results
                .iter()
                .map(|r| match r {
                    Ok(()) => None,
                    Err(e) => Some(e.waits_for().expect("only waits")),
                })
                .collect();
            (committed, outcome)
        }
    };
    let mark = || async {
        count(
            &app.pg,
            "SELECT coalesce(max(stream_sequence), 0) FROM partition_marks WHERE consumer = $1",
            &[&durable],
        )
        .await as u64
    };
    let s = sequences.clone();

    // Nothing handled yet: a batch from "1" waits for "0", and nothing of it is handled.
    assert_eq!(run(&[1, 2]).await, (vec![], vec![Some(s[0]), Some(s[0])]));
    assert_eq!(mark().await, 0);
    // "0" continues; "2" after it skips "1" (out with another instance, say): it waits.
    assert_eq!(run(&[0, 2]).await, (vec![s[0]], vec![None, Some(s[1])]));
    assert_eq!(mark().await, s[0]);
    // "0" again (a redelivery) is handled again harmlessly; "1", "2" continue.
    assert_eq!(
        run(&[0, 1, 2]).await,
        (vec![s[0], s[1], s[2]], vec![None, None, None])
    );
    assert_eq!(mark().await, s[2]);

    // A mark behind the consumer's ack floor (the partition was consumed one message at a
    // time, with no mark): everything acknowledged counts as handled.
    app.pg
        .execute("UPDATE partition_marks SET stream_sequence = 0", &[])
        .await
        .unwrap();
    let mut messages = raw.fetch().max_messages(4).messages().await.unwrap();
    for _ in 0..4 {
        messages
            .next()
            .await
            .unwrap()
            .unwrap()
            .double_ack()
            .await
            .unwrap();
    }
    assert_eq!(run(&[4]).await, (vec![s[4]], vec![None]));
    assert_eq!(mark().await, s[4]);
}
