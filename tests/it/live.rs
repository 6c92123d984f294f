//! Live agent notifications over the API's WebSocket: an offer arrives with its deadline, is
//! accepted over the HTTP API, and the customer's next message follows; a reconnecting client
//! resumes where it left off.

use std::time::Duration;

use crate::helpers::api::TestApi;
use crate::helpers::TestApp;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const SETUP: &str = r#"{"tenants":[{"id": "acme", "dispatch_cycle_seconds": 60,
   "channels": [{"id": "mail", "kind": "email", "bot_enabled": false}],
   "agents": [{"id": "amy", "name": "Amy", "capacity": 3}]}]}"#;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(api: &TestApi, token: &str, after: Option<u64>) -> Socket {
    let base = api.base.replace("http://", "ws://");
    let mut url = format!("{base}/api/v1/live?access_token={token}");
    if let Some(a) = after {
        url.push_str(&format!("&after={a}"));
    }
    let (socket, response) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    assert_eq!(response.status(), 101);
    socket
}

/// The next JSON frame, within 20 s.
async fn frame(socket: &mut Socket, what: &str) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("socket open")
            .expect("a frame");
        if let Message::Text(text) = m {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// The next notification frame of `kind`; returns (seq, notification).
async fn notification(socket: &mut Socket, kind: &str) -> (u64, Value) {
    loop {
        let f = frame(socket, kind).await;
        assert_eq!(f["type"], "notification", "{f}");
        if f["notification"]["type"] == kind {
            return (f["seq"].as_u64().unwrap(), f["notification"].clone());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gets_an_offer_accepts_it_over_the_api_then_the_customers_next_message() {
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await;
    let amy = app.token("acme", "agent", Some("amy")).await;

    let mut socket = connect(&api, &amy, None).await;
    let snapshot = frame(&mut socket, "the snapshot").await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["offers"], json!([]));
    assert_eq!(snapshot["serving"], json!([]));

    api.presence(&amy, "amy", "ready").await;
    app.customer_says("acme", "mail", "C1", "我的訂單還沒到")
        .await;
    let (_, offer) = notification(&mut socket, "offer").await;
    let conversation = offer["conversation_id"].as_str().unwrap().to_string();
    assert_eq!(offer["customer"]["id"], "C1");
    let deadline: chrono::DateTime<chrono::Utc> =
        offer["deadline"].as_str().unwrap().parse().unwrap();
    let left = deadline - chrono::Utc::now();
    assert!(
        left > chrono::Duration::seconds(50) && left <= chrono::Duration::seconds(60),
        "SPEC D8: {left}"
    );

    let (status, body) = api
        .post(
            &format!("/api/v1/conversations/{conversation}/accept"),
            &amy,
            json!({}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let (_, assigned) = notification(&mut socket, "assigned").await;
    assert_eq!(assigned["conversation_id"], conversation.as_str());

    app.customer_says("acme", "mail", "C1", "訂單號碼 A123")
        .await;
    let (seq, message) = notification(&mut socket, "customer_message").await;
    assert_eq!(message["text"], "訂單號碼 A123");
    assert_eq!(message["conversation_id"], conversation.as_str());

    // Disconnected, the agent misses two messages; reconnecting after the last seq it saw,
    // it gets them, in order, and the snapshot says what it serves.
    socket.close(None).await.unwrap();
    drop(socket);
    app.customer_says("acme", "mail", "C1", "還在嗎？").await;
    app.customer_says("acme", "mail", "C1", "hello?").await;
    crate::helpers::eventually("both stored", Duration::from_secs(10), || async {
        let n = crate::helpers::count(
            &app.pg,
            "SELECT count(*) FROM messages WHERE author = 'customer'",
            &[],
        )
        .await;
        (n == 4).then_some(())
    })
    .await;
    let mut socket = connect(&api, &amy, Some(seq)).await;
    let snapshot = frame(&mut socket, "the snapshot").await;
    assert_eq!(snapshot["serving"], json!([conversation]));
    let (_, first) = notification(&mut socket, "customer_message").await;
    let (_, second) = notification(&mut socket, "customer_message").await;
    assert_eq!(
        (first["text"].as_str(), second["text"].as_str()),
        (Some("還在嗎？"), Some("hello?"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desktop_connecting_later_learns_of_its_open_offers_from_the_snapshot() {
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await;
    let amy = app.token("acme", "agent", Some("amy")).await;
    api.presence(&amy, "amy", "ready").await;
    app.customer_says("acme", "mail", "S1", "hi").await;
    let offered = crate::helpers::eventually("an open offer", Duration::from_secs(20), || async {
        let n = crate::helpers::count(
            &app.pg,
            "SELECT count(*) FROM offers WHERE status = 'open'",
            &[],
        )
        .await;
        (n == 1).then_some(())
    });
    offered.await;
    // A desktop that connects now (no `after`) learns of the offer from the snapshot.
    let mut socket = connect(&api, &amy, None).await;
    let snapshot = frame(&mut socket, "the snapshot").await;
    assert_eq!(snapshot["offers"].as_array().unwrap().len(), 1);
    assert_eq!(snapshot["offers"][0]["customer_id"], "S1");
    assert!(snapshot["offers"][0]["deadline"].is_string());

    // Only agents have a live channel; a plain GET is told it is a WebSocket.
    let admin = app.token("acme", "admin", None).await;
    let (status, body) = api.get("/api/v1/live", &admin).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = api.get("/api/v1/live", &amy).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("WebSocket"));
    let (status, _) = api.call("GET", "/api/v1/live", None, None).await;
    assert_eq!(status, 401);
}
