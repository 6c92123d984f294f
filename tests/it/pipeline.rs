//! End to end through real NATS JetStream and real Postgres, with every worker running:
//! what a gateway and an agent desktop see. Bodies are hand-written JSON, as a gateway in
//! another language would publish them.

use std::time::Duration;

use crate::helpers::{
    count, eventually, holds_for, next_json, next_matching, wait_for_count, TestApp,
};
use serde_json::json;
use uuid::Uuid;

/// One tenant with a bot channel (`line`) and a channel without bot (`mail`).
pub(crate) const SETUP: &str = r#"{"tenants":[{
    "id": "t1", "dispatch_cycle_seconds": 60,
    "channels": [
        {"id": "line", "kind": "line", "bot_enabled": true},
        {"id": "mail", "kind": "email", "bot_enabled": false}
    ]
}]}"#;

fn conversation_id(v: &serde_json::Value) -> Uuid {
    v["conversation_id"].as_str().unwrap().parse().unwrap()
}

/// SPEC L1, L2, L4, L6, L7, L8, L9 and the notifier's deliveries, in one customer's story.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_travels_from_inbound_to_completed() {
    let app = TestApp::spawn(SETUP).await;
    let mut events = app
        .client
        .subscribe("fl.t1.events.conversation")
        .await
        .unwrap();
    let mut outbound = app.client.subscribe("fl.t1.outbound.line").await.unwrap();
    let mut notify = app.client.subscribe("fl.t1.notify.amy").await.unwrap();
    app.presence("t1", "amy", "ready", 5, &["zh"]).await;

    // L1/L2: the first message opens a conversation, in the bot (the channel's bot is on).
    app.customer_says("t1", "line", "U1", "你好").await;
    let created = next_json(&mut events, "the created event").await;
    assert_eq!(created["from"], json!(null));
    assert_eq!(created["to"], "bot");
    assert_eq!(created["channel"], "line");
    assert_eq!(created["customer_id"], "U1");
    let conversation = conversation_id(&created);
    let reply = next_json(&mut outbound, "the bot's reply").await;
    assert_eq!(reply["author"], "bot");
    assert_eq!(reply["customer_id"], "U1");

    // L4 then L6: the hand-over keyword queues it; amy is ready with room, so it is offered.
    app.customer_says("t1", "line", "U1", "轉真人").await;
    let offer = next_matching(&mut notify, "the offer", |v| v["type"] == "offer").await;
    assert_eq!(conversation_id(&offer), conversation);
    assert_eq!(offer["customer"]["id"], "U1");
    assert!(offer["deadline"].is_string());
    app.wait_for_state("t1", "line", "U1", "assigning").await;

    // L7: accept.
    app.agent_does("t1", "amy", "accept", conversation, json!({}))
        .await;
    let assigned = next_matching(&mut notify, "the assignment", |v| v["type"] == "assigned").await;
    assert_eq!(assigned["offer_id"], offer["offer_id"]);
    app.wait_for_state("t1", "line", "U1", "processing").await;

    // A customer message in processing reaches the agent, not the bot.
    app.customer_says("t1", "line", "U1", "訂單 #123 還沒到")
        .await;
    let forwarded = next_matching(&mut notify, "the customer's message", |v| {
        v["type"] == "customer_message"
    })
    .await;
    assert_eq!(forwarded["text"], "訂單 #123 還沒到");

    // The agent's reply goes out to the gateway.
    app.agent_does(
        "t1",
        "amy",
        "reply",
        conversation,
        json!({"text": "已為您查詢"}),
    )
    .await;
    let agent_reply = next_matching(&mut outbound, "the agent's reply", |v| {
        v["author"] == "agent"
    })
    .await;
    assert_eq!(agent_reply["text"], "已為您查詢");
    assert_eq!(agent_reply["agent_id"], "amy");
    assert_eq!(conversation_id(&agent_reply), conversation);

    // L8: close -> completed, in Postgres and on the events subject.
    app.agent_does("t1", "amy", "close", conversation, json!({}))
        .await;
    let closed = next_matching(&mut events, "the completed event", |v| {
        v["to"] == "completed"
    })
    .await;
    assert_eq!(closed["from"], "processing");
    assert_eq!(closed["agent_id"], "amy");
    app.wait_for_state("t1", "line", "U1", "completed").await;

    assert_eq!(
        app.states_of(conversation).await,
        ["bot", "waiting", "assigning", "processing", "completed"]
    );
    let row = app
        .pg
        .query_one(
            "SELECT bot_at IS NOT NULL AND queued_at IS NOT NULL AND assigning_at IS NOT NULL
                    AND processing_at IS NOT NULL AND completed_at IS NOT NULL, closed_by
             FROM conversations WHERE id = $1",
            &[&conversation],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "every transition has its timestamp");
    assert_eq!(row.get::<_, String>(1), "closed_by_agent");

    // L9: the next message after completed starts a new conversation.
    app.customer_says("t1", "line", "U1", "還有一個問題").await;
    let again = next_matching(&mut events, "a new conversation", |v| v["to"] == "bot").await;
    assert_ne!(conversation_id(&again), conversation);
}

