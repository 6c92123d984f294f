//! The queue dashboard in a real browser: headless Chromium (Debian's `chromium`, driven over
//! the DevTools protocol) loads the page from the running API, with real conversations in
//! every state; the test checks the counts and rows shown, sees a live update arrive without a
//! reload, switches the language, and saves screenshots under `target/test-output/`.

use crate::helpers::browser::{Browser, Page};
use crate::helpers::{next_matching, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

const SETUP: &str = r#"{"tenants":[{"id": "acme", "dispatch_cycle_seconds": 120,
   "channels": [{"id": "line", "kind": "line", "bot_enabled": true},
                {"id": "mail", "kind": "email", "bot_enabled": false},
                {"id": "vip", "kind": "webchat", "bot_enabled": false, "required_skills": ["vip"], "weight": 7}],
   "agents": [{"id": "amy", "name": "Amy Lin", "capacity": 2},
              {"id": "ben", "name": "Ben Wu", "capacity": 3},
              {"id": "zed", "name": "Zhang Wei-Ting, second-line billing and refunds", "capacity": 3}]}]}"#;

/// Whether every header and cell of the agents table lies inside the agents panel and shows
/// all its content (issue 20: at 1400 px the last column, 分派中, was clipped once a status
/// reason showed; a long name pushed the columns out). A list of what sticks out, empty when
/// all fits.
const AGENTS_CLIPPED: &str = r#"(() => {
    const panel = document.querySelector("aside.agents").getBoundingClientRect();
    const out = [];
    for (const c of document.querySelectorAll("aside.agents th, aside.agents td")) {
        const r = c.getBoundingClientRect();
        if (r.left < panel.left - 0.5 || r.right > panel.right + 0.5)
            out.push(`${c.textContent}: cell ${r.left}..${r.right}, panel ${panel.left}..${panel.right}`);
        else if (c.scrollWidth > c.clientWidth + 1)
            out.push(`${c.textContent}: content ${c.scrollWidth} px in a ${c.clientWidth} px cell`);
    }
    return JSON.stringify(out);
})()"#;

/// What the dashboard shows, read from the DOM (a JSON string).
const SHOWN: &str = r#"(() => { try { return JSON.stringify({
    refreshes: +(document.body.dataset.refreshes || 0),
    live: document.getElementById("live-status").dataset.connected,
    title: document.querySelector("h1").textContent,
    note: document.getElementById("order-note").textContent,
    counts: Object.fromEntries([...document.querySelectorAll("[data-count]")].map(e => [e.dataset.count, +e.textContent])),
    rows: [...document.querySelectorAll("tr[data-conversation-id]")].map(r => ({
        id: r.dataset.conversationId, state: r.dataset.state, section: r.closest("section").dataset.section,
        text: r.textContent, weight: r.querySelector("td[data-weight]")?.textContent ?? null,
        score: r.querySelector("td[data-score-since]")?.textContent ?? null })),
    headers: [...document.querySelectorAll("section[data-section=waiting] th")].map(h => h.textContent),
    agents: [...document.querySelectorAll("tr[data-agent-id]")].map(r => ({
        id: r.dataset.agentId, status: r.dataset.status, text: r.textContent })),
    marker: window.__marker || null,
    sl: {
        share: document.getElementById("sl-share").textContent,
        queued: document.querySelector("[data-sl=queued]")?.textContent,
        hours: document.querySelectorAll('#sl-chart g[data-hour]').length,
        bars: document.querySelectorAll('#sl-chart rect').length,
        queuedInChart: [...document.querySelectorAll('#sl-chart g[data-hour]')].reduce((n, g) => n + +g.dataset.queued, 0),
        channels: [...document.querySelectorAll("tr[data-sl-channel]")].map(r => r.dataset.slChannel),
        title: document.querySelector('#service-level h2').textContent,
    },
}); } catch (e) { return JSON.stringify({loading: String(e)}); } })()"#;

async fn conversation_of(events: &mut async_nats::Subscriber, customer: &str, to: &str) -> Uuid {
    let v = next_matching(events, &format!("{customer} {to}"), |v| {
        v["customer_id"] == customer && v["to"] == to
    })
    .await;
    v["conversation_id"].as_str().unwrap().parse().unwrap()
}

