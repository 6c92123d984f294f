//! The reference web-chat gateway (`workers/webchat`), a process of its own that talks to the
//! system over NATS only, as the tenant's fenced gateway user of `firstline nats-config`, over
//! real NATS, Postgres and every worker (with the API): a customer's message reaches the
//! pipeline and the bot's reply (buttons, image) comes back over the WebSocket; a button press
//! is a postback; an agent's reply arrives too; a widget reconnecting with its last seen `seq`
//! gets exactly what it missed; a message sent again is stored and shown once; a bad token is
//! refused; another tenant's gateway can read none of it. And in headless Chromium: the widget
//! answers, survives a dropped connection and a reload with its transcript, in English and
//! zh-TW (screenshots in `target/test-output/`).

use std::time::Duration;

use crate::helpers::webchat::{
    fenced_nats, press_widget_button, type_in_widget, wait_widget, widget_shown, widget_texts,
    Gateway,
};
use crate::helpers::{count, eventually, next_matching, Browser, Page, TestApp};
use async_nats::jetstream::consumer::pull;
use firstline_shared::domain::{ChannelId, TenantId};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const SETUP: &str = r#"{"tenants":[
    {"id": "acme", "dispatch_cycle_seconds": 60,
     "channels": [{"id": "webchat", "kind": "webchat", "bot_enabled": true}],
     "agents": [{"id": "amy", "name": "Amy", "capacity": 2}]},
    {"id": "other", "channels": [{"id": "webchat", "kind": "webchat", "bot_enabled": true}]}]}"#;

const SECRET: &str = "acme-customer-identity-secret";

/// Serves the SVG the bot's reply shows (a test's own little web server).
async fn image_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/plans.svg",
        axum::routing::get(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, "image/svg+xml")],
                r##"<svg xmlns="http://www.w3.org/2000/svg" width="240" height="80"><rect width="240" height="80" rx="8" fill="#0b6bcb"/><text x="120" y="50" font-size="26" text-anchor="middle" fill="#fff" font-family="sans-serif">PLANS</text></svg>"##,
            )
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/plans.svg")
}

fn bot(image_url: &str) -> String {
    format!(
        r#"
tenant: acme
fallback_reply: "Sorry, I did not get that. 抱歉，我不太明白。"
keyword_rules:
  - id: price
    match: exact
    pattern: 價格
    reply:
      text: "請選擇方案："
      buttons: [{{label: 基本方案, payload: plan_basic}}, {{label: 專業方案}}]
      image_url: {image_url}
  - {{id: basic, match: exact, pattern: plan_basic, reply: {{text: "基本方案每月 300 元。"}}}}
  - {{id: hours, match: contains, pattern: 營業時間, reply: {{text: "每天 09:00-18:00 為您服務。"}}}}
"#
    )
}

/// NATS with the fenced users of `firstline nats-config` (workers, and the gateways of acme
/// and other), every worker, the bot, and the gateway of acme as its gateway user.
struct System {
    app: TestApp,
    gateway: Gateway,
    image_url: String,
}

async fn start() -> System {
    let nats = fenced_nats(&["acme", "other"]).await;
    let app = TestApp::spawn_on(nats, SETUP).await;
    let image_url = image_server().await;
    app.load_bot(&bot(&image_url)).await.expect("the bot file");
    let gateway = Gateway::start(&app, "acme", Some(SECRET)).await;
    System {
        app,
        gateway,
        image_url,
    }
}