/// SPEC L5: once in waiting, customer messages are stored but trigger no bot reply or flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_message_in_waiting_triggers_no_bot() {
    let app = TestApp::spawn(SETUP).await;
    app.customer_says("t1", "line", "U2", "hi").await;
    app.wait_for_state("t1", "line", "U2", "bot").await;
    app.customer_says("t1", "line", "U2", "agent").await;
    app.wait_for_state("t1", "line", "U2", "waiting").await; // nobody is online (D3)

    let later = app
        .customer_says("t1", "line", "U2", "hello? anyone?")
        .await;
    let keyword_again = app.customer_says("t1", "line", "U2", "轉真人").await;
    for id in [&later, &keyword_again] {
        eventually("the message stored", Duration::from_secs(20), || async {
            let r = app
                .pg
                .query_opt(
                    "SELECT routed_to FROM messages WHERE external_id = $1",
                    &[id],
                )
                .await
                .unwrap();
            r.map(|r| assert_eq!(r.get::<_, String>(0), "queued"))
        })
        .await;
    }
    // Only the two messages sent while in the bot reached the bot, and it answered twice;
    // once queued, the customer was told their place in line, once (neither later message
    // asks for it).
    assert_eq!(app.stored("FL_BOT", "fl.t1.bot.*.*").await.len(), 2);
    assert_eq!(
        count(
            &app.pg,
            "SELECT count(*) FROM messages WHERE author = 'bot' AND external_id NOT LIKE 'place:%'",
            &[]
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &app.pg,
            "SELECT count(*) FROM messages WHERE author = 'bot' AND external_id LIKE 'place:%'",
            &[]
        )
        .await,
        1
    );
    assert_eq!(
        app.state_of("t1", "line", "U2").await.as_deref(),
        Some("waiting")
    );
}

/// SPEC L1: many first messages of one customer, handled at once by three ingest instances,
/// open one conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_first_messages_of_one_customer_make_one_conversation() {
    let mut app = TestApp::spawn(SETUP).await;
    for _ in 0..2 {
        let config = firstline_ingest::Config {
            common: app.config.clone(),
        };
        let shutdown = app.shutdown.clone();
        app.spawn_worker(firstline_ingest::run(config, shutdown));
    }
    let customers = 10;
    let per_customer = 6;
    let mut sends = Vec::new();
    for c in 0..customers {
        for i in 0..per_customer {
            let app = &app;
            sends.push(async move {
                app.customer_says("t1", "mail", &format!("C{c}"), &format!("message {i}"))
                    .await
            });
        }
    }
    futures::future::join_all(sends).await;
    wait_for_count(
        &app.pg,
        "every message stored",
        Duration::from_secs(30),
        "SELECT count(*) FROM messages WHERE author = 'customer'",
        (customers * per_customer) as i64,
    )
    .await;
    let per: Vec<i64> = app
        .pg
        .query(
            "SELECT count(DISTINCT m.conversation_id) FROM messages m GROUP BY m.channel_id, (SELECT customer_id FROM conversations c WHERE c.id = m.conversation_id)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(per.len(), customers);
    assert!(
        per.iter().all(|n| *n == 1),
        "one conversation per customer: {per:?}"
    );
    assert_eq!(
        count(&app.pg, "SELECT count(*) FROM conversations", &[]).await,
        customers as i64
    );
}

