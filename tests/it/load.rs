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

pub(crate) fn start_ingest(app: &mut TestApp) {
    let worker = firstline_ingest::run(
        firstline_ingest::Config {
            common: app.config.clone(),
        },
        app.shutdown.clone(),
    );
    app.spawn_worker(worker);
}

pub(crate) async fn texts_in_order(app: &TestApp, customer: &str) -> Vec<String> {
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

/// The customer key in the subject (`fl.<t>.inbound.<channel>.<key>`): one channel's customers
/// spread over the partitions of `FL_INBOUND_KEYED`, each customer's messages still in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_customer_key_one_channels_customers_spread_over_the_partitions_in_order() {
    let mut app = backlog_app().await;
    for i in 0..20 {
        for c in 0..8 {
            app.customer_says_keyed("t1", "mail", &format!("U{c}"), &i.to_string())
                .await;
        }
    }
    start_ingest(&mut app);
    wait_for_count(
        &app.pg,
        "all stored",
        Duration::from_secs(30),
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        160,
    )
    .await;
    for c in 0..8 {
        let expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
        assert_eq!(texts_in_order(&app, &format!("U{c}")).await, expected);
    }
    let partitions = count(
        &app.pg,
        "SELECT count(*) FROM partition_marks WHERE consumer LIKE 'ingest-k%' AND stream_sequence > 0",
        &[],
    )
    .await;
    assert!(
        partitions >= 3,
        "8 customers of one channel in {partitions} partitions"
    );
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

/// A store left by a version before leases (durable, pinned consumers per partition): their
/// ack floors become the marks (what they acknowledged is not handled again) and they are
/// removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_consumers_of_an_older_version_are_taken_over() {
    use async_nats::jetstream::consumer;
    use firstline_shared::subjects;
    use futures::StreamExt;
    let mut app = backlog_app().await;
    let stream = app.js.get_stream("FL_INBOUND").await.unwrap();
    for i in 0..5 {
        app.customer_says("t1", "mail", "U1", &i.to_string()).await;
    }
    // The older version's consumer of the messages' partition handled (and acknowledged)
    // "0" and "1".
    let subject = stream.get_raw_message(1).await.unwrap().subject;
    let p: u32 = subject.rsplit('.').next().unwrap().parse().unwrap();
    let durable = format!("ingest-p{p}");
    let old = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(durable.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 1,
            filter_subject: subjects::partition_filter(&subjects::INBOUND, p),
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..2 {
        let mut messages = old.fetch().max_messages(1).messages().await.unwrap();
        while let Some(m) = messages.next().await {
            m.unwrap().double_ack().await.unwrap();
        }
    }
    start_ingest(&mut app);
    wait_for_count(
        &app.pg,
        "stored after the older version's floor",
        Duration::from_secs(30),
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        3,
    )
    .await;
    assert_eq!(texts_in_order(&app, "U1").await, vec!["2", "3", "4"]);
    assert!(
        stream.consumer_info(&durable).await.is_err(),
        "{durable} removed"
    );
}

/// The fence (shared/src/batch/fence.rs), on its own: a batch commits only if the partition's
/// mark is where its reader left it, and moves the mark over what it handled from the first on
/// (a poison message stops it there). Two readers of one partition (a lease that lapsed under a
/// live instance): the first to commit wins, the other commits nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_commits_only_where_its_reader_left_the_partitions_mark() {
    use firstline_shared::batch;
    use firstline_shared::bus::{Delivered, Partition};
    use firstline_shared::worker::Services;
    use firstline_shared::HandleError;
    use std::sync::Arc;

    let app = TestApp::without_workers(SETUP).await;
    let services = Services::start(&app.config, &app.shutdown).await.unwrap();
    app.pg
        .batch_execute(
            "INSERT INTO partition_marks (consumer, stream_sequence) VALUES ('ingest-p9', 0);
             CREATE TABLE handled (stream_sequence bigint NOT NULL)",
        )
        .await
        .unwrap();
    let reader = |mark: u64| {
        Arc::new(Partition {
            consumer: "ingest-p9",
            stream: "FL_INBOUND",
            filter: "fl.*.inbound.*.9".into(),
            mark: mark.into(),
        })
    };
    let partition = reader(0);
    // Messages at stream sequences 10, 20, 30… read by `partition`; the one at `poison` is
    // poison.
    let run = |partition: &Arc<Partition>, sequences: &[u64], poison: Option<u64>| {
        let partition = partition.clone();
        let batch: Vec<Delivered> = sequences
            .iter()
            .map(|&s| Delivered {
                subject: "fl.t1.inbound.mail.9".into(),
                payload: Default::default(),
                headers: None,
                stream_sequence: s,
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
                        if Some(m.stream_sequence) == poison {
                            return Err(HandleError::poison("bad"));
                        }
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
            let fenced = results
                .iter()
                .filter(|r| matches!(r, Err(e) if e.waits_for().is_some()))
                .count();
            (committed, fenced)
        }
    };
    let mark = || async {
        count(
            &app.pg,
            "SELECT stream_sequence FROM partition_marks WHERE consumer = 'ingest-p9'",
            &[],
        )
        .await as u64
    };

    assert_eq!(run(&partition, &[10, 20], None).await, (vec![10, 20], 0));
    assert_eq!((mark().await, partition.mark()), (20, 20));
    // A poison message stops the mark before it; what comes after it is still handled.
    assert_eq!(
        run(&partition, &[30, 40, 50], Some(40)).await,
        (vec![30, 50], 0)
    );
    assert_eq!((mark().await, partition.mark()), (30, 30));
    // Another reader of the partition, from the same mark, commits first: this reader's
    // batch is not committed, one message or many.
    let other = reader(30);
    assert_eq!(run(&other, &[40, 50], None).await, (vec![40, 50], 0));
    assert_eq!(run(&partition, &[40], None).await, (vec![], 1));
    assert_eq!(run(&partition, &[40, 50, 60], None).await, (vec![], 3));
    assert_eq!(mark().await, 50);
    // Its reader starts again after the mark (what the supervisor does): it goes on.
    let again = reader(50);
    assert_eq!(run(&again, &[60, 70], None).await, (vec![60, 70], 0));
    assert_eq!(mark().await, 70);
}
