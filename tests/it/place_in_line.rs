//! The customer's place in line over the real workers (README decision: how a customer is
//! told their place in the queue): when queued (no bot, or the bot's hand-over) and when they
//! ask (the tenant's keywords), the customer gets an outbound bot message with their place
//! and a wait estimated from the recent service rate of their skills. Here the rate is known:
//! 30 accepts in the last 15 minutes, 2 a minute, so place n waits about n/2 minutes.

use std::time::Duration;

use crate::helpers::{count, holds_for, next_matching, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

const SETUP: &str = r#"{"tenants":[{"id": "acme",
   "handover_keywords": ["轉真人"], "handover_reply": "正在為您轉接專員。",
   "channels": [{"id": "mail", "kind": "email", "bot_enabled": false},
                {"id": "line", "kind": "line", "bot_enabled": true},
                {"id": "vip", "kind": "webchat", "bot_enabled": false, "required_skills": ["vip"]}],
   "agents": [{"id": "amy", "name": "Amy", "capacity": 1}]}]}"#;

/// The next outbound message to `customer` on the subscription.
async fn told(out: &mut async_nats::Subscriber, customer: &str) -> Value {
    next_matching(out, &format!("a message to {customer}"), |v| {
        v["customer_id"] == customer
    })
    .await
}

fn said(place: u64, minutes: u64) -> String {
    format!("您目前排在第 {place} 位，預計約 {minutes} 分鐘後由專員為您服務。You are number {place} in line; an agent should be with you in about {minutes} min.")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_are_told_their_place_and_wait_when_queued_and_when_they_ask() {
    let app = TestApp::spawn(SETUP).await;
    // A known service rate for conversations without required skills: an accept every 30 s
    // over the last 15 minutes.
    app.pg
        .execute(
            "WITH c AS (INSERT INTO customers (id, tenant_id, channel_id, external_id)
                        SELECT gen_random_uuid(), 'acme', 'mail', 'history-' || n FROM generate_series(0, 29) n
                        RETURNING id, external_id)
             INSERT INTO conversations (id, tenant_id, channel_id, customer_id, state, agent_id,
                                        created_at, queued_at, accepted_at, processing_at, completed_at)
             SELECT gen_random_uuid(), 'acme', 'mail', c.id, 'completed', 'amy', at - interval '10 s',
                    at - interval '10 s', at, at, at + interval '1 s'
               FROM (SELECT id, now() - make_interval(secs => 30 * substr(external_id, 9)::int + 15) AS at
                       FROM c) c",
            &[],
        )
        .await
        .unwrap();
    let mut mail = app.client.subscribe("fl.acme.outbound.mail").await.unwrap();
    let mut line = app.client.subscribe("fl.acme.outbound.line").await.unwrap();
    let mut vip = app.client.subscribe("fl.acme.outbound.vip").await.unwrap();

    // Queued from a channel without a bot: place n, n x 30 s rounded up to minutes.
    for (n, minutes) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)] {
        let customer = format!("W{n}");
        app.customer_says("acme", "mail", &customer, "hello").await;
        let m = told(&mut mail, &customer).await;
        assert_eq!(m["author"], "bot");
        assert_eq!(m["text"], said(n, minutes), "{customer}");
    }

    // Asked with a keyword, anywhere in the message: told again. Another message: nothing.
    app.customer_says("acme", "mail", "W5", "請問我排第幾？")
        .await;
    assert_eq!(told(&mut mail, "W5").await["text"], said(5, 3));
    app.customer_says("acme", "mail", "W5", "my order is A123")
        .await;
    holds_for(
        "no answer to an ordinary message",
        Duration::from_secs(2),
        || async {
            count(
                &app.pg,
                "SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id
             JOIN customers cu ON cu.id = c.customer_id
             WHERE cu.external_id = 'W5' AND m.author = 'bot'",
                &[],
            )
            .await
                == 2
        },
    )
    .await;

    // The place moves up as the queue is served: W1 offered (still ahead of W2), then
    // accepted (W2 first in line).
    let mut notify = app.client.subscribe("fl.acme.notify.amy").await.unwrap();
    app.presence("acme", "amy", "ready", 1, &[]).await;
    let offer = next_matching(&mut notify, "W1 offered", |v| v["type"] == "offer").await;
    assert_eq!(offer["customer"]["id"], "W1");
    app.wait_for_state("acme", "mail", "W1", "assigning").await;
    app.customer_says("acme", "mail", "W2", "還要等多久").await;
    assert_eq!(told(&mut mail, "W2").await["text"], said(2, 1));
    let w1: Uuid = offer["conversation_id"].as_str().unwrap().parse().unwrap();
    app.agent_does("acme", "amy", "accept", w1, json!({})).await;
    app.wait_for_state("acme", "mail", "W1", "processing").await;
    app.customer_says("acme", "mail", "W2", "HOW LONG?").await;
    assert_eq!(told(&mut mail, "W2").await["text"], said(1, 1));

    // Handed over by the bot: the hand-over reply, then the place (behind W2..W5).
    app.customer_says("acme", "line", "L1", "轉真人").await;
    assert_eq!(told(&mut line, "L1").await["text"], "正在為您轉接專員。");
    assert_eq!(told(&mut line, "L1").await["text"], said(5, 3));

    // Skills nobody has served lately: no estimate, the other text.
    app.customer_says("acme", "vip", "V1", "hello").await;
    assert_eq!(
        told(&mut vip, "V1").await["text"],
        "您目前排在第 1 位，專員將盡快為您服務。You are number 1 in line; an agent will be with you as soon as possible."
    );
}
