//! A worker and its Postgres (shared/src/db.rs): the migrations it runs at start refuse a
//! database that a newer build migrated further; its prepared statements are planned once per
//! connection (`FL_DB_PLAN_CACHE_MODE`), not again on every execution.

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
