//! The agent desk (`/desk`) in a real browser: headless Chromium loads it from the running API
//! over the real workers, signs in with an agent token and works as an agent does: away with a
//! reason, ready, an offer with its countdown, accept, the transcript, a reply that reaches the
//! gateway's subject, a customer message arriving live, a transfer to a skill, a decline with a
//! reason, a close and a transfer to an agent (who serves it at once and sees it on their own
//! desk, SPEC D12), each checked in Postgres or on NATS, in English and Traditional Chinese. Screenshots of each step go to `target/test-output/desk-*.png`.

use std::time::Duration;

use crate::helpers::desk_page::{desk_message_shown, desk_shown, offer_for};
use crate::helpers::{eventually, next_matching, Browser, TestApp};
use serde_json::Value;
use uuid::Uuid;

/// `web` is a web chat without a bot: a customer's first message queues at once.
const SETUP: &str = r#"{"tenants":[{"id": "acme", "dispatch_cycle_seconds": 120,
   "channels": [{"id": "web", "kind": "webchat", "bot_enabled": false}],
   "agents": [{"id": "amy", "name": "Amy Lin", "capacity": 3}, {"id": "ben", "name": "Ben Wu"}]}]}"#;

/// Seconds of an `m:ss` countdown.
fn seconds(countdown: &str) -> Option<i64> {
    let (m, s) = countdown.split_once(':')?;
    Some(m.trim().parse::<i64>().ok()? * 60 + s.trim().parse::<i64>().ok()?)
}

/// The conversation `customer` opened on `web`, once it is offered (assigning).
async fn offered(events: &mut async_nats::Subscriber, customer: &str) -> Uuid {
    let v = next_matching(events, &format!("{customer} offered"), |v| {
        v["customer_id"] == customer && v["to"] == "assigning"
    })
    .await;
    v["conversation_id"].as_str().unwrap().parse().unwrap()
}

