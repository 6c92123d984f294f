//! The queue snapshot (交談佇列) and its live updates, for the dashboard and supervisors' tools.
//!
//! Display order is not dispatch order (SPEC D5; the seed's 儀表板順序不代表分派順序): rows are
//! shown by arrival (接入時間) for bot and queued conversations and by service start
//! (服務開始時間) for conversations in processing.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use chrono::{DateTime, TimeZone, Utc};
use firstline_shared::wire::{self, AgentPresenceMessage};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::agents::{self, Agent};
use super::conversations::{summary_from_row, ConversationSummary, SUMMARY_SQL};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody, Query};
use crate::AppState;

/// Rows per state in a snapshot (the counts are always complete).
const ROWS_PER_STATE: i64 = 200;

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueCounts {
    pub script: i64,
    pub bot: i64,
    pub waiting: i64,
    pub assigning: i64,
    pub processing: i64,
    /// Completed since midnight in the snapshot's time zone.
    pub completed_today: i64,
}

/// A conversation as the queue shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueRow {
    #[serde(flatten)]
    pub conversation: ConversationSummary,
    /// How long it has waited for a person: since it was queued (waiting, assigning), or how
    /// long it waited before it was accepted (processing, completed).
    pub waiting_seconds: Option<i64>,
}

/// Everything the queue dashboard shows.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueSnapshot {
    pub generated_at: DateTime<Utc>,
    /// The IANA zone "today" is counted in.
    pub timezone: String,
    pub counts: QueueCounts,
    /// Open conversations (up to 200 per state) and today's completed ones (the latest 50), in
    /// display order: by state, then by arrival or service start.
    pub conversations: Vec<QueueRow>,
    /// Every agent with presence, load against capacity and open offers.
    pub agents: Vec<Agent>,
    /// Display order is not dispatch order.
    pub note: &'static str,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SnapshotParams {
    /// IANA time zone for "completed today" (default UTC), e.g. Asia/Taipei.
    pub tz: Option<String>,
}

const NOTE: &str = "Display order is not dispatch order: conversations are offered by score (weight x seconds waited, SPEC D10), skills and agents' load (SPEC D4, D5). 儀表板順序不代表分派順序。";

/// The `tz` parameter of the dashboard's endpoints (UTC when absent); a 400 naming it when
/// the zone is unknown.
pub(crate) fn time_zone(tz: Option<&str>) -> Result<chrono_tz::Tz, ApiError> {
    match tz {
        None => Ok(chrono_tz::UTC),
        Some(tz) => tz
            .parse()
            .map_err(|_| ApiError::bad_request(format!("tz: unknown time zone {tz:?}"))),
    }
}

