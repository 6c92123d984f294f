//! SPEC D11 responsible agent (負責專員, 客戶分派): a customer's responsible agent, set by hand
//! or dealt out in turn from a list of customers to a list of agents, like cards. The
//! dispatcher offers the customer's queued conversations to that agent first.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;
use chrono::{DateTime, Utc};
use firstline_shared::domain::{AgentId, ChannelId, TenantId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::wake_dispatcher;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Body, ErrorBody, Text};
use crate::AppState;

/// A customer of a channel, with their responsible agent.
#[derive(Debug, Serialize, ToSchema)]
pub struct Customer {
    pub channel: String,
    /// The channel's id of the customer (as in inbound messages).
    pub id: String,
    pub name: Option<String>,
    /// SPEC D11: offered the customer's conversations first.
    pub responsible_agent: Option<String>,
    /// How it was set: `api` (by hand) or `dealt` (in turn from a list).
    pub responsible_set_by: Option<String>,
    pub responsible_set_at: Option<DateTime<Utc>>,
    /// The agent who last accepted one of the customer's conversations (the responsible one
    /// when none is set and the tenant's `last_agent_responsible` is on).
    pub last_served_by: Option<String>,
}

const CUSTOMER_SQL: &str = "SELECT channel_id, external_id, display_name, responsible_agent_id,
        responsible_set_by, responsible_set_at, last_served_by
     FROM customers WHERE tenant_id = $1 AND channel_id = $2 AND external_id = $3";

fn from_row(r: &tokio_postgres::Row) -> Customer {
    Customer {
        channel: r.get(0),
        id: r.get(1),
        name: r.get(2),
        responsible_agent: r.get(3),
        responsible_set_by: r.get(4),
        responsible_set_at: r.get(5),
        last_served_by: r.get(6),
    }
}

type CustomerPath = Result<Path<(String, String)>, PathRejection>;

fn customer_path(path: CustomerPath) -> ApiResult<(ChannelId, String)> {
    let Path((channel, customer)) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let channel = ChannelId::parse(channel).map_err(|e| ApiError::bad_request(e.to_string()))?;
    check_customer_id(&customer)?;
    Ok((channel, customer))
}

fn check_customer_id(id: &str) -> ApiResult<()> {
    if id.is_empty() || id.chars().count() > 200 || id.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "customer id {id:?} must be 1 to 200 characters without control characters"
        )));
    }
    Ok(())
}

async fn channel_exists(
    client: &impl deadpool_postgres::GenericClient,
    tenant: &TenantId,
    channel: &ChannelId,
) -> ApiResult<()> {
    client
        .query_opt(
            "SELECT 1 FROM channels WHERE tenant_id = $1 AND id = $2",
            &[&tenant.as_str(), &channel.as_str()],
        )
        .await?
        .map(|_| ())
        .ok_or_else(|| ApiError::not_found(format!("no channel {channel}")))
}

async fn agents_exist(
    client: &impl deadpool_postgres::GenericClient,
    tenant: &TenantId,
    agents: &[AgentId],
) -> ApiResult<()> {
    let ids: Vec<&str> = agents.iter().map(AgentId::as_str).collect();
    let known: Vec<String> = client
        .query(
            "SELECT id FROM agents WHERE tenant_id = $1 AND id = ANY($2)",
            &[&tenant.as_str(), &ids],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    match ids.iter().find(|id| !known.iter().any(|k| k == *id)) {
        Some(unknown) => Err(ApiError::invalid(format!("no agent {unknown:?}"))),
        None => Ok(()),
    }
}

/// Sets (or clears) the responsible agent of customers, creating the customer rows that do
/// not exist yet, and keeps their open conversations in step (the dispatcher reads
/// `conversations.responsible_agent`).
async fn assign(
    tx: &deadpool_postgres::Transaction<'_>,
    tenant: &TenantId,
    channel: &ChannelId,
    customers: &[String],
    agents: &[Option<&str>],
    set_by: Option<&str>,
) -> ApiResult<()> {
    let ids: Vec<Uuid> = customers.iter().map(|_| Uuid::now_v7()).collect();
    tx.execute(
        "INSERT INTO customers AS cu (id, tenant_id, channel_id, external_id, responsible_agent_id,
                                      responsible_set_by, responsible_set_at)
         SELECT u.id, $1, $2, u.external_id, u.agent, CASE WHEN u.agent IS NOT NULL THEN $6 END,
                CASE WHEN u.agent IS NOT NULL THEN statement_timestamp() END
           FROM unnest($3::uuid[], $4::text[], $5::text[]) AS u(id, external_id, agent)
         ON CONFLICT (tenant_id, channel_id, external_id) DO UPDATE
            SET responsible_agent_id = excluded.responsible_agent_id,
                responsible_set_by = excluded.responsible_set_by,
                responsible_set_at = excluded.responsible_set_at",
        &[
            &tenant.as_str(),
            &channel.as_str(),
            &ids,
            &customers,
            &agents,
            &set_by,
        ],
    )
    .await?;
    // Open conversations: the new responsible agent (or, cleared, the last agent when the
    // tenant counts them as responsible).
    tx.execute(
        "UPDATE conversations c
            SET responsible_agent = coalesce(cu.responsible_agent_id,
                                             CASE WHEN t.last_agent_responsible THEN cu.last_served_by END)
           FROM customers cu JOIN tenants t ON t.id = cu.tenant_id
          WHERE cu.tenant_id = $1 AND cu.channel_id = $2 AND cu.external_id = ANY($3)
            AND c.customer_id = cu.id AND c.state IN ('waiting', 'assigning')",
        &[&tenant.as_str(), &channel.as_str(), &customers],
    )
    .await?;
    Ok(())
}

