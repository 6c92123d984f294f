//! Agents: skills and capacity (admin), presence (the agent, or staff for any agent).

use async_nats::HeaderMap;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use firstline_shared::domain::{AgentId, AgentStatus, TenantId};
use firstline_shared::wire::{self, AgentPresence, AgentPresenceMessage, Version};
use firstline_shared::{bus, subjects, telemetry};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::wake_dispatcher;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Body, ErrorBody, PathId, Skills, Text};
use crate::AppState;

/// An agent with their presence and load.
#[derive(Debug, Serialize, ToSchema)]
pub struct Agent {
    pub id: String,
    pub display_name: String,
    pub skills: Vec<String>,
    /// SPEC capacity (服務上限): conversations in processing at once.
    pub capacity: i32,
    /// SPEC S2 (服務狀態): ready (就緒), away (離開) or logged_out (登出).
    #[schema(value_type = StatusName)]
    pub status: String,
    /// Why the agent is away (break, meeting...); only with `away`.
    pub status_reason: Option<String>,
    pub status_since: DateTime<Utc>,
    /// Conversations in processing with this agent (load against capacity).
    pub serving: i64,
    /// Open offers to this agent (SPEC D1).
    pub open_offers: i64,
}

pub(crate) const AGENT_SQL: &str = "
    SELECT a.id, a.display_name, a.skills, a.capacity, a.status, a.status_reason, a.status_since,
           (SELECT count(*) FROM conversations c
             WHERE c.tenant_id = a.tenant_id AND c.agent_id = a.id AND c.state = 'processing'),
           (SELECT count(*) FROM offers o
             WHERE o.tenant_id = a.tenant_id AND o.agent_id = a.id AND o.status = 'open')
    FROM agents a WHERE a.tenant_id = $1";

pub(crate) fn from_row(row: &tokio_postgres::Row) -> Agent {
    Agent {
        id: row.get(0),
        display_name: row.get(1),
        skills: row.get(2),
        capacity: row.get(3),
        status: row.get(4),
        status_reason: row.get(5),
        status_since: row.get(6),
        serving: row.get(7),
        open_offers: row.get(8),
    }
}

pub(crate) async fn all(state: &AppState, tenant: &TenantId) -> ApiResult<Vec<Agent>> {
    let client = state.pool.get().await?;
    let rows = client
        .query(&format!("{AGENT_SQL} ORDER BY a.id"), &[&tenant.as_str()])
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

async fn read(state: &AppState, tenant: &TenantId, id: &AgentId) -> ApiResult<Agent> {
    let client = state.pool.get().await?;
    client
        .query_opt(
            &format!("{AGENT_SQL} AND a.id = $2"),
            &[&tenant.as_str(), &id.as_str()],
        )
        .await?
        .map(|r| from_row(&r))
        .ok_or_else(|| ApiError::not_found(format!("no agent {id}")))
}

fn agent_id(id: &PathId) -> ApiResult<AgentId> {
    AgentId::parse(id.0.clone()).map_err(|e| ApiError::bad_request(e.to_string()))
}

#[utoipa::path(get, path = "/api/v1/agents", tag = "agents",
    summary = "The tenant's agents with presence and load (admin, supervisor)",
    responses((status = 200, body = Vec<Agent>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, p: Principal) -> ApiResult<Json<Vec<Agent>>> {
    p.staff()?;
    Ok(Json(all(&state, &p.tenant).await?))
}

#[utoipa::path(get, path = "/api/v1/agents/{id}", tag = "agents",
    summary = "One agent (admin, supervisor, or the agent themselves)",
    params(("id" = String, Path, description = "The agent's id")),
    responses((status = 200, body = Agent), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(state): State<AppState>,
    p: Principal,
    id: PathId,
) -> ApiResult<Json<Agent>> {
    let id = agent_id(&id)?;
    p.may_act_for(&id)?;
    Ok(Json(read(&state, &p.tenant, &id).await?))
}

/// An agent as written by PUT (presence is set apart).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentInput {
    #[serde(default)]
    pub display_name: Text<200>,
    /// SPEC D4.
    #[serde(default)]
    pub skills: Skills,
    /// 0 to 1000 (default 10).
    #[serde(default = "default_capacity")]
    #[schema(default = 10, minimum = 0, maximum = 1000)]
    pub capacity: i32,
}

fn default_capacity() -> i32 {
    10
}

#[utoipa::path(put, path = "/api/v1/agents/{id}", tag = "agents",
    summary = "Create an agent or change their name, skills and capacity (admin)",
    params(("id" = String, Path, description = "The agent's id (letters, digits, _ and -)")),
    request_body = AgentInput,
    responses((status = 200, description = "Changed", body = Agent), (status = 201, description = "Created", body = Agent),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn put(
    State(state): State<AppState>,
    p: Principal,
    id: PathId,
    Body(input): Body<AgentInput>,
) -> ApiResult<(StatusCode, Json<Agent>)> {
    p.admin()?;
    let id = agent_id(&id)?;
    if !(0..=1000).contains(&input.capacity) {
        return Err(ApiError::invalid(format!(
            "capacity must be 0 to 1000, not {}",
            input.capacity
        )));
    }
    let client = state.pool.get().await?;
    let row = client
        .query_one(
            "INSERT INTO agents AS a (tenant_id, id, display_name, skills, capacity)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant_id, id) DO UPDATE SET display_name = $3, skills = $4, capacity = $5
             RETURNING (xmax = 0)",
            &[
                &p.tenant.as_str(),
                &id.as_str(),
                &input.display_name.as_str(),
                &input.skills.0.to_vec(),
                &input.capacity,
            ],
        )
        .await?;
    let created: bool = row.get(0);
    drop(client);
    // New skills or a larger capacity may let a waiting conversation be offered now.
    wake_dispatcher(&state, &p.tenant, "agent").await;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(read(&state, &p.tenant, &id).await?)))
}

