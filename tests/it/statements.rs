//! A worker and its Postgres (shared/src/db.rs): the migrations it runs at start refuse a
//! database that a newer build migrated further; its prepared statements are planned once per
//! connection (`FL_DB_PLAN_CACHE_MODE`), not again on every execution; its connections carry
//! the program's name (`pg_stat_activity.application_name`).

use firstline_shared::config::CommonConfig;
use firstline_shared::db;
use firstline_tests::db::TestDb;

/// Executes a statement of the kind the workers' hot paths use (an array parameter, as in the
/// partition marks' lock) ten times on one pooled connection; returns how many of those
/// executions ran a generic plan (made once, kept) and how many a custom one (made for that
/// execution).
async fn plans(mode: &str) -> (i64, i64) {
    let test_db = TestDb::create().await;
    let mut config = CommonConfig::new("nats://127.0.0.1:1", &test_db.url);
    config.db_plan_cache_mode = mode.into();
    db::migrate(&config.database_url).await.expect("migrate");
    let pool = db::pool(&config).expect("pool");
    let client = pool.get().await.expect("connection");
    let sql = "SELECT consumer, stream_sequence FROM partition_marks WHERE consumer = ANY($1)";
    let stmt = client.prepare_cached(sql).await.expect("prepare");
    for i in 0..10 {
        let names: Vec<String> = (0..=i).map(|n| format!("ingest-{n}")).collect();
        client.query(&stmt, &[&names]).await.expect("query");
    }
    let row = client
        .query_one(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
            &[&sql],
        )
        .await
        .expect("pg_prepared_statements");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn pooled_statements_are_planned_once_per_connection() {
    let (generic, custom) = plans("force_generic_plan").await;
    assert_eq!(
        (generic, custom),
        (10, 0),
        "every execution ran the one generic plan"
    );
    // Postgres's own default plans such a statement again on every execution: what the
    // setting saves.
    let (_, custom) = plans("auto").await;
    assert!(custom >= 5, "auto made {custom} custom plans");
}

/// docs/operations.md: a worker's connections are named after its program (`firstline-ingest`,
/// ...; here the test binary), unless the database URL names them.
#[tokio::test]
async fn pooled_connections_are_named_after_the_program() {
    let test_db = TestDb::create().await;
    let name = |url: String| async move {
        let pool = db::pool(&CommonConfig::new("nats://127.0.0.1:1", &url)).expect("pool");
        let client = pool.get().await.expect("connection");
        let row = client
            .query_one(
                "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .expect("pg_stat_activity");
        row.get::<_, String>(0)
    };
    let program = std::env::current_exe().expect("exe");
    let program = program.file_stem().and_then(|s| s.to_str()).expect("name");
    assert_eq!(name(test_db.url.clone()).await, program);
    let named = format!("{}?application_name=mine", test_db.url);
    assert_eq!(name(named).await, "mine");
}

/// docs/operations.md, "Upgrading": an instance of an older build does not start on a database
/// that a newer build has migrated past its own migrations (it cannot know what they changed).
#[tokio::test]
async fn a_build_does_not_start_on_a_database_migrated_past_its_migrations() {
    let test_db = TestDb::create().await;
    db::migrate(&test_db.url).await.expect("migrate");
    // What a newer build's migration leaves behind.
    test_db
        .connect()
        .await
        .execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
             VALUES (9999, 'from_a_newer_build', $1, '1')",
            &[&chrono::Utc::now().to_rfc3339()],
        )
        .await
        .expect("a newer migration's row");
    let refused = db::migrate(&test_db.url)
        .await
        .expect_err("an older build must not start on it");
    assert!(
        format!("{refused:#}").contains("missing"),
        "the error names the migration it does not have: {refused:#}"
    );
    // Its own migrations applied again change nothing and start fine once that row is gone.
    test_db
        .connect()
        .await
        .execute(
            "DELETE FROM refinery_schema_history WHERE version = 9999",
            &[],
        )
        .await
        .expect("delete");
    db::migrate(&test_db.url).await.expect("migrate again");
}

/// A tenant `t1` with channel `web`, agent `a1`, and one conversation of customer `c1` in
/// `processing` with `a1`.
async fn seed_served_conversation(pg: &tokio_postgres::Client) -> uuid::Uuid {
    let conversation = uuid::Uuid::now_v7();
    let customer = uuid::Uuid::now_v7();
    pg.batch_execute(&format!(
        "INSERT INTO tenants (id, name) VALUES ('t1', 't1');
         INSERT INTO channels (tenant_id, id) VALUES ('t1', 'web');
         INSERT INTO agents (tenant_id, id, status) VALUES ('t1', 'a1', 'ready');
         INSERT INTO customers (id, tenant_id, channel_id, external_id) VALUES ('{customer}', 't1', 'web', 'c1');
         INSERT INTO conversations (id, tenant_id, channel_id, customer_id, state, agent_id, queued_at)
         VALUES ('{conversation}', 't1', 'web', '{customer}', 'processing', 'a1', now());"
    ))
    .await
    .expect("seed");
    conversation
}

/// The session's row writes to `table` not yet reported to the statistics (this
/// transaction's, and earlier ones' still pending): (inserted, updated, of them HOT).
async fn written(tx: &tokio_postgres::Transaction<'_>, table: &str) -> (i64, i64, i64) {
    let row = tx
        .query_one(
            "SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = $1",
            &[&table],
        )
        .await
        .expect("pg_stat_xact_user_tables");
    (row.get(0), row.get(1), row.get(2))
}

/// Issue 22: an agent's close (shared/src/db.rs `transition_ending`, as the dispatcher applies
/// it) is one statement that writes one new version of the conversation's row, state and the
/// assignment's end together, and one history row; the end is read back as the dispatcher's
/// late-reply rule reads it.
#[tokio::test]
async fn a_close_writes_one_version_of_the_conversation() {
    use firstline_shared::db::{conversation_for_update, transition_ending, Transition};
    use firstline_shared::domain::{AgentId, ConversationState, TenantId};
    let test_db = TestDb::create().await;
    let id = seed_served_conversation(&test_db.connect().await).await;
    let pool = db::pool(&CommonConfig::new("nats://127.0.0.1:1", &test_db.url)).expect("pool");
    let mut client = pool.get().await.expect("connection");
    let tx = client.transaction().await.expect("begin");
    let tenant = TenantId::parse("t1").unwrap();
    let agent = AgentId::parse("a1").unwrap();
    let mut conversation = conversation_for_update(&tx, &tenant, id)
        .await
        .expect("load")
        .expect("seeded");
    let mut outbox = firstline_shared::outbox::Outbox::new();
    transition_ending(
        &tx,
        &mut outbox,
        &mut conversation,
        Transition {
            to: ConversationState::Completed,
            agent: Some(&agent),
            reason: "closed_by_agent",
        },
        Some((&agent, 42)),
    )
    .await
    .expect("close");
    assert_eq!(written(&tx, "conversations").await.1, 1, "one row version");
    assert_eq!(written(&tx, "conversation_transitions").await.0, 1);
    let row = tx
        .query_one(
            "SELECT c.state, c.ended_agent, c.ended_action_seq, c.closed_by, t.from_state, t.to_state, t.agent_id
             FROM conversations c JOIN conversation_transitions t ON t.conversation_id = c.id WHERE c.id = $1",
            &[&id],
        )
        .await
        .expect("read back");
    let got: (String, String, i64, String, String, String, String) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
        row.get(6),
    );
    assert_eq!(
        got,
        (
            "completed".into(),
            "a1".into(),
            42,
            "closed_by_agent".into(),
            "processing".into(),
            "completed".into(),
            "a1".into()
        )
    );
    assert!(!outbox.is_empty(), "the conversation event is staged");
    tx.commit().await.expect("commit");
}