/// DESIGN.md: deduplicated by `Nats-Msg-Id` in the stream and by the unique key in Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_inbound_published_twice_is_stored_once() {
    let app = TestApp::spawn(SETUP).await;
    let body =
        json!({"version": 1, "message_id": "ext-42", "customer": {"id": "U3"}, "text": "hello"})
            .to_string();
    // The same publish retried at once: JetStream drops the second within its duplicate window.
    assert!(
        !app.publish_json("fl.t1.inbound.line", Some("t1:line:ext-42"), &body)
            .await
    );
    assert!(
        app.publish_json("fl.t1.inbound.line", Some("t1:line:ext-42"), &body)
            .await
    );
    // A gateway that lost its id, or republished after the window: Postgres's unique key.
    assert!(!app.publish_json("fl.t1.inbound.line", None, &body).await);
    // A later, different message proves the copies before it were handled.
    app.publish_json(
        "fl.t1.inbound.line",
        None,
        &json!({"version": 1, "message_id": "ext-43", "customer": {"id": "U3"}, "text": "again"})
            .to_string(),
    )
    .await;
    wait_for_count(
        &app.pg,
        "the later message stored",
        Duration::from_secs(20),
        "SELECT count(*) FROM messages WHERE external_id = 'ext-43'",
        1,
    )
    .await;
    assert_eq!(
        count(
            &app.pg,
            "SELECT count(*) FROM messages WHERE external_id = 'ext-42'",
            &[]
        )
        .await,
        1
    );
    assert_eq!(
        count(&app.pg, "SELECT count(*) FROM conversations", &[]).await,
        1
    );
    // The bot answered each stored message once.
    wait_for_count(
        &app.pg,
        "two bot replies",
        Duration::from_secs(20),
        "SELECT count(*) FROM messages WHERE author = 'bot'",
        2,
    )
    .await;
}

