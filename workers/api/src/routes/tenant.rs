//! The token's tenant: who am I, and the tenant's dispatch settings.

use axum::extract::State;
use axum::Json;
use firstline_shared::db::{
    self, TenantSettingsPatch, DISPATCH_CYCLE_SECONDS, OFFER_LIMIT, SERVICE_LEVEL_SECONDS,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::wake_dispatcher;
use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiResult, Body, ErrorBody, Text};
use crate::AppState;

/// The token's identity.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    pub tenant: String,
    pub role: Role,
    /// For an agent token: the agent it acts as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/me", tag = "tenant",
    summary = "Who the token is: tenant, role, agent",
    responses((status = 200, body = Me), (status = 401, body = ErrorBody)))]
pub async fn me(p: Principal) -> Json<Me> {
    Json(Me {
        tenant: p.tenant.to_string(),
        role: p.role,
        agent_id: p.agent.map(|a| a.to_string()),
    })
}

/// A tenant's settings.
#[derive(Debug, Serialize, ToSchema)]
pub struct Settings {
    pub id: String,
    pub name: String,
    /// SPEC D8 (當指派專員未接應時): seconds an offer stands before it is re-dispatched.
    pub dispatch_cycle_seconds: i32,
    /// SPEC D1: open offers an agent may hold at once.
    pub offer_limit: i32,
    /// SPEC L4: a customer message equal to one of these hands the conversation to a person.
    pub handover_keywords: Vec<String>,
    /// What the bot answers when nothing matches.
    pub bot_reply: String,
    pub handover_reply: String,
    /// A knowledge-base article answers when its score reaches this (0..1].
    pub kb_min_score: f32,
    /// SPEC SL (服務水平): a conversation accepted within this many seconds of being queued
    /// meets the service level.
    pub service_level_seconds: i32,
    /// A waiting customer's message containing one of these is answered with their place in
    /// line and estimated wait.
    pub queue_position_keywords: Vec<String>,
    /// The place-in-line text, with `{position}` and `{minutes}`.
    pub queue_position_reply: String,
    /// The text when there is no estimate (nothing of those skills accepted lately), with
    /// `{position}`.
    pub queue_position_reply_no_estimate: String,
    /// SPEC D11: the last agent who served a customer on a channel counts as their
    /// responsible agent when none is set (default false).
    pub last_agent_responsible: bool,
}

/// A change of settings: fields left out keep their value.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    pub name: Option<Text<200>>,
    /// 5 to 86400.
    #[schema(minimum = 5, maximum = 86400)]
    pub dispatch_cycle_seconds: Option<i32>,
    /// 1 to 50.
    #[schema(minimum = 1, maximum = 50)]
    pub offer_limit: Option<i32>,
    /// At most 100 keywords.
    #[schema(max_items = 100)]
    pub handover_keywords: Option<Vec<Text<100>>>,
    pub bot_reply: Option<Text<5000>>,
    pub handover_reply: Option<Text<5000>>,
    /// Above 0, at most 1.
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub kb_min_score: Option<f32>,
    /// SPEC SL: 1 to 3600 (default 20).
    #[schema(minimum = 1, maximum = 3600)]
    pub service_level_seconds: Option<i32>,
    /// At most 100 keywords.
    #[schema(max_items = 100)]
    pub queue_position_keywords: Option<Vec<Text<100>>>,
    pub queue_position_reply: Option<Text<5000>>,
    pub queue_position_reply_no_estimate: Option<Text<5000>>,
    /// SPEC D11: the last agent who served a customer counts as responsible.
    pub last_agent_responsible: Option<bool>,
}

/// The most hand-over keywords a tenant has.
const MAX_KEYWORDS: usize = 100;

impl SettingsPatch {
    fn to_db(&self) -> TenantSettingsPatch {
        TenantSettingsPatch {
            name: self.name.clone().map(String::from),
            dispatch_cycle_seconds: self.dispatch_cycle_seconds,
            offer_limit: self.offer_limit,
            handover_keywords: self
                .handover_keywords
                .clone()
                .map(|k| k.into_iter().map(String::from).collect()),
            bot_reply: self.bot_reply.clone().map(String::from),
            handover_reply: self.handover_reply.clone().map(String::from),
            kb_min_score: self.kb_min_score,
            service_level_seconds: self.service_level_seconds,
            queue_position_keywords: self
                .queue_position_keywords
                .clone()
                .map(|k| k.into_iter().map(String::from).collect()),
            queue_position_reply: self.queue_position_reply.clone().map(String::from),
            queue_position_reply_no_estimate: self
                .queue_position_reply_no_estimate
                .clone()
                .map(String::from),
            last_agent_responsible: self.last_agent_responsible,
        }
    }

