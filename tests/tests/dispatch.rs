//! Dispatch behaviour over the real workers: decline and the dispatch cycle (SPEC D8), and
//! the outbox that keeps decided messages across a crash.

use std::time::Duration;

use firstline_tests::{count, eventually, next_matching, TestApp};
use serde_json::json;
use uuid::Uuid;

const SETUP: &str = r#"{"tenants":[{
    "id": "t1", "dispatch_cycle_seconds": 5,
    "channels": [{"id": "mail", "kind": "email", "bot_enabled": false}]
}]}"#;

async fn open_offer_agent(app: &TestApp, conversation: Uuid) -> Option<String> {
    app.pg
        .query_opt(
            "SELECT agent_id FROM offers WHERE conversation_id = $1 AND status = 'open'",
            &[&conversation],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// README decision: a decline re-dispatches at once, never to the agent who declined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_offer_goes_to_another_agent_and_never_back() {
    let app = TestApp::spawn(SETUP).await;
    let mut events = app
        .client
        .subscribe("fl.t1.events.conversation")
        .await
        .unwrap();
    app.presence("t1", "amy", "ready", 5, &[]).await;
    app.customer_says("t1", "mail", "D1", "help").await;
    let offered = next_matching(&mut events, "the offer", |v| v["to"] == "assigning").await;
    let conversation: Uuid = offered["conversation_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(offered["agent_id"], "amy");

    // amy declines while nobody else is ready: back to waiting, not re-offered to amy.
    app.agent_does(
        "t1",
        "amy",
        "decline",
        conversation,
        json!({"reason": "busy"}),
    )
    .await;
    let back = next_matching(&mut events, "back to waiting", |v| v["to"] == "waiting").await;
    assert_eq!(back["reason"], "declined");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(open_offer_agent(&app, conversation).await, None);
    assert_eq!(
        app.state_of("t1", "mail", "D1").await.as_deref(),
        Some("waiting")
    );

    // ben comes: he gets it at once.
    app.presence("t1", "ben", "ready", 5, &[]).await;
    let again = next_matching(&mut events, "the second offer", |v| v["to"] == "assigning").await;
    assert_eq!(again["agent_id"], "ben");
    // The queue position is kept: queued_at did not move.
    let (queued, first_queued): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) = {
        let r = app
            .pg
            .query_one(
                "SELECT c.queued_at, (SELECT min(at) FROM conversation_transitions t WHERE t.conversation_id = c.id AND t.to_state = 'waiting')
                 FROM conversations c WHERE c.id = $1",
                &[&conversation],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(queued, first_queued);
}

/// SPEC D8: an offer not accepted within the dispatch cycle is revoked and re-dispatched to
/// another suitable agent; D7: with nobody else, it stays `assigning`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_not_accepted_within_the_cycle_is_redispatched() {
    let app = TestApp::spawn(SETUP).await;
    let mut amy = app.client.subscribe("fl.t1.notify.amy").await.unwrap();
    app.presence("t1", "amy", "ready", 5, &[]).await;
    app.customer_says("t1", "mail", "E1", "help").await;
    let offer = next_matching(&mut amy, "the offer", |v| v["type"] == "offer").await;
    let conversation: Uuid = offer["conversation_id"].as_str().unwrap().parse().unwrap();

    // D7: amy goes not ready, nobody else is online: the conversation stays assigning.
    app.presence("t1", "amy", "not_ready", 5, &[]).await;
    // D8: at the deadline (5 s) the offer is revoked, by the timer, not by a new event.
    let revoked = next_matching(&mut amy, "the revocation", |v| v["type"] == "offer_revoked").await;
    assert_eq!(revoked["offer_id"], offer["offer_id"]);
    assert_eq!(open_offer_agent(&app, conversation).await, None);
    assert_eq!(
        app.state_of("t1", "mail", "E1").await.as_deref(),
        Some("assigning")
    );

    // An agent comes online who can take it: it is re-offered to them.
    app.presence("t1", "ben", "ready", 5, &[]).await;
    eventually("re-offered to ben", Duration::from_secs(20), || async {
        (open_offer_agent(&app, conversation).await.as_deref() == Some("ben")).then_some(())
    })
    .await;
    let history = count(
        &app.pg,
        "SELECT count(*) FROM offers WHERE conversation_id = $1",
        &[&conversation],
    )
    .await;
    assert_eq!(history, 2, "one expired offer to amy, one open to ben");
}

/// A decided message whose publish never happened (the process died after the commit) is
/// published by the outbox sweeper of any running worker, with its fixed Nats-Msg-Id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_publishes_what_a_crashed_process_left_behind() {
    let app = TestApp::spawn(SETUP).await;
    let mut sub = app
        .client
        .subscribe("fl.t1.events.conversation")
        .await
        .unwrap();
    let payload = json!({"left": "behind"}).to_string();
    app.pg
        .execute(
            "INSERT INTO outbox (subject, msg_id, payload, created_at) VALUES ($1, 'crash-1', $2, now() - interval '1 minute')",
            &[&"fl.t1.events.conversation", &payload.as_bytes()],
        )
        .await
        .unwrap();
    let got = firstline_tests::next_json(&mut sub, "the swept message").await;
    assert_eq!(got, json!({"left": "behind"}));
    eventually("the row removed", Duration::from_secs(10), || async {
        (count(
            &app.pg,
            "SELECT count(*) FROM outbox WHERE msg_id = 'crash-1'",
            &[],
        )
        .await
            == 0)
            .then_some(())
    })
    .await;
}