/// Issue 20: `FL_INBOUND`'s de-duplication is keyed by `Nats-Msg-Id` alone, across the whole
/// stream, so two tenants' messages with the same old-form id (`<channel>:<message id>`) must
/// not be taken for one (docs/operations.md): both are stored, each tenant gets its
/// conversation; a gateway's retry of the same message is still stored once (Postgres's key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_with_the_same_old_form_message_id_are_both_stored() {
    let app = TestApp::spawn(
        r#"{"tenants":[
            {"id": "t1", "channels": [{"id": "web", "kind": "webchat", "bot_enabled": false}]},
            {"id": "t2", "channels": [{"id": "web", "kind": "webchat", "bot_enabled": false}]}
        ]}"#,
    )
    .await;
    let body = |customer: &str| {
        json!({"version": 1, "message_id": "m-1001", "customer": {"id": customer}, "text": "hi"})
            .to_string()
    };
    // Two gateways, a moment apart. (Within 100 ms, JetStream's shortest duplicate window, the
    // stream would still drop t2's: the residual risk of the old form, docs/operations.md.)
    let t1 = app
        .publish_json("fl.t1.inbound.web", Some("web:m-1001"), &body("U1"))
        .await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let t2 = app
        .publish_json("fl.t2.inbound.web", Some("web:m-1001"), &body("U2"))
        .await;
    // t1's gateway retries its message (an ack it did not see), old form and new form.
    app.publish_json("fl.t1.inbound.web", Some("web:m-1001"), &body("U1"))
        .await;
    app.publish_json("fl.t1.inbound.web", Some("t1:web:m-1001"), &body("U1"))
        .await;
    assert!(
        !t1 && !t2,
        "the stream took t2's message for t1's (t1 duplicate: {t1}, t2 duplicate: {t2})"
    );
    // The new form, twice per tenant: each tenant's message once.
    for tenant in ["t1", "t2"] {
        let b =
            json!({"version": 1, "message_id": "m-1002", "customer": {"id": "U9"}, "text": "x"})
                .to_string();
        for _ in 0..2 {
            app.publish_json(
                &format!("fl.{tenant}.inbound.web"),
                Some(&format!("{tenant}:web:m-1002")),
                &b,
            )
            .await;
        }
    }
    wait_for_count(
        &app.pg,
        "t2's m-1001 stored",
        Duration::from_secs(20),
        "SELECT count(*) FROM messages WHERE tenant_id = 't2' AND external_id = 'm-1001'",
        1,
    )
    .await;
    wait_for_count(
        &app.pg,
        "each tenant's m-1002 stored",
        Duration::from_secs(20),
        "SELECT count(*) FROM messages WHERE external_id = 'm-1002'",
        2,
    )
    .await;
    // The retries and repeats are all handled by now (each partition in order) and stored once.
    for (tenant, id) in [("t1", "m-1001"), ("t1", "m-1002"), ("t2", "m-1002")] {
        assert_eq!(
            count(
                &app.pg,
                "SELECT count(*) FROM messages WHERE tenant_id = $1 AND external_id = $2",
                &[&tenant, &id]
            )
            .await,
            1,
            "{tenant}'s {id}"
        );
    }
    assert_eq!(
        count(
            &app.pg,
            "SELECT count(DISTINCT tenant_id) FROM conversations",
            &[]
        )
        .await,
        2,
        "each tenant has its conversation"
    );
}

/// A body that can never be handled is dead-lettered with the reason; the stream flows on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_inbound_is_dead_lettered_with_the_reason_and_the_next_flows() {
    let app = TestApp::spawn(SETUP).await;
    let bad = [
        (
            "fl.t1.inbound.line",
            "{this is not json",
            "key must be a string",
        ),
        (
            "fl.t1.inbound.line",
            r#"{"version":1,"customer":{"id":"U4"},"text":"x"}"#,
            "missing field `message_id`",
        ),
        (
            "fl.t1.inbound.line",
            r#"{"version":7,"message_id":"m","customer":{"id":"U4"}}"#,
            "unsupported version 7",
        ),
        (
            "fl.t1.inbound.nochannel",
            r#"{"version":1,"message_id":"m","customer":{"id":"U4"}}"#,
            "unknown channel",
        ),
        (
            "fl.nobody.inbound.line",
            r#"{"version":1,"message_id":"m","customer":{"id":"U4"}}"#,
            "unknown channel",
        ),
    ];
    for (subject, body, _) in bad {
        app.publish_json(subject, None, body).await;
    }
    app.customer_says("t1", "line", "U5", "good message").await;
    app.wait_for_state("t1", "line", "U5", "bot").await;

    let letters = eventually("five dead letters", Duration::from_secs(20), || async {
        let l = app
            .stored("FL_DEADLETTER", "fl.*.deadletter.FL_INBOUND")
            .await;
        (l.len() == 5).then_some(l)
    })
    .await;
    // Channels are handled in parallel partitions: find each message's dead letter by its
    // subject (stored under its partition, fl.<t>.inbound.<c>.<p>) and its original bytes.
    for (subject, body, reason) in bad {
        let letter = letters
            .iter()
            .find(|l| {
                l["payload"] == body
                    && l["subject"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("{subject}."))
            })
            .unwrap_or_else(|| panic!("no dead letter of {subject} {body}: {letters:?}"));
        assert_eq!(letter["stream"], "FL_INBOUND");
        assert!(
            letter["reason"].as_str().unwrap().contains(reason),
            "{letter}"
        );
    }
    // Nothing stored from the bad ones.
    assert_eq!(
        count(
            &app.pg,
            "SELECT count(*) FROM messages WHERE author = 'customer'",
            &[]
        )
        .await,
        1
    );
}

