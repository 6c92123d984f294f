//! API tokens of the tenant (admin). A token is shown once, when it is made.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use firstline_shared::domain::AgentId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{self, Principal, Role};
use crate::error::{ApiError, ApiResult, Body, ErrorBody, PathId, Text};
use crate::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenInfo {
    pub id: Uuid,
    pub role: Role,
    pub agent_id: Option<String>,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub role: Role,
    /// Required for an agent token: the agent it acts as.
    #[serde(default)]
    #[schema(value_type = Option<String>, max_length = 64, pattern = "^[A-Za-z0-9_-]+$")]
    pub agent_id: Option<AgentId>,
    /// What it is for ("Amy's desktop", "wallboard"...).
    #[serde(default)]
    pub name: Text<200>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    pub id: Uuid,
    /// The token: shown this once; only its hash is kept.
    pub token: String,
    pub role: Role,
    pub agent_id: Option<String>,
    pub name: String,
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "admin",
    summary = "The tenant's tokens, without their secrets (admin)",
    responses((status = 200, body = Vec<TokenInfo>), (status = 403, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, p: Principal) -> ApiResult<Json<Vec<TokenInfo>>> {
    p.admin()?;
    let client = state.pool.get().await?;
    let rows = client
        .query(
            "SELECT id, role, agent_id, name, created_at, revoked_at FROM api_tokens
             WHERE tenant_id = $1 ORDER BY created_at, id",
            &[&p.tenant.as_str()],
        )
        .await?;
    Ok(Json(
        rows.iter()
            .map(|r| TokenInfo {
                id: r.get(0),
                role: Role::parse(r.get(1)).unwrap_or(Role::Agent),
                agent_id: r.get(2),
                name: r.get(3),
                created_at: r.get(4),
                revoked_at: r.get(5),
            })
            .collect(),
    ))
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "admin",
    summary = "Make a token for an admin, a supervisor or an agent (admin)",
    request_body = NewToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    p: Principal,
    Body(input): Body<NewToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    p.admin()?;
    let client = state.pool.get().await?;
    let (id, token) = auth::create_token(
        &**client,
        &p.tenant,
        input.role,
        input.agent_id.as_ref(),
        &input.name,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id,
            token,
            role: input.role,
            agent_id: input.agent_id.map(String::from),
            name: input.name.into_string(),
        }),
    ))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "admin",
    summary = "Revoke a token (admin); it stops working at once",
    params(("id" = Uuid, Path, description = "The token's id (not the token)")),
    responses((status = 204, description = "Revoked"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn revoke(
    State(state): State<AppState>,
    p: Principal,
    id: PathId,
) -> ApiResult<StatusCode> {
    p.admin()?;
    let id = id.uuid("token")?;
    let client = state.pool.get().await?;
    let n = client
        .execute(
            "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE tenant_id = $1 AND id = $2",
            &[&p.tenant.as_str(), &id],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found(format!("no token {id}")));
    }
    Ok(StatusCode::NO_CONTENT)
}
