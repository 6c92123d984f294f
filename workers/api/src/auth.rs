//! Per-tenant tokens and roles.
//!
//! | role | may |
//! |---|---|
//! | `admin` | everything of its tenant: settings, channels, agents, tokens, webhooks, and what a supervisor may |
//! | `supervisor` | read everything of its tenant (conversations, queue, agents), set any agent's presence |
//! | `agent` | act as its agent: presence, accept, decline, reply, close, transfer; read its own conversations |
//!
//! A token is sent as `Authorization: Bearer <token>` (or `?access_token=` where a browser
//! cannot set headers: WebSocket, EventSource). Only its SHA-256 is stored. Whatever the
//! request names, the tenant is the token's: no request reaches another tenant's rows.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use firstline_shared::domain::{AgentId, TenantId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::AppState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Supervisor,
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Supervisor => "supervisor",
            Self::Agent => "agent",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "admin" => Some(Self::Admin),
            "supervisor" => Some(Self::Supervisor),
            "agent" => Some(Self::Agent),
            _ => None,
        }
    }
}

/// Who is asking: the token's tenant, role and (for agents) agent.
#[derive(Clone, Debug)]
pub struct Principal {
    pub token_id: Uuid,
    pub tenant: TenantId,
    pub role: Role,
    pub agent: Option<AgentId>,
}

impl Principal {
    /// Admins only.
    pub fn admin(&self) -> ApiResult<()> {
        match self.role {
            Role::Admin => Ok(()),
            _ => Err(ApiError::forbidden("this needs an admin token")),
        }
    }

    /// Admins and supervisors.
    pub fn staff(&self) -> ApiResult<()> {
        match self.role {
            Role::Admin | Role::Supervisor => Ok(()),
            Role::Agent => Err(ApiError::forbidden(
                "this needs an admin or supervisor token",
            )),
        }
    }

    /// The agent an agent token acts as.
    pub fn agent(&self) -> ApiResult<&AgentId> {
        self.agent.as_ref().ok_or_else(|| {
            ApiError::forbidden("only an agent token acts on conversations (as that agent)")
        })
    }

    /// Staff may name any agent; an agent only themselves.
    pub fn may_act_for(&self, agent: &AgentId) -> ApiResult<()> {
        match &self.agent {
            Some(me) if me != agent => Err(ApiError::forbidden(format!(
                "an agent token acts only for its own agent ({me}), not {agent}"
            ))),
            _ => Ok(()),
        }
    }
}

/// A new random token: `fl_` and 64 hex digits (244 random bits from the OS).
pub fn new_token() -> String {
    format!("fl_{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Makes a token (the only time it is seen in clear) and stores its hash.
pub async fn create_token(
    client: &impl tokio_postgres::GenericClient,
    tenant: &TenantId,
    role: Role,
    agent: Option<&AgentId>,
    name: &str,
) -> ApiResult<(Uuid, String)> {
    if (role == Role::Agent) != agent.is_some() {
        return Err(ApiError::invalid(
            "an agent token names its agent (agent_id); admin and supervisor tokens do not",
        ));
    }
    if let Some(agent) = agent {
        let found = client
            .query_opt(
                "SELECT 1 FROM agents WHERE tenant_id = $1 AND id = $2",
                &[&tenant.as_str(), &agent.as_str()],
            )
            .await?;
        if found.is_none() {
            return Err(ApiError::invalid(format!("no agent {agent}")));
        }
    }
    let id = Uuid::now_v7();
    let token = new_token();
    client
        .execute(
            "INSERT INTO api_tokens (id, tenant_id, role, agent_id, name, token_hash)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &id,
                &tenant.as_str(),
                &role.as_str(),
                &agent.map(AgentId::as_str),
                &name,
                &hash(&token),
            ],
        )
        .await?;
    Ok((id, token))
}

fn token_of(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))?;
        return Some(token.trim().to_string());
    }
    let query = parts.uri.query()?;
    query.split('&').find_map(|pair| {
        pair.strip_prefix("access_token=")
            .map(|t| t.trim().to_string())
    })
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let Some(token) = token_of(parts) else {
            return Err(ApiError::unauthorized(
                "no token: send the header Authorization: Bearer <token>",
            ));
        };
        let client = state.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT id, tenant_id, role, agent_id FROM api_tokens
                 WHERE token_hash = $1 AND revoked_at IS NULL",
            )
            .await?;
        let Some(row) = client.query_opt(&stmt, &[&hash(&token)]).await? else {
            return Err(ApiError::unauthorized("unknown or revoked token"));
        };
        let role: String = row.get(2);
        Ok(Self {
            token_id: row.get(0),
            tenant: TenantId::parse(row.get::<_, String>(1)).map_err(anyhow::Error::from)?,
            role: Role::parse(&role)
                .ok_or_else(|| anyhow::anyhow!("stored token has role {role:?}"))?,
            agent: row
                .get::<_, Option<String>>(3)
                .map(AgentId::parse)
                .transpose()
                .map_err(anyhow::Error::from)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 3 + 64);
        assert!(a.starts_with("fl_"));
        assert_eq!(hash(&a).len(), 32);
        assert_ne!(hash(&a), hash(&b));
    }

    #[test]
    fn the_token_comes_from_the_header_or_the_query() {
        let req = axum::http::Request::builder()
            .uri("/x?a=1&access_token=fl_q")
            .body(())
            .unwrap();
        let (parts, _) = req.into_parts();
        assert_eq!(token_of(&parts).as_deref(), Some("fl_q"));
        let req = axum::http::Request::builder()
            .uri("/x?access_token=fl_q")
            .header("authorization", "Bearer fl_h")
            .body(())
            .unwrap();
        let (parts, _) = req.into_parts();
        assert_eq!(token_of(&parts).as_deref(), Some("fl_h"));
        let req = axum::http::Request::builder()
            .uri("/x")
            .header("authorization", "Basic abc")
            .body(())
            .unwrap();
        let (parts, _) = req.into_parts();
        assert_eq!(token_of(&parts), None);
    }
}
