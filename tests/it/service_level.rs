//! SPEC SL, service level (服務水平), over the real API and workers: the figures of a scripted
//! day of arrivals, accepts and departures (written to Postgres with known timestamps) equal
//! the ones computed here by hand; the threshold T is the tenant's setting; a conversation the
//! real workers queue and an agent accepts is counted today; the day's query is served by its
//! index.

use std::time::Duration;

use crate::helpers::{eventually, next_matching, TestApp};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

const SETUP: &str = r#"{"tenants":[{"id": "acme",
   "channels": [{"id": "mail", "kind": "email", "bot_enabled": false},
                {"id": "line", "kind": "line", "bot_enabled": false}],
   "agents": [{"id": "amy", "name": "Amy", "capacity": 5}]}]}"#;

/// An instant of 2026-03-02 in Asia/Taipei (UTC+8, no clock change), `hh:mm:ss` local.
fn taipei(hms: &str) -> DateTime<Utc> {
    let local =
        chrono::NaiveDateTime::parse_from_str(&format!("2026-03-02 {hms}"), "%F %T").unwrap();
    local.and_utc() - chrono::Duration::hours(8)
}

/// How a scripted conversation's wait ended.
enum End {
    Accepted(&'static str),
    /// First accepted at the first time, accepted again (after a transfer) at the second.
    AcceptedTwice(&'static str, &'static str),
    Left(&'static str),
    Waiting,
}

/// Writes a conversation of `channel` queued at `queued` (local time in Taipei) as the
/// workers would have left it.
async fn script(app: &TestApp, channel: &str, queued: Option<DateTime<Utc>>, end: End) {
    let customer = Uuid::new_v4();
    app.pg
        .execute(
            "INSERT INTO customers (id, tenant_id, channel_id, external_id) VALUES ($1, 'acme', $2, $3)",
            &[&customer, &channel, &customer.to_string()],
        )
        .await
        .unwrap();
    let (state, agent, accepted, processing, completed) = match end {
        End::Accepted(a) => (
            "completed",
            Some("amy"),
            Some(taipei(a)),
            Some(taipei(a)),
            None,
        ),
        End::AcceptedTwice(first, again) => (
            "completed",
            Some("amy"),
            Some(taipei(first)),
            Some(taipei(again)),
            None,
        ),
        End::Left(at) => ("completed", None, None, None, Some(taipei(at))),
        End::Waiting => ("waiting", None, None, None, None),
    };
    let completed = completed.or(processing.map(|p| p + chrono::Duration::minutes(5)));
    app.pg
        .execute(
            "INSERT INTO conversations (id, tenant_id, channel_id, customer_id, state, agent_id,
                 required_skills, created_at, queued_at, accepted_at, processing_at, completed_at)
             VALUES ($1, 'acme', $2, $3, $4, $5, '{nobody-has-it}', coalesce($6::timestamptz, $9::timestamptz), $6, $7, $8, $9)",
            &[
                &Uuid::now_v7(),
                &channel,
                &customer,
                &state,
                &agent,
                &queued,
                &accepted,
                &processing,
                &completed,
            ],
        )
        .await
        .unwrap();
}

fn close(got: &Value, want: f64) -> bool {
    got.as_f64().is_some_and(|g| (g - want).abs() < 1e-9)
}

/// Asserts the figures `f` (a JSON object of the API) are the hand-computed ones.
#[allow(clippy::too_many_arguments)]
fn assert_figures(
    what: &str,
    f: &Value,
    (queued, accepted, within, left, waiting): (u64, u64, u64, u64, u64),
    share: f64,
    average: Option<f64>,
    p90: Option<f64>,
) {
    let counts = (
        f["queued"].as_u64(),
        f["accepted"].as_u64(),
        f["accepted_within_threshold"].as_u64(),
        f["left_without_agent"].as_u64(),
        f["waiting"].as_u64(),
    );
    assert_eq!(
        counts,
        (
            Some(queued),
            Some(accepted),
            Some(within),
            Some(left),
            Some(waiting)
        ),
        "{what}: {f}"
    );
    assert!(
        close(&f["service_level"], share),
        "{what}: share {share}: {f}"
    );
    match average {
        Some(a) => assert!(
            close(&f["average_wait_seconds"], a),
            "{what}: average {a}: {f}"
        ),
        None => assert!(f["average_wait_seconds"].is_null(), "{what}: {f}"),
    }
    match p90 {
        Some(p) => assert!(close(&f["p90_wait_seconds"], p), "{what}: p90 {p}: {f}"),
        None => assert!(f["p90_wait_seconds"].is_null(), "{what}: {f}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_day_gives_the_hand_computed_service_level() {
    let mut app = TestApp::spawn(SETUP).await;
    let api = app.start_api().await;
    let admin = app.token("acme", "admin", None).await;
    let supervisor = app.token("acme", "supervisor", None).await;

    // The scripted day, 2026-03-02 in Taipei. Waits to the first accept, T = 20 s:
    use End::*;
    let day = [
        ("mail", "09:00:00", Accepted("09:00:05")), // 5 s, within
        ("mail", "09:10:00", Accepted("09:10:20")), // 20 s, within (T counts)
        ("line", "09:20:00", Accepted("09:21:00")), // 60 s, late
        ("line", "09:30:00", Left("09:30:40")),     // left without an agent
        ("line", "10:00:00", Accepted("10:00:10")), // 10 s, within
        ("mail", "10:05:00", Accepted("10:05:30")), // 30 s, late
        ("mail", "10:59:59", Accepted("11:00:09")), // 10 s, within; counted at 10:00, when queued
        ("mail", "10:30:00", AcceptedTwice("10:30:08", "10:45:00")), // 8 s: the first accept
        ("line", "11:30:00", Waiting),              // still waiting, far past T: late
    ];
    for (channel, queued, end) in day {
        script(&app, channel, Some(taipei(queued)), end).await;
    }
    // Not of the day: queued the evening before, and one the bot finished (never queued).
    script(
        &app,
        "mail",
        Some(taipei("00:00:00") - chrono::Duration::seconds(1)),
        Accepted("00:00:03"),
    )
    .await;
    script(&app, "mail", None, Left("09:00:00")).await;

    let path = "/api/v1/service-level?tz=Asia/Taipei&date=2026-03-02";
    let sl = api.ok(path, &supervisor).await;
    assert_eq!(sl["threshold_seconds"], 20, "the default T");
    assert_eq!(sl["date"], "2026-03-02");
    assert_eq!(sl["timezone"], "Asia/Taipei");
    // Day: 9 queued; 7 accepted, 5 within T (5, 20, 10, 10, 8 s); 1 left; 1 waiting (late).
    // Decided: 7 + 1 + 1 = 9, so 5/9. Waits 5, 8, 10, 10, 20, 30, 60: mean 143/7; p90 is the
    // ceil(0.9 x 7) = 7th: 60.
    assert_figures(
        "day",
        &sl["day"],
        (9, 7, 5, 1, 1),
        5.0 / 9.0,
        Some(143.0 / 7.0),
        Some(60.0),
    );
    let hours = sl["hours"].as_array().unwrap();
    assert_eq!(hours.len(), 24, "a past day has its 24 hours");
    assert_eq!(hours[9]["start"], "2026-03-02T01:00:00Z", "09:00 in Taipei");
    // 09:00: 5, 20, 60 s and one left: 2 of 4; mean 85/3; p90 the 3rd of 3: 60.
    assert_figures(
        "09:00",
        &hours[9],
        (4, 3, 2, 1, 0),
        0.5,
        Some(85.0 / 3.0),
        Some(60.0),
    );
    // 10:00: 10, 30, 10, 8 s: 3 of 4; mean 14.5; p90 the 4th of 4: 30.
    assert_figures(
        "10:00",
        &hours[10],
        (4, 4, 3, 0, 0),
        0.75,
        Some(14.5),
        Some(30.0),
    );
    // 11:00: the one still waiting.
    assert_figures("11:00", &hours[11], (1, 0, 0, 0, 1), 0.0, None, None);
    assert_eq!(hours[8]["queued"], 0);
    assert!(hours[8]["service_level"].is_null(), "nothing to decide");

    let channel = |name: &str| {
        sl["channels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["channel"] == name)
            .unwrap_or_else(|| panic!("channel {name}: {sl}"))
            .clone()
    };
    // mail: 5, 20, 30, 10, 8 s: 4 of 5; mean 73/5; p90 the 5th: 30.
    let mail = channel("mail");
    assert_figures(
        "mail",
        &mail["day"],
        (5, 5, 4, 0, 0),
        0.8,
        Some(14.6),
        Some(30.0),
    );
    // line: 60 s, left, 10 s, waiting: 1 of 4; mean 35; p90 the 2nd of 2: 60.
    let line = channel("line");
    assert_figures(
        "line",
        &line["day"],
        (4, 2, 1, 1, 1),
        0.25,
        Some(35.0),
        Some(60.0),
    );
    assert_figures(
        "line 09:00",
        &line["hours"][9],
        (2, 1, 0, 1, 0),
        0.0,
        Some(60.0),
        Some(60.0),
    );

    // T is the tenant's setting: at 30 s the 30 s wait is within too.
    let (status, body) = api
        .call(
            "PATCH",
            "/api/v1/settings",
            Some(&admin),
            Some(json!({"service_level_seconds": 30})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["service_level_seconds"], 30);
    let sl = api.ok(path, &supervisor).await;
    assert_eq!(sl["threshold_seconds"], 30);
    assert_figures(
        "day, T = 30 s",
        &sl["day"],
        (9, 7, 6, 1, 1),
        6.0 / 9.0,
        Some(143.0 / 7.0),
        Some(60.0),
    );
    let (status, body) = api
        .call(
            "PATCH",
            "/api/v1/settings",
            Some(&admin),
            Some(json!({"service_level_seconds": 0})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = api
        .get("/api/v1/service-level?date=2026-02-30", &supervisor)
        .await;
    assert_eq!(status, 400, "{body}");
    let amy = app.token("acme", "agent", Some("amy")).await;
    assert_eq!(api.get(path, &amy).await.0, 403, "staff only");

    // Today, through the real workers: a customer queued and accepted counts, by the first
    // accept the workers record.
    let mut notify = app.client.subscribe("fl.acme.notify.amy").await.unwrap();
    app.presence("acme", "amy", "ready", 5, &[]).await;
    app.customer_says("acme", "mail", "T1", "hello").await;
    let offer = next_matching(&mut notify, "the offer", |v| v["type"] == "offer").await;
    let conversation: Uuid = offer["conversation_id"].as_str().unwrap().parse().unwrap();
    app.agent_does("acme", "amy", "accept", conversation, json!({}))
        .await;
    app.wait_for_state("acme", "mail", "T1", "processing").await;
    let today = eventually(
        "today's accept counted",
        Duration::from_secs(20),
        || async {
            let sl = api.ok("/api/v1/service-level", &supervisor).await;
            (sl["day"]["accepted"] == 1).then_some(sl)
        },
    )
    .await;
    let row = app
        .pg
        .query_one(
            "SELECT extract(epoch FROM accepted_at - queued_at)::float8 FROM conversations WHERE id = $1",
            &[&conversation],
        )
        .await
        .unwrap();
    let wait: f64 = row.get(0);
    let average = today["day"]["average_wait_seconds"].as_f64().unwrap();
    assert!(
        (average - wait).abs() < 0.002,
        "the recorded wait {wait}: {today}"
    );
    assert_eq!(today["channels"][0]["channel"], "mail");
    let now_hour = today["hours"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        now_hour["accepted"], 1,
        "counted in the current hour: {today}"
    );

    // The day's rows are read from the index alone.
    app.pg
        .execute("SET enable_seqscan = off", &[])
        .await
        .unwrap();
    let plan: String = app
        .pg
        .query(
            &format!("EXPLAIN {}", firstline_shared::db::QUEUED_BETWEEN),
            &[&"acme", &taipei("00:00:00"), &taipei("23:59:59")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        plan.contains("Index Only Scan using conversations_service_level"),
        "{plan}"
    );
}
