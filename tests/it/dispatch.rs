//! Dispatch behaviour over the real workers: decline and the dispatch cycle (SPEC D8), and
//! the outbox that keeps decided messages across a crash.

use std::time::Duration;

use crate::helpers::{count, eventually, holds_for, next_matching, wait_for_count, TestApp};
use serde_json::json;
use uuid::Uuid;

const SETUP: &str = r#"{"tenants":[{
    "id": "t1", "dispatch_cycle_seconds": 5,
    "channels": [{"id": "mail", "kind": "email", "bot_enabled": false}]
}]}"#;

async fn queued_at(app: &TestApp, conversation: Uuid) -> chrono::DateTime<chrono::Utc> {
    app.pg
        .query_one(
            "SELECT queued_at FROM conversations WHERE id = $1",
            &[&conversation],
        )
        .await
        .unwrap()
        .get(0)
}

async fn open_offer_agent(app: &TestApp, conversation: Uuid) -> Option<String> {
    app.pg
        .query_opt(
            "SELECT agent_id FROM offers WHERE conversation_id = $1 AND status = 'open'",
            &[&conversation],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// README decision: a decline re-dispatches at once, never to the agent who declined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_offer_goes_to_another_agent_and_never_back() {
    let app = TestApp::spawn(SETUP).await;
    let mut events = app
        .client
        .subscribe("fl.t1.events.conversation")
        .await
        .unwrap();
    app.presence("t1", "amy", "ready", 5, &[]).await;
    app.customer_says("t1", "mail", "D1", "help").await;
    let offered = next_matching(&mut events, "the offer", |v| v["to"] == "assigning").await;
    let conversation: Uuid = offered["conversation_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(offered["agent_id"], "amy");
    let queued_before = queued_at(&app, conversation).await;

    // amy declines while nobody else is ready: back to waiting, not re-offered to amy.
    app.agent_does(
        "t1",
        "amy",
        "decline",
        conversation,
        json!({"reason": "busy"}),
    )
    .await;
    let back = next_matching(&mut events, "back to waiting", |v| v["to"] == "waiting").await;
    assert_eq!(back["reason"], "declined");
    holds_for(
        "waiting, not re-offered to amy",
        Duration::from_millis(300),
        || async {
            open_offer_agent(&app, conversation).await.is_none()
                && app.state_of("t1", "mail", "D1").await.as_deref() == Some("waiting")
        },
    )
    .await;

    // ben comes: he gets it at once.
    app.presence("t1", "ben", "ready", 5, &[]).await;
    let again = next_matching(&mut events, "the second offer", |v| v["to"] == "assigning").await;
    assert_eq!(again["agent_id"], "ben");
    // The queue position is kept: queued_at did not move.
    assert_eq!(queued_at(&app, conversation).await, queued_before);
}

/// SPEC D8: an offer not accepted within the dispatch cycle is revoked and re-dispatched to
/// another suitable agent; D7: with nobody else, it stays `assigning`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_not_accepted_within_the_cycle_is_redispatched() {
    let app = TestApp::spawn(SETUP).await;
    let mut amy = app.client.subscribe("fl.t1.notify.amy").await.unwrap();
    app.presence("t1", "amy", "ready", 5, &[]).await;
    app.customer_says("t1", "mail", "E1", "help").await;
    let offer = next_matching(&mut amy, "the offer", |v| v["type"] == "offer").await;
    let conversation: Uuid = offer["conversation_id"].as_str().unwrap().parse().unwrap();

    // D7: amy goes not ready, nobody else is online: the conversation stays assigning.
    app.presence("t1", "amy", "not_ready", 5, &[]).await;
    // D8: at the deadline (5 s) the offer is revoked, by the timer, not by a new event.
    let revoked = next_matching(&mut amy, "the revocation", |v| v["type"] == "offer_revoked").await;
    assert_eq!(revoked["offer_id"], offer["offer_id"]);
    assert_eq!(open_offer_agent(&app, conversation).await, None);
    assert_eq!(
        app.state_of("t1", "mail", "E1").await.as_deref(),
        Some("assigning")
    );
    // The tenant's passes look for orphans only while some may be left (V6): marked by the
    // expiry, cleared by the pass that offered the last one.
    let possible = || async {
        app.pg
            .query_one("SELECT orphans_possible FROM tenants WHERE id = 't1'", &[])
            .await
            .unwrap()
            .get::<_, bool>(0)
    };
    assert!(possible().await, "the expiry left an orphan");

    // An agent comes online who can take it: it is re-offered to them.
    app.presence("t1", "ben", "ready", 5, &[]).await;
    eventually("re-offered to ben", Duration::from_secs(20), || async {
        (open_offer_agent(&app, conversation).await.as_deref() == Some("ben")).then_some(())
    })
    .await;
    let history = count(
        &app.pg,
        "SELECT count(*) FROM offers WHERE conversation_id = $1",
        &[&conversation],
    )
    .await;
    assert_eq!(history, 2, "one expired offer to amy, one open to ben");
    eventually("no orphans left", Duration::from_secs(10), || async {
        (!possible().await).then_some(())
    })
    .await;
}

/// Decided messages whose publish never happened (the process died after the commit) are
/// published by the outbox sweeper of any running worker, with their fixed Nats-Msg-Ids, in
/// the order of their row (one row holds a lane's messages of one transaction, V18).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_publishes_what_a_crashed_process_left_behind() {
    let app = TestApp::spawn(SETUP).await;
    let mut sub = app
        .client
        .subscribe("fl.t1.events.conversation")
        .await
        .unwrap();
    let first = json!({"left": "behind"}).to_string();
    let second = json!({"and": "after it"}).to_string();
    let subject = "fl.t1.events.conversation";
    app.pg
        .execute(
            "INSERT INTO outbox (subjects, msg_ids, payloads, traceparents, created_at)
             VALUES (ARRAY[$1, $1], ARRAY['crash-1', 'crash-2'], ARRAY[$2::bytea, $3::bytea],
                     ARRAY[NULL, NULL]::text[], now() - interval '1 minute')",
            &[&subject, &first.as_bytes(), &second.as_bytes()],
        )
        .await
        .unwrap();
    let got = crate::helpers::next_json(&mut sub, "the first swept message").await;
    assert_eq!(got, json!({"left": "behind"}));
    let got = crate::helpers::next_json(&mut sub, "the second swept message").await;
    assert_eq!(got, json!({"and": "after it"}));
    wait_for_count(
        &app.pg,
        "the row removed",
        Duration::from_secs(10),
        "SELECT count(*) FROM outbox WHERE 'crash-1' = ANY(msg_ids)",
        0,
    )
    .await;
}

