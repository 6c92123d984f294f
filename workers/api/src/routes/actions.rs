//! An agent's actions on a conversation over HTTP: accept, decline, reply, close, transfer.
//! Each is checked against the conversation as the agent sees it, then published on
//! `fl.<tenant>.agent.<agent>.action`, once per Idempotency-Key, for the dispatcher, which
//! applies an agent's actions in the order published: a reply POSTed just before a close goes
//! out before the close completes the conversation (docs/dispatch.md).

use axum::extract::State;
use axum::http::{HeaderMap as HttpHeaders, StatusCode};
use axum::Json;
use firstline_shared::bus;
use firstline_shared::domain::AgentId;
use firstline_shared::wire::{AgentAction, AgentActionKind, Version};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::conversations::conversation_id;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Body, ErrorBody, OptionalBody, PathId, Skills, Text};
use crate::AppState;

/// An action that was checked and published; its outcome reaches the agent's live
/// notifications (`assigned`, `closed`, `transferred`, or `action_rejected` if the
/// conversation changed in between); the agent a conversation is transferred to gets
/// `transferred_to_you`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActionAccepted {
    pub action_id: Uuid,
    pub conversation_id: Uuid,
    /// accept, decline, reply, close or transfer.
    #[serde(rename = "type")]
    pub kind: &'static str,
}

/// What an action needs of the conversation.
enum Needs {
    /// An open offer to the agent (accept, decline).
    Offer,
    /// The agent serving it (reply, close, transfer: SPEC L7, L8).
    Serving,
}

/// An agent's `Idempotency-Key` is kept this long: a retry within it answers the first 202.
const KEY_HOURS: i32 = 24;

/// Checks an action and publishes it; 202.
///
/// With an `Idempotency-Key`, the key belongs to the tenant and the agent, and to the first
/// request made with it (action, conversation and body; a hash is kept for [`KEY_HOURS`]):
/// the same request again answers the same 202 (even once the action is applied and the
/// conversation moved on) and is not applied twice; another request with the key is a 422. The
/// action id comes from the key, the tenant and the agent, so that two tenants' (or agents')
/// equal keys never make equal message ids for the stream to drop as duplicates.
async fn act(
    state: &AppState,
    p: &Principal,
    headers: &HttpHeaders,
    id: &PathId,
    needs: Needs,
    kind: impl FnOnce(Uuid) -> (AgentActionKind, &'static str),
) -> ApiResult<(StatusCode, Json<ActionAccepted>)> {
    let me = p.agent()?;
    let id = conversation_id(id)?;
    let key: Option<Uuid> = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| ApiError::bad_request("Idempotency-Key must be a UUID"))?,
        ),
    };
    let (kind, name) = kind(id);
    let action_id = match key {
        None => Uuid::now_v7(),
        Some(key) => Uuid::new_v5(&key, format!("{}/{me}", p.tenant).as_bytes()),
    };
    let accepted = || {
        (
            StatusCode::ACCEPTED,
            Json(ActionAccepted {
                action_id,
                conversation_id: id,
                kind: name,
            }),
        )
    };
    let action = AgentAction {
        version: Version,
        action_id,
        kind,
    };
    let request_hash = {
        use sha2::Digest;
        let request = serde_json::to_vec(&action.kind).map_err(anyhow::Error::from)?;
        sha2::Sha256::digest(&request).to_vec()
    };
    let client = state.pool.get().await?;
    if let Some(key) = key {
        if let Some(published) = used_key(&client, p, me, key, &request_hash).await? {
            drop(client);
            if !published {
                // The first request stored the key but may not have published: publish (the
                // same message id: the stream drops it if the first one got through).
                publish(state, p, me, key, &action).await?;
            }
            return Ok(accepted());
        }
    }
    let row = client
        .query_opt(
            "SELECT c.state, c.agent_id, o.agent_id FROM conversations c
             LEFT JOIN offers o ON o.conversation_id = c.id AND o.status = 'open'
             WHERE c.id = $1 AND c.tenant_id = $2",
            &[&id, &p.tenant.as_str()],
        )
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no conversation {id}")))?;
    let (current, serving, offered): (String, Option<String>, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    match needs {
        Needs::Offer if offered.as_deref() != Some(me.as_str()) => {
            return Err(ApiError::conflict(format!(
                "conversation {id} is not offered to you (it is {current})"
            )));
        }
        Needs::Serving if current != "processing" || serving.as_deref() != Some(me.as_str()) => {
            return Err(ApiError::conflict(format!(
                "you are not serving conversation {id} (it is {current})"
            )));
        }
        _ => {}
    }
    if let Some(key) = key {
        client
            .execute(
                "DELETE FROM api_idempotency_keys WHERE tenant_id = $1 AND agent_id = $2
                   AND created_at < now() - make_interval(hours => $3)",
                &[&p.tenant.as_str(), &me.as_str(), &KEY_HOURS],
            )
            .await?;
        let stored = client
            .execute(
                "INSERT INTO api_idempotency_keys (tenant_id, agent_id, key, request_hash)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&p.tenant.as_str(), &me.as_str(), &key, &request_hash],
            )
            .await?;
        if stored == 0 {
            // The same key at the same moment: the first one stored decides.
            used_key(&client, p, me, key, &request_hash).await?;
        }
    }
    drop(client);
    match key {
        Some(key) => publish(state, p, me, key, &action).await?,
        None => bus::publish_action(&state.js, &p.tenant, me, &action).await?,
    }
    Ok(accepted())
}

