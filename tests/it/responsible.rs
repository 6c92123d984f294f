//! SPEC D11 responsible agent (負責專員, 客戶分派), against the real workers over NATS and
//! Postgres, set through the API: the responsible agent is offered their customer's
//! conversation first, anyone suitable after one unaccepted dispatch cycle or when the
//! responsible agent is not ready; customers dealt out like cards; and, with the tenant's
//! setting, the last agent who served the customer counts as responsible.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::api::refused;
use crate::helpers::TestApp;
use firstline_tests::wait::eventually;

const SETUP: &str = r#"{"tenants":[{
    "id": "t1", "dispatch_cycle_seconds": 5,
    "channels": [{"id": "chat", "bot_enabled": false}],
    "agents": [{"id": "amy", "capacity": 5}, {"id": "ben", "capacity": 5}, {"id": "cy", "capacity": 5}]
}]}"#;

/// The agent the newest conversation of `customer` is offered to now, if any.
async fn offered_to(app: &TestApp, customer: &str) -> Option<String> {
    app.pg
        .query_opt(
            "SELECT o.agent_id FROM offers o JOIN conversations c ON c.id = o.conversation_id
             JOIN customers cu ON cu.id = c.customer_id
             WHERE cu.external_id = $1 AND o.status = 'open'",
            &[&customer],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

async fn wait_offered(app: &TestApp, customer: &str, agent: &str, within: Duration) {
    eventually(
        &format!("{customer}'s conversation offered to {agent}"),
        within,
        || async { (offered_to(app, customer).await.as_deref() == Some(agent)).then_some(()) },
    )
    .await;
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

/// SPEC D11: amy is idle longest and least loaded, but R1's responsible agent is ben: ben is
/// offered it first; after one dispatch cycle (5 s) unaccepted it goes to amy. With ben away,
/// R2 (also his) goes to amy at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responsible_agent_first_then_anyone_after_one_cycle() {
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await;
    let supervisor = app.token("t1", "supervisor", None).await;
    let (status, body) = api
        .put(
            "/api/v1/channels/chat/customers/R1/responsible-agent",
            &supervisor,
            json!({"agent_id": "ben"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["responsible_agent"], "ben");
    assert_eq!(body["responsible_set_by"], "api");
    refused(
        api.put(
            "/api/v1/channels/chat/customers/R1/responsible-agent",
            &supervisor,
            json!({"agent_id": "nobody"}),
        )
        .await,
        422,
        "no agent",
    );
    refused(
        api.put(
            "/api/v1/channels/nope/customers/R1/responsible-agent",
            &supervisor,
            json!({"agent_id": "ben"}),
        )
        .await,
        404,
        "no channel",
    );
    let agent_token = app.token("t1", "agent", Some("amy")).await;
    assert_eq!(
        api.put(
            "/api/v1/channels/chat/customers/R1/responsible-agent",
            &agent_token,
            json!({"agent_id": "amy"}),
        )
        .await
        .0,
        403
    );

    app.presence("t1", "amy", "ready", 5, &[]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    app.presence("t1", "ben", "ready", 5, &[]).await;
    app.wait_for_presence("t1", "ben", "ready", None).await;
    app.customer_says("t1", "chat", "R1", "hello, it's me again")
        .await;
    wait_offered(&app, "R1", "ben", Duration::from_secs(10)).await;
    // Someone without a responsible agent: the idle-longest, least-loaded agent.
    app.customer_says("t1", "chat", "N1", "hello").await;
    wait_offered(&app, "N1", "amy", Duration::from_secs(10)).await;
    // Ben lets the offer run out: after the cycle, anyone suitable (amy).
    wait_offered(&app, "R1", "amy", Duration::from_secs(20)).await;

    // Ben away: his customer goes to whoever is ready, at once.
    app.presence("t1", "ben", "away", 5, &[]).await;
    app.wait_for_presence("t1", "ben", "away", None).await;
    api.put(
        "/api/v1/channels/chat/customers/R2/responsible-agent",
        &supervisor,
        json!({"agent_id": "ben"}),
    )
    .await;
    app.customer_says("t1", "chat", "R2", "hi").await;
    wait_offered(&app, "R2", "amy", Duration::from_secs(10)).await;

    // Cleared: no responsible agent.
    let (status, body) = api
        .call(
            "DELETE",
            "/api/v1/channels/chat/customers/R1/responsible-agent",
            Some(&supervisor),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["responsible_agent"], serde_json::Value::Null);
}

/// SPEC D11, the product's card-dealing example: 10 customers dealt to A and B give A
/// customers 1, 3, 5, 7, 9 and B 2, 4, 6, 8, 10; then each one's conversation is offered to
/// their agent first (cy, idle longest, gets neither).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_dealt_out_like_cards_go_to_their_agent() {
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await;
    let admin = app.token("t1", "admin", None).await;
    let customers: Vec<String> = (1..=10).map(|i| format!("c{i}")).collect();
    let (status, body) = api
        .post(
            "/api/v1/responsible-agents/deal",
            &admin,
            json!({"channel": "chat", "customers": customers, "agents": ["amy", "ben"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let of = |agent: &str| -> Vec<String> {
        body["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["agent"] == agent)
            .map(|a| a["customer"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(of("amy"), ["c1", "c3", "c5", "c7", "c9"]);
    assert_eq!(of("ben"), ["c2", "c4", "c6", "c8", "c10"]);
    let c3 = api.ok("/api/v1/channels/chat/customers/c3", &admin).await;
    assert_eq!(c3["responsible_agent"], "amy");
    assert_eq!(c3["responsible_set_by"], "dealt");
    assert_eq!(
        api.ok("/api/v1/channels/chat/customers/c10", &admin).await["responsible_agent"],
        "ben"
    );
    refused(
        api.post(
            "/api/v1/responsible-agents/deal",
            &admin,
            json!({"channel": "chat", "customers": ["x", "x"], "agents": ["amy"]}),
        )
        .await,
        422,
        "twice",
    );
    refused(
        api.post(
            "/api/v1/responsible-agents/deal",
            &admin,
            json!({"channel": "chat", "customers": ["x"], "agents": []}),
        )
        .await,
        422,
        "agents",
    );

    app.presence("t1", "cy", "ready", 5, &[]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    app.presence("t1", "amy", "ready", 5, &[]).await;
    app.presence("t1", "ben", "ready", 5, &[]).await;
    app.wait_for_presence("t1", "ben", "ready", None).await;
    app.wait_for_presence("t1", "amy", "ready", None).await;
    app.customer_says("t1", "chat", "c4", "hello").await;
    wait_offered(&app, "c4", "ben", Duration::from_secs(10)).await;
    app.customer_says("t1", "chat", "c3", "hello").await;
    wait_offered(&app, "c3", "amy", Duration::from_secs(10)).await;
    app.customer_says("t1", "chat", "stranger", "hello").await;
    wait_offered(&app, "stranger", "cy", Duration::from_secs(10)).await;
}

/// SPEC D11's tenant setting: the last agent who served the customer counts as responsible.
/// Ben served L1 and is busier than amy, yet L1's next conversation is offered to him.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_setting_the_last_agent_who_served_is_responsible() {
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await;
    let admin = app.token("t1", "admin", None).await;
    let (status, body) = api
        .call(
            "PATCH",
            "/api/v1/settings",
            Some(&admin),
            Some(json!({"last_agent_responsible": true})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["last_agent_responsible"], true);

    app.presence("t1", "ben", "ready", 5, &[]).await;
    app.customer_says("t1", "chat", "L1", "first time").await;
    wait_offered(&app, "L1", "ben", Duration::from_secs(10)).await;
    let first = conversation_of(&app, "L1").await;
    app.agent_does("t1", "ben", "accept", first, json!({}))
        .await;
    app.wait_for_state("t1", "chat", "L1", "processing").await;
    app.agent_does("t1", "ben", "close", first, json!({})).await;
    app.wait_for_state("t1", "chat", "L1", "completed").await;
    assert_eq!(
        api.ok("/api/v1/channels/chat/customers/L1", &admin).await["last_served_by"],
        "ben"
    );
    // Ben busier: he serves X1.
    app.customer_says("t1", "chat", "X1", "hello").await;
    wait_offered(&app, "X1", "ben", Duration::from_secs(10)).await;
    let x1 = conversation_of(&app, "X1").await;
    app.agent_does("t1", "ben", "accept", x1, json!({})).await;
    app.wait_for_state("t1", "chat", "X1", "processing").await;

    app.presence("t1", "amy", "ready", 5, &[]).await;
    app.wait_for_presence("t1", "amy", "ready", None).await;
    app.customer_says("t1", "chat", "L1", "back again").await;
    eventually(
        "L1's second conversation",
        Duration::from_secs(10),
        || async { (conversation_of(&app, "L1").await != first).then_some(()) },
    )
    .await;
    wait_offered(&app, "L1", "ben", Duration::from_secs(10)).await;
    // Without a last agent: the less loaded amy.
    app.customer_says("t1", "chat", "M1", "hello").await;
    wait_offered(&app, "M1", "amy", Duration::from_secs(10)).await;
}
