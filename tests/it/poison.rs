//! What can never be handled, whatever a publisher sends: subjects with literal wildcard
//! tokens, NUL characters, values the database refuses. Each is dead-lettered at once with
//! the reason, nothing the streams accept vanishes, and the channel flows on.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{count, eventually, next_matching, TestApp};
use crate::pipeline::SETUP;

fn inbound(message_id: &str, customer: &str, text: &str) -> String {
    json!({"version": 1, "message_id": message_id, "customer": {"id": customer}, "text": text})
        .to_string()
}

/// The dead letters stored so far, by the subject of their message.
async fn letters_of(app: &TestApp, subject: &str) -> Vec<Value> {
    app.stored("FL_DEADLETTER", "fl.*.deadletter.*")
        .await
        .into_iter()
        .filter(|l| l["subject"] == subject)
        .collect()
}

/// A publisher may choose any token: one the partitioned streams store untransformed (a
/// literal `*` or `>`) is taken by no partition's consumer, so it is found and dead-lettered,
/// and removed; the other streams' consumers take it and dead-letter it themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn literal_wildcard_subjects_are_dead_lettered_not_lost() {
    let app = TestApp::spawn(SETUP).await;
    let body = inbound("m1", "U1", "hi");
    let subjects = [
        "fl.t1.inbound.*",
        "fl.t1.inbound.>",
        "fl.t1.bot.*",
        "fl.t1.bot.>",
        "fl.t1.presence.*",
        "fl.t1.presence.>",
        "fl.t1.agent.*.action",
        "fl.t1.agent.>.action",
    ];
    for subject in subjects {
        app.publish_json(subject, None, &body).await;
    }
    // A second on the same subject: every message is dead-lettered, not one per subject.
    app.publish_json("fl.t1.inbound.>", None, &inbound("m2", "U1", "again"))
        .await;
    app.customer_says("t1", "line", "U5", "good message").await;
    app.wait_for_state("t1", "line", "U5", "bot").await;

    for subject in subjects {
        let letters = eventually(
            &format!("the dead letter of {subject}"),
            Duration::from_secs(20),
            || async {
                let l = letters_of(&app, subject).await;
                (!l.is_empty()).then_some(l)
            },
        )
        .await;
        let letter = letters
            .iter()
            .find(|l| l["payload"].as_str().unwrap().contains("\"m1\""))
            .unwrap_or_else(|| panic!("{letters:?}"));
        let reason = letter["reason"].as_str().unwrap();
        assert!(
            reason.contains(subject) || reason.contains("invalid"),
            "{letter}"
        );
    }
    eventually(
        "both letters of fl.t1.inbound.>",
        Duration::from_secs(20),
        || async { (letters_of(&app, "fl.t1.inbound.>").await.len() == 2).then_some(()) },
    )
    .await;
    // Dead-lettered strays leave the stream: nothing stays stored that nobody takes.
    for (stream, pattern) in [("FL_INBOUND", "fl.*.inbound.*"), ("FL_BOT", "fl.*.bot.*")] {
        let stream = app.js.get_stream(stream).await.unwrap();
        let left: Vec<_> = stream
            .info_with_subjects(pattern)
            .await
            .unwrap()
            .collect()
            .await;
        assert!(left.is_empty(), "{pattern}: {left:?}");
    }
    assert_eq!(
        count(
            &app.pg,
            "SELECT count(*) FROM messages WHERE author = 'customer'",
            &[]
        )
        .await,
        1
    );
}

/// The dead letter of `subject` whose payload contains `marker`.
async fn letter_with(app: &TestApp, subject: &str, marker: &str) -> Value {
    eventually(
        &format!("the dead letter of {marker} on {subject}"),
        Duration::from_secs(20),
        || async {
            app.stored("FL_DEADLETTER", "fl.*.deadletter.*")
                .await
                .into_iter()
                .find(|l| {
                    l["subject"].as_str().unwrap().starts_with(subject)
                        && l["payload"].as_str().unwrap().contains(marker)
                })
        },
    )
    .await
}

/// A NUL character can never be stored: a customer's message, an agent's reply or a presence
/// reason holding one is dead-lettered at once (no retries) naming the field, and the
/// customer's next message right behind it is handled without waiting for retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_is_dead_lettered_at_once_naming_the_field() {
    let app =
        TestApp::spawn_configured(firstline_tests::nats::TestNats::start().await, SETUP, |c| {
            c.max_deliver = 20
        })
        .await;
    let started = Instant::now();
    app.publish_json(
        "fl.t1.inbound.line",
        None,
        &inbound("nul-1", "U1", "a\u{0}b"),
    )
    .await;
    app.customer_says("t1", "line", "U1", "right behind it")
        .await;
    app.wait_for_state("t1", "line", "U1", "bot").await;
    let letter = letter_with(&app, "fl.t1.inbound.line", "nul-1").await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let reason = letter["reason"].as_str().unwrap();
    assert!(
        reason.contains("field `text`") && reason.contains("NUL"),
        "{letter}"
    );
    assert_eq!(letter["deliveries"], 1, "{letter}");

    // A presence reason.
    app.publish_json(
        "fl.t1.presence.amy",
        None,
        &json!({"version": 1, "status": "not_ready", "reason": "lunch\u{0}"}).to_string(),
    )
    .await;
    let letter = letter_with(&app, "fl.t1.presence.amy", "lunch").await;
    assert!(
        letter["reason"]
            .as_str()
            .unwrap()
            .contains("field `reason`"),
        "{letter}"
    );
    assert_eq!(letter["deliveries"], 1, "{letter}");

    // An agent's reply in a conversation she serves.
    let conversation = served_by_amy(&app, "U2").await;
    app.agent_does(
        "t1",
        "amy",
        "reply",
        conversation,
        json!({"text": "x\u{0}y"}),
    )
    .await;
    let letter = letter_with(&app, "fl.t1.agent.amy.action", "x\\u0000y").await;
    assert!(
        letter["reason"].as_str().unwrap().contains("field `text`"),
        "{letter}"
    );
    assert_eq!(letter["deliveries"], 1, "{letter}");
}