/// Whether `key` was used already by this agent: `Some(published)` for the same request,
/// a 422 for another one, `None` for a new key.
async fn used_key(
    client: &deadpool_postgres::Client,
    p: &Principal,
    me: &AgentId,
    key: Uuid,
    request_hash: &[u8],
) -> ApiResult<Option<bool>> {
    let Some(row) = client
        .query_opt(
            "SELECT request_hash, published_at IS NOT NULL FROM api_idempotency_keys
             WHERE tenant_id = $1 AND agent_id = $2 AND key = $3",
            &[&p.tenant.as_str(), &me.as_str(), &key],
        )
        .await?
    else {
        return Ok(None);
    };
    if row.get::<_, &[u8]>(0) != request_hash {
        return Err(ApiError::invalid(format!(
            "Idempotency-Key {key} was used for another request (another action, conversation or body); \
             a key makes one request safe to retry: send a new key for a new request"
        )));
    }
    Ok(Some(row.get(1)))
}

/// Publishes an action made under an Idempotency-Key, then marks the key published.
async fn publish(
    state: &AppState,
    p: &Principal,
    me: &AgentId,
    key: Uuid,
    action: &AgentAction,
) -> ApiResult<()> {
    bus::publish_action(&state.js, &p.tenant, me, action).await?;
    let client = state.pool.get().await?;
    client
        .execute(
            "UPDATE api_idempotency_keys SET published_at = now()
             WHERE tenant_id = $1 AND agent_id = $2 AND key = $3",
            &[&p.tenant.as_str(), &me.as_str(), &key],
        )
        .await?;
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/conversations/{id}/accept", tag = "conversations",
    summary = "Accept the conversation offered to you (agent; SPEC L7)",
    description = "Send `Idempotency-Key: <uuid>` (on any action) to make a retry safe: the same request again answers the same 202 and is applied once; the key used for another request is a 422. Keys are the agent's own and kept 24 hours. The outcome arrives as an `assigned` (or `action_rejected`) notification.",
    params(("id" = Uuid, Path, description = "The conversation's id")),
    responses((status = 202, body = ActionAccepted), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "Not offered to you", body = ErrorBody)))]
pub async fn accept(
    State(state): State<AppState>,
    p: Principal,
    headers: HttpHeaders,
    id: PathId,
) -> ApiResult<(StatusCode, Json<ActionAccepted>)> {
    act(&state, &p, &headers, &id, Needs::Offer, |conversation_id| {
        (AgentActionKind::Accept { conversation_id }, "accept")
    })
    .await
}

/// Why the agent declines (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeclineInput {
    #[serde(default)]
    pub reason: Option<Text<500>>,
}

#[utoipa::path(post, path = "/api/v1/conversations/{id}/decline", tag = "conversations",
    summary = "Decline the conversation offered to you (agent): it is re-dispatched at once, never to you",
    params(("id" = Uuid, Path, description = "The conversation's id")),
    request_body(content = DeclineInput, description = "Optional"),
    responses((status = 202, body = ActionAccepted), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "Not offered to you", body = ErrorBody)))]
