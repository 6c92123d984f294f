//! Group commit (shared/src/partitions/combine.rs, shared/src/batch): the batches of several
//! partitions in one transaction, each partition's mark checked and moved in it; a batch that
//! cannot commit whole is split by partition, so one partition's poison message or moved
//! mark costs the others nothing.

use std::sync::Arc;
use std::time::Duration;

use firstline_shared::batch;
use firstline_shared::bus::{Delivered, Partition};
use firstline_shared::worker::Services;
use firstline_shared::HandleError;

use crate::helpers::{count, wait_for_count, TestApp};
use crate::load::{start_ingest, texts_in_order};

const SETUP: &str = r#"{"tenants":[{"id":"t1","channels":[{"id":"mail","bot_enabled":false}]}]}"#;

fn partition(name: &'static str, mark: u64) -> Arc<Partition> {
    Arc::new(Partition {
        consumer: name,
        stream: "FL_INBOUND",
        filter: format!("fl.*.inbound.*.{name}"),
        mark: mark.into(),
    })
}

/// Messages at `sequences` of each partition, the partitions' batches one after the other.
fn combined(parts: &[(&Arc<Partition>, &[u64])]) -> Vec<Delivered> {
    parts
        .iter()
        .flat_map(|(p, sequences)| {
            sequences.iter().map(|&s| Delivered {
                subject: format!("fl.t1.inbound.mail.{}", p.consumer),
                payload: Default::default(),
                headers: None,
                stream_sequence: s,
                delivered: 1,
                published: chrono::Utc::now(),
                partition: Some((*p).clone()),
            })
        })
        .collect()
}

/// Runs `batch` as the workers do; a message at `poison` (partition, sequence) is poison.
/// Returns, per message, "ok", "fenced" or "poison", and what each transaction committed
/// (the `handled` rows grouped by transaction).
async fn run(
    services: &Services,
    pg: &tokio_postgres::Client,
    batch: &[Delivered],
    poison: Option<(&'static str, u64)>,
) -> (Vec<&'static str>, Vec<Vec<String>>) {
    pg.batch_execute("DELETE FROM handled").await.unwrap();
    let (results, _) = batch::in_one_transaction(
        services,
        "ingest",
        batch,
        &(),
        |m| Some(m.subject.clone()),
        |_, tx, _, m| {
            Box::pin(async move {
                let p = m.partition.as_ref().unwrap().consumer;
                if Some((p, m.stream_sequence)) == poison {
                    return Err(HandleError::poison("bad"));
                }
                tx.execute(
                    "INSERT INTO handled VALUES ($1)",
                    &[&format!("{p}:{}", m.stream_sequence)],
                )
                .await?;
                Ok(Some(()))
            })
        },
    )
    .await;
    let outcomes = results
        .iter()
        .map(|r| match r {
            Ok(()) => "ok",
            Err(e) if e.waits_for().is_some() => "fenced",
            Err(_) => "poison",
        })
        .collect();
    let transactions = pg
        .query(
            "SELECT array_agg(what ORDER BY what) FROM handled GROUP BY xmin::text ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    (outcomes, transactions)
}

async fn marks(pg: &tokio_postgres::Client) -> Vec<(String, i64)> {
    pg.query(
        "SELECT consumer, stream_sequence FROM partition_marks WHERE consumer LIKE 'gc-%' ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_partitions_commit_in_one_transaction_and_split_when_one_cannot() {
    let app = TestApp::without_workers(SETUP).await;
    let services = Services::start(&app.config, &app.shutdown).await.unwrap();
    app.pg
        .batch_execute(
            "INSERT INTO partition_marks (consumer, stream_sequence) VALUES ('gc-a', 0), ('gc-b', 0), ('gc-c', 0);
             CREATE TABLE handled (what text NOT NULL)",
        )
        .await
        .unwrap();
    let (a, b, c) = (
        partition("gc-a", 0),
        partition("gc-b", 0),
        partition("gc-c", 0),
    );

    // Three partitions' batches: one transaction, every mark moved over its own messages.
    let batch = combined(&[(&b, &[1, 2]), (&a, &[5]), (&c, &[7, 9])]);
    let (outcomes, transactions) = run(&services, &app.pg, &batch, None).await;
    assert_eq!(outcomes, vec!["ok"; 5]);
    assert_eq!(
        transactions,
        vec![strings(&["gc-a:5", "gc-b:1", "gc-b:2", "gc-c:7", "gc-c:9"])]
    );
    let want =
        |x: i64, y: i64, z: i64| vec![("gc-a".into(), x), ("gc-b".into(), y), ("gc-c".into(), z)];
    assert_eq!(marks(&app.pg).await, want(5, 2, 9));
    assert_eq!((a.mark(), b.mark(), c.mark()), (5, 2, 9));

    // A poison message of one partition: split; it alone is refused, its mark stops before
    // it, the other partitions' messages are all kept (each partition its own transaction).
    let batch = combined(&[(&a, &[6, 8]), (&b, &[3, 4])]);
    let (outcomes, transactions) = run(&services, &app.pg, &batch, Some(("gc-a", 6))).await;
    assert_eq!(outcomes, vec!["poison", "ok", "ok", "ok"]);
    assert_eq!(
        transactions,
        vec![strings(&["gc-a:8"]), strings(&["gc-b:3", "gc-b:4"])]
    );
    assert_eq!(marks(&app.pg).await, want(5, 4, 9));

    // Another reader moved one partition's mark: that partition's messages are fenced, the
    // others' committed.
    app.pg
        .batch_execute("UPDATE partition_marks SET stream_sequence = 12 WHERE consumer = 'gc-c'")
        .await
        .unwrap();
    let batch = combined(&[(&c, &[10, 11]), (&b, &[5])]);
    let (outcomes, transactions) = run(&services, &app.pg, &batch, None).await;
    assert_eq!(outcomes, vec!["fenced", "fenced", "ok"]);
    assert_eq!(transactions, vec![strings(&["gc-b:5"])]);
    assert_eq!(marks(&app.pg).await, want(5, 5, 12));
}

/// The real ingest over a keyed backlog: with one transaction at a time, the batches of the
/// partitions that are ready while it runs share the next one, so the backlog takes fewer
/// transactions than it has partitions; every customer's messages still in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_commits_the_batches_of_many_partitions_together() {
    let mut app = TestApp::without_workers(SETUP).await;
    app.config.partition_transactions = 1;
    for i in 0..10 {
        for c in 0..16 {
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
    let partitions = count(
        &app.pg,
        "SELECT count(*) FROM partition_marks WHERE consumer LIKE 'ingest-k%' AND stream_sequence > 0",
        &[],
    )
    .await;
    let transactions = count(
        &app.pg,
        "SELECT count(DISTINCT xmin::text) FROM messages WHERE author = 'customer'",
        &[],
    )
    .await;
    assert!(partitions >= 6, "16 customers in {partitions} partitions");
    assert!(
        transactions < partitions,
        "{partitions} partitions' backlog in {transactions} transactions: not combined"
    );
    for c in 0..16 {
        let texts = texts_in_order(&app, &format!("U{c}")).await;
        let expected: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        assert_eq!(texts, expected, "customer U{c} in order");
    }
}
