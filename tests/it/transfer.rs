//! SPEC D12, a transfer to a named agent, over the real workers: the conversation goes straight
//! into that agent's `processing`, whatever their status (away, logged out) and load (at
//! capacity), and they are told at once (`transferred_to_you`), with no offer to accept. The
//! former agent is told it left them (`transferred`) and serves one conversation fewer; the
//! event says who had it and who has it; the customer's messages reach the new agent and the new
//! agent's replies reach the customer, the former agent's no longer. An agent past capacity
//! after a transfer gets no new offers until back under it.

use std::time::Duration;

use crate::helpers::{count, eventually, holds_for, next_matching, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

const SETUP: &str = r#"{"tenants":[{
    "id": "t1", "dispatch_cycle_seconds": 60,
    "channels": [{"id": "mail", "kind": "email", "bot_enabled": false}]
}]}"#;

/// The conversation's state and serving agent in Postgres.
async fn state_and_agent(app: &TestApp, conversation: Uuid) -> (String, Option<String>) {
    let row = app
        .pg
        .query_one(
            "SELECT state, agent_id FROM conversations WHERE id = $1",
            &[&conversation],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Conversations in `processing` with `agent`.
async fn serving(app: &TestApp, agent: &str) -> i64 {
    count(
        &app.pg,
        "SELECT count(*) FROM conversations WHERE agent_id = $1 AND state = 'processing'",
        &[&agent],
    )
    .await
}

async fn offers_of(app: &TestApp, conversation: Uuid) -> i64 {
    count(
        &app.pg,
        "SELECT count(*) FROM offers WHERE conversation_id = $1",
        &[&conversation],
    )
    .await
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
    eventually(
        &format!("{agent} serves {conversation}"),
        Duration::from_secs(20),
        || async {
            (state_and_agent(app, conversation).await == ("processing".into(), Some(agent.into())))
                .then_some(())
        },
    )
    .await;
    conversation
}

/// `from` transfers `conversation` to `to` (with `skills`, if any); checks what SPEC D12 says
/// happens at once: `to` is told (`transferred_to_you`), `from` is told it left them, it is
/// `to`'s in Postgres, and the event names both. Returns the notification `to` got.
async fn transfer_to(
    app: &TestApp,
    notify: (&mut async_nats::Subscriber, &mut async_nats::Subscriber),
    events: &mut async_nats::Subscriber,
    conversation: Uuid,
    (from, to): (&str, &str),
    skills: Option<&[&str]>,
) -> Value {
    let (from_notify, to_notify) = notify;
    let mut body = json!({"to_agent": to});
    if let Some(skills) = skills {
        body["skills"] = json!(skills);
    }
    let sent = std::time::Instant::now();
    app.agent_does("t1", from, "transfer", conversation, body)
        .await;
    let told = next_matching(to_notify, &format!("{to} told of the transfer"), |v| {
        v["type"] == "transferred_to_you" && v["conversation_id"] == conversation.to_string()
    })
    .await;
    eprintln!(
        "transfer {from} -> {to}: told {:?} after the publish",
        sent.elapsed()
    );
    assert_eq!(told["from_agent"], from);
    assert_eq!(told["channel"], "mail");
    // The notification comes after the commit: the conversation is theirs already.
    assert_eq!(
        state_and_agent(app, conversation).await,
        ("processing".into(), Some(to.into()))
    );
    let left = next_matching(from_notify, &format!("{from} told it left"), |v| {
        v["type"] == "transferred" && v["conversation_id"] == conversation.to_string()
    })
    .await;
    assert_eq!(left["to_agent"], to);
    let event = next_matching(events, "the transfer's event", |v| {
        v["conversation_id"] == conversation.to_string() && v["reason"] == "transferred"
    })
    .await;
    assert_eq!(
        (&event["from"], &event["to"]),
        (&json!("processing"), &json!("processing"))
    );
    assert_eq!(
        (&event["agent_id"], &event["from_agent_id"]),
        (&json!(to), &json!(from))
    );
    told
}

/// SPEC D12: to an away agent, then to a logged-out one, then to one at capacity; each serves
/// it at once, with no offer. The customer and the new agent talk; the former agent may no
/// longer reply. The agent past capacity gets no new offers until back under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_to_a_named_agent_lands_in_their_processing_whatever_their_status() {
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await;
    let supervisor = app.token("t1", "supervisor", None).await;
    let sub = |agent: &str| app.client.subscribe(format!("fl.t1.notify.{agent}"));
    let (mut amy, mut ben, mut cho, mut dan) = (
        sub("amy").await.unwrap(),
        sub("ben").await.unwrap(),
        sub("cho").await.unwrap(),
        sub("dan").await.unwrap(),
    );
    let mut events = app
        .client
        .subscribe("fl.t1.events.conversation")
        .await
        .unwrap();
    let mut outbound = app.client.subscribe("fl.t1.outbound.mail").await.unwrap();

    // dan (capacity 1) serves D1; amy serves A1. ben is away in a meeting, cho logged out.
    app.presence("t1", "dan", "ready", 1, &[]).await;
    app.customer_says("t1", "mail", "D1", "hello").await;
    let d1 = accept_next(&app, &mut dan, "dan").await;
    app.presence("t1", "amy", "ready", 5, &[]).await;
    app.customer_says("t1", "mail", "A1", "I need help with my order")
        .await;
    let a1 = accept_next(&app, &mut amy, "amy").await;
    let away = json!({"version": 2, "status": "away", "reason": "meeting", "capacity": 5});
    app.publish_json("fl.t1.presence.ben", None, &away.to_string())
        .await;
    app.presence("t1", "cho", "logged_out", 5, &[]).await;
    app.wait_for_presence("t1", "ben", "away", Some("meeting"))
        .await;
    app.wait_for_presence("t1", "cho", "logged_out", None).await;

    // A transfer to someone who is no agent of the tenant is refused; nothing moves.
    app.agent_does("t1", "amy", "transfer", a1, json!({"to_agent": "nobody"}))
        .await;
    let refused = next_matching(&mut amy, "the refusal", |v| v["type"] == "action_rejected").await;
    assert_eq!(refused["reason"], "to_agent: no agent nobody");
    assert_eq!(
        state_and_agent(&app, a1).await,
        ("processing".into(), Some("amy".into()))
    );

    // To ben, away: his at once. His service starts now (服務開始時間, the dashboard's);
    // the first accept (the service level's) stays.
    let times = || async {
        let r = app
            .pg
            .query_one(
                "SELECT accepted_at, processing_at FROM conversations WHERE id = $1",
                &[&a1],
            )
            .await
            .unwrap();
        let t: (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
            (r.get(0), r.get(1));
        t
    };
    let (accepted_at, _) = times().await;
    let told = transfer_to(
        &app,
        (&mut amy, &mut ben),
        &mut events,
        a1,
        ("amy", "ben"),
        None,
    )
    .await;
    let (accepted_again, processing_at) = times().await;
    assert_eq!(accepted_again, accepted_at);
    assert!(
        processing_at > accepted_at,
        "{processing_at} after {accepted_at}"
    );
    assert_eq!(told["customer"]["id"], "A1");
    assert_eq!(told["customer"]["name"], "customer A1");
    assert_eq!(
        serving(&app, "amy").await,
        0,
        "the former agent serves one fewer"
    );
    assert_eq!(serving(&app, "ben").await, 1);
    // The dashboards' snapshot says so: the row is ben's, the agents' loads moved.
    let q = api.ok("/api/v1/queue", &supervisor).await;
    let row = q["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == a1.to_string())
        .unwrap()
        .clone();
    assert_eq!(
        (&row["state"], &row["agent_id"]),
        (&json!("processing"), &json!("ben"))
    );
    let load = |agent: &str| {
        q["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == agent)
            .map(|a| (a["status"].clone(), a["serving"].clone()))
            .unwrap()
    };
    assert_eq!(load("amy"), (json!("ready"), json!(0)));
    assert_eq!(load("ben"), (json!("away"), json!(1)));

    // The customer's next message reaches ben; ben's reply reaches the customer; amy's is refused.
    app.customer_says("t1", "mail", "A1", "are you still there?")
        .await;
    let m = next_matching(&mut ben, "the customer's message to ben", |v| {
        v["type"] == "customer_message"
    })
    .await;
    assert_eq!(m["text"], "are you still there?");
    app.agent_does(
        "t1",
        "ben",
        "reply",
        a1,
        json!({"text": "Ben here, I have your order in front of me."}),
    )
    .await;
    let out = next_matching(&mut outbound, "ben's reply to the customer", |v| {
        v["author"] == "agent"
    })
    .await;
    assert_eq!(
        (&out["agent_id"], &out["customer_id"], &out["text"]),
        (
            &json!("ben"),
            &json!("A1"),
            &json!("Ben here, I have your order in front of me.")
        )
    );
    app.agent_does("t1", "amy", "reply", a1, json!({"text": "still me"}))
        .await;
    let refused = next_matching(&mut amy, "amy's reply refused", |v| {
        v["type"] == "action_rejected"
    })
    .await;
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("not serving this conversation"),
        "{refused}"
    );

    // To cho, logged out: hers at once too.
    transfer_to(
        &app,
        (&mut ben, &mut cho),
        &mut events,
        a1,
        ("ben", "cho"),
        None,
    )
    .await;
    assert_eq!(
        (serving(&app, "ben").await, serving(&app, "cho").await),
        (0, 1)
    );

    // To dan, at capacity (1, serving D1): it lands all the same, and dan serves 2. The skills
    // given with it become what it requires.
    let told = transfer_to(
        &app,
        (&mut cho, &mut dan),
        &mut events,
        a1,
        ("cho", "dan"),
        Some(&["VIP"]),
    )
    .await;
    assert_eq!(told["required_skills"], json!(["vip"]));
    let skills: Vec<String> = app
        .pg
        .query_one(
            "SELECT required_skills FROM conversations WHERE id = $1",
            &[&a1],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(skills, ["vip"]);
    assert_eq!(serving(&app, "dan").await, 2);
    assert_eq!(
        offers_of(&app, a1).await,
        1,
        "no offer after the first: {a1}"
    );
    let history: Vec<(String, Option<String>, String)> = app
        .pg
        .query(
            "SELECT to_state, agent_id, reason FROM conversation_transitions
             WHERE conversation_id = $1 ORDER BY id",
            &[&a1],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let step =
        |s: &str, a: Option<&str>, r: &str| (s.to_owned(), a.map(str::to_owned), r.to_owned());
    assert_eq!(
        history,
        [
            step("waiting", None, "new_conversation"),
            step("assigning", Some("amy"), "offered"),
            step("processing", Some("amy"), "accepted"),
            step("processing", Some("ben"), "transferred"),
            step("processing", Some("cho"), "transferred"),
            step("processing", Some("dan"), "transferred"),
        ]
    );

    // Past capacity, dan gets no new offers (amy away, nobody else ready) until back under it.
    app.presence("t1", "amy", "away", 5, &[]).await;
    app.wait_for_presence("t1", "amy", "away", None).await;
    app.customer_says("t1", "mail", "N1", "new question").await;
    app.wait_for_state("t1", "mail", "N1", "waiting").await;
    let n1_offers = || async {
        count(
            &app.pg,
            "SELECT count(*) FROM offers o JOIN conversations c ON c.id = o.conversation_id
             JOIN customers cu ON cu.id = c.customer_id WHERE cu.external_id = 'N1'",
            &[],
        )
        .await
    };
    holds_for("no offer to dan at 2/1", Duration::from_secs(2), || async {
        n1_offers().await == 0
    })
    .await;
    app.agent_does("t1", "dan", "close", a1, json!({})).await;
    eventually("A1 closed", Duration::from_secs(20), || async {
        (state_and_agent(&app, a1).await.0 == "completed").then_some(())
    })
    .await;
    holds_for("no offer to dan at 1/1", Duration::from_secs(1), || async {
        n1_offers().await == 0
    })
    .await;
    app.agent_does("t1", "dan", "close", d1, json!({})).await;
    let offer = next_matching(&mut dan, "N1 offered to dan once under capacity", |v| {
        v["type"] == "offer"
    })
    .await;
    assert_eq!(offer["customer"]["id"], "N1");
}
