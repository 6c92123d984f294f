//! Channels: the skills their conversations require (SPEC D4, D9), the bot (L2), business
//! hours and the survey.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use firstline_shared::domain::{self, ChannelId};
use firstline_shared::hours::BusinessHours;
use firstline_shared::survey::Survey;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::wake_dispatcher;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Body, ErrorBody, PathId, Skills, Text};
use crate::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct Channel {
    pub id: String,
    /// line, webchat, messenger, whatsapp, email...
    pub kind: String,
    pub name: String,
    /// SPEC D4: skills an agent needs for this channel's conversations (lower-case, sorted).
    pub required_skills: Vec<String>,
    /// SPEC L2: new conversations go to the bot first.
    pub bot_enabled: bool,
    /// SPEC D10: the default assignment weight of its conversations (score = weight x seconds
    /// waited, highest first).
    pub weight: i32,
    /// A published flow new conversations start in (對話腳本).
    pub welcome_flow: Option<String>,
    /// The bot completes a conversation idle this long; null: never.
    pub bot_idle_seconds: Option<i32>,
    /// 營業時間: {timezone, weekly: {mon: [["09:00","18:00"]]...}, closed_dates, closed_message, after_hours_handover}; null: always open.
    #[schema(value_type = Option<Object>)]
    pub business_hours: Option<serde_json::Value>,
    /// 滿意度調查: {question, scale, thanks, window_minutes}; null: no survey.
    #[schema(value_type = Option<Object>)]
    pub survey: Option<serde_json::Value>,
}

/// A channel as written by PUT: the whole channel. A field left out takes its default (it
/// does not keep its old value): PUT replaces.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelInput {
    #[serde(default = "default_kind")]
    #[schema(default = "webchat")]
    pub kind: Text<64>,
    #[serde(default)]
    pub name: Text<200>,
    #[serde(default)]
    pub required_skills: Skills,
    #[serde(default = "yes")]
    #[schema(default = true)]
    pub bot_enabled: bool,
    /// SPEC D10: the default assignment weight of its conversations, 1 to 1000000 (default 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000000, default = 1)]
    pub weight: Option<i32>,
    /// Deprecated: the first version's strict queue priority. Read when `weight` is left out,
    /// as weight `priority + 1` (0 and below: 1).
    #[serde(default)]
    #[schema(deprecated)]
    pub priority: Option<i32>,
    /// The id of a published flow.
    #[serde(default)]
    pub welcome_flow: Option<Text<64>>,
    /// At least 1; null: never (default 1800).
    #[serde(default = "default_idle")]
    #[schema(minimum = 1)]
    pub bot_idle_seconds: Option<i32>,
    /// {timezone, weekly: {mon: [["09:00","18:00"]]...}, closed_dates, closed_message,
    /// after_hours_handover}; every text in it at most 5000 characters.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub business_hours: Option<BusinessHours>,
    /// {question, scale (2 to 10), thanks, window_minutes}; every text in it at most 5000
    /// characters.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub survey: Option<Survey>,
}

fn default_kind() -> Text<64> {
    Text("webchat".into())
}
fn yes() -> bool {
    true
}
fn default_idle() -> Option<i32> {
    Some(1800)
}

const COLUMNS: &str = "id, kind, name, required_skills, bot_enabled, weight, welcome_flow, bot_idle_seconds, business_hours, survey";

fn from_row(row: &tokio_postgres::Row) -> Channel {
    Channel {
        id: row.get(0),
        kind: row.get(1),
        name: row.get(2),
        required_skills: row.get(3),
        bot_enabled: row.get(4),
        weight: row.get(5),
        welcome_flow: row.get(6),
        bot_idle_seconds: row.get(7),
        business_hours: row.get(8),
        survey: row.get(9),
    }
}

fn channel_id(id: &PathId) -> ApiResult<ChannelId> {
    ChannelId::parse(id.0.clone()).map_err(|e| ApiError::bad_request(e.to_string()))
}

#[utoipa::path(get, path = "/api/v1/channels", tag = "channels",
    summary = "The tenant's channels (admin, supervisor)",
    responses((status = 200, body = Vec<Channel>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, p: Principal) -> ApiResult<Json<Vec<Channel>>> {
    p.staff()?;
    let client = state.pool.get().await?;
    let rows = client
        .query(
            &format!("SELECT {COLUMNS} FROM channels WHERE tenant_id = $1 ORDER BY id"),
            &[&p.tenant.as_str()],
        )
        .await?;
    Ok(Json(rows.iter().map(from_row).collect()))
}

async fn read(state: &AppState, p: &Principal, id: &ChannelId) -> ApiResult<Channel> {
    let client = state.pool.get().await?;
    client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM channels WHERE tenant_id = $1 AND id = $2"),
            &[&p.tenant.as_str(), &id.as_str()],
        )
        .await?
        .map(|r| from_row(&r))
        .ok_or_else(|| ApiError::not_found(format!("no channel {id}")))
}

