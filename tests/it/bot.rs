//! The bot, driven through NATS as a gateway would (inbound JSON in, outbound JSON out), with
//! every worker running over real NATS and Postgres: keyword replies, knowledge-base answers
//! (Chinese and English), scripted flows with branches, kept answers, hand-over and versions,
//! business hours on both sides of the opening time, the satisfaction survey, idle completion,
//! and bad configuration refused. SPEC L2-L5, L9.

use std::time::Duration;

use crate::helpers::{count, next_json, next_matching, TestApp};
use chrono::{Timelike, Utc};
use serde_json::{json, Value};

const SETUP: &str = r#"{"tenants":[{
    "id": "t1", "dispatch_cycle_seconds": 60,
    "handover_keywords": ["轉真人", "agent"],
    "bot_reply": "抱歉，我不太明白。Sorry, I did not get that.",
    "handover_reply": "正在為您轉接專員。",
    "channels": [
        {"id": "line", "kind": "line", "required_skills": ["zh"]},
        {"id": "web", "kind": "webchat"}
    ]
}]}"#;

/// Keyword rules, articles and two flows; `orders` welcomes every new conversation on `web`.
const BOT: &str = r#"
tenant: t1
kb_min_score: 0.45
channels:
  - id: web
    welcome_flow: orders
keyword_rules:
  - {id: hours, priority: 1, match: contains, pattern: 營業時間, reply: {text: "每天 09:00-18:00 為您服務。"}}
  - id: price
    match: exact
    pattern: 價格
    reply:
      text: "請選擇方案："
      buttons: [{label: 基本方案, payload: plan_basic}, {label: 專業方案}]
      image_url: https://example.com/plans.png
  - {id: basic, match: exact, pattern: plan_basic, reply: {text: "基本方案每月 300 元。"}}
  - {id: refund-words, priority: 5, match: regex, pattern: '退(款|費).*多久', reply: {text: "退款約 5-7 個工作天。"}}
  - {id: helper, match: contains, pattern: 訂單小幫手, reply: {text: "好的！", flow: orders}}
articles:
  - id: order-status
    title: 如何查詢訂單狀態
    body: 登入會員中心，點選「我的訂單」即可查詢訂單目前的狀態與物流進度。
    tags: [訂單, 物流, 查詢]
  - id: address
    title: 修改收件地址
    body: 訂單出貨前可在會員中心修改收件地址；出貨後請聯絡客服。
    tags: [地址, 收件]
  - id: password
    title: How do I reset my password
    body: On the login page choose "Forgot password" and we will e-mail you a link to set a new password.
    tags: [password, login, account]
  - id: shipping
    title: Shipping to other countries
    body: We ship internationally to most countries. Fees and customs duties depend on the destination.
    tags: [shipping, international]
flows:
  - id: orders
    name: 訂單小幫手
    publish: true
    start: welcome
    handover_skills: [billing]
    steps:
      welcome: {type: message, text: "您好，這裡是訂單小幫手。", next: menu}
      menu:
        type: buttons
        text: 請選擇服務項目
        buttons:
          - {label: 查訂單, next: ask_order}
          - {label: 退貨, next: returns}
          - {label: 找專員, next: agent}
      ask_order: {type: question, text: 請輸入訂單編號, save_as: order_no, next: found}
      found: {type: message, text: "訂單 {{order_no}} 已出貨，預計明天送達。", next: bye}
      returns: {type: handover, text: 為您轉接退貨專員, skills: [returns]}
      agent: {type: handover}
      bye: {type: end, text: 謝謝您，再見！}
"#;

async fn app() -> TestApp {
    let app = TestApp::spawn(SETUP).await;
    app.load_bot(BOT).await.expect("the bot file loads");
    app
}