/// SPEC D1, D2, D3: offers only to online and ready agents, at most min(3, remaining
/// capacity) each; none while nobody is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_respect_readiness_and_limits() {
    let app = TestApp::spawn(SETUP).await;
    for i in 0..10 {
        app.customer_says("t1", "mail", &format!("Q{i}"), "help")
            .await;
    }
    wait_for_count(
        &app.pg,
        "ten waiting",
        Duration::from_secs(20),
        "SELECT count(*) FROM conversations WHERE state = 'waiting'",
        10,
    )
    .await;
    // D3: online but not ready -> nothing is offered.
    app.presence("t1", "amy", "not_ready", 10, &[]).await;
    app.presence("t1", "ben", "offline", 1, &[]).await;
    let open_offers = || async {
        count(
            &app.pg,
            "SELECT count(*) FROM offers WHERE status = 'open'",
            &[],
        )
        .await
    };
    // A pass has run for each presence event once the agents' rows say so.
    wait_for_count(
        &app.pg,
        "presence applied",
        Duration::from_secs(20),
        "SELECT count(*) FROM agents WHERE status IN ('away', 'logged_out')",
        2,
    )
    .await;
    holds_for(
        "no offer while nobody is ready",
        Duration::from_millis(300),
        || async { open_offers().await == 0 },
    )
    .await;

    // D1/D2: amy ready with 10 remaining -> 3; ben ready with capacity 1 -> 1. Cap 4.
    app.presence("t1", "amy", "ready", 10, &[]).await;
    app.presence("t1", "ben", "ready", 1, &[]).await;
    eventually("four offers", Duration::from_secs(20), || async {
        (open_offers().await == 4).then_some(())
    })
    .await;
    holds_for(
        "never above the D2 cap",
        Duration::from_millis(300),
        || async { open_offers().await == 4 },
    )
    .await;
    let per_agent: Vec<(String, i64)> = app
        .pg
        .query("SELECT agent_id, count(*) FROM offers WHERE status = 'open' GROUP BY agent_id ORDER BY agent_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(per_agent, [("amy".to_owned(), 3), ("ben".to_owned(), 1)]);
    assert_eq!(
        count(
            &app.pg,
            "SELECT count(*) FROM conversations WHERE state = 'assigning'",
            &[]
        )
        .await,
        4
    );

    // Ben accepts: capacity 1 is now used, so ben gets no further offer; amy's slots stay 3.
    let bens: Uuid = app
        .pg
        .query_one(
            "SELECT conversation_id FROM offers WHERE agent_id = 'ben' AND status = 'open'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    app.agent_does("t1", "ben", "accept", bens, json!({})).await;
    wait_for_count(
        &app.pg,
        "ben processing",
        Duration::from_secs(20),
        "SELECT count(*) FROM conversations WHERE state = 'processing'",
        1,
    )
    .await;
    holds_for(
        "amy's three offers, none to ben",
        Duration::from_millis(300),
        || async { open_offers().await == 3 },
    )
    .await;

    // An accept without an offer is refused with a reason, and changes nothing.
    let mut ben_notes = app.client.subscribe("fl.t1.notify.ben").await.unwrap();
    let someone_elses: Uuid = app
        .pg
        .query_one(
            "SELECT conversation_id FROM offers WHERE agent_id = 'amy' AND status = 'open' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    app.agent_does("t1", "ben", "accept", someone_elses, json!({}))
        .await;
    let rejected = next_matching(&mut ben_notes, "the rejection", |v| {
        v["type"] == "action_rejected"
    })
    .await;
    assert!(
        rejected["reason"]
            .as_str()
            .unwrap()
            .contains("no open offer"),
        "{rejected}"
    );
    // Nor may ben reply in a conversation he does not serve (the notifier refuses it).
    app.agent_does("t1", "ben", "reply", someone_elses, json!({"text": "hi"}))
        .await;
    let refused = next_matching(&mut ben_notes, "the reply refused", |v| {
        v["type"] == "action_rejected"
    })
    .await;
    assert!(
        refused["reason"].as_str().unwrap().contains("not serving"),
        "{refused}"
    );
    assert_eq!(open_offers().await, 3);
}

/// The database refuses what a confused dispatcher might write: a second open offer for a
/// conversation, and an offer above an agent's D1 limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_double_offers_and_offers_beyond_d1() {
    let db = crate::helpers::TestDb::create().await;
    let file = firstline::setup::SetupFile::parse(
        r#"{"tenants":[{"id":"t1","offer_limit":3,"channels":[{"id":"mail","bot_enabled":false}],
            "agents":[{"id":"amy","capacity":2},{"id":"ben","capacity":5}]}]}"#,
    )
    .unwrap();
    firstline::setup::configure(&db.url, &file).await.unwrap();
    let pg = db.connect().await;
    pg.batch_execute(
        "UPDATE agents SET status = 'ready';
         INSERT INTO customers (id, tenant_id, channel_id, external_id)
           SELECT gen_random_uuid(), 't1', 'mail', 'c' || i FROM generate_series(1, 4) i;
         INSERT INTO conversations (id, tenant_id, channel_id, customer_id, state, queued_at)
           SELECT gen_random_uuid(), 't1', 'mail', id, 'waiting', now() FROM customers;",
    )
    .await
    .unwrap();
    let conversations: Vec<Uuid> = pg
        .query("SELECT id FROM conversations ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let offer = |conversation: Uuid, agent: &'static str| {
        let pg = &pg;
        async move {
            pg.execute(
                "INSERT INTO offers (id, tenant_id, conversation_id, agent_id, deadline) VALUES ($1, 't1', $2, $3, now())",
                &[&Uuid::new_v4(), &conversation, &agent],
            )
            .await
        }
    };
    offer(conversations[0], "amy").await.unwrap();
    let twice = offer(conversations[0], "ben").await.unwrap_err();
    assert!(
        format!("{twice:?}").contains("offers_one_open_per_conversation"),
        "{twice:?}"
    );
    offer(conversations[1], "amy").await.unwrap();
    // amy's capacity is 2: a third open offer breaks D1.
    let over = offer(conversations[2], "amy").await.unwrap_err();
    assert!(format!("{over:?}").contains("SPEC D1"), "{over:?}");
    pg.execute("UPDATE agents SET status = 'away' WHERE id = 'ben'", &[])
        .await
        .unwrap();
    let not_ready = offer(conversations[3], "ben").await.unwrap_err();
    assert!(format!("{not_ready:?}").contains("away"), "{not_ready:?}");
}

