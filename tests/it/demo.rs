//! The demo `scripts/up` runs (`firstline::demo::run`), over every worker: its web chat is the
//! newcomer's, offered only to Dana, whose desk the demo prints (SPEC D4: the `webchat` skill
//! only she has), while the simulated agents take the simulated customers; and without the
//! simulation (`firstline demo --no-simulation`, `scripts/up --no-simulation`) nothing but the
//! newcomer's chat and Dana runs.

use std::time::Duration;

use crate::helpers::{eventually, next_matching, TestApp};
use firstline::demo::{DemoOptions, DESK_AGENT};
use serde_json::json;
use uuid::Uuid;

/// Starts the demo over `app`'s workers, as `firstline demo` does.
fn start_demo(
    app: &TestApp,
    simulate: bool,
    conversations: Option<usize>,
) -> tokio::task::JoinHandle<anyhow::Result<usize>> {
    let options = DemoOptions {
        conversations,
        every: Duration::from_millis(500),
        api_addr: None,
        simulate,
    };
    let (nats, db, stop) = (
        app.nats.url.clone(),
        app.db.url.clone(),
        app.shutdown.child_token(),
    );
    tokio::spawn(async move { firstline::demo::run(&nats, &db, options, stop).await })
}

/// The newest conversation of a web-chat customer of the demo.
async fn webchat_conversation(app: &TestApp, customer: &str) -> Uuid {
    app.pg
        .query_one(
            "SELECT c.id FROM conversations c JOIN customers cu ON cu.id = c.customer_id
             WHERE cu.tenant_id = 'demo' AND cu.channel_id = 'webchat' AND cu.external_id = $1
             ORDER BY c.created_at DESC LIMIT 1",
            &[&customer],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until the simulated agents have been offered `n` conversations made at least a
/// second after `after` (a time of the database's): passes that ran after it.
async fn simulated_offers_after(app: &TestApp, after: chrono::DateTime<chrono::Utc>, n: i64) {
    eventually(
        &format!("{n} offers to the simulated agents"),
        Duration::from_secs(60),
        || async {
            let count: i64 = app
                .pg
                .query_one(
                    "SELECT count(*) FROM offers WHERE tenant_id = 'demo'
                     AND agent_id IN ('amy', 'ben', 'chen')
                     AND created_at > $1::timestamptz + interval '1 second'",
                    &[&after],
                )
                .await
                .unwrap()
                .get(0);
            (count >= n).then_some(())
        },
    )
    .await;
}

/// The first column of what `sql` returns.
async fn column<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    app: &TestApp,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Vec<T> {
    let rows = app.pg.query(sql, params).await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// The agents `conversation` was offered to, in order.
async fn offers_of(app: &TestApp, conversation: Uuid) -> Vec<String> {
    column(
        app,
        "SELECT agent_id FROM offers WHERE conversation_id = $1 ORDER BY created_at",
        &[&conversation],
    )
    .await
}

/// The newcomer's web chat waits for Dana while the simulated agents are ready and take the
/// conversations queued after it, goes to Dana when she is ready, and Dana is offered nothing of
/// the simulation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_chat_goes_to_dana_and_never_to_a_simulated_agent() {
    let app = TestApp::spawn(r#"{"tenants": []}"#).await;
    // Configured ahead of the demo (which configures too), so that its agents can be awaited.
    firstline::demo::configure(&app.db.url).await.unwrap();
    let demo = start_demo(&app, true, None);
    app.wait_for_presence("demo", "amy", "ready", None).await;

    // Dana is not ready yet: the customer asks for a person and waits.
    app.customer_says("demo", "webchat", "W1", "human").await;
    app.wait_for_state("demo", "webchat", "W1", "waiting").await;
    let w1 = webchat_conversation(&app, "W1").await;
    let waited: chrono::DateTime<chrono::Utc> = app
        .pg
        .query_one(
            "SELECT at FROM conversation_transitions WHERE conversation_id = $1 AND to_state = 'waiting'",
            &[&w1],
        )
        .await
        .unwrap()
        .get(0);
    simulated_offers_after(&app, waited, 3).await;
    assert_eq!(
        app.state_of("demo", "webchat", "W1").await.as_deref(),
        Some("waiting")
    );
    assert_eq!(offers_of(&app, w1).await, Vec::<String>::new());

    // Dana, at the desk, goes ready: the web chat is offered to her.
    app.presence("demo", DESK_AGENT, "ready", 3, &["webchat"])
        .await;
    app.wait_for_state("demo", "webchat", "W1", "assigning")
        .await;
    assert_eq!(offers_of(&app, w1).await, [DESK_AGENT]);

    // While she is ready, the simulation goes on without her.
    let now: chrono::DateTime<chrono::Utc> =
        app.pg.query_one("SELECT now()", &[]).await.unwrap().get(0);
    simulated_offers_after(&app, now, 3).await;
    let hers: Vec<Uuid> = column(
        &app,
        "SELECT conversation_id FROM offers WHERE tenant_id = 'demo' AND agent_id = $1",
        &[&DESK_AGENT],
    )
    .await;
    assert_eq!(hers, [w1], "Dana is offered only the web chat");
    app.shutdown.cancel();
    demo.await.unwrap().expect("the demo ends cleanly");
}

/// `--no-simulation`: the demo starts no simulated customer and leaves the simulated agents
/// offline; the newcomer's chat goes its whole way with Dana, and it is the only conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_simulation_only_the_web_chat_and_dana_run() {
    let app = TestApp::spawn(r#"{"tenants": []}"#).await;
    // Amy, as an earlier run with the simulation left her: ready.
    firstline::demo::configure(&app.db.url).await.unwrap();
    app.presence("demo", "amy", "ready", 3, &["zh", "english"])
        .await;
    app.wait_for_presence("demo", "amy", "ready", None).await;
    let demo = start_demo(&app, false, Some(1));
    // Set offline by the demo, so that nobody takes what she would not answer.
    app.wait_for_presence("demo", "amy", "logged_out", None)
        .await;
    app.presence("demo", DESK_AGENT, "ready", 3, &["webchat"])
        .await;
    app.wait_for_presence("demo", DESK_AGENT, "ready", None)
        .await;
    app.customer_says("demo", "webchat", "W1", "human").await;
    app.wait_for_state("demo", "webchat", "W1", "assigning")
        .await;
    let w1 = webchat_conversation(&app, "W1").await;
    assert_eq!(offers_of(&app, w1).await, [DESK_AGENT]);
    app.agent_does("demo", DESK_AGENT, "accept", w1, json!({}))
        .await;
    app.wait_for_state("demo", "webchat", "W1", "processing")
        .await;
    app.agent_does("demo", DESK_AGENT, "close", w1, json!({}))
        .await;
    // The demo counts the one conversation completed and stops (`--conversations 1`).
    let completed = tokio::time::timeout(Duration::from_secs(30), demo)
        .await
        .expect("the demo stops after one conversation")
        .unwrap()
        .unwrap();
    assert_eq!(completed, 1);

    let conversations: Vec<String> = column(
        &app,
        "SELECT channel_id FROM conversations WHERE tenant_id = 'demo'",
        &[],
    )
    .await;
    assert_eq!(conversations, ["webchat"], "no simulated customer");
    let ready: Vec<String> = column(
        &app,
        "SELECT id FROM agents WHERE tenant_id = 'demo' AND status = 'ready'",
        &[],
    )
    .await;
    assert_eq!(ready, [DESK_AGENT], "no simulated agent ready");
}

/// The next reply to the customer W2.
async fn reply_to(out: &mut async_nats::Subscriber, what: &str) -> serde_json::Value {
    tokio::time::timeout(
        Duration::from_secs(20),
        next_matching(out, what, |v| v["customer_id"] == "W2"),
    )
    .await
    .unwrap_or_else(|_| panic!("no {what}"))
}

/// The web chat's bot, as the README's Try it suggests: `menu` answers with buttons, a press
/// gets an English knowledge-base answer, and the button for a person hands over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_chat_s_bot_answers_its_menu_and_hands_over() {
    let app = TestApp::spawn(r#"{"tenants": []}"#).await;
    firstline::demo::configure(&app.db.url).await.unwrap();
    let mut out = app
        .client
        .subscribe("fl.demo.outbound.webchat")
        .await
        .unwrap();

    app.customer_says("demo", "webchat", "W2", "menu").await;
    let menu = reply_to(&mut out, "the menu").await;
    let buttons: Vec<(String, String)> = menu["buttons"]
        .as_array()
        .expect("buttons")
        .iter()
        .map(|b| {
            let label = b["label"].as_str().unwrap().to_owned();
            let payload = b["payload"].as_str().unwrap_or(&label).to_owned();
            (label, payload)
        })
        .collect();
    let press = |label: &str| buttons.iter().find(|b| b.0 == label).unwrap().clone();

    let (label, payload) = press("Track my order");
    app.customer_presses("demo", "webchat", "W2", &label, &payload)
        .await;
    let answer = reply_to(&mut out, "the article").await;
    assert!(
        answer["text"].as_str().unwrap().contains("My orders"),
        "{answer}"
    );

    let (label, payload) = press("Talk to a person");
    app.customer_presses("demo", "webchat", "W2", &label, &payload)
        .await;
    app.wait_for_state("demo", "webchat", "W2", "waiting").await;
}
