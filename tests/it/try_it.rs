//! Issue 24's "done when", end to end in a real browser: a customer chats in the web-chat widget
//! while an agent works in the desk, two tabs of one headless Chromium, over every worker
//! (ingest, bot-router, dispatcher, notifier, the API) and the reference web-chat gateway, as
//! the tenant's fenced gateway user, on real NATS and Postgres, with the demo's own
//! configuration and bot (`firstline::demo::configure`, what `scripts/up` loads), so that the
//! pictures are what a newcomer sees. The customer types, the bot answers, the customer asks
//! for a person; the desk (the address the demo prints, signed in as Dana, ready) shows the
//! offer; the agent accepts and replies, and the widget shows the reply; the agent
//! closes, the widget shows the survey's buttons, the customer presses one, and the rating is
//! stored (Postgres).
//!
//! A screenshot of the page at each step goes to `target/test-output/try-it/NN-<page>-<step>.png`.
//! With `FL_README_IMAGES=1` the test also writes the README's two pictures,
//! `docs/img/try-it-widget.png` and `docs/img/try-it-desk.png`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::helpers::desk_page::{desk_message_shown, desk_shown, offer_for};
use crate::helpers::webchat::{
    fenced_nats, press_widget_button, type_in_widget, wait_widget, widget_texts, Gateway,
};
use crate::helpers::{eventually, Browser, Page, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

/// The customer's first message and the demo bot's answer (its rule `hours-en`).
const QUESTION: &str = "What are your opening hours?";
const BOT_ANSWER: &str = "We are open every day, 09:00-21:00.";
/// The demo tenant's default place-in-line text, for the first in line with no recent accepts.
const PLACE_IN_LINE: &str = "您目前排在第 1 位，專員將盡快為您服務。You are number 1 in line; an agent will be with you as soon as possible.";
const AGENT_REPLY: &str = "Hi, I'm Dana. We are open until 21:00 today; how can I help?";

/// What the demo's bot file says on hand-over, and its `webchat` survey's question and thanks.
fn demo_bot_texts() -> (String, String, String) {
    let bot = firstline_bot_router::setup::BotFile::parse(firstline::demo::DEMO_BOT, false)
        .expect("the demo's bot file");
    let survey = bot
        .channels
        .iter()
        .find(|c| c.id.as_str() == "webchat")
        .and_then(|c| c.survey.clone().flatten())
        .expect("the demo's web chat has a survey");
    (
        bot.handover_reply.expect("a hand-over reply"),
        survey.question,
        survey.thanks.expect("the survey's thanks"),
    )
}

/// The screenshots of the run, numbered in the order taken.
struct Shots {
    taken: u32,
}

impl Shots {
    /// Saves `page` as `try-it/NN-<name>.png` under `target/test-output/`; its path.
    async fn take(&mut self, page: &mut Page, name: &str) -> PathBuf {
        self.taken += 1;
        // A tab in the background is not painted: the one shot comes to the front first.
        page.call("Page.bringToFront", json!({})).await;
        page.screenshot(&format!("try-it/{:02}-{name}.png", self.taken))
            .await
    }
}

/// Copies a screenshot to `docs/img/<name>` when `FL_README_IMAGES=1` (the README's pictures).
fn readme_image(shot: &Path, name: &str) {
    if std::env::var("FL_README_IMAGES").as_deref() == Ok("1") {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/img");
        std::fs::create_dir_all(&dir).unwrap();
        let to = dir.join(name);
        std::fs::copy(shot, &to).unwrap();
        println!("README image: {}", to.display());
    }
}

/// The page's viewport: a phone-sized one for the widget, a laptop's for the desk.
async fn viewport(page: &mut Page, width: u32, height: u32) {
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await;
}

fn last_message(shown: &Value) -> Value {
    shown["messages"]
        .as_array()
        .and_then(|m| m.last().cloned())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_chats_in_the_widget_and_an_agent_answers_in_the_desk() {
    // The demo's own configuration and bot, as `scripts/up` loads them (without its
    // simulation: what it adds never reaches Dana or the web chat, demo:: checks).
    let nats = fenced_nats(&["demo"]).await;
    let mut app = TestApp::spawn_on(nats, r#"{"tenants": []}"#).await;
    firstline::demo::configure(&app.db.url)
        .await
        .expect("the demo's configuration");
    let (handover_reply, survey_question, thanks) = demo_bot_texts();
    let api = app.start_api().await;
    let gateway = Gateway::start(&app, "demo", None).await;
    let browser = Browser::start();
    let mut shots = Shots { taken: 0 };

    // The desk, in one tab: the address the demo prints (signed in as Dana), in English, and
    // ready.
    let addr = api.base.trim_start_matches("http://").parse().unwrap();
    let line = firstline::demo::desk_address(&app.pg, addr).await.unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("an address in {line:?}"))
        .replacen("/desk#", "/desk?lang=en#", 1);
    let mut desk = browser.page().await;
    viewport(&mut desk, 1280, 760).await;
    desk.navigate(&url).await;
    desk_shown(&mut desk, "the desk signed in and live", |v| {
        v["signedIn"] == "true" && v["live"] == "true" && v["presence"] == "logged_out"
    })
    .await;
    desk.click("#go-ready").await;
    app.wait_for_presence("demo", "dana", "ready", None).await;
    desk_shown(&mut desk, "ready shown", |v| v["presence"] == "ready").await;
    shots.take(&mut desk, "desk-ready").await;

    // The widget, in another tab: the customer types, the bot answers.
    let mut widget = browser.new_page().await;
    viewport(&mut widget, 480, 760).await;
    widget.navigate(&format!("{}/?lang=en", gateway.url)).await;
    let v = wait_widget(&mut widget, "the widget connected", |v| {
        v["connected"] == "true" && v["visible"] == true
    })
    .await;
    assert_eq!(v["title"], "Chat with us");
    let customer = widget
        .eval("window.__firstlineWebchat.customerId")
        .await
        .as_str()
        .expect("the visitor's id")
        .to_owned();
    type_in_widget(&mut widget, QUESTION).await;
    let v = wait_widget(&mut widget, "the bot's answer", |v| {
        last_message(v)["text"] == BOT_ANSWER
    })
    .await;
    assert_eq!(widget_texts(&v), [QUESTION, BOT_ANSWER]);
    assert_eq!(last_message(&v)["author"], "bot");
    app.wait_for_state("demo", "webchat", &customer, "bot")
        .await;
    shots.take(&mut widget, "widget-bot-answers").await;

    // The customer asks for a person: the bot hands over, and the desk shows the offer.
    type_in_widget(&mut widget, "human").await;
    // The hand-over reply, then the customer's place in line (SPEC SL's neighbour, issue 23).
    wait_widget(
        &mut widget,
        "the bot's hand-over and the place in line",
        |v| {
            let texts: Vec<&str> = v["messages"]
                .as_array()
                .map(|ms| ms.iter().filter_map(|m| m["text"].as_str()).collect())
                .unwrap_or_default();
            texts.contains(&handover_reply.as_str())
                && last_message(v)["text"]
                    .as_str()
                    .is_some_and(|t| t == PLACE_IN_LINE)
        },
    )
    .await;
    shots.take(&mut widget, "widget-handover").await;
    app.wait_for_state("demo", "webchat", &customer, "assigning")
        .await;
    let conversation: Uuid = app
        .pg
        .query_one(
            "SELECT c.id FROM conversations c JOIN customers cu ON cu.id = c.customer_id
             WHERE cu.tenant_id = 'demo' AND cu.external_id = $1 AND c.state = 'assigning'",
            &[&customer],
        )
        .await
        .unwrap()
        .get(0);
    let v = desk_shown(&mut desk, "the offer", |v| {
        offer_for(v, conversation).is_some()
    })
    .await;
    let offer = offer_for(&v, conversation).unwrap();
    assert!(
        offer["text"].as_str().unwrap().contains(&customer),
        "the offer names the customer: {offer}"
    );
    shots.take(&mut desk, "desk-offer").await;

    // The agent accepts: the desk shows the conversation with the customer's messages.
    desk.click(&format!(
        ".offer[data-conversation-id='{conversation}'] button.accept"
    ))
    .await;
    app.wait_for_state("demo", "webchat", &customer, "processing")
        .await;
    desk_shown(&mut desk, "the accepted conversation", |v| {
        v["open"] == conversation.to_string()
            && desk_message_shown(v, "customer", QUESTION)
            && desk_message_shown(v, "customer", "human")
    })
    .await;

    // The agent replies: the widget shows it, from the agent.
    desk.type_into("#reply-text", AGENT_REPLY).await;
    desk.click("#reply-send").await;
    desk_shown(&mut desk, "the reply stored", |v| {
        v["messages"].as_array().is_some_and(|ms| {
            ms.iter().any(|m| {
                m["author"] == "agent" && m["text"] == AGENT_REPLY && m["pending"] == "false"
            })
        })
    })
    .await;
    let desk_shot = shots.take(&mut desk, "desk-reply").await;
    let v = wait_widget(&mut widget, "the agent's reply", |v| {
        last_message(v)["text"] == AGENT_REPLY
    })
    .await;
    assert_eq!(last_message(&v)["author"], "agent");
    shots.take(&mut widget, "widget-agent-reply").await;

    // The agent closes: the conversation leaves the desk; the widget shows the survey buttons.
    desk.click("#close").await;
    app.wait_for_state("demo", "webchat", &customer, "completed")
        .await;
    desk_shown(&mut desk, "the closed conversation gone", |v| {
        v["serving"].as_array().is_some_and(|s| s.is_empty()) && v["open"].is_null()
    })
    .await;
    shots.take(&mut desk, "desk-closed").await;
    let v = wait_widget(&mut widget, "the survey's buttons", |v| {
        last_message(v)["text"] == survey_question
    })
    .await;
    let survey = last_message(&v);
    let labels: Vec<&str> = survey["buttons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["1", "2", "3", "4", "5"]);
    let widget_shot = shots.take(&mut widget, "widget-survey").await;

    // The customer presses 4: thanked, and the rating is stored on the conversation.
    press_widget_button(&mut widget, "4").await;
    let v = wait_widget(&mut widget, "the thanks", |v| {
        last_message(v)["text"] == thanks
    })
    .await;
    assert_eq!(
        widget_texts(&v),
        [
            QUESTION,
            BOT_ANSWER,
            "human",
            &handover_reply,
            PLACE_IN_LINE,
            AGENT_REPLY,
            &survey_question,
            "4",
            &thanks
        ]
    );
    shots.take(&mut widget, "widget-rated").await;
    let row = eventually(
        "the rating stored",
        Duration::from_secs(20),
        || async {
            let row = app
                .pg
                .query_one(
                    "SELECT rating, rated_at IS NOT NULL, agent_id, state FROM conversations WHERE id = $1",
                    &[&conversation],
                )
                .await
                .unwrap();
            row.get::<_, Option<i16>>(0).is_some().then_some(row)
        },
    )
    .await;
    let stored: (Option<i16>, bool, Option<String>, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        stored,
        (
            Some(4),
            true,
            Some(firstline::demo::DESK_AGENT.to_owned()),
            "completed".to_owned()
        )
    );
    // The way it went, as the transitions recorded it.
    assert_eq!(
        app.states_of(conversation).await,
        ["bot", "waiting", "assigning", "processing", "completed"]
    );

    readme_image(&widget_shot, "try-it-widget.png");
    readme_image(&desk_shot, "try-it-desk.png");
}
