//! SPEC D10 assignment weight (分派權重), against the real workers over NATS and Postgres:
//! the product's 緊急信件轉派 example end to end (an e-mail gateway's message with its headers,
//! a bot flow's condition step setting weight 1000, the dispatcher serving by score), the
//! channel's weight as the default, the old `priority` read as a weight, and the API showing
//! each queued conversation's weight and score.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::helpers::TestApp;
use firstline_tests::wait::eventually;

const SETUP: &str = r#"{"tenants":[{
    "id": "t1", "dispatch_cycle_seconds": 60,
    "channels": [
        {"id": "mail", "kind": "email", "bot_enabled": true},
        {"id": "chat", "bot_enabled": false},
        {"id": "vip", "bot_enabled": false, "weight": 5},
        {"id": "old", "bot_enabled": false, "priority": 10}
    ]
}]}"#;

/// The product's example: mail whose subject or body says urgent or warning gets weight
/// 1000; every mail then goes to an agent.
const BOT: &str = r#"
tenant: t1
channels:
  - id: mail
    welcome_flow: triage
flows:
  - id: triage
    name: 緊急信件轉派
    publish: true
    start: check
    steps:
      check:
        type: condition
        when:
          - {field: subject, match: regex, pattern: 'urgent|warning|緊急'}
          - {field: text, match: regex, pattern: 'urgent|warning|緊急'}
        set_weight: 1000
        then: agent
      agent: {type: handover}
"#;

/// An e-mail as an e-mail gateway publishes it: the body in `text`, the headers in `email`.
async fn mail(app: &TestApp, from: &str, subject: &str, body: &str) {
    let message_id = Uuid::new_v4().to_string();
    let inbound = json!({
        "version": 1,
        "message_id": message_id,
        "customer": {"id": from},
        "text": body,
        "email": {"subject": subject, "from": from, "to": ["support@shop.example"]},
    });
    app.publish_json(
        "fl.t1.inbound.mail",
        Some(&format!("t1:mail:{message_id}")),
        &inbound.to_string(),
    )
    .await;
}

async fn weight_of(app: &TestApp, customer: &str) -> i32 {
    app.pg
        .query_one(
            "SELECT c.weight FROM conversations c JOIN customers cu ON cu.id = c.customer_id
             WHERE cu.external_id = $1 ORDER BY c.created_at DESC LIMIT 1",
            &[&customer],
        )
        .await
        .unwrap()
        .get(0)
}

async fn conversation_of(app: &TestApp, customer: &str) -> Uuid {
    app.pg
        .query_one(
            "SELECT c.id FROM conversations c JOIN customers cu ON cu.id = c.customer_id
             WHERE cu.external_id = $1 ORDER BY c.created_at DESC LIMIT 1",
            &[&customer],
        )
        .await
        .unwrap()
        .get(0)
}

