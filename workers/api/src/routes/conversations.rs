//! Conversations: the list with filters, and one conversation with its transcript and history
//! (the agent's actions on it are in [`super::actions`]).
//!
//! An agent token sees only the agent's own conversations: those it serves or served, and those
//! offered to it now. Staff see the whole tenant.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use firstline_shared::domain::{AgentId, ConversationState};
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody, PathId, Query};
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
    /// SPEC D10 assignment weight (分派權重): the channel's, or set by a bot flow.
    pub weight: i32,
    /// SPEC D10 dispatch score while queued (waiting, assigning): weight x seconds since it
    /// was queued, at the time of the response; the queue goes highest first.
    pub score: Option<f64>,
    /// The agent serving it (processing) or who served it (completed).
    pub agent_id: Option<String>,
    /// The agent it is offered to now (assigning), and until when (SPEC D8).
    pub offered_to: Option<String>,
    pub offer_deadline: Option<DateTime<Utc>>,
    /// 接入時間: when the customer's first message opened it.
    pub created_at: DateTime<Utc>,
    /// When it entered the queue (waiting).
    pub queued_at: Option<DateTime<Utc>>,
    /// 服務開始時間: when the agent serving it accepted it, or had it transferred to them
    /// (SPEC D12).
    pub processing_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

pub(crate) const SUMMARY_SQL: &str = "
    SELECT c.id, c.channel_id, cu.external_id, cu.display_name, c.state, c.required_skills,
           c.weight, c.agent_id, o.agent_id, o.deadline, c.created_at, c.queued_at,
           c.processing_at, c.completed_at, c.updated_at,
           CASE WHEN c.state IN ('waiting', 'assigning')
                THEN round((c.weight * greatest(0, extract(epoch FROM statement_timestamp() - c.queued_at)))::numeric, 3)::float8
           END
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
        weight: row.get(6),
        score: row.get(15),
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

pub(super) fn conversation_id(id: &PathId) -> ApiResult<Uuid> {
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