pub async fn decline(
    State(state): State<AppState>,
    p: Principal,
    headers: HttpHeaders,
    id: PathId,
    OptionalBody(input): OptionalBody<DeclineInput>,
) -> ApiResult<(StatusCode, Json<ActionAccepted>)> {
    let reason = input.reason;
    act(&state, &p, &headers, &id, Needs::Offer, |conversation_id| {
        (
            AgentActionKind::Decline {
                conversation_id,
                reason: reason.map(String::from),
            },
            "decline",
        )
    })
    .await
}

/// A message to the customer.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplyInput {
    /// 1 to 5,000 characters.
    #[schema(min_length = 1)]
    pub text: Text<5000>,
}

#[utoipa::path(post, path = "/api/v1/conversations/{id}/reply", tag = "conversations",
    summary = "Send the customer a message (the agent serving the conversation)",
    params(("id" = Uuid, Path, description = "The conversation's id")),
    request_body = ReplyInput,
    responses((status = 202, body = ActionAccepted), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "You are not serving it", body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn reply(
    State(state): State<AppState>,
    p: Principal,
    headers: HttpHeaders,
    id: PathId,
    Body(input): Body<ReplyInput>,
) -> ApiResult<(StatusCode, Json<ActionAccepted>)> {
    if input.text.trim().is_empty() {
        return Err(ApiError::invalid(
            "text must be 1 to 5000 characters, not only white space",
        ));
    }
    act(
        &state,
        &p,
        &headers,
        &id,
        Needs::Serving,
        |conversation_id| {
            (
                AgentActionKind::Reply {
                    conversation_id,
                    text: input.text.into_string(),
                },
                "reply",
            )
        },
    )
    .await
}

#[utoipa::path(post, path = "/api/v1/conversations/{id}/close", tag = "conversations",
    summary = "Close the conversation you serve: the problem is solved (SPEC L8)",
    params(("id" = Uuid, Path, description = "The conversation's id")),
    responses((status = 202, body = ActionAccepted), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "You are not serving it", body = ErrorBody)))]
pub async fn close(
    State(state): State<AppState>,
    p: Principal,
    headers: HttpHeaders,
    id: PathId,
) -> ApiResult<(StatusCode, Json<ActionAccepted>)> {
    act(
        &state,
        &p,
        &headers,
        &id,
        Needs::Serving,
        |conversation_id| (AgentActionKind::Close { conversation_id }, "close"),
    )
    .await
}

/// Where a transferred conversation goes: to one agent, who serves it at once whatever their
/// status and load (SPEC D12; `skills`, if given too, are what it requires should it go back to
/// the queue later), or back to the queue for agents with these skills (default: its current
/// skills). Never offered back to you.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferInput {
    #[serde(default)]
    #[schema(value_type = Option<String>, max_length = 64, pattern = "^[A-Za-z0-9_-]+$")]
    pub to_agent: Option<AgentId>,
    #[serde(default)]
    pub skills: Option<Skills>,
}

#[utoipa::path(post, path = "/api/v1/conversations/{id}/transfer", tag = "conversations",
    summary = "Hand the conversation you serve to another agent (straight to them, SPEC D12) or back to the queue for skills",
    params(("id" = Uuid, Path, description = "The conversation's id")),
    request_body(content = TransferInput, description = "Optional"),
    responses((status = 202, body = ActionAccepted), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "You are not serving it", body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn transfer(
    State(state): State<AppState>,
    p: Principal,
    headers: HttpHeaders,
    id: PathId,
    OptionalBody(input): OptionalBody<TransferInput>,
) -> ApiResult<(StatusCode, Json<ActionAccepted>)> {
    if let Some(to) = &input.to_agent {
        if Some(to) == p.agent.as_ref() {
            return Err(ApiError::invalid(
                "a conversation cannot be transferred to yourself",
            ));
        }
        let client = state.pool.get().await?;
        let found = client
            .query_opt(
                "SELECT 1 FROM agents WHERE tenant_id = $1 AND id = $2",
                &[&p.tenant.as_str(), &to.as_str()],
            )
            .await?;
        if found.is_none() {
            return Err(ApiError::invalid(format!("to_agent: no agent {to}")));
        }
    }
    act(
        &state,
        &p,
        &headers,
        &id,
        Needs::Serving,
        |conversation_id| {
            (
                AgentActionKind::Transfer {
                    conversation_id,
                    to_agent: input.to_agent,
                    skills: input.skills.map(|s| s.0),
                },
                "transfer",
            )
        },
    )
    .await
}