/// SPEC D10, the product's example: urgent mail (weight 1000) queued after ordinary mail is
/// offered first; ordinary mail that has waited more than 1000 times longer still goes before
/// urgent mail. The API returns each queued conversation's weight and score.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_mail_goes_first_unless_ordinary_mail_waited_a_thousand_times_longer() {
    let mut app = TestApp::spawn(SETUP).await;
    app.load_bot(BOT).await.unwrap();
    let api = app.start_api().await;
    let supervisor = app.token("t1", "supervisor", None).await;
    mail(
        &app,
        "ada@example.com",
        "Question about my bill",
        "Why is it higher?",
    )
    .await;
    mail(&app, "bo@example.com", "Delivery", "Where is my parcel?").await;
    mail(
        &app,
        "cy@example.com",
        "URGENT: card stolen",
        "Please block it.",
    )
    .await;
    for c in ["ada@example.com", "bo@example.com", "cy@example.com"] {
        app.wait_for_state("t1", "mail", c, "waiting").await;
    }
    assert_eq!(weight_of(&app, "ada@example.com").await, 1);
    assert_eq!(weight_of(&app, "bo@example.com").await, 1);
    assert_eq!(weight_of(&app, "cy@example.com").await, 1000);
    // Condition on the body too (the flow's second test).
    mail(
        &app,
        "di@example.com",
        "Hello",
        "Warning: someone used my account",
    )
    .await;
    app.wait_for_state("t1", "mail", "di@example.com", "waiting")
        .await;
    assert_eq!(weight_of(&app, "di@example.com").await, 1000);

    // The API: weight and score (weight x seconds waited) of every queued conversation.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let queued = api
        .ok("/api/v1/conversations?state=waiting", &supervisor)
        .await;
    let rows = queued.as_array().unwrap();
    assert_eq!(rows.len(), 4, "{queued}");
    for r in rows {
        let (weight, score) = (r["weight"].as_f64().unwrap(), r["score"].as_f64().unwrap());
        let waited = (chrono::Utc::now()
            - r["queued_at"]
                .as_str()
                .unwrap()
                .parse::<chrono::DateTime<chrono::Utc>>()
                .unwrap())
        .num_milliseconds() as f64
            / 1000.0;
        assert!(
            score > 0.0 && score <= weight * waited + 0.01,
            "score {score} of weight {weight} after {waited} s: {r}"
        );
    }

    // One agent, one place: the urgent mails first, by score (cy waited longer than di).
    app.presence("t1", "amy", "ready", 1, &[]).await;
    app.wait_for_state("t1", "mail", "cy@example.com", "assigning")
        .await;
    for c in ["ada@example.com", "bo@example.com", "di@example.com"] {
        assert_eq!(
            app.state_of("t1", "mail", c).await.as_deref(),
            Some("waiting"),
            "{c}"
        );
    }
    let cy = conversation_of(&app, "cy@example.com").await;
    app.agent_does("t1", "amy", "accept", cy, json!({})).await;
    app.wait_for_state("t1", "mail", "cy@example.com", "processing")
        .await;

    // ada's mail has waited 10,000 s (set in the database: a test cannot wait hours), more
    // than 1000 times di's few seconds: when amy's place frees, ada's goes before di's.
    app.pg
        .execute(
            "UPDATE conversations c SET queued_at = now() - interval '10000 seconds'
               FROM customers cu WHERE cu.id = c.customer_id AND cu.external_id = 'ada@example.com'",
            &[],
        )
        .await
        .unwrap();
    app.agent_does("t1", "amy", "close", cy, json!({})).await;
    app.wait_for_state("t1", "mail", "ada@example.com", "assigning")
        .await;
    assert_eq!(
        app.state_of("t1", "mail", "di@example.com")
            .await
            .as_deref(),
        Some("waiting")
    );
    let ada = conversation_of(&app, "ada@example.com").await;
    app.agent_does("t1", "amy", "accept", ada, json!({})).await;
    app.wait_for_state("t1", "mail", "ada@example.com", "processing")
        .await;
    app.agent_does("t1", "amy", "close", ada, json!({})).await;
    // Then di's (1000 x its wait) before bo's (1 x a few seconds more).
    app.wait_for_state("t1", "mail", "di@example.com", "assigning")
        .await;
    assert_eq!(
        app.state_of("t1", "mail", "bo@example.com")
            .await
            .as_deref(),
        Some("waiting")
    );
}

/// SPEC D10: a channel's weight is the default of its conversations (`vip`, weight 5, goes
/// before `chat` once its score passes: 5 x 1.5 s against about 2 s); the first version's
/// `priority` is read as weight `priority + 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channels_weight_is_the_default_and_the_old_priority_becomes_one() {
    let app = TestApp::spawn(SETUP).await;
    let channel_weight = |id: &'static str| {
        let pg = &app.pg;
        async move {
            pg.query_one("SELECT weight FROM channels WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get::<_, i32>(0)
        }
    };
    assert_eq!(channel_weight("chat").await, 1);
    assert_eq!(channel_weight("vip").await, 5);
    assert_eq!(channel_weight("old").await, 11, "priority 10 -> weight 11");

    app.customer_says("t1", "chat", "C1", "hello").await;
    app.wait_for_state("t1", "chat", "C1", "waiting").await;
    app.customer_says("t1", "vip", "V1", "hello").await;
    app.wait_for_state("t1", "vip", "V1", "waiting").await;
    assert_eq!(weight_of(&app, "C1").await, 1);
    assert_eq!(weight_of(&app, "V1").await, 5);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.presence("t1", "amy", "ready", 1, &[]).await;
    app.wait_for_state("t1", "vip", "V1", "assigning").await;
    assert_eq!(
        app.state_of("t1", "chat", "C1").await.as_deref(),
        Some("waiting")
    );
    // Equal weights: first come, first served (SPEC D5).
    app.customer_says("t1", "chat", "C2", "hello").await;
    app.wait_for_state("t1", "chat", "C2", "waiting").await;
    let v1 = conversation_of(&app, "V1").await;
    app.agent_does("t1", "amy", "decline", v1, json!({})).await;
    eventually("C1 offered before C2", Duration::from_secs(20), || async {
        (app.state_of("t1", "chat", "C1").await.as_deref() == Some("assigning")).then_some(())
    })
    .await;
    assert_eq!(
        app.state_of("t1", "chat", "C2").await.as_deref(),
        Some("waiting")
    );
}
