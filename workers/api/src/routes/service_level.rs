//! SPEC SL, service level (服務水平): a day's figures, in total and per hour and channel. The
//! figures are computed by `firstline_shared::service_level::report` from one row per
//! conversation queued that day (`firstline_shared::db::queued_between`).

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use firstline_shared::db;
use firstline_shared::service_level;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody, Query};
use crate::AppState;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ServiceLevelParams {
    /// IANA time zone the day and its hours are counted in (default UTC), e.g. Asia/Taipei.
    pub tz: Option<String>,
    /// The day, `YYYY-MM-DD` in `tz` (default today), of 1970 to 9999.
    pub date: Option<String>,
}

/// The figures of a set of conversations queued (SPEC SL).
#[derive(Debug, Serialize, ToSchema)]
pub struct Figures {
    /// Conversations queued.
    pub queued: u64,
    /// Accepted by an agent (first accept, at any time so far).
    pub accepted: u64,
    /// Accepted at most `threshold_seconds` after being queued.
    pub accepted_within_threshold: u64,
    /// Left the queue without an agent.
    pub left_without_agent: u64,
    /// Still in the queue.
    pub waiting: u64,
    /// accepted_within_threshold / (accepted + left_without_agent + still waiting longer than
    /// the threshold), 0 to 1; null when none is decided yet.
    pub service_level: Option<f64>,
    /// Mean wait, queued to first accept, of the accepted ones.
    pub average_wait_seconds: Option<f64>,
    /// 90th percentile of those waits (nearest rank).
    pub p90_wait_seconds: Option<f64>,
}

impl From<service_level::Figures> for Figures {
    fn from(f: service_level::Figures) -> Self {
        Self {
            queued: f.queued,
            accepted: f.accepted,
            accepted_within_threshold: f.accepted_within_threshold,
            left_without_agent: f.left_without_agent,
            waiting: f.waiting,
            service_level: f.service_level,
            average_wait_seconds: f.average_wait_seconds,
            p90_wait_seconds: f.p90_wait_seconds,
        }
    }
}

/// One hour's figures: the conversations queued in it.
#[derive(Debug, Serialize, ToSchema)]
pub struct HourFigures {
    /// When the hour starts.
    pub start: DateTime<Utc>,
    #[serde(flatten)]
    pub figures: Figures,
}

/// A channel's figures of the day and of each hour.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChannelFigures {
    pub channel: String,
    pub day: Figures,
    pub hours: Vec<HourFigures>,
}

/// The service level of a day (服務水平).
#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceLevel {
    pub generated_at: DateTime<Utc>,
    pub timezone: String,
    pub date: NaiveDate,
    /// The tenant's threshold T (`service_level_seconds`).
    pub threshold_seconds: i32,
    /// Every conversation queued that day.
    pub day: Figures,
    /// Each hour of the day (up to now, today), by when conversations were queued.
    pub hours: Vec<HourFigures>,
    /// The same per channel, for the channels with a conversation queued that day.
    pub channels: Vec<ChannelFigures>,
}

fn hours(h: Vec<service_level::HourFigures>) -> Vec<HourFigures> {
    h.into_iter()
        .map(|h| HourFigures {
            start: h.start,
            figures: h.figures.into(),
        })
        .collect()
}

/// The UTC instant of local midnight starting `date` in `zone`.
fn midnight(zone: chrono_tz::Tz, date: NaiveDate) -> DateTime<Utc> {
    let local = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    zone.from_local_datetime(&local)
        .earliest()
        // A zone whose clocks skip midnight: the day starts an hour later.
        .or_else(|| {
            zone.from_local_datetime(&(local + Duration::hours(1)))
                .earliest()
        })
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| Utc.from_utc_datetime(&local))
}

#[utoipa::path(get, path = "/api/v1/service-level", tag = "queue",
    summary = "Service level (服務水平) of a day: accepted within the threshold, average and p90 wait, left without an agent; per hour and channel (admin, supervisor)",
    description = "SPEC SL. Each conversation counts in the hour it was queued in, by its first wait (queued to the first accept). The threshold is the tenant's `service_level_seconds` (PATCH /api/v1/settings). docs/api.md#service-level says how each figure is computed.",
    params(ServiceLevelParams),
    responses((status = 200, body = ServiceLevel), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn service_level(
    State(state): State<AppState>,
    p: Principal,
    Query(params): Query<ServiceLevelParams>,
) -> ApiResult<Json<ServiceLevel>> {
    p.staff()?;
    let zone = super::queue::time_zone(params.tz.as_deref())?;
    let now = Utc::now();
    let date = match &params.date {
        None => now.with_timezone(&zone).date_naive(),
        Some(d) => NaiveDate::parse_from_str(d, "%Y-%m-%d")
            .ok()
            .filter(|d| (1970..=9999).contains(&d.year()))
            .ok_or_else(|| {
                ApiError::bad_request(format!("date: not a YYYY-MM-DD day of 1970-9999: {d:?}"))
            })?,
    };
    let next = date
        .succ_opt()
        .ok_or_else(|| ApiError::bad_request("date: out of range"))?;
    let (start, end) = (midnight(zone, date), midnight(zone, next));
    let client = state.pool.get().await?;
    let threshold: i32 = client
        .query_one(
            "SELECT service_level_seconds FROM tenants WHERE id = $1",
            &[&p.tenant.as_str()],
        )
        .await?
        .get(0);
    let rows = db::queued_between(&client, &p.tenant, start, end).await?;
    drop(client);
    let report = service_level::report(&rows, Duration::seconds(threshold.into()), start, end, now);
    Ok(Json(ServiceLevel {
        generated_at: now,
        timezone: zone.name().to_string(),
        date,
        threshold_seconds: threshold,
        day: report.total.day.into(),
        hours: hours(report.total.hours),
        channels: report
            .channels
            .into_iter()
            .map(|c| ChannelFigures {
                channel: c.channel,
                day: c.figures.day.into(),
                hours: hours(c.figures.hours),
            })
            .collect(),
    }))
}