async fn state_and_skills(app: &TestApp, conversation: Uuid) -> (String, Vec<String>) {
    let row = app
        .pg
        .query_one(
            "SELECT state, required_skills FROM conversations WHERE id = $1",
            &[&conversation],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn wait_state(app: &TestApp, conversation: Uuid, want: &str) -> Vec<String> {
    eventually(
        &format!("{conversation} {want}"),
        Duration::from_secs(20),
        || async {
            let (state, skills) = state_and_skills(app, conversation).await;
            (state == want).then_some(skills)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_works_conversations_in_the_desk() {
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await;
    let amy = app.token("acme", "agent", Some("amy")).await;
    let mut events = app
        .client
        .subscribe("fl.acme.events.conversation")
        .await
        .unwrap();
    let mut outbound = app.client.subscribe("fl.acme.outbound.web").await.unwrap();

    // The page and its assets are served without a token; the token is asked for.
    for (path, kind) in [
        ("/desk", "text/html"),
        ("/desk/desk.js", "text/javascript"),
        ("/desk/desk.css", "text/css"),
    ] {
        let r = api
            .http
            .get(format!("{}{path}", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with(kind), "{path}: {ct}");
    }

    let browser = Browser::start();
    let mut page = browser.page().await;

    // Sign in: the token typed into the form (kept in sessionStorage).
    page.navigate(&format!("{}/desk?lang=en", api.base)).await;
    desk_shown(&mut page, "the sign-in form", |v| v["signedIn"] == "false").await;
    page.type_into("#token-input", &amy).await;
    page.click("#token-save").await;
    let v = desk_shown(&mut page, "signed in and live", |v| {
        v["signedIn"] == "true" && v["live"] == "true" && v["snapshots"] == 1
    })
    .await;
    assert_eq!(v["title"], "Agent desk");
    assert_eq!(v["presence"], "logged_out");
    assert_eq!(
        page.eval("sessionStorage.getItem('fl_desk_token')").await,
        amy.as_str()
    );
    page.screenshot("desk-1-signed-in.png").await;

    // Away with a reason, then ready: both reach the dispatcher (Postgres).
    page.type_into("#away-reason", "lunch").await;
    page.click("#go-away").await;
    app.wait_for_presence("acme", "amy", "away", Some("lunch"))
        .await;
    desk_shown(&mut page, "away shown", |v| {
        v["presence"] == "away" && v["presenceText"] == "Away · lunch"
    })
    .await;
    page.click("#go-ready").await;
    app.wait_for_presence("acme", "amy", "ready", None).await;
    desk_shown(&mut page, "ready shown", |v| v["presence"] == "ready").await;

    // A customer writes (as a gateway publishes it): the offer shows with its countdown, which
    // runs to the offer's deadline.
    let first_text = "My parcel has not arrived";
    app.customer_says("acme", "web", "C1", first_text).await;
    let c1 = offered(&mut events, "C1").await;
    let v = desk_shown(&mut page, "the offer", |v| offer_for(v, c1).is_some()).await;
    let offer = offer_for(&v, c1).unwrap();
    assert!(
        offer["text"].as_str().unwrap().contains("customer C1"),
        "{offer}"
    );
    let left = seconds(offer["countdown"].as_str().unwrap()).expect("an m:ss countdown");
    let deadline: chrono::DateTime<chrono::Utc> = app
        .pg
        .query_one(
            "SELECT deadline FROM offers WHERE conversation_id = $1 AND status = 'open'",
            &[&c1],
        )
        .await
        .unwrap()
        .get(0);
    let expected = (deadline - chrono::Utc::now()).num_seconds();
    assert!(
        (left - expected).abs() <= 3 && left > 60,
        "countdown {left} s, deadline in {expected} s"
    );
    desk_shown(&mut page, "the countdown ticking", |v| {
        offer_for(v, c1)
            .and_then(|o| seconds(o["countdown"].as_str()?))
            .is_some_and(|s| s < left)
    })
    .await;
    page.screenshot("desk-2-offer.png").await;

    // Accept: the conversation is served, its transcript shows the customer's message.
    page.click(&format!(
        ".offer[data-conversation-id='{c1}'] button.accept"
    ))
    .await;
    wait_state(&app, c1, "processing").await;
    let v = desk_shown(&mut page, "the accepted conversation", |v| {
        v["open"] == c1.to_string()
            && v["offers"].as_array().is_some_and(|o| o.is_empty())
            && desk_message_shown(v, "customer", first_text)
    })
    .await;
    assert_eq!(v["serving"][0]["conversation"], c1.to_string());
    page.screenshot("desk-3-accepted.png").await;

    // Reply: it reaches the gateway's subject, and the transcript shows it stored.
    let reply = "您好，我幫您查一下包裹。";
    page.type_into("#reply-text", reply).await;
    page.click("#reply-send").await;
    let out = next_matching(&mut outbound, "the reply on outbound", |v| {
        v["text"] == reply
    })
    .await;
    assert_eq!(out["author"], "agent");
    assert_eq!(out["agent_id"], "amy");
    assert_eq!(out["conversation_id"], c1.to_string());
    assert_eq!(out["customer_id"], "C1");
    desk_shown(&mut page, "the stored reply", |v| {
        v["messages"].as_array().is_some_and(|ms| {
            ms.iter()
                .any(|m| m["author"] == "agent" && m["text"] == reply && m["pending"] == "false")
        })
    })
    .await;

    // A new customer message appears live, on the same page.
    page.eval("window.__marker = 7").await;
    let second_text = "Order A123";
    app.customer_says("acme", "web", "C1", second_text).await;
    let v = desk_shown(&mut page, "the live customer message", |v| {
        desk_message_shown(v, "customer", second_text)
    })
    .await;
    assert_eq!(v["marker"], 7, "the same page, not a reload");
    page.screenshot("desk-4-live-message.png").await;

    // Traditional Chinese labels.
    page.click("#lang").await;
    let v = desk_shown(&mut page, "zh-TW labels", |v| v["lang"] == "zh-TW").await;
    assert_eq!(v["title"], "專員工作台");
    let buttons: Vec<&str> = v["buttons"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // SPEC S2: the product's names of the statuses (服務狀態).
    for label in ["就緒", "離開", "登出", "轉接", "結束交談", "送出"] {
        assert!(buttons.contains(&label), "{label} in {buttons:?}");
    }
    let path = page.screenshot("desk-5-zh-TW.png").await;
    assert!(
        std::fs::metadata(path).unwrap().len() > 10_000,
        "a real picture"
    );
    page.click("#lang").await;

    // Transfer to a skill nobody has: the conversation waits for it, and leaves the desk.
    page.eval("document.getElementById('transfer-kind').value = 'skills'")
        .await;
    page.type_into("#transfer-target", "billing").await;
    page.click("#transfer").await;
    let skills = wait_state(&app, c1, "waiting").await;
    assert_eq!(skills, ["billing"]);
    desk_shown(&mut page, "the transferred conversation gone", |v| {
        v["serving"].as_array().is_some_and(|s| s.is_empty())
            && v["notices"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n.as_str().unwrap().contains("billing")))
    })
    .await;
    page.screenshot("desk-6-transferred.png").await;

    // Decline with a reason: the offer ends declined, with it.
    app.customer_says("acme", "web", "C2", "hello?").await;
    let c2 = offered(&mut events, "C2").await;
    desk_shown(&mut page, "the second offer", |v| {
        offer_for(v, c2).is_some()
    })
    .await;
    page.type_into(
        &format!(".offer[data-conversation-id='{c2}'] input.decline-reason"),
        "wrong language",
    )
    .await;
    page.click(&format!(
        ".offer[data-conversation-id='{c2}'] button.decline"
    ))
    .await;
    eventually("the declined offer", Duration::from_secs(20), || async {
        let row = app
            .pg
            .query_opt(
                "SELECT end_reason FROM offers WHERE conversation_id = $1 AND status = 'declined'",
                &[&c2],
            )
            .await
            .unwrap()?;
        (row.get::<_, Option<String>>(0).as_deref() == Some("wrong language")).then_some(())
    })
    .await;
    desk_shown(&mut page, "the declined offer gone", |v| {
        offer_for(v, c2).is_none()
    })
    .await;

    // Accept, then close: completed.
    app.customer_says("acme", "web", "C3", "Can I change my address?")
        .await;
    let c3 = offered(&mut events, "C3").await;
    desk_shown(&mut page, "the third offer", |v| offer_for(v, c3).is_some()).await;
    page.click(&format!(
        ".offer[data-conversation-id='{c3}'] button.accept"
    ))
    .await;
    desk_shown(&mut page, "the third conversation open", |v| {
        v["open"] == c3.to_string() && desk_message_shown(v, "customer", "Can I change my address?")
    })
    .await;
    page.click("#close").await;
    wait_state(&app, c3, "completed").await;
    desk_shown(&mut page, "the closed conversation gone", |v| {
        v["serving"].as_array().is_some_and(|s| s.is_empty()) && v["open"].is_null()
    })
    .await;
    page.screenshot("desk-7-closed.png").await;

    // Transfer to an agent: one that does not exist is refused with the API's message, shown;
    // Ben, logged out, serves it at once (SPEC D12), and his desk (another tab) shows it.
    app.customer_says("acme", "web", "C4", "Please ask Ben")
        .await;
    let c4 = offered(&mut events, "C4").await;
    desk_shown(&mut page, "the fourth offer", |v| {
        offer_for(v, c4).is_some()
    })
    .await;
    page.click(&format!(
        ".offer[data-conversation-id='{c4}'] button.accept"
    ))
    .await;
    desk_shown(&mut page, "the fourth conversation open", |v| {
        v["open"] == c4.to_string()
    })
    .await;
    page.eval("document.getElementById('transfer-kind').value = 'agent'")
        .await;
    page.type_into("#transfer-target", "nobody").await;
    page.click("#transfer").await;
    desk_shown(&mut page, "the refusal shown", |v| {
        v["notices"].as_array().is_some_and(|n| {
            n.iter()
                .any(|n| n.as_str().unwrap().contains("to_agent: no agent nobody"))
        })
    })
    .await;
    assert_eq!(state_and_skills(&app, c4).await.0, "processing");
    let ben = app.token("acme", "agent", Some("ben")).await;
    let mut ben_page = browser.new_page().await;
    ben_page
        .navigate(&format!("{}/desk?lang=en#token={ben}", api.base))
        .await;
    desk_shown(&mut ben_page, "Ben's desk, logged out", |v| {
        v["live"] == "true" && v["presence"] == "logged_out"
    })
    .await;
    page.type_into("#transfer-target", "ben").await;
    page.click("#transfer").await;
    eventually("Ben serving C4", Duration::from_secs(20), || async {
        let row = app
            .pg
            .query_one(
                "SELECT state, agent_id FROM conversations WHERE id = $1",
                &[&c4],
            )
            .await
            .unwrap();
        let (state, agent): (String, Option<String>) = (row.get(0), row.get(1));
        (state == "processing" && agent.as_deref() == Some("ben")).then_some(())
    })
    .await;
    desk_shown(&mut page, "the conversation transferred to Ben gone", |v| {
        v["serving"].as_array().is_some_and(|s| s.is_empty())
    })
    .await;
    desk_shown(
        &mut ben_page,
        "it on Ben's desk, with its transcript",
        |v| {
            v["serving"][0]["conversation"] == c4.to_string()
                && v["open"] == c4.to_string()
                && desk_message_shown(v, "customer", "Please ask Ben")
                && v["notices"]
                    .as_array()
                    .is_some_and(|n| n.iter().any(|n| n == "amy transferred customer C4 to you"))
        },
    )
    .await;
    ben_page.screenshot("desk-8-transferred-to-ben.png").await;
}

/// The WebSocket reconnects after a drop, from the last notification it saw (`?after=`): an
/// offer made while it was down is shown once it is back, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_desk_reconnects_its_websocket_and_misses_nothing() {
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await;
    let amy = app.token("acme", "agent", Some("amy")).await;
    let mut events = app
        .client
        .subscribe("fl.acme.events.conversation")
        .await
        .unwrap();
    let browser = Browser::start();
    let mut page = browser.page().await;
    page.navigate(&format!("{}/desk?lang=en#token={amy}", api.base))
        .await;
    desk_shown(&mut page, "signed in and live", |v| {
        v["live"] == "true" && v["snapshots"] == 1
    })
    .await;
    page.click("#go-ready").await;
    app.wait_for_presence("acme", "amy", "ready", None).await;

    // The socket drops (the network, a proxy): the desk shows it and reconnects by itself, here
    // after 8 s (its backoff set ahead), so that the offer is made while it is down.
    page.eval("state.retry = 4; state.ws.close()").await;
    desk_shown(&mut page, "the drop shown", |v| v["live"] == "false").await;
    app.customer_says("acme", "web", "R1", "are you there?")
        .await;
    let r1 = offered(&mut events, "R1").await;
    let v = desk_shown(&mut page, "the offer after the reconnect", |v| {
        v["live"] == "true" && v["snapshots"].as_i64() >= Some(2) && offer_for(v, r1).is_some()
    })
    .await;
    assert_eq!(v["offers"].as_array().unwrap().len(), 1, "once: {v}");
}

/// `scripts/up` (the demo) prints the desk's address beside the dashboard's, signed in as the
/// agent no simulation drives: opened, Ready pressed, she is offered the web chat's next
/// conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_prints_a_desk_address_for_an_agent_left_to_a_person() {
    let mut app = TestApp::spawn(r#"{"tenants": []}"#).await;
    firstline::demo::configure(&app.db.url).await.unwrap();
    let api = app.start_api().await;
    let addr = api.base.trim_start_matches("http://").parse().unwrap();
    let line = firstline::demo::desk_address(&app.pg, addr).await.unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("an address in {line:?}"));
    assert!(
        url.starts_with(&format!("{}/desk#token=fl_", api.base)),
        "{url}"
    );
    let token = url.split("#token=").nth(1).unwrap();
    assert_eq!(
        api.ok("/api/v1/me", token).await["agent_id"],
        firstline::demo::DESK_AGENT
    );
    let mut events = app
        .client
        .subscribe("fl.demo.events.conversation")
        .await
        .unwrap();

    let browser = Browser::start();
    let mut page = browser.page().await;
    page.navigate(url).await;
    desk_shown(&mut page, "signed in and live", |v| {
        v["live"] == "true" && v["presence"] == "logged_out"
    })
    .await;
    page.click("#go-ready").await;
    // The web chat's customer asks for a person: only Dana has the skill it requires.
    app.customer_says("demo", "webchat", "U900", "human").await;
    let c = offered(&mut events, "U900").await;
    desk_shown(&mut page, "the offer in the demo's desk", |v| {
        offer_for(v, c).is_some()
    })
    .await;
}