/// A conversation of `customer` on `mail`, accepted by amy.
async fn served_by_amy(app: &TestApp, customer: &str) -> Uuid {
    let mut notify = app.client.subscribe("fl.t1.notify.amy").await.unwrap();
    app.presence("t1", "amy", "ready", 5, &[]).await;
    app.customer_says("t1", "mail", customer, "help").await;
    let offer = next_matching(&mut notify, "the offer", |v| v["type"] == "offer").await;
    let conversation: Uuid = offer["conversation_id"].as_str().unwrap().parse().unwrap();
    app.agent_does("t1", "amy", "accept", conversation, json!({}))
        .await;
    app.wait_for_state("t1", "mail", customer, "processing")
        .await;
    conversation
}

/// A message the workers build can outgrow the server's `max_payload` although what it was
/// built from fit (an agent's reply as large as an action may be, to a customer with a long
/// id): it never goes out, so it is dead-lettered (cut to fit, saying how large it was)
/// rather than kept in the outbox and tried again forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_to_publish_is_dead_lettered_not_retried_forever() {
    let app = TestApp::spawn(SETUP).await;
    let customer = format!("U{}", "u".repeat(2000));
    let conversation = served_by_amy(&app, &customer).await;
    let max = app.client.server_info().max_payload;
    let action_overhead = json!({
        "version": 1, "action_id": Uuid::nil(), "type": "reply",
        "conversation_id": conversation, "text": "",
    })
    .to_string()
    .len();
    // The action fits, with room for its headers; its delivery to the customer (staged by
    // the dispatcher, for the notifier), which also names the customer, does not.
    let text = "x".repeat(max - action_overhead - 200);
    app.agent_does("t1", "amy", "reply", conversation, json!({ "text": text }))
        .await;
    let letter = eventually(
        "the outbox's dead letter",
        Duration::from_secs(20),
        || async {
            app.stored("FL_DEADLETTER", "fl.t1.deadletter.outbox")
                .await
                .into_iter()
                .next()
        },
    )
    .await;
    assert_eq!(letter["subject"], "fl.t1.delivery.customer");
    assert!(
        letter["reason"].as_str().unwrap().contains("max payload"),
        "{}",
        letter["reason"]
    );
    let size = letter["payload_bytes"]
        .as_u64()
        .expect("cut, with its size");
    assert!(size as usize > max, "{size}");
    // What is left of it cannot be replayed: it would be another message.
    let filter = firstline::dead_letters::Filter {
        tenant: Some("t1".into()),
        stream: Some("outbox".into()),
    };
    let listed = firstline::dead_letters::list(&app.js, &filter, 10)
        .await
        .unwrap();
    let refused = firstline::dead_letters::replay(&app.js, &[listed[0].0])
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("cannot be replayed"),
        "{refused}"
    );
    eventually("the outbox emptied", Duration::from_secs(20), || async {
        (count(&app.pg, "SELECT count(*) FROM outbox", &[]).await == 0).then_some(())
    })
    .await;
}

/// A value the database refuses for what it is (SQLSTATE class 22 or 54: here a customer id
/// too large for its index) is poison: dead-lettered on its first try with the database's
/// reason, not retried to the end while the partition waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_database_refuses_is_dead_lettered_on_the_first_try() {
    let app =
        TestApp::spawn_configured(firstline_tests::nats::TestNats::start().await, SETUP, |c| {
            c.max_deliver = 20
        })
        .await;
    // Incompressible, so that the index entry stays beyond a btree page's third.
    let huge_id: String = (0..3000)
        .map(|_| Uuid::new_v4().simple().to_string())
        .collect();
    app.publish_json(
        "fl.t1.inbound.line",
        None,
        &inbound("big-id", &huge_id, "hi"),
    )
    .await;
    app.customer_says("t1", "line", "U1", "right behind it")
        .await;
    app.wait_for_state("t1", "line", "U1", "bot").await;
    let letter = letter_with(&app, "fl.t1.inbound.line", "big-id").await;
    let reason = letter["reason"].as_str().unwrap();
    assert!(reason.contains("SQLSTATE 54000"), "{reason}");
    assert_eq!(letter["deliveries"], 1, "{letter}");
}
