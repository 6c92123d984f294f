//! An agent's actions on a conversation take effect in the order the agent sent them,
//! whichever worker is down or slow (issue 20): a reply published just before a close reaches
//! `outbound` once, before the survey question the close sends, and is never refused; a reply
//! sent after the close is refused as before (SPEC L8: `completed` is served by nobody).

use std::time::Duration;

use crate::helpers::api::TestApi;
use crate::helpers::{eventually, TestApp, WorkerProcess};
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use serde_json::{json, Value};
use uuid::Uuid;

/// One tenant, one channel without bot (conversations queue at once) that asks a survey.
const SETUP: &str = r#"{"tenants":[{
    "id": "t1", "dispatch_cycle_seconds": 60,
    "channels": [{"id": "mail", "kind": "email", "bot_enabled": false}]
}]}"#;

const QUESTION: &str = "請為本次服務評分";

/// The channel asks its survey after an agent's close (the question is what comes last).
async fn ask_survey(app: &TestApp) {
    app.pg
        .execute(
            "UPDATE channels SET survey = $1 WHERE tenant_id = 't1' AND id = 'mail'",
            &[&json!({"question": QUESTION, "scale": 5})],
        )
        .await
        .unwrap();
}

/// `n` customers' conversations, each accepted by amy (who has room for all): their ids.
async fn served_by_amy(app: &TestApp, n: usize) -> Vec<Uuid> {
    let mut notes = app.client.subscribe("fl.t1.notify.amy").await.unwrap();
    app.presence("t1", "amy", "ready", 50, &[]).await;
    let mut ids = Vec::new();
    for i in 0..n {
        app.customer_says("t1", "mail", &format!("C{i}"), "help")
            .await;
    }
    while ids.len() < n {
        let offer =
            firstline_tests::wait::next_matching(&mut notes, "an offer", |v| v["type"] == "offer")
                .await;
        let id: Uuid = offer["conversation_id"].as_str().unwrap().parse().unwrap();
        app.agent_does("t1", "amy", "accept", id, json!({})).await;
        ids.push(id);
    }
    for i in 0..n {
        app.wait_for_state("t1", "mail", &format!("C{i}"), "processing")
            .await;
    }
    ids
}

fn reply_text(conversation: Uuid) -> String {
    format!("已為您處理 {conversation}")
}

/// What `conversation` sent the customer, in `outbound`'s order: "reply" for amy's reply,
/// "survey" for the question, the text for anything else.
async fn sent(app: &TestApp, conversation: Uuid) -> Vec<String> {
    app.stored("FL_OUTBOUND", "fl.t1.outbound.mail")
        .await
        .into_iter()
        .filter(|m| m["conversation_id"] == conversation.to_string())
        // The place in line, told when it was queued, is not what these tests are about.
        .filter(|m| !m["text"].as_str().unwrap_or_default().contains("in line"))
        .map(|m| {
            if m["author"] == "agent" && m["text"] == reply_text(conversation) {
                "reply".to_owned()
            } else if m["text"] == QUESTION {
                "survey".to_owned()
            } else {
                m["text"].as_str().unwrap_or_default().to_owned()
            }
        })
        .collect()
}

/// Waits until `conversation` sent `expected` (in that order) to the customer, then checks it
/// sent nothing else.
async fn sends(app: &TestApp, conversation: Uuid, expected: &[&str]) {
    let got = eventually(
        &format!("{conversation} sends {expected:?}"),
        Duration::from_secs(40),
        || async {
            let got = sent(app, conversation).await;
            (got.len() >= expected.len()).then_some(got)
        },
    )
    .await;
    assert_eq!(got, expected, "what {conversation} sent the customer");
}

/// amy's `action_rejected` notifications so far, with their conversation and reason.
async fn rejections(app: &TestApp) -> Vec<Value> {
    app.stored("FL_NOTIFY", "fl.t1.notify.amy")
        .await
        .into_iter()
        .filter(|n| n["type"] == "action_rejected")
        .collect()
}

async fn completed(app: &TestApp, conversation: Uuid) {
    eventually(
        &format!("{conversation} completed"),
        Duration::from_secs(40),
        || async {
            let state: String = app
                .pg
                .query_one(
                    "SELECT state FROM conversations WHERE id = $1",
                    &[&conversation],
                )
                .await
                .unwrap()
                .get(0);
            (state == "completed").then_some(())
        },
    )
    .await;
}

/// Issue 20: reply then close back to back on the bus, for 8 conversations at once: every
/// reply reaches `outbound` exactly once and before the survey; none is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_just_before_the_close_goes_out_before_the_survey() {
    let app = TestApp::spawn(SETUP).await;
    ask_survey(&app).await;
    let ids = served_by_amy(&app, 8).await;
    for &id in &ids {
        app.agent_does("t1", "amy", "reply", id, json!({"text": reply_text(id)}))
            .await;
        app.agent_does("t1", "amy", "close", id, json!({})).await;
    }
    for &id in &ids {
        sends(&app, id, &["reply", "survey"]).await;
    }
    assert_eq!(rejections(&app).await, Vec::<Value>::new(), "none refused");
}

