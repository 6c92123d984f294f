//! Webhooks against a local HTTP receiver: signed deliveries, a retry after a 500, a dead
//! letter after the last try, a manual retry, and a hanging endpoint that does not hold the
//! pipeline; a Standard Webhooks library (Python's, from PyPI) verifying real deliveries.

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
    /// The Standard Webhooks headers: `webhook-id`, `webhook-timestamp`, `webhook-signature`.
    standard: [String; 3],
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
            standard: [
                header("webhook-id"),
                header("webhook-timestamp"),
                header("webhook-signature"),
            ],
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

/// The directory `standardwebhooks` (PyPI) is installed in (scripts/test puts it in
/// `.tools/standardwebhooks`), or `None` when it is missing outside CI.
fn standardwebhooks() -> Option<std::path::PathBuf> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let dir = std::env::var_os("FL_STANDARDWEBHOOKS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join(".tools/standardwebhooks"));
    if dir.join("standardwebhooks").exists() {
        return Some(dir);
    }
    let install = "python3 -m pip install --target .tools/standardwebhooks standardwebhooks==1.1.0";
    assert!(
        std::env::var_os("CI").is_none(),
        "standardwebhooks is not installed at {} (scripts/test installs it: {install})",
        dir.display()
    );
    eprintln!(
        "SKIPPED: standardwebhooks is not installed at {} and CI is unset; run `{install}`",
        dir.display()
    );
    None
}

/// Runs the library's `Webhook(secret).verify(body, headers)` on exactly what the receiver
/// got: `Ok` or the library's error.
fn library_verifies(
    dir: &std::path::Path,
    secret: &str,
    hit: &Hit,
    body: &str,
) -> Result<(), String> {
    use std::io::Write;
    const SCRIPT: &str = r#"
import json, sys
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
given = json.load(sys.stdin)
try:
    Webhook(given["secret"]).verify(given["body"], given["headers"])
except WebhookVerificationError as e:
    print(e)
    sys.exit(1)
"#;
    let [id, timestamp, signature] = &hit.standard;
    let input = json!({
        "secret": secret,
        "body": body,
        "headers": {"webhook-id": id, "webhook-timestamp": timestamp, "webhook-signature": signature},
    });
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .env("PYTHONPATH", dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    match out.status.code() {
        Some(0) => Ok(()),
        Some(1) => Err(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        _ => panic!(
            "the verifier failed to run: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standard_webhooks_library_verifies_real_deliveries_and_old_secrets_still_work() {
    let Some(library) = standardwebhooks() else {
        return;
    };
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await;
    let admin = app.token("acme", "admin", None).await;
    let (receiver, base) = start_receiver().await;
    let mut hooks = Vec::new();
    for path in ["standard", "old"] {
        let (status, body) = api
            .post(
                "/api/v1/webhooks",
                &admin,
                json!({"url": format!("{base}/{path}"), "states": ["waiting"]}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        hooks.push(body);
    }
    let secret = hooks[0]["secret"].as_str().unwrap().to_string();
    // A secret as the API made them before: `whsec_` and 64 hex digits.
    let old_secret = format!(
        "whsec_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let old_id: uuid::Uuid = hooks[1]["id"].as_str().unwrap().parse().unwrap();
    app.pg
        .execute(
            "UPDATE webhooks SET secret = $1 WHERE id = $2",
            &[&old_secret, &old_id],
        )
        .await
        .unwrap();

    app.customer_says("acme", "mail", "S1", "hello").await;
    for (path, secret) in [("standard", &secret), ("old", &old_secret)] {
        let hit = eventually(
            &format!("a delivery at {path}"),
            Duration::from_secs(20),
            || async { receiver.hits(path).into_iter().next() },
        )
        .await;
        assert_eq!(
            hit.standard[0], hit.delivery,
            "webhook-id is the delivery's id"
        );
        assert!(hit.standard[2].starts_with("v1,"), "{:?}", hit.standard);
        library_verifies(&library, secret, &hit, &hit.body)
            .unwrap_or_else(|e| panic!("{path}: the library refused {:?}: {e}", hit.standard));
        // The library refuses a changed body and another secret.
        let changed = hit.body.replace("S1", "S2");
        assert_eq!(
            library_verifies(&library, secret, &hit, &changed),
            Err("No matching signature found".into())
        );
        let other = firstline_api::webhooks::new_secret();
        assert!(library_verifies(&library, &other, &hit, &hit.body).is_err());
        // This version still sends FirstLine-Signature, keyed with the whole secret.
        let now = chrono::Utc::now().timestamp();
        firstline_api::webhooks::verify(secret, &hit.signature, hit.body.as_bytes(), now, 300)
            .unwrap_or_else(|e| panic!("FirstLine-Signature {}: {e}", hit.signature));
        let [id, timestamp, signatures] = &hit.standard;
        firstline_api::webhooks::verify_standard(
            secret,
            id,
            timestamp,
            signatures,
            hit.body.as_bytes(),
            now,
            300,
        )
        .unwrap();
    }
}