/// A presence change (SPEC S2): ready, away with a reason, logged out.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PresenceInput {
    #[schema(example = "away")]
    pub status: PresenceStatus,
    /// Why the agent is away (break, meeting, training...), shown on the dashboard; kept only
    /// with `away`.
    #[serde(default)]
    pub reason: Option<Text<200>>,
}

/// The statuses an agent can be set to (SPEC S2), and the names before S2, still accepted.
#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    /// 就緒: offered conversations.
    Ready,
    /// 離開: offered nothing new, keeps the conversations they serve.
    Away,
    /// 登出: signed out, keeps the conversations they serve.
    LoggedOut,
    /// The name before SPEC S2 for `away`.
    NotReady,
    /// The name before SPEC S2 for `logged_out`.
    Offline,
}

impl From<PresenceStatus> for AgentStatus {
    fn from(s: PresenceStatus) -> Self {
        match s {
            PresenceStatus::Ready => Self::Ready,
            PresenceStatus::Away | PresenceStatus::NotReady => Self::Away,
            PresenceStatus::LoggedOut | PresenceStatus::Offline => Self::LoggedOut,
        }
    }
}

/// An agent's status in answers (SPEC S2).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum StatusName {
    Ready,
    Away,
    LoggedOut,
}

/// A request that was checked and passed on to the workers that apply it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    /// Always "accepted": the change is applied by the dispatcher within milliseconds.
    pub status: &'static str,
    /// The message id it was published with.
    pub id: Uuid,
}

#[utoipa::path(put, path = "/api/v1/agents/{id}/presence", tag = "agents",
    summary = "Set an agent's presence (the agent themselves, or admin/supervisor)",
    description = "Published on fl.<tenant>.presence.<agent> (a version 2 presence message); the dispatcher applies it. SPEC S2: only a ready agent is offered conversations (one going ready is offered waiting ones at once); an away or logged-out agent gets no new offers and keeps the conversations they serve. `not_ready` and `offline`, the names before S2, are read as `away` and `logged_out`.",
    params(("id" = String, Path, description = "The agent's id")),
    request_body = PresenceInput,
    responses((status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn presence(
    State(state): State<AppState>,
    p: Principal,
    id: PathId,
    Body(input): Body<PresenceInput>,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    let id = agent_id(&id)?;
    p.may_act_for(&id)?;
    read(&state, &p.tenant, &id).await?;
    let status = AgentStatus::from(input.status);
    let message = AgentPresence {
        version: Version,
        status,
        reason: input
            .reason
            .filter(|_| status == AgentStatus::Away)
            .map(String::from),
        capacity: None,
        skills: None,
        display_name: None,
    };
    let msg_id = Uuid::now_v7();
    let mut headers = HeaderMap::new();
    telemetry::inject_current(&mut headers);
    bus::publish(
        &state.js,
        subjects::presence(&p.tenant, &id),
        &format!("presence:{msg_id}"),
        headers,
        wire::encode(&AgentPresenceMessage::from(message)),
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            status: "accepted",
            id: msg_id,
        }),
    ))
}