/// Issue 22, shared/migrations/V17: the bot-router's mark on a customer message it handled
/// (`bot_handled_at`, workers/bot-router/src/store.rs `claim_message`), moments after the
/// message was stored, can be a HOT update (a new row version in the same page, no new entry
/// in the table's three indexes) even while other transactions keep the page's old versions
/// from being pruned, because the pages keep room for it. With full pages (fillfactor 100,
/// Postgres's default) none can. (Without a held snapshot both settings prune their way to HOT
/// updates; under load, the bench measured 58 % HOT at 100 and 81 % at 80, docs/benchmarks.md.)
#[tokio::test]
async fn the_messages_pages_keep_room_for_the_handled_mark() {
    async fn hot_share(fillfactor: Option<u32>) -> f64 {
        let test_db = TestDb::create().await;
        let pg = test_db.connect().await;
        let conversation = seed_served_conversation(&pg).await;
        if let Some(f) = fillfactor {
            pg.batch_execute(&format!("ALTER TABLE messages SET (fillfactor = {f})"))
                .await
                .unwrap();
        }
        let ids: Vec<uuid::Uuid> = (0..300).map(|_| uuid::Uuid::now_v7()).collect();
        let external: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
        pg.execute(
            "INSERT INTO messages (id, tenant_id, channel_id, conversation_id, external_id, author, body, routed_to, created_at)
             SELECT id, 't1', 'web', $3, ext, 'customer', repeat('我想查詢訂單的配送進度 ', 4), 'bot', clock_timestamp()
             FROM unnest($1::uuid[], $2::text[]) AS m(id, ext)",
            &[&ids, &external, &conversation],
        )
        .await
        .unwrap();
        // Under load other transactions are always running, and a version another one may
        // still see cannot be pruned to make room: one snapshot held open for the whole loop.
        let other = test_db.connect().await;
        other
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM messages")
            .await
            .unwrap();
        let pool = db::pool(&CommonConfig::new("nats://127.0.0.1:1", &test_db.url)).unwrap();
        let mut client = pool.get().await.unwrap();
        let (mut updated, mut hot) = (0, 0);
        for id in &ids {
            let tx = client.transaction().await.unwrap();
            let (_, u0, h0) = written(&tx, "messages").await;
            tx.execute(
                "UPDATE messages SET bot_handled_at = statement_timestamp() WHERE id = $1 AND bot_handled_at IS NULL",
                &[id],
            )
            .await
            .unwrap();
            let (_, u, h) = written(&tx, "messages").await;
            updated += u - u0;
            hot += h - h0;
            tx.commit().await.unwrap();
        }
        assert_eq!(updated, 300);
        hot as f64 / updated as f64
    }
    let ours = hot_share(None).await;
    assert!(ours >= 0.2, "{:.0} % of the marks were HOT", ours * 100.0);
    let full_pages = hot_share(Some(100)).await;
    assert!(
        full_pages < 0.05,
        "with full pages {:.0} % were HOT: the check shows nothing",
        full_pages * 100.0
    );
}