/// Reads the page until what it shows satisfies `ok`, within 30 s.
async fn wait_shown(page: &mut Page, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    page.wait_json(what, SHOWN, ok).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_queue_and_updates_live() {
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await;
    let supervisor = app.token("acme", "supervisor", None).await;
    let amy = app.token("acme", "agent", Some("amy")).await;
    let mut events = app
        .client
        .subscribe("fl.acme.events.conversation")
        .await
        .unwrap();

    // Every state: completed (P0), processing (P1), assigning (P2), waiting (V1, V2: nobody has
    // "vip"), bot (B1).
    api.presence(&amy, "amy", "ready").await;
    for (customer, done) in [("P0", true), ("P1", false)] {
        app.customer_says("acme", "mail", customer, "hello").await;
        let c = conversation_of(&mut events, customer, "assigning").await;
        assert_eq!(
            api.post(
                &format!("/api/v1/conversations/{c}/accept"),
                &amy,
                json!({})
            )
            .await
            .0,
            202
        );
        conversation_of(&mut events, customer, "processing").await;
        if done {
            assert_eq!(
                api.post(&format!("/api/v1/conversations/{c}/close"), &amy, json!({}))
                    .await
                    .0,
                202
            );
            conversation_of(&mut events, customer, "completed").await;
        }
    }
    app.customer_says("acme", "mail", "P2", "hello").await;
    let assigning = conversation_of(&mut events, "P2", "assigning").await;
    app.customer_says("acme", "vip", "V1", "hello").await;
    let waiting = conversation_of(&mut events, "V1", "waiting").await;
    app.customer_says("acme", "line", "B1", "hi").await;
    let bot = conversation_of(&mut events, "B1", "bot").await;
    let ben = app.token("acme", "agent", Some("ben")).await;
    assert_eq!(
        api.put(
            "/api/v1/agents/ben/presence",
            &ben,
            json!({"status": "away", "reason": "lunch"})
        )
        .await
        .0,
        202
    );

    // The name before SPEC S2 still works, and is shown as away.
    let zed = app.token("acme", "agent", Some("zed")).await;
    assert_eq!(
        api.put(
            "/api/v1/agents/zed/presence",
            &zed,
            json!({"status": "not_ready", "reason": "training on the new billing system"})
        )
        .await
        .0,
        202
    );

    let browser = Browser::start();
    let mut page = browser.page().await;
    page.navigate(&format!(
        "{}/dashboard?lang=en#token={supervisor}",
        api.base
    ))
    .await;
    let shown = wait_shown(&mut page, "the dashboard to load and go live", |v| {
        v["refreshes"].as_i64() >= Some(1)
            && v["live"] == "true"
            && v["agents"][1]["status"] == "away"
            && v["agents"][2]["status"] == "away"
    })
    .await;
    assert_eq!(shown["title"], "Conversation queue");
    assert!(shown["note"]
        .as_str()
        .unwrap()
        .contains("Display order is not dispatch order"));
    assert_eq!(
        shown["counts"],
        json!({"bot": 1, "waiting": 1, "assigning": 1, "processing": 1, "completed": 1})
    );
    let row = |id: Uuid| {
        shown["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id.to_string())
            .cloned()
            .unwrap_or_else(|| panic!("a row for {id}: {shown}"))
    };
    assert_eq!(row(bot)["section"], "bot");
    assert_eq!(row(waiting)["section"], "waiting");
    assert!(
        row(waiting)["text"].as_str().unwrap().contains("vip"),
        "required skills shown"
    );
    // SPEC D10: each queued conversation's weight (the channel's, 7) and score (weight x
    // seconds waited, growing while the page is open).
    assert!(
        shown["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == "Weight")
            && shown["headers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h == "Score"),
        "{}",
        shown["headers"]
    );
    assert_eq!(row(waiting)["weight"], "7");
    assert_eq!(row(assigning)["weight"], "1");
    let score = |v: &Value| -> f64 {
        v.as_str()
            .unwrap_or("")
            .replace(',', "")
            .parse()
            .unwrap_or(-1.0)
    };
    assert!(score(&row(waiting)["score"]) >= 0.0, "{}", row(waiting));
    let first_score = score(&row(waiting)["score"]);
    let id = waiting.to_string();
    wait_shown(&mut page, "V1's score to grow by 7 a second", |v| {
        v["rows"].as_array().is_some_and(|rows| {
            rows.iter()
                .any(|r| r["id"] == id.as_str() && score(&r["score"]) >= first_score + 14.0)
        })
    })
    .await;
    assert_eq!(row(assigning)["section"], "assigning");
    assert!(
        row(assigning)["text"].as_str().unwrap().contains("amy"),
        "the agent offered"
    );
    assert_eq!(shown["rows"].as_array().unwrap().len(), 5);
    let agents = shown["agents"].as_array().unwrap();
    assert_eq!(agents[0]["id"], "amy");
    assert!(
        agents[0]["text"].as_str().unwrap().contains("1 / 2"),
        "load against capacity: {}",
        agents[0]
    );
    // SPEC S2: the product's statuses, away with its reason.
    assert!(
        agents[1]["text"].as_str().unwrap().contains("away · lunch"),
        "the away status: {}",
        agents[1]
    );
    assert!(agents[0]["text"].as_str().unwrap().contains("ready"));
    // SPEC SL: the service-level panel, with a bar per hour of today's queued conversations
    // (P0, P1, P2 and V1 on mail and vip: four, one per channel row).
    let sl = &shown["sl"];
    assert_eq!(sl["title"], "Service level");
    assert_eq!(sl["queued"], "4", "{sl}");
    assert_eq!(sl["queuedInChart"], 4, "{sl}");
    assert!(sl["share"].as_str().unwrap().ends_with('%'), "{sl}");
    assert!(
        sl["hours"].as_i64() >= Some(1) && sl["bars"].as_i64() >= Some(1),
        "{sl}"
    );
    assert_eq!(sl["channels"], json!(["mail", "vip"]));
    page.screenshot("dashboard-en.png").await;

    // A live update: a new customer queues; the page shows it without a reload.
    page.eval("window.__marker = 42").await;
    app.customer_says("acme", "vip", "V2", "hello?").await;
    let second = conversation_of(&mut events, "V2", "waiting").await;
    let shown = wait_shown(&mut page, "the live update", |v| {
        v["counts"]["waiting"] == 2
    })
    .await;
    assert_eq!(shown["marker"], 42, "the same page, not a reload");
    let shown = wait_shown(&mut page, "the service level's live update", |v| {
        v["sl"]["queuedInChart"] == 5
    })
    .await;
    assert_eq!(shown["sl"]["queued"], "5");
    assert!(shown["rows"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == second.to_string() && r["section"] == "waiting"));
    // Sorted as the seed says: the longest-waiting first.
    let waiting_rows: Vec<&str> = shown["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["section"] == "waiting")
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(waiting_rows, [waiting.to_string(), second.to_string()]);

    // Traditional Chinese labels.
    page.eval("document.getElementById('lang').click()").await;
    let shown = page.json(SHOWN).await;
    assert_eq!(shown["title"], "交談佇列");
    assert!(shown["note"]
        .as_str()
        .unwrap()
        .contains("儀表板的排序不代表分派順序"));
    let labels = page
        .eval("[...document.querySelectorAll('.count .label')].map(e => e.textContent).join('|')")
        .await;
    assert_eq!(labels, "機器人／對話腳本|等待中|分派中|處理中|今日已完成");
    assert_eq!(shown["sl"]["title"], "服務水平");
    let statuses = page
        .eval("[...document.querySelectorAll('tr[data-agent-id] td:nth-child(2)')].map(e => e.textContent).join('|')")
        .await;
    assert_eq!(
        statuses,
        "就緒|離開 · lunch|離開 · training on the new billing system"
    );
    let path = page.screenshot("dashboard-zh-TW.png").await;
    assert!(
        std::fs::metadata(path).unwrap().len() > 10_000,
        "a real picture"
    );

    // 1400 px wide, a long agent name and status reasons: the agents table fits its panel, in
    // both languages.
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await;
    for (lang, shot) in [
        ("zh-TW", "dashboard-1400-zh-TW.png"),
        ("en", "dashboard-1400-en.png"),
    ] {
        if page.eval("document.documentElement.lang").await != lang {
            page.eval("document.getElementById('lang').click()").await;
        }
        assert_eq!(page.eval("innerWidth").await, 1400);
        page.screenshot(shot).await;
        let clipped: Vec<String> =
            serde_json::from_str(page.eval(AGENTS_CLIPPED).await.as_str().unwrap()).unwrap();
        assert!(
            clipped.is_empty(),
            "{lang}: the agents table sticks out of its panel: {clipped:?}"
        );
    }
}
