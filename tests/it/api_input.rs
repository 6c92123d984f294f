//! The API's edge against hand-written requests (issue 20): Idempotency-Key scoped to the
//! tenant, the agent and the request; NUL characters, wrong content types, malformed JSON,
//! wrong types and oversized strings refused with a JSON 4xx before anything is applied;
//! unknown routes and methods answered in the error shape.

use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::api::{queued, refused, start, state, wait_state};
use crate::helpers::api::TestApi;
use crate::helpers::{eventually, next_matching, TestApp};

/// A request with exactly these headers and body; the status and the body (JSON, a string when
/// it is not JSON, `null` when empty).
async fn raw(
    api: &TestApi,
    method: &str,
    path: &str,
    token: &str,
    content_type: Option<&str>,
    body: Option<String>,
    key: Option<&str>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = api
        .http
        .request(method, format!("{}{path}", api.base))
        .bearer_auth(token);
    if let Some(c) = content_type {
        req = req.header("content-type", c);
    }
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    crate::helpers::api::status_and_json(req.send().await.expect("request")).await
}

/// An action with an Idempotency-Key and a JSON body.
async fn act(api: &TestApi, token: &str, path: &str, key: &str, body: Value) -> (u16, Value) {
    raw(
        api,
        "POST",
        path,
        token,
        Some("application/json"),
        Some(body.to_string()),
        Some(key),
    )
    .await
}

/// A conversation of `customer` on the tenant `other`'s channel `web` (no bot), queued.
async fn queued_other(app: &TestApp, customer: &str) -> Uuid {
    let mut events = app
        .client
        .subscribe("fl.other.events.conversation")
        .await
        .unwrap();
    app.customer_says("other", "web", customer, "hello").await;
    let v = next_matching(&mut events, "queued", |v| {
        v["to"] == "waiting" && v["customer_id"] == customer
    })
    .await;
    v["conversation_id"].as_str().unwrap().parse().unwrap()
}