/// SPEC D2 seed examples through the real workers: 5 ready agents with 10 remaining -> 15
/// in `assigning`; one of them with only 1 remaining -> 13.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_examples_of_the_assigning_cap() {
    let app = TestApp::spawn(SETUP).await;
    for i in 0..40 {
        app.customer_says("t1", "mail", &format!("S{i}"), "help")
            .await;
    }
    let assigning = || async {
        count(
            &app.pg,
            "SELECT count(*) FROM conversations WHERE state = 'assigning'",
            &[],
        )
        .await
    };
    for i in 0..5 {
        app.presence("t1", &format!("a{i}"), "ready", 10, &[]).await;
    }
    eventually("15 in assigning", Duration::from_secs(20), || async {
        (assigning().await == 15).then_some(())
    })
    .await;
    holds_for("5 x min(3, 10)", Duration::from_millis(300), || async {
        assigning().await == 15
    })
    .await;

    // Same, but one agent has 1 remaining: 4*3 + 1 = 13. (Here it is agent a5 with capacity 1
    // replacing a4, whose offers are declined to free them.)
    let a4: Vec<Uuid> = app
        .pg
        .query(
            "SELECT conversation_id FROM offers WHERE agent_id = 'a4' AND status = 'open'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    app.presence("t1", "a4", "offline", 10, &[]).await;
    for c in a4 {
        app.agent_does("t1", "a4", "decline", c, json!({})).await;
    }
    app.presence("t1", "a5", "ready", 1, &[]).await;
    // Settled: a4's offers all declined (13 may be passed through on the way, while one
    // of them is still open) and a5's one place taken.
    let open_of = |agent: &'static str| {
        let pg = &app.pg;
        async move {
            count(
                pg,
                "SELECT count(*) FROM offers WHERE agent_id = $1 AND status = 'open'",
                &[&agent],
            )
            .await
        }
    };
    eventually("13 in assigning", Duration::from_secs(20), || async {
        (assigning().await == 13 && open_of("a4").await == 0 && open_of("a5").await == 1)
            .then_some(())
    })
    .await;
    holds_for("4 x 3 + 1", Duration::from_millis(300), || async {
        assigning().await == 13
    })
    .await;
}

