//! The `/api/v1` endpoints, each documented in the OpenAPI document by its `#[utoipa::path]`.

mod actions;
mod agents;
mod channels;
mod conversations;
mod customers;
mod queue;
mod service_level;
mod tenant;
mod tokens;
mod webhooks;

use async_nats::HeaderMap;
use firstline_shared::domain::TenantId;
use firstline_shared::wire::{self, QueueSignal, Version};
use firstline_shared::{bus, subjects, telemetry};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;

pub fn register(router: OpenApiRouter<AppState>) -> OpenApiRouter<AppState> {
    router
        .routes(routes!(tenant::me))
        .routes(routes!(tenant::get_settings, tenant::patch_settings))
        .routes(routes!(channels::list))
        .routes(routes!(channels::get_one, channels::put, channels::delete))
        .routes(routes!(agents::list))
        .routes(routes!(agents::get_one, agents::put))
        .routes(routes!(agents::presence))
        .routes(routes!(customers::get_one))
        .routes(routes!(
            customers::put_responsible,
            customers::delete_responsible
        ))
        .routes(routes!(customers::deal_out))
        .routes(routes!(conversations::list))
        .routes(routes!(conversations::get_one))
        .routes(routes!(actions::accept))
        .routes(routes!(actions::decline))
        .routes(routes!(actions::reply))
        .routes(routes!(actions::close))
        .routes(routes!(actions::transfer))
        .routes(routes!(queue::snapshot))
        .routes(routes!(queue::live))
        .routes(routes!(service_level::service_level))
        .routes(routes!(crate::live::agent_live))
        .routes(routes!(tokens::list, tokens::create))
        .routes(routes!(tokens::revoke))
        .routes(routes!(webhooks::list, webhooks::create))
        .routes(routes!(webhooks::get_one, webhooks::delete))
        .routes(routes!(webhooks::deliveries))
        .routes(routes!(webhooks::retry))
}

/// Wakes the dispatcher for `tenant`: a change made here (skills, capacity, offer limit) may
/// let queued conversations be offered now. The change is committed already, so a failure is
/// only logged: the dispatcher's backstop pass (every 10 s) picks the change up anyway.
pub(crate) async fn wake_dispatcher(state: &AppState, tenant: &TenantId, reason: &str) {
    let mut headers = HeaderMap::new();
    telemetry::inject_current(&mut headers);
    let signal = QueueSignal {
        version: Version,
        conversation_id: None,
        reason: reason.to_string(),
    };
    if let Err(e) = bus::publish(
        &state.js,
        subjects::queue(tenant, "api"),
        &format!("queue:api:{}", Uuid::now_v7()),
        headers,
        wire::encode(&signal),
    )
    .await
    {
        tracing::warn!(%tenant, "waking the dispatcher after a {reason} change: {e:#}");
    }
}
