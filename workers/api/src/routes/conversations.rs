//! Conversations: the list with filters, one conversation with its transcript and history, and
//! the agent's actions on it (accept, decline, reply, close, transfer).
//!
//! An agent token sees only the agent's own conversations: those it serves or served, and those
//! offered to it now. Staff see the whole tenant.

use axum::extract::State;
use axum::http::{HeaderMap as HttpHeaders, StatusCode};
use axum::Json;
use chrono::{DateTime, Utc};
use firstline_shared::bus;
use firstline_shared::domain::{AgentId, ConversationState};
use firstline_shared::wire::{AgentAction, AgentActionKind, Version};
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{
    ApiError, ApiResult, Body, ErrorBody, OptionalBody, PathId, Query, Skills, Text,
};
use crate::AppState;

/// The customer of a conversation.
#[derive(Debug, Serialize, ToSchema)]
pub struct Customer {
    /// The channel's id of the customer.
    pub id: String,
    pub name: Option<String>,
}

/// A conversation in a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationSummary {
    pub id: Uuid,
    pub channel: String,
    pub customer: Customer,
    /// script, bot, waiting, assigning, processing or completed (SPEC S).
    pub state: String,
    /// SPEC D4.
    pub required_skills: Vec<String>,
    pub priority: i32,
    /// The agent serving it (processing) or who served it (completed).
    pub agent_id: Option<String>,
    /// The agent it is offered to now (assigning), and until when (SPEC D8).
    pub offered_to: Option<String>,
    pub offer_deadline: Option<DateTime<Utc>>,
    /// 接入時間: when the customer's first message opened it.
    pub created_at: DateTime<Utc>,
    /// When it entered the queue (waiting).
    pub queued_at: Option<DateTime<Utc>>,
    /// 服務開始時間: when an agent accepted it.
    pub processing_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

pub(crate) const SUMMARY_SQL: &str = "
    SELECT c.id, c.channel_id, cu.external_id, cu.display_name, c.state, c.required_skills,
           c.priority, c.agent_id, o.agent_id, o.deadline, c.created_at, c.queued_at,
           c.processing_at, c.completed_at, c.updated_at
    FROM conversations c
    JOIN customers cu ON cu.id = c.customer_id
    LEFT JOIN offers o ON o.conversation_id = c.id AND o.status = 'open'
    WHERE c.tenant_id = $1";

pub(crate) fn summary_from_row(row: &tokio_postgres::Row) -> ConversationSummary {
    ConversationSummary {
        id: row.get(0),
        channel: row.get(1),
        customer: Customer {
            id: row.get(2),
            name: row.get(3),
        },
        state: row.get(4),
        required_skills: row.get(5),
        priority: row.get(6),
        agent_id: row.get(7),
        offered_to: row.get(8),
        offer_deadline: row.get(9),
        created_at: row.get(10),
        queued_at: row.get(11),
        processing_at: row.get(12),
        completed_at: row.get(13),
        updated_at: row.get(14),
    }
}

/// Filters of the conversation list; all optional, combined with AND.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Filter {
    /// One state or several, comma separated: `waiting,assigning`.
    #[param(max_length = 200)]
    pub state: Option<String>,
    #[param(max_length = 200)]
    pub channel: Option<String>,
    /// Conversations this agent serves, served, or is offered now.
    #[param(max_length = 200)]
    pub agent: Option<String>,
    /// Conversations requiring this skill.
    #[param(max_length = 200)]
    pub skill: Option<String>,
    /// At most this many (1 to 500, default 50), newest first.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Skip this many (paging).
    #[param(minimum = 0)]
    pub offset: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/conversations", tag = "conversations",
    summary = "Conversations, newest first, with filters",
    description = "Staff see the tenant's conversations; an agent token sees only its agent's own (served or offered now).",
    params(Filter),
    responses((status = 200, body = Vec<ConversationSummary>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    p: Principal,
    Query(f): Query<Filter>,
) -> ApiResult<Json<Vec<ConversationSummary>>> {
    let states = f
        .state
        .as_deref()
        .map(|s| {
            s.split(',')
                .map(|s| {
                    ConversationState::from_str(s.trim())
                        .map(|s| s.as_str().to_string())
                        .map_err(|_| {
                            ApiError::bad_request(format!(
                                "state: {s:?} is not one of script, bot, waiting, assigning, processing, completed"
                            ))
                        })
                })
                .collect::<ApiResult<Vec<String>>>()
        })
        .transpose()?;
    let limit = f.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to 500, not {limit}"
        )));
    }
    let offset = f.offset.unwrap_or(0);
    if offset < 0 {
        return Err(ApiError::bad_request("offset may not be negative"));
    }
    if let (Some(me), Some(asked)) = (&p.agent, &f.agent) {
        if me.as_str() != asked {
            return Err(ApiError::forbidden(format!(
                "an agent token lists only its own conversations ({me}), not {asked}'s"
            )));
        }
    }
    let skill = f.skill.map(|s| s.trim().to_lowercase());
    let own = p.agent.as_ref().map(AgentId::as_str);
    let client = state.pool.get().await?;
    let sql = format!(
        "{SUMMARY_SQL}
           AND ($2::text[] IS NULL OR c.state = ANY($2))
           AND ($3::text IS NULL OR c.channel_id = $3)
           AND ($4::text IS NULL OR c.agent_id = $4 OR o.agent_id = $4)
           AND ($5::text IS NULL OR $5 = ANY(c.required_skills))
           AND ($6::text IS NULL OR c.agent_id = $6 OR o.agent_id = $6)
         ORDER BY c.created_at DESC, c.id DESC LIMIT $7 OFFSET $8"
    );
    let rows = client
        .query(
            &sql,
            &[
                &p.tenant.as_str(),
                &states,
                &f.channel,
                &f.agent,
                &skill,
                &own,
                &limit,
                &offset,
            ],
        )
        .await?;
    Ok(Json(rows.iter().map(summary_from_row).collect()))
}