impl System {
    /// Waits until the gateway has taken (and acked) every reply published so far.
    async fn gateway_took_every_reply(&self) {
        let js = self.app.js.clone();
        eventually(
            "the gateway to take the replies",
            Duration::from_secs(20),
            || async {
                let stream = js.get_stream("FL_OUTBOUND").await.ok()?;
                let info = stream.consumer_info("gateway-acme").await.ok()?;
                (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
            },
        )
        .await;
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A widget's connection, at the WebSocket level.
struct Widget {
    socket: Socket,
    /// The last `seq` received.
    last: Option<u64>,
}

impl Widget {
    async fn connect(gateway: &str, query: &str) -> (Self, Value) {
        let url = format!("{}/ws?{query}", gateway.replace("http://", "ws://"));
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket");
        let mut w = Widget { socket, last: None };
        let first = w.frame().await;
        (w, first)
    }

    async fn frame(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .expect("a frame within 30 s")
                .expect("the socket is open")
                .expect("a frame");
            if let Message::Text(text) = m {
                let v: Value = serde_json::from_str(&text).unwrap();
                if let Some(seq) = v["seq"].as_u64() {
                    assert!(self.last.is_none_or(|l| seq > l), "seqs grow: {v}");
                    self.last = Some(seq);
                }
                return v;
            }
        }
    }

    /// The next transcript entry (`message` frame); fails on anything else.
    async fn entry(&mut self) -> Value {
        let v = self.frame().await;
        assert_eq!(v["type"], "message", "{v}");
        v["message"].clone()
    }

    async fn send(&mut self, body: Value) {
        self.socket
            .send(Message::Text(body.to_string().into()))
            .await
            .unwrap();
    }

    /// Sends a text message; its id.
    async fn says(&mut self, text: &str) -> String {
        let id = Uuid::new_v4().to_string();
        self.send(json!({"message_id": id, "text": text})).await;
        id
    }

    /// No frame comes for a moment.
    async fn stays_quiet(&mut self) {
        let got = tokio::time::timeout(Duration::from_millis(700), self.socket.next()).await;
        assert!(got.is_err(), "expected no frame, got {got:?}");
    }
}

async fn messages_with_id(app: &TestApp, id: &str) -> i64 {
    count(
        &app.pg,
        &format!("SELECT count(*) FROM messages WHERE tenant_id = 'acme' AND channel_id = 'webchat' AND external_id = '{id}'"),
        &[],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_chats_through_the_gateway_and_a_reconnect_gets_exactly_what_it_missed() {
    let mut sys = start().await;
    let api = sys.app.start_api().await;
    let token = firstline_webchat::identity::token(SECRET, "member-1");
    let query = format!("customer_id=member-1&token={token}");
    let (mut a, welcome) = Widget::connect(&sys.gateway.url, &query).await;
    assert_eq!(
        welcome,
        json!({"type": "welcome", "customer_id": "member-1"})
    );

    // A message reaches the pipeline (a conversation with the bot, the message stored) and the
    // bot's reply comes back: text, buttons and image.
    let m1 = a.says("價格").await;
    let echo = a.entry().await;
    assert_eq!(
        (echo["author"].as_str(), echo["message_id"].as_str()),
        (Some("customer"), Some(m1.as_str()))
    );
    let reply = a.entry().await;
    assert_eq!(reply["author"], "bot");
    assert_eq!(reply["text"], "請選擇方案：");
    assert_eq!(
        reply["buttons"],
        json!([{"label": "基本方案", "payload": "plan_basic"}, {"label": "專業方案", "payload": "專業方案"}])
    );
    assert_eq!(reply["image_url"], sys.image_url.as_str());
    sys.app
        .wait_for_state("acme", "webchat", "member-1", "bot")
        .await;
    assert_eq!(messages_with_id(&sys.app, &m1).await, 1);
    // On the keyed subject, with the customer key (README: the gateway contract): ordered per
    // customer in FL_INBOUND_KEYED (stored with the partition after the key), none in FL_INBOUND.
    let stored = sys
        .app
        .stored("FL_INBOUND_KEYED", "fl.acme.inbound.webchat.member-1.*")
        .await;
    assert!(
        stored
            .iter()
            .any(|m| m["message_id"] == m1.as_str() && m["customer"]["id"] == "member-1"),
        "{stored:?}"
    );
    assert_eq!(
        sys.app
            .stored("FL_INBOUND", "fl.acme.inbound.webchat.*")
            .await,
        Vec::<Value>::new()
    );

    // A button press is a postback: the label as text, the payload as postback.
    let m2 = Uuid::new_v4().to_string();
    a.send(json!({"message_id": m2, "text": "基本方案", "postback": "plan_basic"}))
        .await;
    assert_eq!(a.entry().await["text"], "基本方案");
    assert_eq!(a.entry().await["text"], "基本方案每月 300 元。");

    // The connection drops. Meanwhile the customer writes from a second tab; the first,
    // reconnecting with the last seq it saw, gets exactly the two entries it missed.
    let seen = a.last.unwrap();
    drop(a);
    let (mut b, _) = Widget::connect(&sys.gateway.url, &format!("{query}&after={seen}")).await;
    let m3 = b.says("營業時間?").await;
    assert_eq!(b.entry().await["message_id"], m3.as_str());
    assert_eq!(b.entry().await["text"], "每天 09:00-18:00 為您服務。");
    let (mut a, _) = Widget::connect(&sys.gateway.url, &format!("{query}&after={seen}")).await;
    let missed = [a.entry().await, a.entry().await];
    assert_eq!(missed[0]["message_id"], m3.as_str());
    assert_eq!(missed[1]["author"], "bot");
    assert_eq!(missed[1]["text"], "每天 09:00-18:00 為您服務。");
    a.stays_quiet().await;
    // A widget unsure whether its message went through sends it again, with the same id:
    // stored once, shown once.
    a.send(json!({"message_id": m3, "text": "營業時間?"})).await;
    a.stays_quiet().await;
    b.stays_quiet().await;
    assert_eq!(messages_with_id(&sys.app, &m3).await, 1);
    // A first connection without `after` gets the whole kept transcript.
    let (mut fresh, _) = Widget::connect(&sys.gateway.url, &query).await;
    let mut all = Vec::new();
    for _ in 0..6 {
        all.push(
            fresh.entry().await["message_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!([&all[0], &all[2], &all[4]], [&m1, &m2, &m3]);
    fresh.stays_quiet().await;

    // An agent's reply comes the same way.
    let amy = sys.app.token("acme", "agent", Some("amy")).await;
    api.presence(&amy, "amy", "ready").await;
    let handover = a.says("agent").await;
    assert_eq!(a.entry().await["message_id"], handover.as_str());
    let handover_reply = a.entry().await;
    assert_eq!(handover_reply["author"], "bot");
    sys.app
        .wait_for_state("acme", "webchat", "member-1", "assigning")
        .await;
    let row = sys
        .app
        .pg
        .query_one("SELECT c.id FROM conversations c JOIN customers cu ON cu.id = c.customer_id WHERE cu.external_id = 'member-1' AND c.state = 'assigning'", &[])
        .await
        .unwrap();
    let conversation: Uuid = row.get(0);
    assert_eq!(
        api.post(
            &format!("/api/v1/conversations/{conversation}/accept"),
            &amy,
            json!({})
        )
        .await
        .0,
        202
    );
    sys.app
        .wait_for_state("acme", "webchat", "member-1", "processing")
        .await;
    assert_eq!(
        api.post(
            &format!("/api/v1/conversations/{conversation}/reply"),
            &amy,
            json!({"text": "Hi, Amy here."})
        )
        .await
        .0,
        202
    );
    // Queued, the customer was told their place in line (a bot message like the others).
    let place = a.entry().await;
    assert_eq!(place["author"], "bot", "{place}");
    assert!(
        place["text"]
            .as_str()
            .unwrap_or_default()
            .contains("You are number 1 in line"),
        "{place}"
    );
    let from_amy = a.entry().await;
    assert_eq!(
        (
            from_amy["author"].as_str(),
            from_amy["agent_id"].as_str(),
            from_amy["text"].as_str()
        ),
        (Some("agent"), Some("amy"), Some("Hi, Amy here."))
    );
    // Every open tab of the customer gets the same entries.
    for expected in [
        &json!(handover),
        &handover_reply["message_id"],
        &place["message_id"],
        &from_amy["message_id"],
    ] {
        assert_eq!(&b.entry().await["message_id"], expected);
    }
    drop(b);
    drop(fresh);

    // Bad input is answered, not swallowed.
    a.send(json!({"message_id": "has a space", "text": "x"}))
        .await;
    let e = a.frame().await;
    assert_eq!(e["type"], "error", "{e}");
    assert!(e["reason"].as_str().unwrap().contains("message_id"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_a_bad_token_and_other_tenants_read_none_of_its_messages() {
    let sys = start().await;
    let good = firstline_webchat::identity::token(SECRET, "member-1");
    for query in [
        format!("customer_id=member-2&token={good}"),
        "customer_id=member-1&token=00".to_owned(),
        "customer_id=member-1".to_owned(),
        "customer_id=anon-not-random".to_owned(),
    ] {
        let (_, first) = Widget::connect(&sys.gateway.url, &query).await;
        assert_eq!(first["type"], "refused", "{query}: {first}");
    }
    // An anonymous visitor without an id is given one.
    let (mut visitor, welcome) = Widget::connect(&sys.gateway.url, "").await;
    let id = welcome["customer_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("anon-") && id.len() == 37, "{welcome}");
    visitor.says("hello").await;
    visitor.entry().await;
    assert_eq!(
        visitor.entry().await["text"],
        "Sorry, I did not get that. 抱歉，我不太明白。"
    );
    // The same id comes back (as the widget keeps it in localStorage) with its transcript.
    let (mut again, _) = Widget::connect(&sys.gateway.url, &format!("customer_id={id}")).await;
    assert_eq!(again.entry().await["text"], "hello");

    // Tenant other's gateway user may neither make a consumer of acme's outbound messages nor
    // use acme's gateway consumer.
    let other = async_nats::ConnectOptions::with_user_and_password(
        "gateway-other".into(),
        "other-gateway-secret".into(),
    )
    .custom_inbox_prefix("_INBOX_other")
    .connect(format!("nats://127.0.0.1:{}", sys.app.nats.port))
    .await
    .unwrap();
    let mut js = async_nats::jetstream::new(other);
    js.set_timeout(Duration::from_secs(2));
    let stream = js.get_stream_no_info("FL_OUTBOUND").await.unwrap();
    let acme = TenantId::parse("acme").unwrap();
    let webchat = ChannelId::parse("webchat").unwrap();
    let stolen = firstline_webchat::outbound::consumer_config("gateway-other", &acme, &webchat);
    assert!(
        stream.create_consumer(stolen).await.is_err(),
        "a consumer of acme's outbound"
    );
    assert!(
        stream
            .get_consumer::<pull::Config>("gateway-acme")
            .await
            .is_err(),
        "acme's consumer"
    );
    // Nor may acme's own gateway widen its consumer's filter: the one in the request's subject
    // must be the one in its body.
    let acme_gateway = async_nats::ConnectOptions::with_user_and_password(
        "gateway-acme".into(),
        "acme-gateway-secret".into(),
    )
    .custom_inbox_prefix("_INBOX_acme")
    .connect(format!("nats://127.0.0.1:{}", sys.app.nats.port))
    .await
    .unwrap();
    let widened = json!({"stream_name": "FL_OUTBOUND", "action": "",
        "config": {"durable_name": "gateway-acme", "name": "gateway-acme", "ack_policy": "explicit",
                   "deliver_policy": "new", "filter_subject": "fl.other.outbound.webchat"}});
    let answer = acme_gateway
        .request(
            "$JS.API.CONSUMER.CREATE.FL_OUTBOUND.gateway-acme.fl.acme.outbound.webchat",
            widened.to_string().into(),
        )
        .await
        .expect("an answer");
    let answer: Value = serde_json::from_slice(&answer.payload).unwrap();
    // JetStream's "did not match filtered subject from create subject".
    assert_eq!(answer["error"]["err_code"], 10131, "{answer}");
    let consumer = sys
        .app
        .js
        .get_stream("FL_OUTBOUND")
        .await
        .unwrap()
        .consumer_info("gateway-acme")
        .await
        .unwrap()
        .clone();
    assert_eq!(consumer.config.filter_subject, "fl.acme.outbound.webchat");
    // Its own is allowed, for its own outbound subjects.
    let own = firstline_webchat::outbound::consumer_config(
        "gateway-other",
        &TenantId::parse("other").unwrap(),
        &webchat,
    );
    stream.create_consumer(own).await.expect("its own consumer");
}

/// What the widget shows stays `expected` for 800 ms (read every 100 ms).
async fn stays_shown(page: &mut Page, expected: &Value, what: &str) {
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let v = widget_shown(page).await;
        assert_eq!(v["messages"], expected["messages"], "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_widget_keeps_its_transcript_across_a_reload_and_a_dropped_connection() {
    let sys = start().await;
    let browser = Browser::start();
    let mut page = browser.page().await;
    page.call("Page.enable", json!({})).await;
    page.call(
        "Page.navigate",
        json!({"url": format!("{}/?lang=en", sys.gateway.url)}),
    )
    .await;
    let v = wait_widget(&mut page, "the widget to connect", |v| {
        v["connected"] == "true"
    })
    .await;
    assert_eq!(v["title"], "Chat with us");

    // Typed in the widget; the bot answers with buttons and an image; a button press answers.
    type_in_widget(&mut page, "價格").await;
    let v =
        wait_widget(&mut page, "the bot's buttons", |v| {
            v["messages"].as_array().unwrap().iter().any(|m| {
                m["buttons"].as_array().is_some_and(|b| b.len() == 2) && m["image"] == true
            })
        })
        .await;
    assert_eq!(widget_texts(&v), ["價格", "請選擇方案："]);
    press_widget_button(&mut page, "基本方案").await;
    let v = wait_widget(&mut page, "the postback's answer", |v| {
        widget_texts(v).len() == 4
    })
    .await;
    assert_eq!(
        widget_texts(&v),
        ["價格", "請選擇方案：", "基本方案", "基本方案每月 300 元。"]
    );
    assert!(
        v["messages"][1]["buttons"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["disabled"] == true),
        "old buttons are disabled: {v}"
    );
    page.screenshot("webchat-en.png").await;

    // The network goes away: the widget's socket drops and cannot reconnect. While it is away
    // the bot answers a message of the customer's (sent on another device, through NATS).
    let visitor = page
        .eval("window.__firstlineWebchat.customerId")
        .await
        .as_str()
        .unwrap()
        .to_owned();
    page.eval(r#"window.__realWebSocket = window.WebSocket;
        window.WebSocket = function () { return new window.__realWebSocket("ws://127.0.0.1:9/offline"); };
        window.__firstlineWebchat.drop()"#).await;
    wait_widget(&mut page, "the widget to see the drop", |v| {
        v["connected"] == "false"
    })
    .await;
    let mut outbound = sys
        .app
        .client
        .subscribe("fl.acme.outbound.webchat")
        .await
        .unwrap();
    sys.app
        .customer_says_keyed("acme", "webchat", &visitor, "營業時間")
        .await;
    next_matching(&mut outbound, "the bot's answer", |m| {
        m["customer_id"] == visitor.as_str() && m["text"] == "每天 09:00-18:00 為您服務。"
    })
    .await;
    sys.gateway_took_every_reply().await;
    // Typed while offline: it waits in the widget.
    type_in_widget(&mut page, "還在嗎？").await;
    let v = widget_shown(&mut page).await;
    assert_eq!(
        v["messages"].as_array().unwrap().last().unwrap()["pending"],
        true,
        "{v}"
    );
    // The network is back: the widget reconnects from the last entry it saw, gets what it
    // missed, once, and sends what waited.
    page.eval("window.WebSocket = window.__realWebSocket").await;
    let v = wait_widget(
        &mut page,
        "the missed answer and the waiting message",
        |v| {
            v["connected"] == "true"
                && widget_texts(v).len() == 7
                && v["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|m| m["pending"] == false)
        },
    )
    .await;
    assert_eq!(
        widget_texts(&v),
        [
            "價格",
            "請選擇方案：",
            "基本方案",
            "基本方案每月 300 元。",
            "每天 09:00-18:00 為您服務。",
            "還在嗎？",
            "Sorry, I did not get that. 抱歉，我不太明白。"
        ]
    );
    let before = v;
    stays_shown(&mut page, &before, "nothing shown twice").await;

    // A reload: the transcript is there at once (from localStorage), and the reconnect adds
    // nothing twice. In zh-TW this time.
    page.call(
        "Page.navigate",
        json!({"url": format!("{}/?lang=zh-TW", sys.gateway.url)}),
    )
    .await;
    let after = wait_widget(&mut page, "the reloaded widget to connect", |v| {
        v["connected"] == "true" && v["title"] == "線上客服" && v["visible"] == true
    })
    .await;
    assert_eq!(widget_texts(&after), widget_texts(&before));
    assert_eq!(
        after["messages"], before["messages"],
        "the same entries, the same seqs"
    );
    stays_shown(&mut page, &after, "nothing added by the reconnect").await;
    let v = wait_widget(&mut page, "the latest entry in view", |v| {
        v["at_bottom"] == true
    })
    .await;
    assert_eq!(v["messages"], before["messages"]);
    assert_eq!(
        page.eval("window.__firstlineWebchat.customerId")
            .await
            .as_str(),
        Some(visitor.as_str()),
        "the visitor keeps its id"
    );
    page.screenshot("webchat-zh-TW.png").await;
    assert_eq!(
        count(&sys.app.pg, &format!("SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id JOIN customers cu ON cu.id = c.customer_id WHERE cu.external_id = '{visitor}' AND m.author = 'customer'"), &[]).await,
        4,
        "each customer message stored once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restart_loses_no_reply_taken_for_a_closed_widget() {
    let mut sys = start().await;
    let visitor = firstline_webchat::identity::new_anonymous();
    let query = format!("customer_id={visitor}");
    let (mut w, _) = Widget::connect(&sys.gateway.url, &query).await;
    w.says("價格").await;
    w.entry().await;
    let first_reply = w.entry().await;
    let seen = w.last.unwrap();
    drop(w);

    // While the widget is closed the bot answers a message the customer sent elsewhere, and
    // the gateway takes (acks) the answer. Then the gateway restarts.
    let mut outbound = sys
        .app
        .client
        .subscribe("fl.acme.outbound.webchat")
        .await
        .unwrap();
    sys.app
        .customer_says_keyed("acme", "webchat", &visitor, "營業時間")
        .await;
    let answer = next_matching(&mut outbound, "the bot's answer", |m| {
        m["customer_id"] == visitor.as_str() && m["text"] == "每天 09:00-18:00 為您服務。"
    })
    .await;
    sys.gateway_took_every_reply().await;
    sys.gateway.restart(&sys.app).await;

    // The new gateway read the recent replies again from the stream: the widget gets the
    // answer it missed. Before it, under a new seq, the reply it has (its message_id tells).
    let (mut w, _) = Widget::connect(&sys.gateway.url, &format!("{query}&after={seen}")).await;
    assert_eq!(w.entry().await["message_id"], first_reply["message_id"]);
    let missed = w.entry().await;
    assert_eq!(missed["message_id"], answer["message_id"]);
    assert_eq!(missed["text"], "每天 09:00-18:00 為您服務。");
    w.stays_quiet().await;
    // And the replay's consumer is gone.
    let stream = sys.app.js.get_stream("FL_OUTBOUND").await.unwrap();
    assert!(stream.consumer_info("replay-acme").await.is_err());
}
