//! SPEC S2, agent service statuses (服務狀態) over the real workers: only a ready agent is
//! offered conversations; an away agent (with a reason) and a logged-out one get no offers
//! and keep the conversations they serve, whose customer messages still reach them and
//! which they can still close. Presence messages of version 2 carry the product's names;
//! version 1, from before S2, is still read.

use std::time::Duration;

use crate::helpers::{count, eventually, holds_for, next_matching, TestApp};
use serde_json::json;
use uuid::Uuid;

const SETUP: &str = r#"{"tenants":[{
    "id": "t1", "dispatch_cycle_seconds": 60,
    "channels": [{"id": "mail", "kind": "email", "bot_enabled": false}]
}]}"#;

/// The agent's stored status and reason.
async fn status_of(app: &TestApp, agent: &str) -> (String, Option<String>) {
    let row = app
        .pg
        .query_one(
            "SELECT status, status_reason FROM agents WHERE tenant_id = 't1' AND id = $1",
            &[&agent],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// `agent` accepts the next offer made to them; the conversation's id.
async fn accept_next(app: &TestApp, notify: &mut async_nats::Subscriber, agent: &str) -> Uuid {
    let offer = next_matching(notify, &format!("an offer to {agent}"), |v| {
        v["type"] == "offer"
    })
    .await;
    let conversation: Uuid = offer["conversation_id"].as_str().unwrap().parse().unwrap();
    app.agent_does("t1", agent, "accept", conversation, json!({}))
        .await;
    conversation
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_ready_agents_are_offered_and_away_or_logged_out_keep_what_they_serve() {
    let app = TestApp::spawn(SETUP).await;
    let mut amy = app.client.subscribe("fl.t1.notify.amy").await.unwrap();
    let mut ben = app.client.subscribe("fl.t1.notify.ben").await.unwrap();

    // amy (version 2, the product's names) takes A1, then goes away for a meeting.
    app.presence("t1", "amy", "ready", 5, &[]).await;
    app.customer_says("t1", "mail", "A1", "help").await;
    let a1 = accept_next(&app, &mut amy, "amy").await;
    app.wait_for_state("t1", "mail", "A1", "processing").await;
    let away = json!({"version": 2, "status": "away", "reason": "meeting"}).to_string();
    app.publish_json("fl.t1.presence.amy", None, &away).await;
    eventually("amy away", Duration::from_secs(20), || async {
        (status_of(&app, "amy").await == ("away".into(), Some("meeting".into()))).then_some(())
    })
    .await;

    // ben takes B1, then logs out with a version 1 message (before S2: "offline").
    app.presence("t1", "ben", "ready", 5, &[]).await;
    app.customer_says("t1", "mail", "B1", "help").await;
    let b1 = accept_next(&app, &mut ben, "ben").await;
    app.wait_for_state("t1", "mail", "B1", "processing").await;
    app.presence("t1", "ben", "offline", 5, &[]).await;
    eventually("ben logged out", Duration::from_secs(20), || async {
        (status_of(&app, "ben").await.0 == "logged_out").then_some(())
    })
    .await;

    // A new customer waits: neither the away nor the logged-out agent is offered it, though
    // both have room.
    app.customer_says("t1", "mail", "C1", "anyone?").await;
    app.wait_for_state("t1", "mail", "C1", "waiting").await;
    holds_for(
        "no offer to an agent who is not ready",
        Duration::from_secs(3),
        || async { count(&app.pg, "SELECT count(*) FROM offers", &[]).await == 2 },
    )
    .await;

    // Both keep what they serve: the customers' messages reach them.
    app.customer_says("t1", "mail", "A1", "still there?").await;
    app.customer_says("t1", "mail", "B1", "hello?").await;
    for (agent, text) in [("amy", "still there?"), ("ben", "hello?")] {
        let subject = format!("fl.t1.notify.{agent}");
        let got = eventually(
            &format!("the message kept for {agent}"),
            Duration::from_secs(20),
            || async {
                app.stored("FL_NOTIFY", &subject)
                    .await
                    .into_iter()
                    .find(|n| n["type"] == "customer_message" && n["text"] == text)
            },
        )
        .await;
        assert_eq!(got["type"], "customer_message");
    }
    assert_eq!(
        app.state_of("t1", "mail", "A1").await.as_deref(),
        Some("processing")
    );
    assert_eq!(
        app.state_of("t1", "mail", "B1").await.as_deref(),
        Some("processing")
    );

    // ... and close them, away and logged out.
    app.agent_does("t1", "amy", "close", a1, json!({})).await;
    app.agent_does("t1", "ben", "close", b1, json!({})).await;
    app.wait_for_state("t1", "mail", "A1", "completed").await;
    app.wait_for_state("t1", "mail", "B1", "completed").await;

    // Ready again: amy is offered the waiting customer at once.
    app.presence("t1", "amy", "ready", 5, &[]).await;
    let offer = next_matching(&mut amy, "C1 offered to amy", |v| v["type"] == "offer").await;
    assert_eq!(offer["customer"]["id"], "C1");
    assert_eq!(
        status_of(&app, "amy").await,
        ("ready".into(), None),
        "a reason only when away"
    );
}