/// README: transfer to a skill (agents with it, never the one who transferred it; it keeps its
/// place in the queue), or SPEC D12 to a named agent (straight into their `processing`, no
/// offer). `transfer::` tests D12 with every status and at capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_is_transferred_to_an_agent_or_a_skill() {
    let app = TestApp::spawn(SETUP).await;
    let mut amy = app.client.subscribe("fl.t1.notify.amy").await.unwrap();
    app.presence("t1", "amy", "ready", 5, &["zh"]).await;
    app.customer_says("t1", "mail", "T1", "help").await;
    let offer = next_matching(&mut amy, "the offer", |v| v["type"] == "offer").await;
    let conversation: Uuid = offer["conversation_id"].as_str().unwrap().parse().unwrap();
    app.agent_does("t1", "amy", "accept", conversation, json!({}))
        .await;
    app.wait_for_state("t1", "mail", "T1", "processing").await;

    // To the billing skill: ben has it, cho does not; amy never gets it back.
    app.presence("t1", "cho", "ready", 5, &["zh"]).await;
    app.agent_does(
        "t1",
        "amy",
        "transfer",
        conversation,
        json!({"skills": ["Billing"]}),
    )
    .await;
    let note = next_matching(&mut amy, "the transfer", |v| v["type"] == "transferred").await;
    assert_eq!(note["required_skills"], json!(["billing"]));
    app.wait_for_state("t1", "mail", "T1", "waiting").await;
    holds_for(
        "nobody ready has billing",
        Duration::from_millis(300),
        || async { open_offer_agent(&app, conversation).await.is_none() },
    )
    .await;
    app.presence("t1", "ben", "ready", 5, &["billing"]).await;
    eventually("offered to ben", Duration::from_secs(20), || async {
        (open_offer_agent(&app, conversation).await.as_deref() == Some("ben")).then_some(())
    })
    .await;
    app.agent_does("t1", "ben", "accept", conversation, json!({}))
        .await;
    app.wait_for_state("t1", "mail", "T1", "processing").await;

    // SPEC D12, to a named agent: cho serves it at once, with no offer, although dan is ready
    // and idle.
    app.presence("t1", "dan", "ready", 5, &[]).await;
    let mut cho = app.client.subscribe("fl.t1.notify.cho").await.unwrap();
    app.agent_does(
        "t1",
        "ben",
        "transfer",
        conversation,
        json!({"to_agent": "cho"}),
    )
    .await;
    let told = next_matching(&mut cho, "cho told", |v| v["type"] == "transferred_to_you").await;
    assert_eq!(told["from_agent"], "ben");
    // Its skills are kept: they would matter should it go back to the queue.
    assert_eq!(told["required_skills"], json!(["billing"]));
    let serving: Option<String> = app
        .pg
        .query_one(
            "SELECT agent_id FROM conversations WHERE id = $1 AND state = 'processing'",
            &[&conversation],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(serving.as_deref(), Some("cho"));
    assert_eq!(open_offer_agent(&app, conversation).await, None);
    // A transfer by someone not serving it is refused.
    let mut dan = app.client.subscribe("fl.t1.notify.dan").await.unwrap();
    app.agent_does(
        "t1",
        "dan",
        "transfer",
        conversation,
        json!({"to_agent": "dan"}),
    )
    .await;
    next_matching(&mut dan, "the refusal", |v| v["type"] == "action_rejected").await;
    let history: Vec<String> = app
        .pg
        .query(
            "SELECT reason FROM conversation_transitions WHERE conversation_id = $1 ORDER BY id",
            &[&conversation],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        history,
        [
            "new_conversation",
            "offered",
            "accepted",
            "transferred",
            "offered",
            "accepted",
            "transferred"
        ]
    );
}

