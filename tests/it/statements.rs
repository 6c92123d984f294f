//! How the workers' connections talk to Postgres (shared/src/db.rs): their prepared statements
//! are planned once per connection (`FL_DB_PLAN_CACHE_MODE`), not again on every execution.

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