/// Issue 22: a transaction's outbox is one row per lane (one tenant's messages of one kind),
/// holding that lane's messages in the order they were staged, not one row per message.
#[tokio::test]
async fn a_transactions_outbox_is_one_row_per_lane_in_order() {
    use firstline_shared::domain::{AgentId, TenantId};
    use firstline_shared::wire::NotificationKind;
    let test_db = TestDb::create().await;
    let config = CommonConfig::new("nats://127.0.0.1:1", &test_db.url);
    db::migrate(&config.database_url).await.expect("migrate");
    let pool = db::pool(&config).expect("pool");
    let mut client = pool.get().await.expect("connection");
    let tx = client.transaction().await.expect("begin");
    let mut outbox = firstline_shared::outbox::Outbox::new();
    let agent = AgentId::parse("a1").unwrap();
    let staged: Vec<(&str, u128)> = vec![("t1", 1), ("t2", 2), ("t1", 3), ("t1", 4), ("t2", 5)];
    for (tenant, n) in &staged {
        outbox.notify_agent(
            &TenantId::parse(*tenant).unwrap(),
            &agent,
            uuid::Uuid::from_u128(*n),
            uuid::Uuid::from_u128(*n),
            NotificationKind::OfferRevoked {
                offer_id: uuid::Uuid::from_u128(*n),
                reason: "test".into(),
            },
        );
    }
    let _staged = outbox.stage(&tx).await.expect("stage");
    let rows: Vec<(Vec<String>, Vec<String>, usize)> = tx
        .query(
            "SELECT subjects, msg_ids, cardinality(payloads) FROM outbox ORDER BY subjects[1]",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get::<_, i32>(2) as usize))
        .collect();
    let id = |n: u128| format!("delivery:{}", uuid::Uuid::from_u128(n));
    assert_eq!(
        rows,
        vec![
            (
                vec!["fl.t1.delivery.agent".to_string(); 3],
                vec![id(1), id(3), id(4)],
                3
            ),
            (
                vec!["fl.t2.delivery.agent".to_string(); 2],
                vec![id(2), id(5)],
                2
            ),
        ]
    );
}

/// V18: a row's payloads are compressed with lz4 where the server has it (this one's, when a
/// table can be made with it), not with the slower default pglz.
#[tokio::test]
async fn the_outbox_payloads_are_compressed_with_lz4_where_the_server_has_it() {
    let test_db = TestDb::create().await;
    db::migrate(&test_db.url).await.expect("migrate");
    let pg = test_db.connect().await;
    let has_lz4 = pg
        .batch_execute("CREATE TEMP TABLE lz4_probe (b bytea COMPRESSION lz4)")
        .await
        .is_ok();
    let method: String = pg
        .query_one(
            "SELECT attcompression::text FROM pg_attribute
             WHERE attrelid = 'outbox'::regclass AND attname = 'payloads'",
            &[],
        )
        .await
        .expect("attribute")
        .get(0);
    assert_eq!(
        method,
        if has_lz4 { "l" } else { "" },
        "lz4 available: {has_lz4}"
    );
}
