//! The HTTP API over the real workers, NATS and Postgres: every endpoint, the roles, tenant
//! isolation and bad input (4xx with a message).

use std::time::Duration;

use crate::helpers::api::TestApi;
use crate::helpers::{eventually, next_matching, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

pub(crate) const SETUP: &str = r#"{"tenants":[
  {"id": "acme", "dispatch_cycle_seconds": 30,
   "channels": [{"id": "line", "kind": "line", "bot_enabled": true},
                {"id": "mail", "kind": "email", "bot_enabled": false, "required_skills": ["en"]}],
   "agents": [{"id": "amy", "name": "Amy", "skills": ["en", "zh"], "capacity": 2},
              {"id": "ben", "name": "Ben", "skills": ["zh"], "capacity": 2}]},
  {"id": "other",
   "channels": [{"id": "web", "bot_enabled": false}],
   "agents": [{"id": "zoe", "name": "Zoe"}]}
]}"#;

pub(crate) struct Tokens {
    pub admin: String,
    pub supervisor: String,
    pub amy: String,
    pub ben: String,
    pub other_admin: String,
}

pub(crate) async fn start() -> (TestApp, TestApi, Tokens) {
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await;
    let tokens = Tokens {
        admin: app.token("acme", "admin", None).await,
        supervisor: app.token("acme", "supervisor", None).await,
        amy: app.token("acme", "agent", Some("amy")).await,
        ben: app.token("acme", "agent", Some("ben")).await,
        other_admin: app.token("other", "admin", None).await,
    };
    (app, api, tokens)
}

pub(crate) fn message(body: &Value) -> &str {
    body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("an error body: {body}"))
}

/// Asserts the status and that the error names `needle`.
pub(crate) fn refused(got: (u16, Value), status: u16, needle: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error"]["status"], status);
    assert!(
        message(&got.1).contains(needle),
        "{:?} should mention {needle:?}",
        message(&got.1)
    );
}

/// A conversation of `customer` on `mail` (no bot), queued.
pub(crate) async fn queued(app: &TestApp, customer: &str) -> Uuid {
    let mut events = app
        .client
        .subscribe("fl.acme.events.conversation")
        .await
        .unwrap();
    app.customer_says("acme", "mail", customer, "hello").await;
    let v = next_matching(&mut events, "queued", |v| {
        v["to"] == "waiting" && v["customer_id"] == customer
    })
    .await;
    v["conversation_id"].as_str().unwrap().parse().unwrap()
}

pub(crate) async fn state(app: &TestApp, conversation: Uuid) -> String {
    app.pg
        .query_one(
            "SELECT state FROM conversations WHERE id = $1",
            &[&conversation],
        )
        .await
        .unwrap()
        .get(0)
}

