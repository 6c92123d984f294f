//! Webhooks against a local HTTP receiver: signed deliveries, a retry after a 500, a dead
//! letter after the last try, a manual retry, and a hanging endpoint that does not hold the
//! pipeline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::{count, eventually, TestApp};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use futures::StreamExt;
use serde_json::{json, Value};

const SETUP: &str = r#"{"tenants":[{"id": "acme",
   "channels": [{"id": "mail", "kind": "email", "bot_enabled": false}]}]}"#;

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Hit {
    at: Instant,
    signature: String,
    delivery: String,
    attempt: String,
    body: String,
}

#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<HashMap<String, Vec<Hit>>>>,
    /// Per path: the statuses to answer, in turn; the last one repeats.
    script: Arc<Mutex<HashMap<String, Vec<u16>>>>,
}

impl Receiver {
    fn hits(&self, path: &str) -> Vec<Hit> {
        self.hits
            .lock()
            .unwrap()
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
    fn answer(&self, path: &str, statuses: &[u16]) {
        self.script
            .lock()
            .unwrap()
            .insert(path.into(), statuses.to_vec());
    }
}

async fn hook(
    State(r): State<Receiver>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    r.hits
        .lock()
        .unwrap()
        .entry(path.clone())
        .or_default()
        .push(Hit {
            at: Instant::now(),
            signature: header("firstline-signature"),
            delivery: header("firstline-delivery-id"),
            attempt: header("firstline-attempt"),
            body,
        });
    if path == "slow" {
        // The hanging endpoint (the scenario), not a wait for state.
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let status = {
        let mut script = r.script.lock().unwrap();
        let statuses = script.entry(path).or_insert_with(|| vec![200]);
        if statuses.len() > 1 {
            statuses.remove(0)
        } else {
            statuses[0]
        }
    };
    StatusCode::from_u16(status).unwrap()
}

async fn start_receiver() -> (Receiver, String) {
    let receiver = Receiver::default();
    let app = axum::Router::new()
        .route("/{path}", post(hook))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (receiver, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_retried_after_a_500_and_dead_lettered_after_the_last_try() {
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await; // 3 tries, 100 ms backoff doubling
    let admin = app.token("acme", "admin", None).await;
    let (receiver, base) = start_receiver().await;
    receiver.answer("flaky", &[500, 200]);
    receiver.answer("down", &[500]);

    let register = |url: String, states: Value| {
        let api = &api;
        let admin = &admin;
        async move {
            let (status, body) = api
                .post(
                    "/api/v1/webhooks",
                    admin,
                    json!({"url": url, "states": states}),
                )
                .await;
            assert_eq!(status, 201, "{body}");
            assert!(body["secret"].as_str().unwrap().starts_with("whsec_"));
            body
        }
    };
    let flaky = register(format!("{base}/flaky"), json!([])).await;
    let down = register(format!("{base}/down"), json!(["waiting"])).await;
    // Bad registrations are refused.
    for (body, needle) in [
        (json!({"url": "ftp://x/y"}), "http:// or https://"),
        (json!({"url": "not a url"}), "url:"),
        (
            json!({"url": "http://x/y", "states": ["lost"]}),
            "not a conversation state",
        ),
        (json!({}), "missing field `url`"),
    ] {
        let (status, err) = api.post("/api/v1/webhooks", &admin, body).await;
        assert_eq!(status, 422, "{err}");
        assert!(
            err["error"]["message"].as_str().unwrap().contains(needle),
            "{err}"
        );
    }

    let mut dead_letters = app
        .client
        .subscribe("fl.acme.deadletter.webhooks")
        .await
        .unwrap();
    app.customer_says("acme", "mail", "H1", "hello").await;

    // flaky: a 500, then the same delivery again, accepted.
    let hits = eventually("two tries at flaky", Duration::from_secs(20), || async {
        let h = receiver.hits("flaky");
        (h.len() >= 2).then_some(h)
    })
    .await;
    assert_eq!(hits.len(), 2, "delivered on the second try, not sent again");
    assert_eq!(hits[0].delivery, hits[1].delivery);
    assert_eq!(hits[0].body, hits[1].body);
    assert_eq!(
        (hits[0].attempt.as_str(), hits[1].attempt.as_str()),
        ("1", "2")
    );
    assert!(
        hits[1].at - hits[0].at >= Duration::from_millis(90),
        "backoff before the retry"
    );
    let secret = flaky["secret"].as_str().unwrap();
    let now = chrono::Utc::now().timestamp();
    for h in &hits {
        firstline_api::webhooks::verify(secret, &h.signature, h.body.as_bytes(), now, 300)
            .unwrap_or_else(|e| panic!("signature {}: {e}", h.signature));
        assert!(firstline_api::webhooks::verify(
            "whsec_wrong",
            &h.signature,
            h.body.as_bytes(),
            now,
            300
        )
        .is_err());
    }
    let body: Value = serde_json::from_str(&hits[0].body).unwrap();
    assert_eq!(body["version"], 1);
    assert_eq!(body["type"], "conversation.waiting");
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["data"]["customer_id"], "H1");
    assert_eq!(body["data"]["to"], "waiting");

    // down: three tries with growing gaps, then dead, with a dead letter.
    let letter = tokio::time::timeout(Duration::from_secs(20), dead_letters.next())
        .await
        .expect("a dead letter")
        .unwrap();
    let letter: Value = serde_json::from_slice(&letter.payload).unwrap();
    assert!(
        letter["reason"]
            .as_str()
            .unwrap()
            .contains("failed 3 times; last: HTTP 500"),
        "{letter}"
    );
    assert_eq!(letter["consumer"], "webhooks");
    assert_eq!(letter["deliveries"], 3);
    assert_eq!(
        letter["payload"].as_str().unwrap(),
        receiver.hits("down")[0].body
    );
    let tries = receiver.hits("down");
    assert_eq!(tries.len(), 3);
    let (gap1, gap2) = (tries[1].at - tries[0].at, tries[2].at - tries[1].at);
    assert!(
        gap1 >= Duration::from_millis(90) && gap2 >= Duration::from_millis(180),
        "{gap1:?} {gap2:?}"
    );
    let down_id = down["id"].as_str().unwrap();
    // The dead letter is published just before the row is marked dead.
    let dead = eventually(
        "the delivery marked dead",
        Duration::from_secs(10),
        || async {
            let d = api
                .ok(
                    &format!("/api/v1/webhooks/{down_id}/deliveries?status=dead"),
                    &admin,
                )
                .await;
            (d.as_array().unwrap().len() == 1).then_some(d)
        },
    )
    .await;
    assert_eq!(dead[0]["attempts"], 3);
    assert_eq!(dead[0]["last_status"], 500);
    let listed = api.ok(&format!("/api/v1/webhooks/{down_id}"), &admin).await;
    assert_eq!(
        (listed["dead"].as_i64(), listed["delivered"].as_i64()),
        (Some(1), Some(0))
    );
    assert!(listed.get("secret").is_none(), "the secret is shown once");
    let flaky_id = flaky["id"].as_str().unwrap();
    let delivered = api
        .ok(&format!("/api/v1/webhooks/{flaky_id}/deliveries"), &admin)
        .await;
    assert_eq!(
        (
            delivered[0]["status"].as_str(),
            delivered[0]["attempts"].as_i64()
        ),
        (Some("delivered"), Some(2))
    );

    // The endpoint is fixed: the admin sends the dead delivery again.
    receiver.answer("down", &[200]);
    let delivery = dead[0]["id"].as_str().unwrap();
    let (status, _) = api
        .call(
            "POST",
            &format!("/api/v1/webhooks/{down_id}/deliveries/{delivery}/retry"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, 202);
    eventually(
        "the retried delivery delivered",
        Duration::from_secs(10),
        || async {
            let d = api
                .ok(&format!("/api/v1/webhooks/{down_id}/deliveries"), &admin)
                .await;
            (d[0]["status"] == "delivered").then_some(())
        },
    )
    .await;
    let (status, _) = api
        .call(
            "POST",
            &format!("/api/v1/webhooks/{down_id}/deliveries/{delivery}/retry"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, 409, "delivered already");
    let (status, _) = api
        .call(
            "DELETE",
            &format!("/api/v1/webhooks/{down_id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        api.ok("/api/v1/webhooks", &admin)
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_does_not_hold_the_pipeline() {
    let mut app = TestApp::spawn(SETUP).await;
    // Timeout 2 s; one request at a time, so a sender stuck on it would be visible.
    let api = app.start_api_with(|c| c.webhooks.concurrency = 1).await;
    let admin = app.token("acme", "admin", None).await;
    let (receiver, base) = start_receiver().await;
    let (status, _) = api
        .post(
            "/api/v1/webhooks",
            &admin,
            json!({"url": format!("{base}/slow")}),
        )
        .await;
    assert_eq!(status, 201);
    let started = Instant::now();
    for i in 0..10 {
        app.customer_says("acme", "mail", &format!("S{i}"), "hello")
            .await;
    }
    eventually(
        "ten conversations queued",
        Duration::from_secs(20),
        || async {
            (count(
                &app.pg,
                "SELECT count(*) FROM conversations WHERE state = 'waiting'",
                &[],
            )
            .await
                == 10)
                .then_some(())
        },
    )
    .await;
    let queued_in = started.elapsed();
    // Every event has its delivery row although the endpoint answers none of them.
    eventually(
        "ten deliveries recorded",
        Duration::from_secs(20),
        || async {
            (count(&app.pg, "SELECT count(*) FROM webhook_deliveries", &[]).await == 10)
                .then_some(())
        },
    )
    .await;
    assert!(receiver.hits("slow").len() <= 3, "one at a time, 2 s each");
    assert!(
        queued_in < Duration::from_secs(15),
        "the pipeline went on (a blocked one would take 20 s): {queued_in:?}"
    );
}

/// Webhooks whose dead letter would exceed the server's `max_payload` (a 600,000-character
/// URL, in the letter's reason and headers) still end `dead`, with a letter cut to fit that
/// says how large it was, and are not claimed again; meanwhile the sender holds no more than
/// its few database connections, so every tenant's requests are answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_too_large_for_their_dead_letter_end_dead_and_the_api_stays_fast() {
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await; // 3 tries, 100 ms backoff doubling
    let admin = app.token("acme", "admin", None).await;
    // Past the API's own checks, as an older row or another writer could be: a port where
    // nothing listens, and a path no server would take.
    let port = firstline_tests::nats::free_port();
    let url = format!("http://127.0.0.1:{port}/{}", "a".repeat(600_000));
    const HOOKS: usize = 12;
    for _ in 0..HOOKS {
        app.pg
            .execute(
                "INSERT INTO webhooks (id, tenant_id, url, secret) VALUES ($1, 'acme', $2, 'whsec_x')",
                &[&uuid::Uuid::new_v4(), &url],
            )
            .await
            .unwrap();
    }
    let mut dead_letters = app
        .client
        .subscribe("fl.acme.deadletter.webhooks")
        .await
        .unwrap();
    app.customer_says("acme", "mail", "H1", "hello").await;

    // While the deliveries fail and die, the API answers at once.
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(6) {
        let asked = Instant::now();
        let (status, body) = api.get("/api/v1/me", &admin).await;
        assert_eq!(status, 200, "{body}");
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(slowest < Duration::from_secs(1), "GET /me took {slowest:?}");

    let letter = tokio::time::timeout(Duration::from_secs(20), dead_letters.next())
        .await
        .expect("a dead letter")
        .unwrap();
    assert!(letter.payload.len() <= app.client.server_info().max_payload);
    let letter: Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(letter["consumer"], "webhooks");
    assert!(
        letter["reason"].as_str().unwrap().contains("bytes in all"),
        "{}",
        &letter["reason"].as_str().unwrap()[..200]
    );
    eventually("every delivery dead", Duration::from_secs(30), || async {
        let dead = count(
            &app.pg,
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'dead'",
            &[],
        )
        .await;
        (dead == HOOKS as i64).then_some(())
    })
    .await;
    // Dead is the end: no further try.
    let attempts = count(
        &app.pg,
        "SELECT coalesce(max(attempts), 0)::bigint FROM webhook_deliveries",
        &[],
    )
    .await;
    assert_eq!(attempts, 3);
}