#[utoipa::path(get, path = "/api/v1/channels/{id}", tag = "channels",
    summary = "One channel (admin, supervisor)",
    params(("id" = String, Path, description = "The channel's id")),
    responses((status = 200, body = Channel), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(state): State<AppState>,
    p: Principal,
    id: PathId,
) -> ApiResult<Json<Channel>> {
    p.staff()?;
    Ok(Json(read(&state, &p, &channel_id(&id)?).await?))
}

impl ChannelInput {
    /// SPEC D10: `weight`, else the old `priority`, else 1.
    fn weight(&self) -> ApiResult<i32> {
        let weight = match (self.weight, self.priority) {
            (Some(w), _) => w,
            (None, Some(p)) => domain::weight_from_priority(p),
            (None, None) => 1,
        };
        domain::check_weight(weight).map_err(|e| ApiError::invalid(e.to_string()))
    }

    fn check(&self) -> ApiResult<()> {
        if self.kind.trim().is_empty() {
            return Err(ApiError::invalid("kind may not be empty"));
        }
        self.weight()?;
        if let Some(s) = self.bot_idle_seconds {
            if s < 1 {
                return Err(ApiError::invalid(format!(
                    "bot_idle_seconds must be at least 1, not {s}"
                )));
            }
        }
        if let Some(h) = &self.business_hours {
            h.compile()
                .map_err(|e| ApiError::invalid(format!("business_hours: {e}")))?;
        }
        if let Some(s) = &self.survey {
            s.check().map_err(ApiError::invalid)?;
        }
        Ok(())
    }
}

#[utoipa::path(put, path = "/api/v1/channels/{id}", tag = "channels",
    summary = "Create or replace a channel (admin)",
    description = "A change of required_skills reaches the channel's open conversations that use the channel's default (SPEC D9): a waiting one is dispatched under the new skills at once, one already offered at the end of its dispatch cycle.",
    params(("id" = String, Path, description = "The channel's id (letters, digits, _ and -)")),
    request_body = ChannelInput,
    responses((status = 200, description = "Replaced", body = Channel), (status = 201, description = "Created", body = Channel),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn put(
    State(state): State<AppState>,
    p: Principal,
    id: PathId,
    Body(input): Body<ChannelInput>,
) -> ApiResult<(StatusCode, Json<Channel>)> {
    p.admin()?;
    let id = channel_id(&id)?;
    input.check()?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    if let Some(flow) = &input.welcome_flow {
        let published = tx
            .query_opt(
                "SELECT 1 FROM flow_versions WHERE tenant_id = $1 AND flow_id = $2 LIMIT 1",
                &[&p.tenant.as_str(), &flow.as_str()],
            )
            .await?;
        if published.is_none() {
            return Err(ApiError::invalid(format!(
                "welcome_flow: flow {flow:?} has no published version"
            )));
        }
    }
    let hours = input
        .business_hours
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(anyhow::Error::from)?;
    let survey = input
        .survey
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(anyhow::Error::from)?;
    let row = tx
        .query_one(
            "INSERT INTO channels AS c (tenant_id, id, kind, name, required_skills, bot_enabled, weight,
                                        welcome_flow, bot_idle_seconds, business_hours, survey)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (tenant_id, id) DO UPDATE SET kind = $3, name = $4, required_skills = $5,
                 bot_enabled = $6, weight = $7, welcome_flow = $8, bot_idle_seconds = $9,
                 business_hours = $10, survey = $11
             RETURNING (xmax = 0)",
            &[
                &p.tenant.as_str(),
                &id.as_str(),
                &input.kind.as_str(),
                &input.name.as_str(),
                &input.required_skills.0.to_vec(),
                &input.bot_enabled,
                &input.weight()?,
                &input.welcome_flow.as_deref(),
                &input.bot_idle_seconds,
                &hours,
                &survey,
            ],
        )
        .await?;
    let created: bool = row.get(0);
    tx.commit().await?;
    drop(client);
    wake_dispatcher(&state, &p.tenant, "channel").await;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(read(&state, &p, &id).await?)))
}

#[utoipa::path(delete, path = "/api/v1/channels/{id}", tag = "channels",
    summary = "Delete a channel that has no conversations (admin)",
    params(("id" = String, Path, description = "The channel's id")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 409, description = "The channel has conversations", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    p: Principal,
    id: PathId,
) -> ApiResult<StatusCode> {
    p.admin()?;
    let id = channel_id(&id)?;
    let client = state.pool.get().await?;
    // Deleting would take the conversations' history with it: refuse while there is any.
    let row = client
        .query_one(
            "SELECT count(*) FROM conversations WHERE tenant_id = $1 AND channel_id = $2",
            &[&p.tenant.as_str(), &id.as_str()],
        )
        .await?;
    let conversations: i64 = row.get(0);
    if conversations > 0 {
        return Err(ApiError::conflict(format!(
            "channel {id} has {conversations} conversations; a channel with history cannot be deleted"
        )));
    }
    let deleted = client
        .execute(
            "DELETE FROM channels WHERE tenant_id = $1 AND id = $2",
            &[&p.tenant.as_str(), &id.as_str()],
        )
        .await?;
    if deleted == 0 {
        return Err(ApiError::not_found(format!("no channel {id}")));
    }
    Ok(StatusCode::NO_CONTENT)
}