async fn read(
    state: &AppState,
    tenant: &TenantId,
    channel: &ChannelId,
    id: &str,
) -> ApiResult<Customer> {
    let client = state.pool.get().await?;
    client
        .query_opt(CUSTOMER_SQL, &[&tenant.as_str(), &channel.as_str(), &id])
        .await?
        .map(|r| from_row(&r))
        .ok_or_else(|| ApiError::not_found(format!("no customer {id:?} on channel {channel}")))
}

#[utoipa::path(get, path = "/api/v1/channels/{channel}/customers/{customer}", tag = "customers",
    summary = "A customer with their responsible agent (admin, supervisor)",
    params(("channel" = String, Path, description = "The channel's id"),
           ("customer" = String, Path, description = "The channel's id of the customer")),
    responses((status = 200, body = Customer), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(state): State<AppState>,
    p: Principal,
    path: CustomerPath,
) -> ApiResult<Json<Customer>> {
    p.staff()?;
    let (channel, customer) = customer_path(path)?;
    Ok(Json(read(&state, &p.tenant, &channel, &customer).await?))
}

/// The responsible agent to set.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResponsibleInput {
    pub agent_id: Text<64>,
}

#[utoipa::path(put, path = "/api/v1/channels/{channel}/customers/{customer}/responsible-agent", tag = "customers",
    summary = "Set a customer's responsible agent (admin, supervisor)",
    description = "SPEC D11: the customer's conversations are offered first to this agent when they are ready with a free slot, and to any suitable agent otherwise or after one unaccepted dispatch cycle. A customer who has not written yet is created. Their open conversations follow at once.",
    params(("channel" = String, Path, description = "The channel's id"),
           ("customer" = String, Path, description = "The channel's id of the customer")),
    request_body = ResponsibleInput,
    responses((status = 200, body = Customer), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn put_responsible(
    State(state): State<AppState>,
    p: Principal,
    path: CustomerPath,
    Body(input): Body<ResponsibleInput>,
) -> ApiResult<Json<Customer>> {
    p.staff()?;
    let (channel, customer) = customer_path(path)?;
    let agent = AgentId::parse(input.agent_id.into_string())
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    channel_exists(&tx, &p.tenant, &channel).await?;
    agents_exist(&tx, &p.tenant, std::slice::from_ref(&agent)).await?;
    assign(
        &tx,
        &p.tenant,
        &channel,
        std::slice::from_ref(&customer),
        &[Some(agent.as_str())],
        Some("api"),
    )
    .await?;
    tx.commit().await?;
    drop(client);
    wake_dispatcher(&state, &p.tenant, "responsible").await;
    Ok(Json(read(&state, &p.tenant, &channel, &customer).await?))
}

#[utoipa::path(delete, path = "/api/v1/channels/{channel}/customers/{customer}/responsible-agent", tag = "customers",
    summary = "Clear a customer's responsible agent (admin, supervisor)",
    params(("channel" = String, Path, description = "The channel's id"),
           ("customer" = String, Path, description = "The channel's id of the customer")),
    responses((status = 200, body = Customer), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_responsible(
    State(state): State<AppState>,
    p: Principal,
    path: CustomerPath,
) -> ApiResult<Json<Customer>> {
    p.staff()?;
    let (channel, customer) = customer_path(path)?;
    read(&state, &p.tenant, &channel, &customer).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    assign(
        &tx,
        &p.tenant,
        &channel,
        std::slice::from_ref(&customer),
        &[None],
        None,
    )
    .await?;
    tx.commit().await?;
    drop(client);
    Ok(Json(read(&state, &p.tenant, &channel, &customer).await?))
}

/// Customers to deal out to agents in turn.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DealInput {
    pub channel: Text<64>,
    /// The channel's ids of the customers, in dealing order (1 to 10,000, no repeats).
    pub customers: Vec<String>,
    /// The agents dealt to, in turn (1 to 1,000, no repeats).
    pub agents: Vec<Text<64>>,
}

/// One customer and the agent dealt to them.
#[derive(Debug, Serialize, ToSchema)]
pub struct Dealt {
    pub customer: String,
    pub agent: String,
}

/// What a deal did.
#[derive(Debug, Serialize, ToSchema)]
pub struct DealResult {
    pub channel: String,
    /// In the customers' order.
    pub assignments: Vec<Dealt>,
}

/// SPEC D11's card dealing: customer `i` (from 0) to agent `i mod n`.
pub fn deal<'a>(customers: &'a [String], agents: &'a [AgentId]) -> Vec<(&'a str, &'a AgentId)> {
    customers
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), &agents[i % agents.len()]))
        .collect()
}