#[utoipa::path(get, path = "/api/v1/queue", tag = "queue",
    summary = "The queue snapshot: conversations by state with counts, and the agents panel (admin, supervisor)",
    params(SnapshotParams),
    responses((status = 200, body = QueueSnapshot), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn snapshot(
    State(state): State<AppState>,
    p: Principal,
    Query(params): Query<SnapshotParams>,
) -> ApiResult<Json<QueueSnapshot>> {
    p.staff()?;
    let zone = time_zone(params.tz.as_deref())?;
    let now = Utc::now();
    let midnight = now
        .with_timezone(&zone)
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default();
    let today_start = zone
        .from_local_datetime(&midnight)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(now);
    let tenant = p.tenant.as_str();
    let client = state.pool.get().await?;
    let mut counts = QueueCounts {
        script: 0,
        bot: 0,
        waiting: 0,
        assigning: 0,
        processing: 0,
        completed_today: 0,
    };
    for row in client
        .query(
            "SELECT state, count(*) FROM conversations WHERE tenant_id = $1 AND state <> 'completed' GROUP BY state
             UNION ALL
             SELECT 'completed', count(*) FROM conversations WHERE tenant_id = $1 AND state = 'completed' AND completed_at >= $2",
            &[&tenant, &today_start],
        )
        .await?
    {
        let n: i64 = row.get(1);
        match row.get::<_, &str>(0) {
            "script" => counts.script = n,
            "bot" => counts.bot = n,
            "waiting" => counts.waiting = n,
            "assigning" => counts.assigning = n,
            "processing" => counts.processing = n,
            _ => counts.completed_today = n,
        }
    }
    let sql = format!(
        "{SUMMARY_SQL} AND c.id IN (
             SELECT id FROM (
                 SELECT id, row_number() OVER (PARTITION BY state ORDER BY
                     CASE WHEN state = 'processing' THEN processing_at
                          WHEN state IN ('waiting', 'assigning') THEN queued_at
                          ELSE created_at END, id) AS n
                 FROM conversations WHERE tenant_id = $1 AND state <> 'completed') open
             WHERE n <= $2
             UNION ALL
             SELECT id FROM (
                 SELECT id FROM conversations
                 WHERE tenant_id = $1 AND state = 'completed' AND completed_at >= $3
                 ORDER BY completed_at DESC LIMIT 50) done)
         ORDER BY CASE c.state WHEN 'waiting' THEN 0 WHEN 'assigning' THEN 1 WHEN 'processing' THEN 2
                               WHEN 'bot' THEN 3 WHEN 'script' THEN 4 ELSE 5 END,
                  CASE WHEN c.state = 'processing' THEN c.processing_at
                       WHEN c.state IN ('waiting', 'assigning') THEN c.queued_at
                       WHEN c.state = 'completed' THEN NULL
                       ELSE c.created_at END,
                  c.completed_at DESC, c.id"
    );
    let rows = client
        .query(&sql, &[&tenant, &ROWS_PER_STATE, &today_start])
        .await?;
    drop(client);
    let conversations = rows
        .iter()
        .map(|r| {
            let c = summary_from_row(r);
            let waiting_seconds = c.queued_at.map(|q| {
                let until = match c.state.as_str() {
                    "waiting" | "assigning" => now,
                    _ => c.processing_at.or(c.completed_at).unwrap_or(now),
                };
                (until - q).num_seconds().max(0)
            });
            QueueRow {
                conversation: c,
                waiting_seconds,
            }
        })
        .collect();
    Ok(Json(QueueSnapshot {
        generated_at: now,
        timezone: zone.name().to_string(),
        counts,
        conversations,
        agents: agents::all(&state, &p.tenant).await?,
        note: NOTE,
    }))
}

#[utoipa::path(get, path = "/api/v1/queue/live", tag = "queue",
    summary = "Server-sent events: every conversation event and presence change of the tenant (admin, supervisor)",
    description = "Event `hello` on connect, then `conversation` (a ConversationEvent, as on fl.<tenant>.events.conversation) and `presence` ({agent_id, status, reason}). A client re-reads /api/v1/queue when they arrive. The token may be passed as `?access_token=` (EventSource cannot set headers).",
    responses((status = 200, description = "text/event-stream", content_type = "text/event-stream"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn live(
    State(state): State<AppState>,
    p: Principal,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    p.staff()?;
    let tenant = p.tenant.as_str();
    let events = state
        .nats
        .subscribe(firstline_shared::subjects::conversation_events(&p.tenant))
        .await
        .map_err(anyhow::Error::from)?;
    let presence = state
        .nats
        .subscribe(format!("fl.{tenant}.presence.*"))
        .await
        .map_err(anyhow::Error::from)?;
    let events = events.map(|m| {
        Event::default()
            .event("conversation")
            .data(String::from_utf8_lossy(&m.payload))
    });
    let presence = presence.map(|m| {
        let agent = m.subject.rsplit('.').next().unwrap_or_default().to_string();
        // Either version of the message, with SPEC S2's names (null if it cannot be read).
        let presence = wire::decode::<AgentPresenceMessage>(&m.payload).map(|p| p.current());
        let data = serde_json::json!({
            "agent_id": agent,
            "status": presence.as_ref().ok().map(|p| p.status.as_str()),
            "reason": presence.ok().and_then(|p| p.reason),
        });
        Event::default().event("presence").data(data.to_string())
    });
    let hello = futures::stream::once(async { Event::default().event("hello").data("{}") });
    let stream = hello
        .chain(futures::stream::select(events, presence))
        .take_until(state.shutdown.clone().cancelled_owned())
        .map(Ok);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