/// One message of the transcript.
#[derive(Debug, Serialize, ToSchema)]
pub struct Message {
    pub id: Uuid,
    /// customer, bot or agent.
    pub author: String,
    pub agent_id: Option<String>,
    pub text: String,
    /// Buttons or an image the bot sent with it.
    #[schema(value_type = Option<Object>)]
    pub attachments: Option<serde_json::Value>,
    /// For a customer message: where it went (bot, queued, stored, agent).
    pub routed_to: Option<String>,
    pub at: DateTime<Utc>,
}

/// One state change (SPEC S).
#[derive(Debug, Serialize, ToSchema)]
pub struct Transition {
    pub from: Option<String>,
    pub to: String,
    pub agent_id: Option<String>,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// One offer of the conversation to an agent (SPEC D8).
#[derive(Debug, Serialize, ToSchema)]
pub struct Offer {
    pub id: Uuid,
    pub agent_id: String,
    /// open, accepted, declined, expired or revoked.
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub deadline: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub end_reason: Option<String>,
}

/// A conversation with its transcript, state history and offers.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationDetail {
    #[serde(flatten)]
    pub summary: ConversationSummary,
    /// 滿意度調查: the customer's rating, if any.
    pub rating: Option<i16>,
    pub messages: Vec<Message>,
    pub history: Vec<Transition>,
    pub offers: Vec<Offer>,
}

fn conversation_id(id: &PathId) -> ApiResult<Uuid> {
    id.uuid("conversation")
}

#[utoipa::path(get, path = "/api/v1/conversations/{id}", tag = "conversations",
    summary = "One conversation with its transcript, state history and offers",
    params(("id" = Uuid, Path, description = "The conversation's id")),
    responses((status = 200, body = ConversationDetail), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(state): State<AppState>,
    p: Principal,
    id: PathId,
) -> ApiResult<Json<ConversationDetail>> {
    let id = conversation_id(&id)?;
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            &format!("{SUMMARY_SQL} AND c.id = $2"),
            &[&p.tenant.as_str(), &id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no conversation {id}")))?;
    let summary = summary_from_row(&row);
    if let Some(me) = &p.agent {
        let mine = summary.agent_id.as_deref() == Some(me.as_str())
            || summary.offered_to.as_deref() == Some(me.as_str());
        if !mine {
            return Err(ApiError::forbidden(format!(
                "conversation {id} is not {me}'s: an agent sees the conversations it serves or is offered"
            )));
        }
    }
    let rating: Option<i16> = client
        .query_one("SELECT rating FROM conversations WHERE id = $1", &[&id])
        .await?
        .get(0);
    let messages = client
        .query(
            "SELECT id, author, agent_id, body, attachments, routed_to, created_at FROM messages
             WHERE conversation_id = $1 ORDER BY created_at, id",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| Message {
            id: r.get(0),
            author: r.get(1),
            agent_id: r.get(2),
            text: r.get(3),
            attachments: r.get(4),
            routed_to: r.get(5),
            at: r.get(6),
        })
        .collect();
    let history = client
        .query(
            "SELECT from_state, to_state, agent_id, reason, at FROM conversation_transitions
             WHERE conversation_id = $1 ORDER BY id",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| Transition {
            from: r.get(0),
            to: r.get(1),
            agent_id: r.get(2),
            reason: r.get(3),
            at: r.get(4),
        })
        .collect();
    let offers = client
        .query(
            "SELECT id, agent_id, status, created_at, deadline, ended_at, end_reason FROM offers
             WHERE conversation_id = $1 ORDER BY created_at, id",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| Offer {
            id: r.get(0),
            agent_id: r.get(1),
            status: r.get(2),
            created_at: r.get(3),
            deadline: r.get(4),
            ended_at: r.get(5),
            end_reason: r.get(6),
        })
        .collect();
    Ok(Json(ConversationDetail {
        summary,
        rating,
        messages,
        history,
        offers,
    }))
}

/// An action that was checked and published; its outcome reaches the agent's live
/// notifications (`assigned`, `closed`, `transferred`, or `action_rejected` if the
/// conversation changed in between).
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

/// Where a transferred conversation goes: one agent, or agents with these skills (default:
/// its current skills). Never back to you.
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
    summary = "Hand the conversation you serve back to the queue, for one agent or for skills",
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