/// A message dead-lettered for an unknown channel is replayed once the channel exists, and
/// then handled; the dead letter is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_and_replayed_after_the_fix() {
    let app = TestApp::spawn(SETUP).await;
    app.customer_says("t1", "whatsapp", "W1", "hello from a new channel")
        .await;
    let filter = firstline::dead_letters::Filter {
        tenant: Some("t1".into()),
        stream: Some("FL_INBOUND".into()),
    };
    let letters = eventually("the dead letter", Duration::from_secs(20), || async {
        let l = firstline::dead_letters::list(&app.js, &filter, 10)
            .await
            .ok()?;
        (l.len() == 1).then_some(l)
    })
    .await;
    assert!(
        letters[0].1.reason.contains("unknown channel"),
        "{:?}",
        letters[0].1
    );

    let file = firstline::setup::SetupFile::parse(
        r#"{"tenants":[{"id":"t1","channels":[{"id":"whatsapp","bot_enabled":true}]}]}"#,
    )
    .unwrap();
    firstline::setup::configure(&app.db.url, &file)
        .await
        .unwrap();
    let replayed = firstline::dead_letters::replay(&app.js, &[letters[0].0])
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    app.wait_for_state("t1", "whatsapp", "W1", "bot").await;
    assert!(firstline::dead_letters::list(&app.js, &filter, 10)
        .await
        .unwrap()
        .is_empty());
}