/// The newest conversation of `customer` on `channel`: id, state, skills, reason of its last
/// transition.
async fn conversation(
    app: &TestApp,
    channel: &str,
    customer: &str,
) -> (uuid::Uuid, String, Vec<String>, String) {
    let row = app
        .pg
        .query_one(
            "SELECT c.id, c.state, c.required_skills,
                    (SELECT reason FROM conversation_transitions t WHERE t.conversation_id = c.id ORDER BY t.id DESC LIMIT 1)
             FROM conversations c JOIN customers cu ON cu.id = c.customer_id
             WHERE cu.tenant_id = 't1' AND cu.channel_id = $1 AND cu.external_id = $2
             ORDER BY c.created_at DESC LIMIT 1",
            &[&channel, &customer],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

/// The next outbound message to `customer` (others' messages are skipped).
async fn reply_to(out: &mut async_nats::Subscriber, customer: &str, what: &str) -> Value {
    next_matching(out, what, |v| v["customer_id"] == customer).await
}

/// Nothing is sent to `customer` for a while (SPEC L5 and the like).
async fn silence(out: &mut async_nats::Subscriber, customer: &str) {
    let quiet = tokio::time::timeout(Duration::from_millis(1500), async {
        loop {
            let v = next_json(out, "anything").await;
            if v["customer_id"] == customer {
                return v;
            }
        }
    })
    .await;
    assert!(
        quiet.is_err(),
        "unexpected message to {customer}: {quiet:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyword_replies_and_knowledge_base_answers_in_chinese_and_english() {
    let app = app().await;
    let mut out = app.client.subscribe("fl.t1.outbound.line").await.unwrap();
    let ask = |text: &'static str| {
        let app = &app;
        async move { app.customer_says("t1", "line", "U1", text).await }
    };

    // Keywords in Traditional Chinese, no spaces: contains, exact with buttons and an image.
    ask("請問你們的營業時間？").await;
    assert_eq!(
        reply_to(&mut out, "U1", "hours").await["text"],
        "每天 09:00-18:00 為您服務。"
    );
    ask("價格").await;
    let plans = reply_to(&mut out, "U1", "price").await;
    assert_eq!(plans["author"], "bot");
    assert_eq!(plans["image_url"], "https://example.com/plans.png");
    assert_eq!(
        plans["buttons"],
        json!([{"label": "基本方案", "payload": "plan_basic"}, {"label": "專業方案", "payload": "專業方案"}])
    );
    // A button press comes back as a postback, matched by its payload.
    app.customer_presses("t1", "line", "U1", "基本方案", "plan_basic")
        .await;
    assert_eq!(
        reply_to(&mut out, "U1", "basic").await["text"],
        "基本方案每月 300 元。"
    );
    // Regex, and priority over the knowledge base.
    ask("退款要多久才會到帳").await;
    assert_eq!(
        reply_to(&mut out, "U1", "refund").await["text"],
        "退款約 5-7 個工作天。"
    );

    // Knowledge base: Chinese and English questions find their article...
    ask("請問我要怎麼查詢我的訂單狀態？").await;
    let article = reply_to(&mut out, "U1", "order-status article").await;
    assert!(
        article["text"]
            .as_str()
            .unwrap()
            .starts_with("如何查詢訂單狀態"),
        "{article}"
    );
    ask("出貨前可以改收件地址嗎").await;
    assert!(reply_to(&mut out, "U1", "address article").await["text"]
        .as_str()
        .unwrap()
        .starts_with("修改收件地址"));
    ask("I forgot my password, how can I reset it?").await;
    assert!(reply_to(&mut out, "U1", "password article").await["text"]
        .as_str()
        .unwrap()
        .starts_with("How do I reset my password"));
    ask("Do you ship internationally?").await;
    assert!(reply_to(&mut out, "U1", "shipping article").await["text"]
        .as_str()
        .unwrap()
        .starts_with("Shipping to other countries"));
    // ...and the bot says it does not know otherwise.
    ask("今天天氣如何").await;
    assert_eq!(
        reply_to(&mut out, "U1", "fallback").await["text"],
        "抱歉，我不太明白。Sorry, I did not get that."
    );
    ask("what's the best pizza recipe").await;
    assert_eq!(
        reply_to(&mut out, "U1", "fallback").await["text"],
        "抱歉，我不太明白。Sorry, I did not get that."
    );

    let (_, state, _, _) = conversation(&app, "line", "U1").await;
    assert_eq!(state, "bot", "SPEC L3: answered by the bot, not queued");
    // Every answer is stored in the transcript, buttons and image included.
    let stored = count(
        &app.pg,
        "SELECT count(*) FROM messages WHERE author = 'bot' AND attachments IS NOT NULL",
        &[],
    )
    .await;
    assert_eq!(stored, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_branches_keeps_the_answer_and_completes() {
    let app = app().await;
    let mut out = app.client.subscribe("fl.t1.outbound.web").await.unwrap();
    // SPEC L2: the channel's welcome flow takes the new conversation (state script).
    app.customer_says("t1", "web", "W1", "hi").await;
    assert_eq!(
        reply_to(&mut out, "W1", "welcome").await["text"],
        "您好，這裡是訂單小幫手。"
    );
    let menu = reply_to(&mut out, "W1", "menu").await;
    assert_eq!(menu["text"], "請選擇服務項目");
    assert_eq!(menu["buttons"][0]["label"], "查訂單");
    let (_, state, _, _) = conversation(&app, "web", "W1").await;
    assert_eq!(state, "script");

    // Something else: asked again with the buttons.
    app.customer_says("t1", "web", "W1", "嗯？").await;
    assert_eq!(
        reply_to(&mut out, "W1", "the retry").await["buttons"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Press 查訂單, answer the question: the answer is kept and used, then the flow ends.
    let payload = menu["buttons"][0]["payload"].as_str().unwrap().to_owned();
    app.customer_presses("t1", "web", "W1", "查訂單", &payload)
        .await;
    assert_eq!(
        reply_to(&mut out, "W1", "the question").await["text"],
        "請輸入訂單編號"
    );
    app.customer_says("t1", "web", "W1", "A123").await;
    assert_eq!(
        reply_to(&mut out, "W1", "found").await["text"],
        "訂單 A123 已出貨，預計明天送達。"
    );
    assert_eq!(
        reply_to(&mut out, "W1", "bye").await["text"],
        "謝謝您，再見！"
    );
    app.wait_for_state("t1", "web", "W1", "completed").await;
    let (id, _, _, reason) = conversation(&app, "web", "W1").await;
    assert_eq!(reason, "flow_end", "SPEC L3: the bot finished it");
    let vars: Value = app
        .pg
        .query_one("SELECT flow_vars FROM conversations WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(vars, json!({"order_no": "A123"}));

    // A keyword rule may start the flow in a bot conversation too (bot -> script).
    let mut line = app.client.subscribe("fl.t1.outbound.line").await.unwrap();
    app.customer_says("t1", "line", "U9", "打開訂單小幫手")
        .await;
    assert_eq!(
        reply_to(&mut line, "U9", "rule text").await["text"],
        "好的！"
    );
    assert_eq!(
        reply_to(&mut line, "U9", "welcome").await["text"],
        "您好，這裡是訂單小幫手。"
    );
    reply_to(&mut line, "U9", "menu").await;
    app.wait_for_state("t1", "line", "U9", "script").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_mid_flow_lands_in_waiting_with_the_flows_skills() {
    let app = app().await;
    let mut out = app.client.subscribe("fl.t1.outbound.web").await.unwrap();
    for customer in ["W1", "W2", "W3"] {
        app.customer_says("t1", "web", customer, "你好").await;
        reply_to(&mut out, customer, "welcome").await;
        reply_to(&mut out, customer, "menu").await;
    }
    // SPEC L4 at any point: the hand-over keyword mid-flow; the flow's skills are asked for.
    app.customer_says("t1", "web", "W1", "轉真人").await;
    assert_eq!(
        reply_to(&mut out, "W1", "handover reply").await["text"],
        "正在為您轉接專員。"
    );
    app.wait_for_state("t1", "web", "W1", "waiting").await;
    let (_, _, skills, reason) = conversation(&app, "web", "W1").await;
    assert_eq!(
        (skills, reason.as_str()),
        (vec!["billing".to_owned()], "handover")
    );

    // A handover step with its own skills, and one with the flow's.
    app.customer_says("t1", "web", "W2", "退貨").await;
    assert_eq!(
        reply_to(&mut out, "W2", "step text").await["text"],
        "為您轉接退貨專員"
    );
    app.wait_for_state("t1", "web", "W2", "waiting").await;
    assert_eq!(
        conversation(&app, "web", "W2").await.2,
        vec!["returns".to_owned()]
    );
    app.customer_says("t1", "web", "W3", "3").await;
    app.wait_for_state("t1", "web", "W3", "waiting").await;
    assert_eq!(
        conversation(&app, "web", "W3").await.2,
        vec!["billing".to_owned()]
    );

    // SPEC L5: once out of the bot, no customer message triggers it.
    app.customer_says("t1", "web", "W1", "價格").await;
    app.customer_says("t1", "web", "W1", "轉真人").await;
    silence(&mut out, "W1").await;
    assert_eq!(conversation(&app, "web", "W1").await.1, "waiting");
    let queued = count(
        &app.pg,
        "SELECT count(*) FROM messages m JOIN customers cu ON cu.id = (SELECT customer_id FROM conversations WHERE id = m.conversation_id)
         WHERE cu.external_id = 'W1' AND m.routed_to = 'queued'",
        &[],
    )
    .await;
    assert_eq!(queued, 2, "stored for the agent, not answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_does_not_change_a_conversation_already_in_the_flow() {
    let app = app().await;
    let mut out = app.client.subscribe("fl.t1.outbound.web").await.unwrap();
    app.customer_says("t1", "web", "OLD", "hi").await;
    reply_to(&mut out, "OLD", "welcome").await;
    reply_to(&mut out, "OLD", "menu v1").await;

    // Version 2: another menu, where 查訂單 is gone and 1 means something else.
    let v2 = BOT
        .replace(
            "- {label: 查訂單, next: ask_order}",
            "- {label: 客訴, next: agent}\n          - {label: 查訂單, next: ask_order}",
        )
        .replace("請選擇服務項目", "請選擇服務項目（新版）");
    let applied = app.load_bot(&v2).await.unwrap();
    assert_eq!(applied.published, vec![("orders".to_owned(), 2)]);
    // Loading the same file again publishes nothing new.
    assert!(app.load_bot(&v2).await.unwrap().published.is_empty());

    // The conversation already in the flow keeps version 1: "1" is still 查訂單.
    app.customer_says("t1", "web", "OLD", "1").await;
    assert_eq!(
        reply_to(&mut out, "OLD", "v1 question").await["text"],
        "請輸入訂單編號"
    );
    // A new conversation starts in version 2.
    app.customer_says("t1", "web", "NEW", "hi").await;
    reply_to(&mut out, "NEW", "welcome").await;
    assert_eq!(
        reply_to(&mut out, "NEW", "menu v2").await["text"],
        "請選擇服務項目（新版）"
    );
    app.customer_says("t1", "web", "NEW", "1").await;
    app.wait_for_state("t1", "web", "NEW", "waiting").await;
    let versions = app
        .pg
        .query(
            "SELECT cu.external_id, c.flow_version FROM conversations c JOIN customers cu ON cu.id = c.customer_id
             WHERE cu.channel_id = 'web' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1)))
        .collect::<Vec<_>>();
    assert_eq!(versions, vec![("NEW".to_owned(), 2), ("OLD".to_owned(), 1)]);
}

/// A fixed-offset zone where it is now around noon, so that "30 minutes from now" and "30
/// minutes ago" are the same day: (zone, local minutes since midnight).
fn noon_zone() -> (String, u32) {
    let now = Utc::now();
    let offset = 12 - now.hour() as i32; // -11..=12
                                         // Etc/GMT-N is UTC+N.
    let zone = match offset {
        0 => "Etc/GMT".to_owned(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    };
    (zone, 12 * 60 + now.minute())
}

fn hhmm(minutes: u32) -> String {
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

fn hours_file(zone: &str, opens: u32, after_hours: &str) -> String {
    let days: Vec<String> = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        .iter()
        .map(|d| format!("{d}: [[\"{}\", \"24:00\"]]", hhmm(opens)))
        .collect();
    format!(
        "tenant: t1\nchannels:\n  - id: line\n    business_hours:\n      timezone: {zone}\n      weekly: {{{}}}\n      closed_message: \"目前非營業時間，{{{{opens_at}}}} 開始服務。\"\n      after_hours_handover: {after_hours}\n",
        days.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_hours_on_both_sides_of_the_opening_time() {
    let app = app().await;
    let mut out = app.client.subscribe("fl.t1.outbound.line").await.unwrap();
    let (zone, now) = noon_zone();

    // Before the opening time (it opens in 30 minutes), hand-over kept with the bot.
    app.load_bot(&hours_file(&zone, now + 30, "stay"))
        .await
        .unwrap();
    app.customer_says("t1", "line", "EARLY", "轉真人").await;
    let closed = reply_to(&mut out, "EARLY", "closed message").await;
    let text = closed["text"].as_str().unwrap();
    assert!(text.starts_with("目前非營業時間，"), "{text}");
    assert!(
        text.contains(&hhmm(now + 30)),
        "tells when it opens: {text}"
    );
    // Anything the bot cannot answer gets the closed message too; keywords still answer.
    app.customer_says("t1", "line", "EARLY", "今天天氣如何")
        .await;
    assert!(reply_to(&mut out, "EARLY", "closed").await["text"]
        .as_str()
        .unwrap()
        .starts_with("目前非營業時間"));
    app.customer_says("t1", "line", "EARLY", "營業時間").await;
    assert_eq!(
        reply_to(&mut out, "EARLY", "keyword").await["text"],
        "每天 09:00-18:00 為您服務。"
    );
    assert_eq!(conversation(&app, "line", "EARLY").await.1, "bot");

    // Before the opening time with "queue": told, and queued anyway.
    app.load_bot(&hours_file(&zone, now + 30, "queue"))
        .await
        .unwrap();
    app.customer_says("t1", "line", "QUEUED", "轉真人").await;
    assert!(reply_to(&mut out, "QUEUED", "closed").await["text"]
        .as_str()
        .unwrap()
        .starts_with("目前非營業時間"));
    app.wait_for_state("t1", "line", "QUEUED", "waiting").await;
    assert_eq!(
        conversation(&app, "line", "QUEUED").await.3,
        "handover_after_hours"
    );

    // After the opening time (it opened 30 minutes ago): the ordinary hand-over.
    app.load_bot(&hours_file(&zone, now - 30, "stay"))
        .await
        .unwrap();
    app.customer_says("t1", "line", "OPEN", "轉真人").await;
    assert_eq!(
        reply_to(&mut out, "OPEN", "handover").await["text"],
        "正在為您轉接專員。"
    );
    app.wait_for_state("t1", "line", "OPEN", "waiting").await;
    assert_eq!(conversation(&app, "line", "OPEN").await.3, "handover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survey_answer_is_stored_on_the_closed_conversation() {
    let app = app().await;
    app.load_bot(
        "tenant: t1\nchannels:\n  - id: line\n    survey: {question: 請為本次服務評分, scale: 5, thanks: 感謝您的評分！}\n",
    )
    .await
    .unwrap();
    let mut out = app.client.subscribe("fl.t1.outbound.line").await.unwrap();
    let mut notify = app.client.subscribe("fl.t1.notify.amy").await.unwrap();
    app.presence("t1", "amy", "ready", 5, &["zh"]).await;
    app.customer_says("t1", "line", "S1", "轉真人").await;
    let offer = next_matching(&mut notify, "offer", |v| v["type"] == "offer").await;
    let id: uuid::Uuid = offer["conversation_id"].as_str().unwrap().parse().unwrap();
    app.agent_does("t1", "amy", "accept", id, json!({})).await;
    app.wait_for_state("t1", "line", "S1", "processing").await;
    app.agent_does("t1", "amy", "close", id, json!({})).await;

    let question = next_matching(&mut out, "survey", |v| v["text"] == "請為本次服務評分").await;
    assert_eq!(question["buttons"].as_array().unwrap().len(), 5);
    assert_eq!(question["conversation_id"], id.to_string());
    app.customer_presses("t1", "line", "S1", "4", "rating:4")
        .await;
    assert_eq!(
        reply_to(&mut out, "S1", "thanks").await["text"],
        "感謝您的評分！"
    );
    let rating: Option<i16> = app
        .pg
        .query_one("SELECT rating FROM conversations WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rating, Some(4));
    let conversations = "SELECT count(*) FROM conversations c JOIN customers cu ON cu.id = c.customer_id WHERE cu.external_id = 'S1'";
    assert_eq!(
        count(&app.pg, conversations, &[]).await,
        1,
        "the answer opened no conversation"
    );

    // Anything else afterwards is a new conversation (SPEC L9).
    app.customer_says("t1", "line", "S1", "5").await;
    app.wait_for_state("t1", "line", "S1", "bot").await;
    assert_eq!(
        count(&app.pg, conversations, &[]).await,
        2,
        "answered once; the next message is new"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_bot_conversation_is_completed() {
    let app = app().await;
    app.load_bot("tenant: t1\nchannels:\n  - id: line\n    bot_idle_seconds: 2\n")
        .await
        .unwrap();
    let mut events = app
        .client
        .subscribe("fl.t1.events.conversation")
        .await
        .unwrap();
    app.customer_says("t1", "line", "IDLE", "你好").await;
    let done = next_matching(&mut events, "idle completion", |v| v["to"] == "completed").await;
    assert_eq!(done["reason"], "bot_idle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused_by_name_and_nothing_changes() {
    let app = app().await;
    let stored = || async {
        (
            count(&app.pg, "SELECT count(*) FROM keyword_rules", &[]).await,
            count(&app.pg, "SELECT count(*) FROM kb_articles", &[]).await,
            count(&app.pg, "SELECT count(*) FROM flow_versions", &[]).await,
            count(&app.pg, "SELECT bot_config_version FROM tenants", &[]).await,
        )
    };
    let before = stored().await;
    assert_eq!((before.0, before.1, before.2), (5, 4, 1));
    let refused = |from: &str, to: &str| {
        let file = BOT
            .replace(from, to)
            .replace("- id: order-status", "- id: changed");
        let app = &app;
        async move { format!("{:#}", app.load_bot(&file).await.unwrap_err()) }
    };
    // Checked before writing: a dangling branch, a bad regex, an unknown zone...
    let e = refused("next: bye}", "next: good_bye}").await;
    assert!(
        e.contains(r#"step "found" next goes to "good_bye", which is not a step"#),
        "{e}"
    );
    let e = refused("pattern: '退(款|費).*多久'", "pattern: '退(款|費'").await;
    assert!(
        e.contains(r#"keyword rule "refund-words": pattern is not a valid regular expression"#),
        "{e}"
    );
    let e = refused(
        "      bye: {type: end, text: 謝謝您，再見！}",
        "      bye: {type: end, text: 謝謝您，再見！}\n      lost: {type: end}",
    )
    .await;
    assert!(e.contains(r#"step "lost" cannot be reached"#), "{e}");
    // ...and against what is stored: a rule starting a flow that was never published, an
    // unknown channel. The articles came before the failure in the same load: not kept.
    let e = refused(
        "reply: {text: \"好的！\", flow: orders}",
        "reply: {text: \"好的！\", flow: surveys}",
    )
    .await;
    assert!(
        e.contains(r#"flow "surveys" does not exist or has no published version"#),
        "{e}"
    );
    let e = refused("  - id: web\n", "  - id: fax\n").await;
    assert!(e.contains("channel fax of tenant t1 does not exist"), "{e}");
    assert_eq!(stored().await, before, "nothing stored changed");
}