/// A reply sent after the close is refused (`action_rejected`) and goes nowhere: back to back
/// right after it, and later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_after_the_close_is_refused() {
    let app = TestApp::spawn(SETUP).await;
    ask_survey(&app).await;
    let ids = served_by_amy(&app, 2).await;
    let (right_after, later) = (ids[0], ids[1]);
    app.agent_does("t1", "amy", "close", right_after, json!({}))
        .await;
    app.agent_does(
        "t1",
        "amy",
        "reply",
        right_after,
        json!({"text": reply_text(right_after)}),
    )
    .await;
    app.agent_does("t1", "amy", "close", later, json!({})).await;
    completed(&app, later).await;
    app.agent_does(
        "t1",
        "amy",
        "reply",
        later,
        json!({"text": reply_text(later)}),
    )
    .await;
    let refused = eventually("both refused", Duration::from_secs(20), || async {
        let r = rejections(&app).await;
        (r.len() >= 2).then_some(r)
    })
    .await;
    let mut refused_in: Vec<String> = refused
        .iter()
        .map(|r| {
            assert!(r["reason"].as_str().unwrap().contains("not serving"), "{r}");
            r["conversation_id"].as_str().unwrap().to_owned()
        })
        .collect();
    refused_in.sort();
    let mut expected = vec![right_after.to_string(), later.to_string()];
    expected.sort();
    assert_eq!(refused_in, expected);
    for id in [right_after, later] {
        sends(&app, id, &["survey"]).await;
    }
}

/// The API's path: POST reply then POST close, for 6 conversations: every reply out once,
/// before the survey, none refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apis_reply_then_close_keeps_the_reply() {
    let mut app = TestApp::spawn(SETUP).await;
    ask_survey(&app).await;
    let api: TestApi = app.start_api().await;
    let ids = served_by_amy(&app, 6).await;
    let amy = app.token("t1", "agent", Some("amy")).await;
    for &id in &ids {
        let (status, body) = api
            .post(
                &format!("/api/v1/conversations/{id}/reply"),
                &amy,
                json!({"text": reply_text(id)}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        let (status, body) = api
            .post(
                &format!("/api/v1/conversations/{id}/close"),
                &amy,
                json!({}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
    }
    for &id in &ids {
        sends(&app, id, &["reply", "survey"]).await;
    }
    assert_eq!(rejections(&app).await, Vec::<Value>::new(), "none refused");
}

/// The worker processes a conversation needs here (no bot): ingest, dispatcher, notifier.
fn processes(app: &TestApp) -> [WorkerProcess; 3] {
    [
        "firstline-ingest",
        "firstline-dispatcher",
        "firstline-notifier",
    ]
    .map(|name| WorkerProcess::start(name, &app.config))
}

/// Reply, then close 1 s later, while the notifier is stopped for 3 s (a restart), and again
/// while the dispatcher is: the reply still goes out, once, before the survey.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_before_the_close_survives_a_worker_restart() {
    let app = TestApp::without_workers(SETUP).await;
    ask_survey(&app).await;
    let [_ingest, mut dispatcher, mut notifier] = processes(&app);
    let ids = served_by_amy(&app, 2).await;
    for (stopped, id) in [&mut notifier, &mut dispatcher].into_iter().zip(ids) {
        let status = stopped.terminate(Duration::from_secs(10)).expect("stopped");
        assert!(status.success(), "{status:?}");
        app.agent_does("t1", "amy", "reply", id, json!({"text": reply_text(id)}))
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        app.agent_does("t1", "amy", "close", id, json!({})).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stopped.restart();
        sends(&app, id, &["reply", "survey"]).await;
    }
    assert_eq!(rejections(&app).await, Vec::<Value>::new(), "none refused");
}

/// The dispatcher's actions consumer, as the dispatcher made it.
async fn dispatcher_actions(app: &TestApp) -> PullConsumer {
    app.js
        .get_stream("FL_ACTIONS")
        .await
        .unwrap()
        .get_consumer("dispatcher-actions")
        .await
        .unwrap()
}

/// When a redelivery comes out of order (an instance died with the reply in hand, and the
/// close after it was applied first), the reply is judged by its own place in the stream:
/// sent while amy served, it still goes out, once (after the survey, which went first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_redelivered_after_the_close_still_goes_out() {
    let app = TestApp::without_workers(SETUP).await;
    ask_survey(&app).await;
    let [_ingest, mut dispatcher, _notifier] = processes(&app);
    let id = served_by_amy(&app, 1).await[0];
    let status = dispatcher
        .terminate(Duration::from_secs(10))
        .expect("stopped");
    assert!(status.success(), "{status:?}");
    app.agent_does("t1", "amy", "reply", id, json!({"text": reply_text(id)}))
        .await;
    app.agent_does("t1", "amy", "close", id, json!({})).await;
    // The reply is delivered to a consumer that dies with it: it comes again after ack_wait.
    let consumer = dispatcher_actions(&app).await;
    let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
    let taken = batch.next().await.expect("the reply delivered").unwrap();
    let taken: Value = serde_json::from_slice(&taken.payload).unwrap();
    assert_eq!(taken["type"], "reply");
    drop(batch);
    dispatcher.restart();
    completed(&app, id).await;
    sends(&app, id, &["survey", "reply"]).await;
    assert_eq!(rejections(&app).await, Vec::<Value>::new(), "none refused");
}
