//! The JetStream helpers against a real server.

use std::time::Duration;

use crate::helpers::TestNats;
use firstline_shared::bus::{self, Outgoing};

/// More messages than the client's 5,000 in-flight publish permits: sending them all before
/// reading any ack would wait forever. They are all stored, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_all_stores_a_batch_larger_than_the_clients_inflight_limit() {
    let nats = TestNats::start().await;
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    bus::ensure_streams(&js).await.unwrap();
    let messages: Vec<Outgoing> = (0..12_000)
        .map(|i| Outgoing {
            subject: "fl.t1.events.conversation".into(),
            msg_id: format!("m{i}"),
            headers: Default::default(),
            payload: format!("{{\"n\":{i}}}").into(),
        })
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(60), bus::publish_all(&js, &messages))
        .await
        .expect("publish_all finishes");
    assert!(results.iter().all(Result::is_ok));
    // Published again with the same ids: deduplicated by the stream.
    let again = bus::publish_all(&js, &messages[..100]).await;
    assert!(again.iter().all(Result::is_ok));
    let mut stream = js.get_stream("FL_EVENTS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 12_000);
}

/// `FL_NATS_URL` may name several servers, comma-separated (a cluster's nodes): the workers'
/// connect takes the list, and reaches a live node when another in the list is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_url_takes_a_comma_separated_list_of_servers() {
    let nats = TestNats::start().await;
    let down = firstline_tests::nats::free_port();
    let list = format!("nats://127.0.0.1:{down}, {}", nats.url);
    let config = firstline_shared::config::CommonConfig::new(list, "postgres://127.0.0.1/unused");
    let client = tokio::time::timeout(Duration::from_secs(30), bus::connect(&config))
        .await
        .expect("connected within 30 s")
        .expect("a list of servers is accepted");
    let js = async_nats::jetstream::new(client);
    bus::ensure_streams(&js).await.unwrap();
    bus::publish(
        &js,
        "fl.t1.events.conversation".into(),
        "list-1",
        Default::default(),
        "{}".into(),
    )
    .await
    .expect("published through the live node");
}