/// SPEC D9: editing a channel's required skills reaches its queued conversations; one already
/// offered keeps its offer until the dispatch cycle ends, then is re-dispatched under the new
/// skills. (A channel's weight, SPEC D10: `weight.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_edits_take_effect_at_the_next_cycle() {
    let app = TestApp::spawn(SETUP).await;
    app.presence("t1", "amy", "ready", 1, &[]).await;
    app.customer_says("t1", "mail", "K1", "first").await;
    app.wait_for_state("t1", "mail", "K1", "assigning").await;
    app.customer_says("t1", "mail", "K2", "second").await;
    app.wait_for_state("t1", "mail", "K2", "waiting").await;

    let configure = |json: &str| {
        let file = firstline::setup::SetupFile::parse(json).unwrap();
        let url = app.db.url.clone();
        async move { firstline::setup::configure(&url, &file).await.unwrap() }
    };
    configure(r#"{"tenants":[{"id":"t1","channels":[{"id":"mail","bot_enabled":false,"required_skills":["vip"]}]}]}"#).await;
    let skills = |customer: &'static str| {
        let pg = &app.pg;
        async move {
            pg.query_one(
                "SELECT c.required_skills FROM conversations c JOIN customers cu ON cu.id = c.customer_id WHERE cu.external_id = $1",
                &[&customer],
            )
            .await
            .unwrap()
            .get::<_, Vec<String>>(0)
        }
    };
    assert_eq!(skills("K2").await, ["vip"]);
    assert_eq!(skills("K1").await, ["vip"]);
    // K1's offer to amy (who lacks vip) stands until its cycle ends (5 s)...
    let k1_offer = || async {
        app.pg
            .query_opt(
                "SELECT o.agent_id FROM offers o JOIN conversations c ON c.id = o.conversation_id
                 JOIN customers cu ON cu.id = c.customer_id WHERE cu.external_id = 'K1' AND o.status = 'open'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, String>(0))
    };
    assert_eq!(k1_offer().await.as_deref(), Some("amy"));
    // ...then goes to an agent with the new skill.
    app.presence("t1", "vic", "ready", 5, &["vip"]).await;
    eventually(
        "K2 offered to vic at once",
        Duration::from_secs(10),
        || async {
            (app.state_of("t1", "mail", "K2").await.as_deref() == Some("assigning")).then_some(())
        },
    )
    .await;
    assert_eq!(
        k1_offer().await.as_deref(),
        Some("amy"),
        "not re-dispatched before the cycle ends"
    );
    eventually(
        "K1 re-dispatched to vic after the cycle",
        Duration::from_secs(20),
        || async { (k1_offer().await.as_deref() == Some("vic")).then_some(()) },
    )
    .await;
}

/// README decision: an agent who goes offline keeps the conversations they serve; the
/// customer's messages still reach them (kept on `FL_NOTIFY` for when they reconnect), and
/// they can still close them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_going_offline_keeps_the_conversations_they_serve() {
    let app = TestApp::spawn(SETUP).await;
    let mut amy = app.client.subscribe("fl.t1.notify.amy").await.unwrap();
    app.presence("t1", "amy", "ready", 5, &[]).await;
    app.customer_says("t1", "mail", "O1", "help").await;
    let offer = next_matching(&mut amy, "the offer", |v| v["type"] == "offer").await;
    let conversation: Uuid = offer["conversation_id"].as_str().unwrap().parse().unwrap();
    app.agent_does("t1", "amy", "accept", conversation, json!({}))
        .await;
    app.wait_for_state("t1", "mail", "O1", "processing").await;

    app.presence("t1", "amy", "offline", 5, &[]).await;
    app.presence("t1", "ben", "ready", 5, &[]).await;
    app.customer_says("t1", "mail", "O1", "are you there?")
        .await;
    let forwarded = eventually(
        "the message kept for amy",
        Duration::from_secs(20),
        || async {
            app.stored("FL_NOTIFY", "fl.t1.notify.amy")
                .await
                .into_iter()
                .find(|n| n["type"] == "customer_message")
        },
    )
    .await;
    assert_eq!(forwarded["text"], "are you there?");
    assert_eq!(
        app.state_of("t1", "mail", "O1").await.as_deref(),
        Some("processing")
    );
    assert_eq!(
        count(
            &app.pg,
            "SELECT count(*) FROM offers WHERE agent_id = 'ben'",
            &[]
        )
        .await,
        0,
        "not re-dispatched"
    );
    app.agent_does("t1", "amy", "close", conversation, json!({}))
        .await;
    app.wait_for_state("t1", "mail", "O1", "completed").await;
}