#[utoipa::path(post, path = "/api/v1/responsible-agents/deal", tag = "customers",
    summary = "Deal customers out to agents in turn, like cards (admin, supervisor)",
    description = "SPEC D11 (客戶分派): the first customer to the first agent, the second to the second... and round again: 10 customers to A and B give A customers 1, 3, 5, 7, 9 and B 2, 4, 6, 8, 10. Each becomes the customer's responsible agent (set_by `dealt`), replacing any before. All or nothing.",
    request_body = DealInput,
    responses((status = 200, body = DealResult), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn deal_out(
    State(state): State<AppState>,
    p: Principal,
    Body(input): Body<DealInput>,
) -> ApiResult<Json<DealResult>> {
    p.staff()?;
    let channel = ChannelId::parse(input.channel.into_string())
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if input.customers.is_empty() || input.customers.len() > 10_000 {
        return Err(ApiError::invalid("customers: 1 to 10,000 ids"));
    }
    if input.agents.is_empty() || input.agents.len() > 1_000 {
        return Err(ApiError::invalid("agents: 1 to 1,000 ids"));
    }
    for c in &input.customers {
        check_customer_id(c)?;
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = input.customers.iter().find(|c| !seen.insert(c.as_str())) {
        return Err(ApiError::invalid(format!(
            "customer {twice:?} is listed twice"
        )));
    }
    let agents = input
        .agents
        .into_iter()
        .map(|a| AgentId::parse(a.into_string()).map_err(|e| ApiError::invalid(e.to_string())))
        .collect::<ApiResult<Vec<_>>>()?;
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = agents.iter().find(|a| !seen.insert(a.as_str())) {
        return Err(ApiError::invalid(format!("agent {twice} is listed twice")));
    }
    let dealt = deal(&input.customers, &agents);
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    channel_exists(&tx, &p.tenant, &channel).await?;
    agents_exist(&tx, &p.tenant, &agents).await?;
    let to: Vec<Option<&str>> = dealt.iter().map(|(_, a)| Some(a.as_str())).collect();
    assign(
        &tx,
        &p.tenant,
        &channel,
        &input.customers,
        &to,
        Some("dealt"),
    )
    .await?;
    tx.commit().await?;
    drop(client);
    wake_dispatcher(&state, &p.tenant, "responsible").await;
    Ok(Json(DealResult {
        channel: channel.to_string(),
        assignments: dealt
            .into_iter()
            .map(|(c, a)| Dealt {
                customer: c.to_owned(),
                agent: a.to_string(),
            })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_customers_to_a_and_b_like_cards() {
        // SPEC D11, the product's example.
        let customers: Vec<String> = (1..=10).map(|i| i.to_string()).collect();
        let agents = [AgentId::parse("A").unwrap(), AgentId::parse("B").unwrap()];
        let dealt = deal(&customers, &agents);
        let of = |agent: &str| -> Vec<&str> {
            dealt
                .iter()
                .filter(|(_, a)| a.as_str() == agent)
                .map(|(c, _)| *c)
                .collect()
        };
        assert_eq!(of("A"), ["1", "3", "5", "7", "9"]);
        assert_eq!(of("B"), ["2", "4", "6", "8", "10"]);
    }
}