    fn check(&self) -> ApiResult<()> {
        if let Some(c) = self.dispatch_cycle_seconds {
            if !DISPATCH_CYCLE_SECONDS.contains(&c) {
                return Err(ApiError::invalid(format!(
                    "dispatch_cycle_seconds must be {} to {}, not {c}",
                    DISPATCH_CYCLE_SECONDS.start(),
                    DISPATCH_CYCLE_SECONDS.end()
                )));
            }
        }
        if let Some(l) = self.offer_limit {
            if !OFFER_LIMIT.contains(&l) {
                return Err(ApiError::invalid(format!(
                    "offer_limit must be {} to {}, not {l}",
                    OFFER_LIMIT.start(),
                    OFFER_LIMIT.end()
                )));
            }
        }
        if let Some(s) = self.service_level_seconds {
            if !SERVICE_LEVEL_SECONDS.contains(&s) {
                return Err(ApiError::invalid(format!(
                    "service_level_seconds must be {} to {}, not {s}",
                    SERVICE_LEVEL_SECONDS.start(),
                    SERVICE_LEVEL_SECONDS.end()
                )));
            }
        }
        if let Some(s) = self.kb_min_score {
            if !(s > 0.0 && s <= 1.0) {
                return Err(ApiError::invalid(format!(
                    "kb_min_score must be above 0 and at most 1, not {s}"
                )));
            }
        }
        for (field, keywords) in [
            ("handover_keywords", &self.handover_keywords),
            ("queue_position_keywords", &self.queue_position_keywords),
        ] {
            let Some(k) = keywords else { continue };
            if k.len() > MAX_KEYWORDS {
                return Err(ApiError::invalid(format!(
                    "{field}: at most {MAX_KEYWORDS} keywords, not {}",
                    k.len()
                )));
            }
            if k.iter().any(|k| k.trim().is_empty()) {
                return Err(ApiError::invalid(format!(
                    "{field} may not contain an empty keyword"
                )));
            }
        }
        for (field, value) in [
            ("bot_reply", self.bot_reply.as_deref()),
            ("handover_reply", self.handover_reply.as_deref()),
            ("name", self.name.as_deref()),
            ("queue_position_reply", self.queue_position_reply.as_deref()),
            (
                "queue_position_reply_no_estimate",
                self.queue_position_reply_no_estimate.as_deref(),
            ),
        ] {
            if value.is_some_and(|v| v.trim().is_empty()) {
                return Err(ApiError::invalid(format!("{field} may not be empty")));
            }
        }
        Ok(())
    }
}

async fn read_settings(state: &AppState, p: &Principal) -> ApiResult<Settings> {
    let client = state.pool.get().await?;
    let row = client
        .query_one(
            "SELECT id, name, dispatch_cycle_seconds, offer_limit, handover_keywords, bot_reply,
                    handover_reply, kb_min_score, service_level_seconds, queue_position_keywords,
                    queue_position_reply, queue_position_reply_no_estimate, last_agent_responsible
             FROM tenants WHERE id = $1",
            &[&p.tenant.as_str()],
        )
        .await?;
    Ok(Settings {
        id: row.get(0),
        name: row.get(1),
        dispatch_cycle_seconds: row.get(2),
        offer_limit: row.get(3),
        handover_keywords: row.get(4),
        bot_reply: row.get(5),
        handover_reply: row.get(6),
        kb_min_score: row.get(7),
        service_level_seconds: row.get(8),
        queue_position_keywords: row.get(9),
        queue_position_reply: row.get(10),
        queue_position_reply_no_estimate: row.get(11),
        last_agent_responsible: row.get(12),
    })
}

#[utoipa::path(get, path = "/api/v1/settings", tag = "tenant",
    summary = "The tenant's settings (admin, supervisor)",
    responses((status = 200, body = Settings), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn get_settings(
    State(state): State<AppState>,
    p: Principal,
) -> ApiResult<Json<Settings>> {
    p.staff()?;
    Ok(Json(read_settings(&state, &p).await?))
}

#[utoipa::path(patch, path = "/api/v1/settings", tag = "tenant",
    summary = "Change the tenant's settings (admin)",
    request_body = SettingsPatch,
    responses((status = 200, body = Settings), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn patch_settings(
    State(state): State<AppState>,
    p: Principal,
    Body(patch): Body<SettingsPatch>,
) -> ApiResult<Json<Settings>> {
    p.admin()?;
    patch.check()?;
    let client = state.pool.get().await?;
    db::update_tenant_settings(&**client, &p.tenant, &patch.to_db()).await?;
    drop(client);
    if patch.offer_limit.is_some() {
        // A higher limit lets waiting conversations be offered now.
        wake_dispatcher(&state, &p.tenant, "settings").await;
    }
    Ok(Json(read_settings(&state, &p).await?))
}