/// One tenant's transactions are combined within an instance: passes asked for while one
/// runs share the next transaction (one lock wait, one pass), and each caller gets its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_asked_for_at_once_share_transactions() {
    use firstline_dispatcher::Dispatcher;
    use firstline_shared::domain::TenantId;
    use firstline_shared::worker::Services;
    let app = TestApp::without_workers(SETUP).await;
    let services = Services::start(&app.config, &app.shutdown).await.unwrap();
    let dispatcher = Dispatcher::new(services);
    let tenant = TenantId::parse("t1").unwrap();
    let reports = futures::future::join_all((0..16).map(|_| dispatcher.pass_for(&tenant))).await;
    let together: Vec<usize> = reports
        .into_iter()
        .map(|r| r.expect("every pass succeeds").together)
        .collect();
    assert!(
        together.iter().any(|&n| n > 1),
        "16 passes asked for at once, each alone: {together:?}"
    );
}

/// Issue 21: the dispatcher's transactions do not wait for their messages to be published. With
/// the delivery stream taking nothing (here: gone, as a stream is while its leader is elected,
/// but for longer), an offer's notification cannot be published; each next presence is still
/// applied and offered at once (while a transaction waited for its publishes, the second offer
/// came 30 s later, when the first one's publish gave up). The notifications are published, in
/// the background, once the stream is back: nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_go_on_while_the_delivery_stream_takes_nothing() {
    const SETUP: &str = r#"{"tenants":[{
        "id": "t1", "dispatch_cycle_seconds": 120,
        "channels": [{"id": "mail", "kind": "email", "bot_enabled": false}]
    }]}"#;
    let mut app = TestApp::without_workers(SETUP).await;
    let common = app.config.clone();
    let shutdown = app.shutdown.clone();
    app.spawn_worker(firstline_ingest::run(
        firstline_ingest::Config {
            common: common.clone(),
        },
        shutdown.clone(),
    ));
    app.spawn_worker(firstline_dispatcher::run(
        firstline_dispatcher::Config::new(common),
        shutdown,
    ));
    for customer in ["W1", "W2", "W3"] {
        app.customer_says("t1", "mail", customer, "help").await;
    }
    wait_for_count(
        &app.pg,
        "three conversations queued, their messages published",
        Duration::from_secs(30),
        "SELECT (SELECT count(*) FROM conversations WHERE state = 'waiting')
              - (SELECT count(*) FROM outbox)",
        3,
    )
    .await;
    app.js.delete_stream("FL_DELIVERY").await.unwrap();

    let offered_to = |agent: &'static str| {
        let pg = &app.pg;
        move || async move {
            (count(
                pg,
                "SELECT count(*) FROM offers WHERE agent_id = $1",
                &[&agent],
            )
            .await
                == 1)
                .then_some(())
        }
    };
    for agent in ["amy", "ben", "cara"] {
        app.presence("t1", agent, "ready", 1, &[]).await;
        eventually(
            &format!("{agent} offered a conversation within 10 s, the delivery stream gone"),
            Duration::from_secs(10),
            offered_to(agent),
        )
        .await;
    }

    firstline_shared::bus::ensure_streams(&app.js)
        .await
        .unwrap();
    let notified = eventually(
        "the three offers' notifications published once the stream is back",
        Duration::from_secs(60),
        || async {
            let stored = app.stored("FL_DELIVERY", "fl.t1.delivery.agent").await;
            (stored.len() >= 3).then_some(stored)
        },
    )
    .await;
    for agent in ["amy", "ben", "cara"] {
        assert!(
            notified.iter().any(|d| d["agent_id"] == agent),
            "{agent} notified: {notified:?}"
        );
    }
    wait_for_count(
        &app.pg,
        "the outbox emptied",
        Duration::from_secs(30),
        "SELECT count(*) FROM outbox",
        0,
    )
    .await;
}
