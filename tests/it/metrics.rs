//! The Prometheus endpoint: after a conversation is offered and accepted and a bad message is
//! dead-lettered, `/metrics` reports them (and how ingest's batches were handled).

use std::time::Duration;

use crate::helpers::{next_matching, TestApp};
use firstline_tests::metrics::{scrape, value};
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_reports_messages_offers_latencies_and_dead_letters() {
    let addr: std::net::SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    firstline_shared::metrics::serve(addr).unwrap();
    let app = TestApp::spawn(
        r#"{"tenants":[{"id":"t1","channels":[{"id":"mail","bot_enabled":false}]}]}"#,
    )
    .await;
    let mut amy = app.client.subscribe("fl.t1.notify.amy").await.unwrap();
    app.presence("t1", "amy", "ready", 5, &[]).await;
    app.customer_says("t1", "mail", "M1", "help").await;
    let offer = next_matching(&mut amy, "the offer", |v| v["type"] == "offer").await;
    let conversation: Uuid = offer["conversation_id"].as_str().unwrap().parse().unwrap();
    app.agent_does("t1", "amy", "accept", conversation, json!({}))
        .await;
    app.wait_for_state("t1", "mail", "M1", "processing").await;
    app.publish_json("fl.t1.inbound.mail", None, "{not json")
        .await;

    let series = [
        r#"fl_messages_total{consumer="ingest-p"#,
        r#"fl_dead_letters_total{stream="FL_INBOUND",consumer="ingest-p"#,
        r#"fl_dead_letters_total{stream="FL_INBOUND""#,
        r#"fl_offers_total{tenant="t1"}"#,
        r#"fl_enqueue_to_offer_seconds_count{tenant="t1"}"#,
        r#"fl_offer_to_accept_seconds_count{tenant="t1"}"#,
        r#"fl_consumer_pending{consumer="ingest-p"#,
        r#"fl_conversations{tenant="t1",state="processing"}"#,
        // Ingest's batches: side by side, and one at a time for the one with the bad message.
        r#"fl_batches_total{consumer="ingest",path="lanes"}"#,
        r#"fl_batches_total{consumer="ingest",path="one_by_one"}"#,
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        let body = scrape(addr).await;
        let missing: Vec<_> = series
            .iter()
            .filter(|s| value(&body, s).is_none())
            .collect();
        if missing.is_empty() {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing {missing:?} in:\n{body}"
        );
        // The poll interval of this wait, which reports the series still missing.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(value(&body, r#"fl_offers_total{tenant="t1"}"#), Some(1.0));
    assert_eq!(
        value(&body, r#"fl_dead_letters_total{stream="FL_INBOUND""#),
        Some(1.0)
    );
    assert_eq!(
        value(&body, r#"fl_offer_to_accept_seconds_count{tenant="t1"}"#),
        Some(1.0)
    );
    assert!(value(&body, r#"fl_messages_total{consumer="ingest-p"#).unwrap() >= 1.0);
}