pub(crate) async fn wait_state(app: &TestApp, conversation: Uuid, want: &str) {
    eventually(
        &format!("{conversation} to be {want}"),
        Duration::from_secs(20),
        || async { (state(app, conversation).await == want).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_endpoint() {
    let (_app, api, _) = start().await;
    // Served without a token.
    let (status, doc) = api.call("GET", "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let expected: &[(&str, &[&str])] = &[
        ("/api/v1/me", &["get"]),
        ("/api/v1/settings", &["get", "patch"]),
        ("/api/v1/channels", &["get"]),
        ("/api/v1/channels/{id}", &["get", "put", "delete"]),
        ("/api/v1/channels/{channel}/customers/{customer}", &["get"]),
        (
            "/api/v1/channels/{channel}/customers/{customer}/responsible-agent",
            &["put", "delete"],
        ),
        ("/api/v1/responsible-agents/deal", &["post"]),
        ("/api/v1/agents", &["get"]),
        ("/api/v1/agents/{id}", &["get", "put"]),
        ("/api/v1/agents/{id}/presence", &["put"]),
        ("/api/v1/conversations", &["get"]),
        ("/api/v1/conversations/{id}", &["get"]),
        ("/api/v1/conversations/{id}/accept", &["post"]),
        ("/api/v1/conversations/{id}/decline", &["post"]),
        ("/api/v1/conversations/{id}/reply", &["post"]),
        ("/api/v1/conversations/{id}/close", &["post"]),
        ("/api/v1/conversations/{id}/transfer", &["post"]),
        ("/api/v1/queue", &["get"]),
        ("/api/v1/queue/live", &["get"]),
        ("/api/v1/service-level", &["get"]),
        ("/api/v1/live", &["get"]),
        ("/api/v1/tokens", &["get", "post"]),
        ("/api/v1/tokens/{id}", &["delete"]),
        ("/api/v1/webhooks", &["get", "post"]),
        ("/api/v1/webhooks/{id}", &["get", "delete"]),
        ("/api/v1/webhooks/{id}/deliveries", &["get"]),
        (
            "/api/v1/webhooks/{id}/deliveries/{delivery}/retry",
            &["post"],
        ),
    ];
    let paths = doc["paths"].as_object().unwrap();
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    documented.sort();
    let mut wanted: Vec<&str> = expected.iter().map(|(p, _)| *p).collect();
    wanted.sort();
    assert_eq!(documented, wanted);
    for (path, methods) in expected {
        for m in *methods {
            let op = &paths[*path][*m];
            assert!(op.is_object(), "{m} {path} is documented");
            assert!(op["summary"].is_string(), "{m} {path} has a summary");
            assert!(
                op["responses"].as_object().unwrap().len() >= 2,
                "{m} {path} lists its errors"
            );
        }
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_and_roles_decide_what_each_may_do() {
    let (app, api, t) = start().await;
    refused(
        api.call("GET", "/api/v1/me", None, None).await,
        401,
        "no token",
    );
    refused(
        api.get("/api/v1/me", "fl_nonsense").await,
        401,
        "unknown or revoked",
    );

    let me = api.ok("/api/v1/me", &t.amy).await;
    assert_eq!(
        me,
        json!({"tenant": "acme", "role": "agent", "agent_id": "amy"})
    );
    assert_eq!(
        api.ok("/api/v1/me", &t.supervisor).await["role"],
        "supervisor"
    );

    // Reads of the whole tenant: staff only.
    for path in [
        "/api/v1/settings",
        "/api/v1/channels",
        "/api/v1/channels/line",
        "/api/v1/agents",
        "/api/v1/queue",
    ] {
        assert_eq!(api.get(path, &t.admin).await.0, 200, "{path}");
        assert_eq!(api.get(path, &t.supervisor).await.0, 200, "{path}");
        refused(api.get(path, &t.amy).await, 403, "admin or supervisor");
    }
    // Writes of settings: admin only.
    let changes: Vec<(&str, &str, Value)> = vec![
        ("PATCH", "/api/v1/settings", json!({"offer_limit": 2})),
        ("PUT", "/api/v1/channels/chat", json!({"kind": "webchat"})),
        ("PUT", "/api/v1/agents/cat", json!({"display_name": "Cat"})),
        ("POST", "/api/v1/tokens", json!({"role": "supervisor"})),
        (
            "POST",
            "/api/v1/webhooks",
            json!({"url": "http://127.0.0.1:9/hook"}),
        ),
    ];
    for (method, path, body) in &changes {
        for token in [&t.supervisor, &t.amy] {
            refused(
                api.call(method, path, Some(token), Some(body.clone()))
                    .await,
                403,
                "admin",
            );
        }
        let (status, body) = api
            .call(method, path, Some(&t.admin), Some(body.clone()))
            .await;
        assert!(
            status == 200 || status == 201,
            "{method} {path}: {status} {body}"
        );
    }
    for path in ["/api/v1/tokens", "/api/v1/webhooks"] {
        assert_eq!(api.get(path, &t.admin).await.0, 200);
        refused(api.get(path, &t.supervisor).await, 403, "admin");
    }
    // An agent sees and sets only its own agent.
    assert_eq!(
        api.ok("/api/v1/agents/amy", &t.amy).await["display_name"],
        "Amy"
    );
    refused(
        api.get("/api/v1/agents/ben", &t.amy).await,
        403,
        "only for its own agent (amy)",
    );
    refused(
        api.put(
            "/api/v1/agents/ben/presence",
            &t.amy,
            json!({"status": "ready"}),
        )
        .await,
        403,
        "own agent",
    );
    // Staff may set anyone's presence; only agents act on conversations.
    let (status, body) = api
        .put(
            "/api/v1/agents/ben/presence",
            &t.supervisor,
            json!({"status": "not_ready", "reason": "meeting"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    eventually("ben not ready", Duration::from_secs(10), || async {
        let a = api.ok("/api/v1/agents/ben", &t.admin).await;
        (a["status"] == "away" && a["status_reason"] == "meeting").then_some(())
    })
    .await;
    let c = queued(&app, "R1").await;
    refused(
        api.post(
            &format!("/api/v1/conversations/{c}/accept"),
            &t.supervisor,
            json!({}),
        )
        .await,
        403,
        "only an agent token",
    );

    // A revoked token stops working at once.
    let (status, made) = api
        .post(
            "/api/v1/tokens",
            &t.admin,
            json!({"role": "agent", "agent_id": "ben", "name": "ben's desk"}),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let token = made["token"].as_str().unwrap();
    assert_eq!(api.ok("/api/v1/me", token).await["agent_id"], "ben");
    let listed = api.ok("/api/v1/tokens", &t.admin).await;
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == made["id"])
        .unwrap();
    assert_eq!(row["name"], "ben's desk");
    assert!(row.get("token").is_none(), "the token is never shown again");
    let (status, _) = api
        .call(
            "DELETE",
            &format!("/api/v1/tokens/{}", made["id"].as_str().unwrap()),
            Some(&t.admin),
            None,
        )
        .await;
    assert_eq!(status, 204);
    refused(api.get("/api/v1/me", token).await, 401, "revoked");
    refused(
        api.call(
            "DELETE",
            &format!("/api/v1/tokens/{}", Uuid::new_v4()),
            Some(&t.admin),
            None,
        )
        .await,
        404,
        "no token",
    );
    // Token requests are checked.
    refused(
        api.post("/api/v1/tokens", &t.admin, json!({"role": "agent"}))
            .await,
        422,
        "names its agent",
    );
    refused(
        api.post(
            "/api/v1/tokens",
            &t.admin,
            json!({"role": "agent", "agent_id": "nobody"}),
        )
        .await,
        422,
        "no agent nobody",
    );
    refused(
        api.post("/api/v1/tokens", &t.admin, json!({"role": "root"}))
            .await,
        422,
        "unknown variant",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_reaches_another_tenants_data() {
    let (app, api, t) = start().await;
    let c = queued(&app, "I1").await;
    let (status, hook) = api
        .post(
            "/api/v1/webhooks",
            &t.admin,
            json!({"url": "http://127.0.0.1:9/h"}),
        )
        .await;
    assert_eq!(status, 201);
    let hook = hook["id"].as_str().unwrap().to_string();

    let o = &t.other_admin;
    // Lists hold only the token's tenant.
    let channels = api.ok("/api/v1/channels", o).await;
    assert_eq!(
        channels
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["web"]
    );
    let agents = api.ok("/api/v1/agents", o).await;
    assert_eq!(agents.as_array().unwrap().len(), 1);
    assert_eq!(agents[0]["id"], "zoe");
    assert_eq!(api.ok("/api/v1/conversations", o).await, json!([]));
    assert_eq!(api.ok("/api/v1/webhooks", o).await, json!([]));
    let q = api.ok("/api/v1/queue", o).await;
    assert_eq!(q["counts"]["waiting"], 0);
    assert_eq!(api.ok("/api/v1/settings", o).await["id"], "other");
    let tokens = api.ok("/api/v1/tokens", o).await;
    assert_eq!(tokens.as_array().unwrap().len(), 1);
    // Another tenant's rows by id: not found, not forbidden (nothing is told about them).
    refused(
        api.get(&format!("/api/v1/conversations/{c}"), o).await,
        404,
        "no conversation",
    );
    // A customer (SPEC D11): acme's I1 on mail is not another tenant's to read or assign.
    assert_eq!(
        api.get("/api/v1/channels/mail/customers/I1", &t.admin)
            .await
            .0,
        200
    );
    refused(
        api.get("/api/v1/channels/mail/customers/I1", o).await,
        404,
        "no customer",
    );
    refused(
        api.put(
            "/api/v1/channels/mail/customers/I1/responsible-agent",
            o,
            json!({"agent_id": "zoe"}),
        )
        .await,
        404,
        "no channel",
    );
    refused(
        api.get("/api/v1/channels/line", o).await,
        404,
        "no channel line",
    );
    refused(api.get("/api/v1/agents/amy", o).await, 404, "no agent amy");
    refused(
        api.get(&format!("/api/v1/webhooks/{hook}"), o).await,
        404,
        "no webhook",
    );
    refused(
        api.call("DELETE", &format!("/api/v1/webhooks/{hook}"), Some(o), None)
            .await,
        404,
        "no webhook",
    );
    refused(
        api.put(
            "/api/v1/agents/amy/presence",
            o,
            json!({"status": "offline"}),
        )
        .await,
        404,
        "no agent amy",
    );
    // A PUT of the same id makes the token's tenant's own channel, leaving acme's alone.
    let (status, _) = api
        .put(
            "/api/v1/channels/line",
            o,
            json!({"kind": "sms", "required_skills": ["x"]}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(
        api.ok("/api/v1/channels/line", &t.admin).await["kind"],
        "line"
    );
    // Tokens cannot be made for another tenant's agent.
    refused(
        api.post(
            "/api/v1/tokens",
            o,
            json!({"role": "agent", "agent_id": "amy"}),
        )
        .await,
        422,
        "no agent amy",
    );
    // Another tenant's agent token cannot act on the conversation.
    let zoe = app.token("other", "agent", Some("zoe")).await;
    refused(
        api.post(
            &format!("/api/v1/conversations/{c}/accept"),
            &zoe,
            json!({}),
        )
        .await,
        404,
        "no conversation",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_channels_and_agents_are_managed_with_clear_errors() {
    let (app, api, t) = start().await;
    let a = &t.admin;
    // Settings.
    let s = api.ok("/api/v1/settings", a).await;
    assert_eq!(s["dispatch_cycle_seconds"], 30);
    assert_eq!(s["offer_limit"], 3);
    let (status, s) = api
        .call(
            "PATCH",
            "/api/v1/settings",
            Some(a),
            Some(json!({"offer_limit": 1, "dispatch_cycle_seconds": 45})),
        )
        .await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        (
            s["offer_limit"].as_i64(),
            s["dispatch_cycle_seconds"].as_i64()
        ),
        (Some(1), Some(45))
    );
    refused(
        api.call(
            "PATCH",
            "/api/v1/settings",
            Some(a),
            Some(json!({"offer_limit": 0})),
        )
        .await,
        422,
        "offer_limit must be 1 to 50",
    );
    refused(
        api.call(
            "PATCH",
            "/api/v1/settings",
            Some(a),
            Some(json!({"dispatch_cycle_seconds": 2})),
        )
        .await,
        422,
        "5 to 86400",
    );
    refused(
        api.call(
            "PATCH",
            "/api/v1/settings",
            Some(a),
            Some(json!({"kb_min_score": 2.0})),
        )
        .await,
        422,
        "kb_min_score",
    );
    refused(
        api.call(
            "PATCH",
            "/api/v1/settings",
            Some(a),
            Some(json!({"ofer_limit": 2})),
        )
        .await,
        422,
        "unknown field `ofer_limit`",
    );
    refused(
        api.call(
            "PATCH",
            "/api/v1/settings",
            Some(a),
            Some(json!({"offer_limit": "two"})),
        )
        .await,
        422,
        "invalid type",
    );
    // Malformed JSON and a missing content type.
    let r = api
        .http
        .patch(format!("{}/api/v1/settings", api.base))
        .bearer_auth(a)
        .header("content-type", "application/json")
        .body("{\"offer_limit\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = json_of(r).await;
    assert!(
        message(&body).contains("EOF") || message(&body).contains("parse"),
        "{body}"
    );
    let r = api
        .http
        .patch(format!("{}/api/v1/settings", api.base))
        .bearer_auth(a)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert!(message(&json_of(r).await).contains("Content-Type"));

    // Channels: create, replace, read, business hours and survey checked, delete.
    let hours = json!({"timezone": "Asia/Taipei", "weekly": {"mon": [["09:00", "18:00"]]}, "closed_message": "closed"});
    let (status, ch) = api
        .put("/api/v1/channels/chat", a, json!({"kind": "webchat", "name": "Web chat", "required_skills": ["EN"], "bot_enabled": false, "weight": 3, "business_hours": hours, "survey": {"question": "1-5?"}}))
        .await;
    assert_eq!(status, 201, "{ch}");
    assert_eq!(ch["required_skills"], json!(["en"]));
    assert_eq!(ch["weight"], 3, "SPEC D10");
    assert_eq!(ch["business_hours"]["timezone"], "Asia/Taipei");
    assert_eq!(ch["survey"]["scale"], 5);
    let (status, ch) = api
        .put(
            "/api/v1/channels/chat",
            a,
            json!({"kind": "webchat", "bot_enabled": true}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(ch["business_hours"], Value::Null);
    assert_eq!(ch["bot_idle_seconds"], 1800);
    assert_eq!(ch["weight"], 1, "PUT replaces: the default weight");
    // The first version's priority is still read, as weight priority + 1.
    let (_, ch) = api
        .put(
            "/api/v1/channels/chat",
            a,
            json!({"kind": "webchat", "priority": 4}),
        )
        .await;
    assert_eq!(ch["weight"], 5);
    refused(
        api.put("/api/v1/channels/chat", a, json!({"weight": 0}))
            .await,
        422,
        "weight",
    );
    assert_eq!(
        api.ok("/api/v1/channels/chat", &t.supervisor).await["bot_enabled"],
        true
    );
    assert_eq!(
        api.ok("/api/v1/channels", a)
            .await
            .as_array()
            .unwrap()
            .len(),
        3
    );
    refused(
        api.put("/api/v1/channels/chat", a, json!({"business_hours": {"timezone": "Mars/Base", "weekly": {}, "closed_message": "x"}})).await,
        422,
        "business_hours",
    );
    refused(api.put("/api/v1/channels/chat", a, json!({"business_hours": {"timezone": "UTC", "weekly": {"mon": [["18:00", "09:00"]]}, "closed_message": "x"}})).await, 422, "business_hours");
    refused(
        api.put(
            "/api/v1/channels/chat",
            a,
            json!({"survey": {"question": "?", "scale": 20}}),
        )
        .await,
        422,
        "scale must be 2 to 10",
    );
    refused(
        api.put("/api/v1/channels/chat", a, json!({"welcome_flow": "nope"}))
            .await,
        422,
        "flow \"nope\" has no published version",
    );
    refused(
        api.put("/api/v1/channels/chat", a, json!({"bot_idle_seconds": 0}))
            .await,
        422,
        "at least 1",
    );
    refused(
        api.put("/api/v1/channels/bad.id", a, json!({})).await,
        400,
        "invalid channel id",
    );
    refused(
        api.get("/api/v1/channels/nope", a).await,
        404,
        "no channel nope",
    );
    let (status, _) = api
        .call("DELETE", "/api/v1/channels/chat", Some(a), None)
        .await;
    assert_eq!(status, 204);
    refused(
        api.call("DELETE", "/api/v1/channels/chat", Some(a), None)
            .await,
        404,
        "no channel chat",
    );
    queued(&app, "K1").await;
    refused(
        api.call("DELETE", "/api/v1/channels/mail", Some(a), None)
            .await,
        409,
        "has 1 conversations",
    );

    // Agents: create, change, checked.
    let (status, cat) = api
        .put(
            "/api/v1/agents/cat",
            a,
            json!({"display_name": "Cat", "skills": ["JA", "en"], "capacity": 4}),
        )
        .await;
    assert_eq!(status, 201, "{cat}");
    assert_eq!(cat["skills"], json!(["en", "ja"]));
    assert_eq!(cat["status"], "logged_out");
    assert_eq!(
        (cat["serving"].as_i64(), cat["open_offers"].as_i64()),
        (Some(0), Some(0))
    );
    // PUT replaces: what is left out takes its default.
    let (status, cat) = api
        .put("/api/v1/agents/cat", a, json!({"capacity": 6}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            cat["capacity"].as_i64(),
            cat["skills"].clone(),
            cat["display_name"].as_str()
        ),
        (Some(6), json!([]), Some(""))
    );
    let (status, _) = api
        .put(
            "/api/v1/agents/cat",
            a,
            json!({"display_name": "Cat", "skills": ["en"], "capacity": 6}),
        )
        .await;
    assert_eq!(status, 200);
    refused(
        api.put("/api/v1/agents/cat", a, json!({"capacity": 5000}))
            .await,
        422,
        "capacity must be 0 to 1000",
    );
    refused(
        api.put(
            "/api/v1/agents/cat/presence",
            &t.supervisor,
            json!({"status": "busy"}),
        )
        .await,
        422,
        "unknown variant `busy`",
    );
    refused(
        api.put(
            "/api/v1/agents/nobody/presence",
            &t.supervisor,
            json!({"status": "ready"}),
        )
        .await,
        404,
        "no agent nobody",
    );
    assert_eq!(
        api.ok("/api/v1/agents", a).await.as_array().unwrap().len(),
        3
    );

    // An agent made ready through the API gets the waiting conversation (capacity and skills
    // from the API, presence through the dispatcher).
    let (status, _) = api
        .put("/api/v1/agents/cat/presence", a, json!({"status": "ready"}))
        .await;
    assert_eq!(status, 202);
    eventually("cat to be offered K1", Duration::from_secs(20), || async {
        let a = api.ok("/api/v1/agents/cat", &t.admin).await;
        (a["open_offers"] == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_works_a_conversation_through_the_api() {
    let (app, api, t) = start().await;
    let mut outbound = app.client.subscribe("fl.acme.outbound.mail").await.unwrap();
    let (status, _) = api
        .put(
            "/api/v1/agents/amy/presence",
            &t.amy,
            json!({"status": "ready"}),
        )
        .await;
    assert_eq!(status, 202);
    let c = queued(&app, "W1").await;
    wait_state(&app, c, "assigning").await;

    // The agent sees it offered, with its deadline; ben sees nothing of it.
    let mine = api.ok("/api/v1/conversations", &t.amy).await;
    assert_eq!(mine.as_array().unwrap().len(), 1);
    assert_eq!(mine[0]["offered_to"], "amy");
    assert!(mine[0]["offer_deadline"].is_string());
    assert_eq!(api.ok("/api/v1/conversations", &t.ben).await, json!([]));
    refused(
        api.get(&format!("/api/v1/conversations/{c}"), &t.ben).await,
        403,
        "not ben's",
    );
    refused(
        api.get("/api/v1/conversations?agent=amy", &t.ben).await,
        403,
        "only its own",
    );
    // Actions that do not fit are refused before anything is published.
    refused(
        api.post(
            &format!("/api/v1/conversations/{c}/accept"),
            &t.ben,
            json!({}),
        )
        .await,
        409,
        "not offered to you",
    );
    refused(
        api.post(
            &format!("/api/v1/conversations/{c}/reply"),
            &t.amy,
            json!({"text": "hi"}),
        )
        .await,
        409,
        "not serving",
    );
    refused(
        api.post(
            &format!("/api/v1/conversations/{}/accept", Uuid::new_v4()),
            &t.amy,
            json!({}),
        )
        .await,
        404,
        "no conversation",
    );
    refused(
        api.post("/api/v1/conversations/not-a-uuid/accept", &t.amy, json!({}))
            .await,
        404,
        "no conversation",
    );

    // Accept (twice with one Idempotency-Key: applied once, the same answer twice).
    let key = Uuid::new_v4().to_string();
    let mut action_ids = Vec::new();
    for _ in 0..2 {
        let r = api
            .http
            .post(format!("{}/api/v1/conversations/{c}/accept", api.base))
            .bearer_auth(&t.amy)
            .header("idempotency-key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let body: Value = json_of(r).await;
        action_ids.push(body["action_id"].clone());
        assert_eq!(body["type"], "accept");
    }
    assert_eq!(action_ids[0], action_ids[1]);
    wait_state(&app, c, "processing").await;
    let r = api
        .http
        .post(format!("{}/api/v1/conversations/{c}/accept", api.base))
        .bearer_auth(&t.amy)
        .header("idempotency-key", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Reply: reaches the customer's gateway.
    refused(
        api.post(
            &format!("/api/v1/conversations/{c}/reply"),
            &t.amy,
            json!({"text": "  "}),
        )
        .await,
        422,
        "1 to 5000",
    );
    refused(
        api.post(
            &format!("/api/v1/conversations/{c}/reply"),
            &t.amy,
            json!({}),
        )
        .await,
        422,
        "missing field `text`",
    );
    let (status, body) = api
        .post(
            &format!("/api/v1/conversations/{c}/reply"),
            &t.amy,
            json!({"text": "您好，我是 Amy"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let out = next_matching(&mut outbound, "the reply", |v| v["author"] == "agent").await;
    assert_eq!(out["text"], "您好，我是 Amy");
    assert_eq!(out["customer_id"], "W1");

    // The conversation with its transcript, history and offers.
    let detail = eventually(
        "the reply in the transcript",
        Duration::from_secs(10),
        || async {
            let d = api.ok(&format!("/api/v1/conversations/{c}"), &t.amy).await;
            // hello, the place in line told when it was queued, the reply.
            (d["messages"].as_array().unwrap().len() == 3).then_some(d)
        },
    )
    .await;
    assert_eq!(detail["state"], "processing");
    assert_eq!(detail["agent_id"], "amy");
    assert_eq!(detail["customer"]["id"], "W1");
    assert_eq!(detail["messages"][0]["author"], "customer");
    assert_eq!(detail["messages"][0]["text"], "hello");
    assert_eq!(detail["messages"][1]["author"], "bot");
    assert_eq!(detail["messages"][2]["author"], "agent");
    let history: Vec<&str> = detail["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["to"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["waiting", "assigning", "processing"]);
    assert_eq!(detail["offers"][0]["status"], "accepted");
    assert_eq!(
        api.ok(&format!("/api/v1/conversations/{c}"), &t.supervisor)
            .await["id"],
        c.to_string()
    );

    // Transfer checks, then close.
    refused(
        api.post(
            &format!("/api/v1/conversations/{c}/transfer"),
            &t.amy,
            json!({"to_agent": "amy"}),
        )
        .await,
        422,
        "yourself",
    );
    refused(
        api.post(
            &format!("/api/v1/conversations/{c}/transfer"),
            &t.amy,
            json!({"to_agent": "nobody"}),
        )
        .await,
        422,
        "no agent nobody",
    );
    refused(
        api.post(
            &format!("/api/v1/conversations/{c}/close"),
            &t.ben,
            json!({}),
        )
        .await,
        409,
        "not serving",
    );
    let (status, _) = api
        .call(
            "POST",
            &format!("/api/v1/conversations/{c}/close"),
            Some(&t.amy),
            None,
        )
        .await;
    assert_eq!(status, 202);
    wait_state(&app, c, "completed").await;
    let done = api
        .ok(
            "/api/v1/conversations?state=completed&agent=amy",
            &t.supervisor,
        )
        .await;
    assert_eq!(done.as_array().unwrap().len(), 1);
    assert_eq!(
        api.ok(&format!("/api/v1/conversations/{c}"), &t.amy).await["history"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decline_and_transfer_through_the_api() {
    let (app, api, t) = start().await;
    for token in [&t.amy, &t.ben] {
        let me = api.ok("/api/v1/me", token).await;
        let path = format!(
            "/api/v1/agents/{}/presence",
            me["agent_id"].as_str().unwrap()
        );
        assert_eq!(
            api.put(&path, token, json!({"status": "ready"})).await.0,
            202
        );
    }
    // mail needs "en": only amy has it.
    let c = queued(&app, "T1").await;
    wait_state(&app, c, "assigning").await;
    let (status, body) = api
        .post(
            &format!("/api/v1/conversations/{c}/decline"),
            &t.amy,
            json!({"reason": "busy"}),
        )
        .await;
    assert_eq!((status, body["type"].as_str()), (202, Some("decline")));
    wait_state(&app, c, "waiting").await;
    let d = api
        .ok(&format!("/api/v1/conversations/{c}"), &t.admin)
        .await;
    assert_eq!(d["offers"][0]["status"], "declined");

    // Transfer: a new conversation accepted by amy, handed to ben by name.
    let c2 = queued(&app, "T2").await;
    wait_state(&app, c2, "assigning").await;
    assert_eq!(
        api.post(
            &format!("/api/v1/conversations/{c2}/accept"),
            &t.amy,
            json!({})
        )
        .await
        .0,
        202
    );
    wait_state(&app, c2, "processing").await;
    let (status, body) = api
        .post(
            &format!("/api/v1/conversations/{c2}/transfer"),
            &t.amy,
            json!({"to_agent": "ben"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    // SPEC D12: ben serves it at once, with no offer to accept.
    eventually("c2 served by ben", Duration::from_secs(20), || async {
        let d = api
            .ok(&format!("/api/v1/conversations/{c2}"), &t.admin)
            .await;
        (d["state"] == "processing" && d["agent_id"] == "ben").then_some(())
    })
    .await;
    // His now, it is his to see and to reply in; no longer amy's.
    let d = api.ok(&format!("/api/v1/conversations/{c2}"), &t.ben).await;
    assert_eq!(d["offers"].as_array().unwrap().len(), 1, "{d}");
    let (status, body) = api
        .post(
            &format!("/api/v1/conversations/{c2}/reply"),
            &t.ben,
            json!({"text": "Ben here"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        api.post(
            &format!("/api/v1/conversations/{c2}/reply"),
            &t.amy,
            json!({"text": "amy again"})
        )
        .await
        .0,
        409
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_snapshot_shows_states_counts_and_agents() {
    let (app, api, t) = start().await;
    // Waiting: two on mail (no agent ready). Bot: one on line.
    let w1 = queued(&app, "Q1").await;
    let w2 = queued(&app, "Q2").await;
    app.customer_says("acme", "line", "Q3", "hi").await;
    app.wait_for_state("acme", "line", "Q3", "bot").await;
    // Processing: amy (ready) takes Q1 first (queued first), then Q2 is offered to her.
    api.presence(&t.amy, "amy", "ready").await;
    wait_state(&app, w1, "assigning").await;
    assert_eq!(
        api.post(
            &format!("/api/v1/conversations/{w1}/accept"),
            &t.amy,
            json!({})
        )
        .await
        .0,
        202
    );
    wait_state(&app, w1, "processing").await;
    wait_state(&app, w2, "assigning").await;

    let q = api.ok("/api/v1/queue?tz=Asia/Taipei", &t.supervisor).await;
    assert_eq!(q["timezone"], "Asia/Taipei");
    assert_eq!(
        q["counts"],
        json!({"script": 0, "bot": 1, "waiting": 0, "assigning": 1, "processing": 1, "completed_today": 0})
    );
    let rows = q["conversations"].as_array().unwrap();
    let states: Vec<&str> = rows.iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert_eq!(
        states,
        ["assigning", "processing", "bot"],
        "display order: by state"
    );
    assert_eq!(rows[0]["offered_to"], "amy");
    assert_eq!(rows[0]["required_skills"], json!(["en"]));
    assert!(rows[0]["waiting_seconds"].as_i64().unwrap() >= 0);
    assert_eq!(rows[1]["agent_id"], "amy");
    assert_eq!(rows[2]["customer"]["id"], "Q3");
    assert!(q["note"].as_str().unwrap().contains("not dispatch order"));
    let amy = q["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "amy")
        .unwrap();
    assert_eq!(
        (
            amy["status"].as_str(),
            amy["serving"].as_i64(),
            amy["capacity"].as_i64(),
            amy["open_offers"].as_i64()
        ),
        (Some("ready"), Some(1), Some(2), Some(1))
    );

    // Completed today counts.
    assert_eq!(
        api.post(
            &format!("/api/v1/conversations/{w1}/close"),
            &t.amy,
            json!({})
        )
        .await
        .0,
        202
    );
    wait_state(&app, w1, "completed").await;
    let q = api.ok("/api/v1/queue", &t.admin).await;
    assert_eq!(q["counts"]["completed_today"], 1);
    assert_eq!(
        q["conversations"].as_array().unwrap().last().unwrap()["state"],
        "completed"
    );
    refused(
        api.get("/api/v1/queue?tz=Mars/Olympus", &t.admin).await,
        400,
        "unknown time zone",
    );
    refused(
        api.get("/api/v1/queue?colour=red", &t.admin).await,
        400,
        "unknown field",
    );

    // Filters of the conversation list.
    assert_eq!(listed(&api, &t.admin, "state=bot").await, 1);
    assert_eq!(listed(&api, &t.admin, "state=assigning,completed").await, 2);
    assert_eq!(listed(&api, &t.admin, "channel=mail").await, 2);
    assert_eq!(listed(&api, &t.admin, "skill=en").await, 2);
    assert_eq!(listed(&api, &t.admin, "skill=zh").await, 0);
    assert_eq!(listed(&api, &t.admin, "agent=amy").await, 2);
    assert_eq!(listed(&api, &t.admin, "limit=1").await, 1);
    assert_eq!(listed(&api, &t.admin, "limit=1&offset=2").await, 1);
    refused(
        api.get("/api/v1/conversations?state=lost", &t.admin).await,
        400,
        "not one of",
    );
    refused(
        api.get("/api/v1/conversations?limit=0", &t.admin).await,
        400,
        "limit must be 1 to 500",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_streams_live_events() {
    let (app, api, t) = start().await;
    refused(
        api.get("/api/v1/queue/live", &t.amy).await,
        403,
        "admin or supervisor",
    );
    let mut resp = api
        .http
        .get(format!(
            "{}/api/v1/queue/live?access_token={}",
            api.base, t.supervisor
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut seen = String::new();
    read_until(&mut resp, &mut seen, "event: hello").await;
    app.customer_says("acme", "mail", "L1", "hi").await;
    read_until(&mut resp, &mut seen, "\"to\":\"waiting\"").await;
    assert!(seen.contains("event: conversation"));
    assert_eq!(
        api.put(
            "/api/v1/agents/ben/presence",
            &t.ben,
            json!({"status": "not_ready", "reason": "lunch"})
        )
        .await
        .0,
        202
    );
    read_until(&mut resp, &mut seen, "\"reason\":\"lunch\"").await;
    assert!(seen.contains("event: presence"));
    assert!(seen.contains("\"agent_id\":\"ben\""));
}

/// Reads a server-sent event stream into `seen` until it contains `needle`.
async fn read_until(resp: &mut reqwest::Response, seen: &mut String, needle: &str) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !seen.contains(needle) {
            let chunk = resp.chunk().await.unwrap().expect("stream open");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} in {seen:?}"));
}

/// How many conversations the list gives for `query`.
async fn listed(api: &TestApi, token: &str, query: &str) -> usize {
    api.ok(&format!("/api/v1/conversations?{query}"), token)
        .await
        .as_array()
        .unwrap()
        .len()
}

async fn json_of(r: reqwest::Response) -> Value {
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}
