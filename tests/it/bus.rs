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

/// When a stream's leader dies, the acks of everything sent to it are lost at once: a window
/// of publishes whose acks do not come costs one ack timeout (5 s, the client's), not one per
/// message in turn. A responder stands in for a stream whose first acks are lost: it stays
/// silent on a message id's first publish and acknowledges it when it comes again, as a new
/// leader would. Ten messages: about 5 s (one timeout, then every retry answered at once),
/// where awaiting the acks one after the other took 50 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_lost_together_cost_one_ack_timeout() {
    use futures::StreamExt;
    let nats = TestNats::start().await;
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut requests = client.subscribe("lost.acks").await.unwrap();
    let responder = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut seq = 0u64;
            while let Some(m) = requests.next().await {
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                if seen.insert(id) {
                    continue; // the first ack is lost
                }
                seq += 1;
                let ack = format!("{{\"stream\":\"LOST\",\"seq\":{seq}}}");
                if let Some(reply) = m.reply {
                    client.publish(reply, ack.into()).await.unwrap();
                }
            }
        })
    };
    let js = async_nats::jetstream::new(client);
    let messages: Vec<Outgoing> = (0..10)
        .map(|i| Outgoing {
            subject: "lost.acks".into(),
            msg_id: format!("m{i}"),
            headers: Default::default(),
            payload: format!("{{\"n\":{i}}}").into(),
        })
        .collect();
    let started = std::time::Instant::now();
    let results = tokio::time::timeout(Duration::from_secs(120), bus::publish_all(&js, &messages))
        .await
        .expect("publish_all finishes");
    let took = started.elapsed();
    responder.abort();
    assert!(
        results.iter().all(Result::is_ok),
        "every message acknowledged on its retry"
    );
    println!("ten lost acks cost {took:?}");
    assert!(
        took < Duration::from_secs(20),
        "ten lost acks cost {took:?}: one ack timeout is 5 s, ten in turn 50 s"
    );
}
