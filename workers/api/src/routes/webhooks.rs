//! Webhook endpoints of the tenant (admin), and what was delivered to them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use firstline_shared::domain::ConversationState;
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Body, ErrorBody, PathId, Query, Text};
use crate::webhooks::new_secret;
use crate::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct Webhook {
    pub id: Uuid,
    pub url: String,
    /// Only events into these states; empty: every conversation event.
    pub states: Vec<String>,
    pub description: String,
    pub created_at: DateTime<Utc>,
    /// Deliveries pending, delivered and dead (dead-lettered after the last try).
    pub pending: i64,
    pub delivered: i64,
    pub dead: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// http:// or https:// URL that receives a POST per event.
    pub url: Text<2048>,
    /// Conversation states (script, bot, waiting, assigning, processing, completed).
    #[serde(default)]
    #[schema(max_items = 6)]
    pub states: Vec<Text<20>>,
    #[serde(default)]
    pub description: Text<500>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedWebhook {
    pub id: Uuid,
    pub url: String,
    pub states: Vec<String>,
    pub description: String,
    /// The HMAC-SHA256 key of the `FirstLine-Signature` header: shown this once.
    pub secret: String,
}

const WEBHOOK_SQL: &str = "
    SELECT w.id, w.url, w.states, w.description, w.created_at,
           count(*) FILTER (WHERE d.status = 'pending'),
           count(*) FILTER (WHERE d.status = 'delivered'),
           count(*) FILTER (WHERE d.status = 'dead')
    FROM webhooks w LEFT JOIN webhook_deliveries d ON d.webhook_id = w.id
    WHERE w.tenant_id = $1";

fn from_row(r: &tokio_postgres::Row) -> Webhook {
    Webhook {
        id: r.get(0),
        url: r.get(1),
        states: r.get(2),
        description: r.get(3),
        created_at: r.get(4),
        pending: r.get(5),
        delivered: r.get(6),
        dead: r.get(7),
    }
}

#[utoipa::path(get, path = "/api/v1/webhooks", tag = "admin",
    summary = "The tenant's webhooks with delivery counts (admin)",
    responses((status = 200, body = Vec<Webhook>), (status = 403, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, p: Principal) -> ApiResult<Json<Vec<Webhook>>> {
    p.admin()?;
    let client = state.pool.get().await?;
    let rows = client
        .query(
            &format!("{WEBHOOK_SQL} GROUP BY w.id ORDER BY w.created_at, w.id"),
            &[&p.tenant.as_str()],
        )
        .await?;
    Ok(Json(rows.iter().map(from_row).collect()))
}

#[utoipa::path(post, path = "/api/v1/webhooks", tag = "admin",
    summary = "Register a URL for conversation events (admin)",
    description = "Each event is POSTed as JSON with `FirstLine-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\" with the secret>`; a non-2xx answer or no answer within the timeout is retried with exponential backoff, and dead-lettered after the last try.",
    request_body = NewWebhook,
    responses((status = 201, body = CreatedWebhook), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    p: Principal,
    Body(input): Body<NewWebhook>,
) -> ApiResult<(StatusCode, Json<CreatedWebhook>)> {
    p.admin()?;
    let url =
        reqwest::Url::parse(&input.url).map_err(|e| ApiError::invalid(format!("url: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ApiError::invalid(
            "url must be an http:// or https:// URL with a host",
        ));
    }
    let states = input
        .states
        .iter()
        .map(|s| {
            ConversationState::from_str(s.as_str())
                .map(|s| s.as_str().to_string())
                .map_err(|_| {
                    ApiError::invalid(format!("states: {s:?} is not a conversation state"))
                })
        })
        .collect::<ApiResult<Vec<String>>>()?;
    let id = Uuid::now_v7();
    let secret = new_secret();
    let client = state.pool.get().await?;
    client
        .execute(
            "INSERT INTO webhooks (id, tenant_id, url, secret, states, description) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&id, &p.tenant.as_str(), &input.url.as_str(), &secret, &states, &input.description.as_str()],
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedWebhook {
            id,
            url: input.url.into_string(),
            states,
            description: input.description.into_string(),
            secret,
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/webhooks/{id}", tag = "admin",
    summary = "One webhook with delivery counts (admin)",
    params(("id" = Uuid, Path, description = "The webhook's id")),
    responses((status = 200, body = Webhook), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(state): State<AppState>,
    p: Principal,
    id: PathId,
) -> ApiResult<Json<Webhook>> {
    p.admin()?;
    let id = id.uuid("webhook")?;
    let client = state.pool.get().await?;
    client
        .query_opt(
            &format!("{WEBHOOK_SQL} AND w.id = $2 GROUP BY w.id"),
            &[&p.tenant.as_str(), &id],
        )
        .await?
        .map(|r| Json(from_row(&r)))
        .ok_or_else(|| ApiError::not_found(format!("no webhook {id}")))
}

#[utoipa::path(delete, path = "/api/v1/webhooks/{id}", tag = "admin",
    summary = "Remove a webhook and its pending deliveries (admin)",
    params(("id" = Uuid, Path, description = "The webhook's id")),
    responses((status = 204, description = "Removed"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    p: Principal,
    id: PathId,
) -> ApiResult<StatusCode> {
    p.admin()?;
    let id = id.uuid("webhook")?;
    let client = state.pool.get().await?;
    let n = client
        .execute(
            "DELETE FROM webhooks WHERE tenant_id = $1 AND id = $2",
            &[&p.tenant.as_str(), &id],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found(format!("no webhook {id}")));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// One event sent (or being sent) to one webhook.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryInfo {
    pub id: Uuid,
    pub event_id: Uuid,
    /// pending, delivered or dead.
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The endpoint's last HTTP status, if it answered.
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// The body that was signed and sent.
    pub body: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveryFilter {
    /// pending, delivered or dead.
    #[param(max_length = 200)]
    pub status: Option<String>,
    /// 1 to 500 (default 100), newest first.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries", tag = "admin",
    summary = "Deliveries of a webhook, newest first; `status=dead` lists its dead letters (admin)",
    params(("id" = Uuid, Path, description = "The webhook's id"), DeliveryFilter),
    responses((status = 200, body = Vec<DeliveryInfo>), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn deliveries(
    State(state): State<AppState>,
    p: Principal,
    id: PathId,
    Query(f): Query<DeliveryFilter>,
) -> ApiResult<Json<Vec<DeliveryInfo>>> {
    p.admin()?;
    let id = id.uuid("webhook")?;
    if let Some(s) = &f.status {
        if !matches!(s.as_str(), "pending" | "delivered" | "dead") {
            return Err(ApiError::bad_request(format!(
                "status: {s:?} is not pending, delivered or dead"
            )));
        }
    }
    let limit = f.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to 500, not {limit}"
        )));
    }
    let client = state.pool.get().await?;
    let found = client
        .query_opt(
            "SELECT 1 FROM webhooks WHERE tenant_id = $1 AND id = $2",
            &[&p.tenant.as_str(), &id],
        )
        .await?;
    if found.is_none() {
        return Err(ApiError::not_found(format!("no webhook {id}")));
    }
    let rows = client
        .query(
            "SELECT id, event_id, status, attempts, next_attempt_at, last_status, last_error, created_at, ended_at, body
             FROM webhook_deliveries WHERE webhook_id = $1 AND ($2::text IS NULL OR status = $2)
             ORDER BY created_at DESC, id DESC LIMIT $3",
            &[&id, &f.status, &limit],
        )
        .await?;
    Ok(Json(
        rows.iter()
            .map(|r| {
                let status: String = r.get(2);
                DeliveryInfo {
                    id: r.get(0),
                    event_id: r.get(1),
                    attempts: r.get(3),
                    next_attempt_at: (status == "pending").then(|| r.get(4)),
                    status,
                    last_status: r.get(5),
                    last_error: r.get(6),
                    created_at: r.get(7),
                    ended_at: r.get(8),
                    body: r.get(9),
                }
            })
            .collect(),
    ))
}

#[utoipa::path(post, path = "/api/v1/webhooks/{id}/deliveries/{delivery}/retry", tag = "admin",
    summary = "Send a dead (or pending) delivery again now, with a fresh count of tries (admin)",
    params(("id" = Uuid, Path, description = "The webhook's id"), ("delivery" = Uuid, Path, description = "The delivery's id")),
    responses((status = 202, description = "Queued for sending"), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "Already delivered", body = ErrorBody)))]
pub async fn retry(
    State(state): State<AppState>,
    p: Principal,
    axum::extract::Path((id, delivery)): axum::extract::Path<(String, String)>,
) -> ApiResult<StatusCode> {
    p.admin()?;
    let not_found = || ApiError::not_found(format!("no delivery {delivery} of webhook {id}"));
    let id: Uuid = id.parse().map_err(|_| not_found())?;
    let delivery_id: Uuid = delivery.parse().map_err(|_| not_found())?;
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT d.status FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
             WHERE w.tenant_id = $1 AND w.id = $2 AND d.id = $3",
            &[&p.tenant.as_str(), &id, &delivery_id],
        )
        .await?
        .ok_or_else(not_found)?;
    if row.get::<_, &str>(0) == "delivered" {
        return Err(ApiError::conflict(format!(
            "delivery {delivery_id} was delivered already"
        )));
    }
    client
        .execute(
            "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(), ended_at = NULL
             WHERE id = $1 AND status <> 'delivered'",
            &[&delivery_id],
        )
        .await?;
    Ok(StatusCode::ACCEPTED)
}
