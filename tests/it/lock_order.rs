//! A batch locks its conversations in one order (workers/ingest/src/db.rs
//! `lock_open_conversations`, shared/src/db.rs `lock_conversations_in_order`): with group
//! commit, ingest's and the bot-router's transactions each hold many conversations, and each
//! message locking its own in the batch's order let two of them wait for each other (a
//! deadlock, a second of `deadlock_timeout` and the batch lost, issue 22). Each test holds the
//! lower of two conversations and checks that the worker, given the higher's message first,
//! waits for the lower without having taken the higher.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use firstline_tests::db::TestDb;
use firstline_tests::nats::TestNats;

use crate::helpers::{eventually, wait_for_count, TestApp};
use crate::load::start_ingest;

const SETUP: &str = r#"{"tenants":[{"id":"t1","channels":[{"id":"mail","bot_enabled":false}]}]}"#;
const BOT_SETUP: &str = r#"{"tenants":[{"id":"t1","channels":[{"id":"web","bot_enabled":true}]}]}"#;

/// Waits until one of the database's sessions waits for a lock.
async fn someone_waits_for_a_lock(app: &TestApp, who: &str) {
    eventually(who, Duration::from_secs(20), || async {
        let waiting: i64 = app
            .pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (waiting > 0).then_some(())
    })
    .await;
}

/// Once `worker` waits for the conversation `holder` holds (the lower id), checks that it has
/// not taken `high` (the higher id) meanwhile, then lets the holder go.
async fn assert_waits_before_taking(
    app: &TestApp,
    worker: &str,
    holder: tokio_postgres::Client,
    high: Uuid,
) {
    someone_waits_for_a_lock(app, &format!("{worker} waiting for the held conversation")).await;
    let free = is_free(app, high).await;
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert!(
        free.is_ok(),
        "{worker} locked the higher id while waiting for the lower: {free:?}"
    );
}

/// Waits until ingest has stored both customers' second message.
async fn both_second_messages_stored(app: &TestApp) {
    wait_for_count(
        &app.pg,
        "both second messages stored",
        Duration::from_secs(20),
        "SELECT count(*) FROM messages WHERE body = 'second'",
        2,
    )
    .await;
}

/// Whether `conversation` can be locked at once (no one else holds it).
async fn is_free(app: &TestApp, conversation: Uuid) -> Result<u64, tokio_postgres::Error> {
    let probe = app.db.connect().await;
    probe.batch_execute("BEGIN").await.unwrap();
    let free = probe
        .execute(
            "SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE NOWAIT",
            &[&conversation],
        )
        .await;
    probe.batch_execute("ROLLBACK").await.unwrap();
    free
}

/// Holds `conversation`'s row lock until the returned session rolls back.
async fn hold(app: &TestApp, conversation: Uuid) -> tokio_postgres::Client {
    let holder = app.db.connect().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute(
            "SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE",
            &[&conversation],
        )
        .await
        .unwrap();
    holder
}

/// The two customers' conversations, the lower id first, with their customers.
async fn in_id_order(app: &TestApp) -> ((Uuid, &'static str), (Uuid, &'static str)) {
    let (c1, c2) = (
        conversation_of(app, "c1").await,
        conversation_of(app, "c2").await,
    );
    if c1 < c2 {
        ((c1, "c1"), (c2, "c2"))
    } else {
        ((c2, "c2"), (c1, "c1"))
    }
}

async fn conversation_of(app: &TestApp, customer: &str) -> Uuid {
    app.pg
        .query_one(
            "SELECT c.id FROM conversations c JOIN customers cu ON cu.id = c.customer_id
             WHERE cu.external_id = $1",
            &[&customer],
        )
        .await
        .expect("the customer's conversation")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_locks_a_batchs_conversations_in_the_order_of_their_ids() {
    let mut app = TestApp::without_workers(SETUP).await;
    // Two customers with an open conversation each, made by a first ingest that then stops.
    let first = CancellationToken::new();
    let ingest = tokio::spawn(firstline_ingest::run(
        firstline_ingest::Config {
            common: app.config.clone(),
        },
        first.clone(),
    ));
    app.customer_says("t1", "mail", "c1", "hello").await;
    app.customer_says("t1", "mail", "c2", "hello").await;
    wait_for_count(
        &app.pg,
        "two conversations",
        Duration::from_secs(20),
        "SELECT count(*) FROM conversations",
        2,
    )
    .await;
    first.cancel();
    ingest
        .await
        .expect("first ingest")
        .expect("first ingest ran");
    let ((low, low_customer), (high, high_customer)) = in_id_order(&app).await;

    // Someone else holds the conversation with the lower id.
    let holder = hold(&app, low).await;
    // One batch (one channel: one partition; both published before ingest reads): the message
    // of the higher id first, so that its own lock would be the first sent.
    app.customer_says("t1", "mail", high_customer, "second")
        .await;
    app.customer_says("t1", "mail", low_customer, "second")
        .await;
    start_ingest(&mut app);
    // It waits for the lower id before it takes the higher: the higher is free.
    assert_waits_before_taking(&app, "ingest", holder, high).await;
    both_second_messages_stored(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_router_locks_a_batchs_conversations_in_the_order_of_their_ids() {
    // One partition: both conversations' bot work in one batch.
    let mut app = TestApp::without_workers_configured(
        TestNats::start().await,
        TestDb::create().await,
        BOT_SETUP,
        |c| c.partitions = 1,
    )
    .await;
    start_ingest(&mut app);
    let bot_router = |shutdown: CancellationToken| {
        let mut config = firstline_bot_router::Config::new(app.config.clone());
        // No idle sweep: it would lock conversations of its own.
        config.idle_sweep_secs = 3600.0;
        tokio::spawn(firstline_bot_router::run(config, shutdown))
    };
    // Two customers whose conversations the bot has answered once, by a first bot-router
    // that then stops.
    let first = CancellationToken::new();
    let running = bot_router(first.clone());
    app.customer_says("t1", "web", "c1", "hello").await;
    app.customer_says("t1", "web", "c2", "hello").await;
    let bot_replies = "SELECT count(*) FROM messages WHERE author = 'bot'";
    wait_for_count(
        &app.pg,
        "two bot replies",
        Duration::from_secs(20),
        bot_replies,
        2,
    )
    .await;
    first.cancel();
    running.await.expect("first bot-router").expect("it ran");
    let ((low, low_customer), (high, high_customer)) = in_id_order(&app).await;

    // Both second messages stored by ingest (their bot work published, the higher id's
    // first), then the lower id held, then a bot-router that reads both in one batch.
    app.customer_says("t1", "web", high_customer, "second")
        .await;
    app.customer_says("t1", "web", low_customer, "second").await;
    both_second_messages_stored(&app).await;
    let holder = hold(&app, low).await;
    let second = CancellationToken::new();
    let running = bot_router(second.clone());
    assert_waits_before_taking(&app, "the bot-router", holder, high).await;
    wait_for_count(
        &app.pg,
        "four bot replies",
        Duration::from_secs(20),
        bot_replies,
        4,
    )
    .await;
    second.cancel();
    running.await.expect("second bot-router").expect("it ran");
}