async fn open_offer_status(app: &TestApp, conversation: Uuid) -> Vec<String> {
    app.pg
        .query(
            "SELECT status FROM offers WHERE conversation_id = $1 ORDER BY created_at",
            &[&conversation],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_belong_to_one_tenant_agent_and_request() {
    let (app, api, t) = start().await;
    let zoe = app.token("other", "agent", Some("zoe")).await;
    api.presence(&t.amy, "amy", "ready").await;
    api.presence(&zoe, "zoe", "ready").await;
    let mut outbound = app.client.subscribe("fl.other.outbound.web").await.unwrap();
    let mine = queued(&app, "K1").await;
    let hers = queued_other(&app, "K2").await;
    wait_state(&app, mine, "assigning").await;
    wait_state(&app, hers, "assigning").await;

    // One key in two tenants: two actions, both applied.
    let key = Uuid::new_v4().to_string();
    let (status, amy_accept) = act(
        &api,
        &t.amy,
        &format!("/api/v1/conversations/{mine}/accept"),
        &key,
        json!({}),
    )
    .await;
    assert_eq!(status, 202, "{amy_accept}");
    let (status, zoe_accept) = act(
        &api,
        &zoe,
        &format!("/api/v1/conversations/{hers}/accept"),
        &key,
        json!({}),
    )
    .await;
    assert_eq!(status, 202, "{zoe_accept}");
    assert_ne!(amy_accept["action_id"], zoe_accept["action_id"]);
    wait_state(&app, mine, "processing").await;
    wait_state(&app, hers, "processing").await;

    // A retry of the same request after it was applied answers the first 202 again (the offer
    // is gone by now: without the key this would be a 409).
    let (status, again) = act(
        &api,
        &t.amy,
        &format!("/api/v1/conversations/{mine}/accept"),
        &key,
        json!({}),
    )
    .await;
    assert_eq!((status, &again), (202, &amy_accept));

    // Zoe's reply with a key amy used for her reply reaches Zoe's customer.
    let reply_key = Uuid::new_v4().to_string();
    let (status, body) = act(
        &api,
        &t.amy,
        &format!("/api/v1/conversations/{mine}/reply"),
        &reply_key,
        json!({"text": "amy here"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = act(
        &api,
        &zoe,
        &format!("/api/v1/conversations/{hers}/reply"),
        &reply_key,
        json!({"text": "zoe here"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let out = next_matching(&mut outbound, "zoe's reply", |v| v["author"] == "agent").await;
    assert_eq!(out["text"], "zoe here");

    // The key reused for another request of the same agent is refused, never dropped: other
    // text, another action, another conversation.
    for (path, body) in [
        (
            format!("/api/v1/conversations/{mine}/reply"),
            json!({"text": "something else"}),
        ),
        (format!("/api/v1/conversations/{mine}/close"), json!({})),
        (
            format!("/api/v1/conversations/{hers}/reply"),
            json!({"text": "amy here"}),
        ),
    ] {
        refused(
            act(&api, &t.amy, &path, &reply_key, body).await,
            422,
            "Idempotency-Key",
        );
    }
    // The same reply again: the first answer, and the customer gets it once.
    let (status, _) = act(
        &api,
        &t.amy,
        &format!("/api/v1/conversations/{mine}/reply"),
        &reply_key,
        json!({"text": "amy here"}),
    )
    .await;
    assert_eq!(status, 202);
    let transcript = eventually("amy's reply stored", Duration::from_secs(10), || async {
        let d = api
            .ok(&format!("/api/v1/conversations/{mine}"), &t.amy)
            .await;
        let texts: Vec<String> = d["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["author"] == "agent")
            .map(|m| m["text"].as_str().unwrap().to_string())
            .collect();
        (!texts.is_empty()).then_some(texts)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = api
        .ok(&format!("/api/v1/conversations/{mine}"), &t.amy)
        .await;
    let agent_messages = d["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["author"] == "agent")
        .count();
    assert_eq!(
        (transcript, agent_messages),
        (vec!["amy here".to_string()], 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_are_refused_at_the_edge_naming_the_field() {
    let (_app, api, t) = start().await;
    let a = &t.admin;
    for param in ["skill", "channel", "agent", "state"] {
        refused(
            api.get(&format!("/api/v1/conversations?{param}=a%00b"), a)
                .await,
            400,
            param,
        );
    }
    let nul = "a\u{0}b";
    let cases: Vec<(&str, String, Value, &str)> = vec![
        (
            "PATCH",
            "/api/v1/settings".into(),
            json!({"name": nul}),
            "name",
        ),
        (
            "PATCH",
            "/api/v1/settings".into(),
            json!({"handover_keywords": ["x", nul]}),
            "handover_keywords",
        ),
        (
            "PUT",
            "/api/v1/channels/web2".into(),
            json!({"name": nul}),
            "name",
        ),
        (
            "PUT",
            "/api/v1/channels/web2".into(),
            json!({"kind": nul}),
            "kind",
        ),
        (
            "PUT",
            "/api/v1/channels/web2".into(),
            json!({"business_hours": {"timezone": "UTC", "weekly": {}, "closed_message": nul}}),
            "closed_message",
        ),
        (
            "PUT",
            "/api/v1/agents/cal".into(),
            json!({"display_name": nul}),
            "display_name",
        ),
        (
            "PUT",
            "/api/v1/agents/cal".into(),
            json!({"skills": [nul]}),
            "skills",
        ),
        (
            "POST",
            "/api/v1/tokens".into(),
            json!({"role": "admin", "name": nul}),
            "name",
        ),
        (
            "POST",
            "/api/v1/webhooks".into(),
            json!({"url": "http://example.com/\u{0}"}),
            "url",
        ),
        (
            "POST",
            "/api/v1/webhooks".into(),
            json!({"url": "http://example.com/", "description": nul}),
            "description",
        ),
    ];
    for (method, path, body, field) in &cases {
        let got = api.call(method, path, Some(a), Some(body.clone())).await;
        assert_eq!(got.0, 422, "{method} {path} {body}: {}", got.1);
        refused(got, 422, field);
    }
    // An agent's reply and presence reason: refused here, never published to be retried
    // downstream.
    let id = Uuid::new_v4();
    refused(
        api.post(
            &format!("/api/v1/conversations/{id}/reply"),
            &t.amy,
            json!({"text": nul}),
        )
        .await,
        422,
        "text",
    );
    refused(
        api.post(
            &format!("/api/v1/conversations/{id}/decline"),
            &t.amy,
            json!({"reason": nul}),
        )
        .await,
        422,
        "reason",
    );
    refused(
        api.put(
            "/api/v1/agents/amy/presence",
            &t.amy,
            json!({"status": "not_ready", "reason": nul}),
        )
        .await,
        422,
        "reason",
    );
    // Nothing was written.
    assert_eq!(api.get("/api/v1/channels/web2", a).await.0, 404);
    assert_eq!(api.get("/api/v1/agents/cal", a).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decline_and_transfer_check_their_body_before_they_act() {
    let (app, api, t) = start().await;
    api.presence(&t.amy, "amy", "ready").await;
    let c = queued(&app, "D1").await;
    wait_state(&app, c, "assigning").await;
    let decline = format!("/api/v1/conversations/{c}/decline");
    let good = r#"{"reason": "busy"}"#.to_string();
    let bad: [(Option<&str>, String, u16, &str); 4] = [
        (
            Some("application/json"),
            r#"{"reason": "#.into(),
            400,
            "JSON",
        ),
        (Some("text/plain"), good.clone(), 415, "application/json"),
        (None, good.clone(), 415, "application/json"),
        (Some("application/json"), "[]".into(), 422, "object"),
    ];
    for (ct, body, status, needle) in &bad {
        let got = raw(
            &api,
            "POST",
            &decline,
            &t.amy,
            *ct,
            Some(body.clone()),
            None,
        )
        .await;
        refused(got, *status, needle);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(open_offer_status(&app, c).await, ["open"]);
    assert_eq!(state(&app, c).await, "assigning");

    // Transfer, by the agent serving it.
    let (status, body) = api
        .post(
            &format!("/api/v1/conversations/{c}/accept"),
            &t.amy,
            json!({}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    wait_state(&app, c, "processing").await;
    let transfer = format!("/api/v1/conversations/{c}/transfer");
    let good = r#"{"skills": ["zh"]}"#.to_string();
    let bad: [(Option<&str>, String, u16, &str); 4] = [
        (Some("application/json"), "{".into(), 400, "JSON"),
        (Some("text/plain"), good.clone(), 415, "application/json"),
        (None, good.clone(), 415, "application/json"),
        (
            Some("application/json"),
            r#"{"skills": 5}"#.into(),
            422,
            "skills",
        ),
    ];
    for (ct, body, status, needle) in &bad {
        let got = raw(
            &api,
            "POST",
            &transfer,
            &t.amy,
            *ct,
            Some(body.clone()),
            None,
        )
        .await;
        refused(got, *status, needle);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(state(&app, c).await, "processing");

    // A wrong type on an enum field is a 422 naming the field.
    refused(
        api.put("/api/v1/agents/amy/presence", &t.amy, json!({"status": 5}))
            .await,
        422,
        "status",
    );
    refused(
        api.post("/api/v1/tokens", &t.admin, json!({"role": 5}))
            .await,
        422,
        "role",
    );
    // Unknown routes and wrong methods answer in the error shape.
    refused(
        api.get("/api/v1/nothing-here", &t.admin).await,
        404,
        "/api/v1/nothing-here",
    );
    refused(
        api.call("DELETE", "/api/v1/me", Some(&t.admin), None).await,
        405,
        "DELETE",
    );
    let r = api
        .http
        .delete(format!("{}/api/v1/me", api.base))
        .bearer_auth(&t.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["allow"], "GET,HEAD");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_an_object_resets_nothing() {
    let (_app, api, t) = start().await;
    let a = &t.admin;
    let agent = api.ok("/api/v1/agents/amy", a).await;
    let channel = api.ok("/api/v1/channels/mail", a).await;
    for path in ["/api/v1/agents/amy", "/api/v1/channels/mail"] {
        for body in [json!([]), json!([1, 2]), json!("x"), json!(null), json!(3)] {
            refused(api.put(path, a, body.clone()).await, 422, "object");
        }
    }
    refused(
        api.call("PATCH", "/api/v1/settings", Some(a), Some(json!([])))
            .await,
        422,
        "object",
    );
    let mut after = api.ok("/api/v1/agents/amy", a).await;
    after["status_since"] = agent["status_since"].clone();
    assert_eq!(after, agent);
    assert_eq!(api.ok("/api/v1/channels/mail", a).await, channel);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_string_has_a_limit_and_nothing_oversized_is_published() {
    let (app, api, t) = start().await;
    let a = &t.admin;
    let id = Uuid::new_v4();
    let mut actions = app
        .client
        .subscribe("fl.acme.agent.amy.action")
        .await
        .unwrap();
    // A megabyte is refused at once as too large, not after five seconds of publishing.
    let mega = "x".repeat(1 << 20);
    let started = std::time::Instant::now();
    refused(
        api.post(
            &format!("/api/v1/conversations/{id}/decline"),
            &t.amy,
            json!({"reason": mega}),
        )
        .await,
        413,
        "bytes",
    );
    refused(
        api.post(
            &format!("/api/v1/conversations/{id}/reply"),
            &t.amy,
            json!({"text": mega}),
        )
        .await,
        413,
        "bytes",
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // Each field says its limit.
    let long = |n: usize| "é".repeat(n);
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "PATCH",
            "/api/v1/settings",
            json!({"name": long(201)}),
            "name: at most 200",
        ),
        (
            "PATCH",
            "/api/v1/settings",
            json!({"bot_reply": long(5001)}),
            "bot_reply: at most 5000",
        ),
        (
            "PATCH",
            "/api/v1/settings",
            json!({"handover_keywords": [long(101)]}),
            "at most 100",
        ),
        (
            "PATCH",
            "/api/v1/settings",
            json!({"handover_keywords": vec!["k"; 101]}),
            "at most 100",
        ),
        (
            "PUT",
            "/api/v1/channels/web2",
            json!({"name": long(201)}),
            "name: at most 200",
        ),
        (
            "PUT",
            "/api/v1/channels/web2",
            json!({"required_skills": [long(65)]}),
            "at most 64",
        ),
        (
            "PUT",
            "/api/v1/channels/web2",
            json!({"survey": {"question": long(5001), "scale": 5, "window_minutes": 5}}),
            "question: at most 5000",
        ),
        (
            "PUT",
            "/api/v1/agents/cal",
            json!({"display_name": long(201)}),
            "display_name: at most 200",
        ),
        (
            "PUT",
            "/api/v1/agents/cal",
            json!({"skills": vec!["s"; 51]}),
            "skills: at most 50",
        ),
        (
            "POST",
            "/api/v1/tokens",
            json!({"role": "admin", "name": long(201)}),
            "name: at most 200",
        ),
        (
            "POST",
            "/api/v1/webhooks",
            json!({"url": format!("http://example.com/{}", "a".repeat(2100))}),
            "url: at most 2048",
        ),
        (
            "POST",
            "/api/v1/webhooks",
            json!({"url": "http://example.com/", "description": long(501)}),
            "description: at most 500",
        ),
    ];
    for (method, path, body, needle) in &cases {
        let got = api.call(method, path, Some(a), Some(body.clone())).await;
        assert_eq!(got.0, 422, "{method} {path}: {}", got.1);
        refused(got, 422, needle);
    }
    for (path, body, needle) in [
        (
            format!("/api/v1/conversations/{id}/reply"),
            json!({"text": long(5001)}),
            "text: at most 5000",
        ),
        (
            format!("/api/v1/conversations/{id}/decline"),
            json!({"reason": long(501)}),
            "reason: at most 500",
        ),
    ] {
        refused(api.post(&path, &t.amy, body).await, 422, needle);
    }
    refused(
        api.put(
            "/api/v1/agents/amy/presence",
            &t.amy,
            json!({"status": "not_ready", "reason": long(201)}),
        )
        .await,
        422,
        "reason: at most 200",
    );
    // None of it reached the bus.
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            futures::StreamExt::next(&mut actions)
        )
        .await
        .is_err(),
        "an action was published"
    );
}
