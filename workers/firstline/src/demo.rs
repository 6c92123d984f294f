//! The demo: a simulated gateway and simulated agents driving the real workers over NATS,
//! printing each conversation's states as they change (from `fl.<tenant>.events.conversation`).
//!
//! Customers write on `line` (the bot answers; they type 轉真人 to reach a person, who needs
//! the `zh` skill) and on `email` (no bot, needs `english`). Agents go ready, accept offers
//! after a moment (now and then one declines), greet the customer, and close the conversation.
//!
//! The `webchat` channel is the newcomer's (`scripts/up` runs the web-chat gateway for it): its
//! bot answers, hands over on request and sends the survey after the agent closes, and its
//! conversations require the `webchat` skill, which only Dana has (SPEC D4), the agent left to
//! a person: the agent desk's address printed at the start signs in as her. No simulated
//! customer writes on `webchat`, and Dana has no skill `line` or `email` require, so neither
//! side of the simulation reaches her desk or takes the newcomer's chat. The simulation is an
//! option ([`DemoOptions::simulate`], `firstline demo --no-simulation`): without it, only the
//! newcomer's chat and Dana.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use firstline_shared::bus;
use firstline_shared::domain::{AgentId, AgentStatus, ChannelId, TenantId};
use firstline_shared::subjects;
use firstline_shared::wire::{
    self, AgentAction, AgentActionKind, AgentNotification, AgentPresence, AgentPresenceMessage,
    ConversationEvent, CustomerRef, InboundMessage, NotificationKind, OutboundMessage, Version,
};
use futures::StreamExt;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::setup::SetupFile;

/// The demo tenant, its channels and agents. `webchat` requires the skill only Dana has
/// ([`DESK_AGENT`]; SPEC D4), `line` and `email` skills she does not have.
pub const DEMO_SETUP: &str = r#"{"tenants":[{
    "id": "demo", "name": "FIRST LINE demo", "dispatch_cycle_seconds": 15, "offer_limit": 3,
    "channels": [
        {"id": "line", "kind": "line", "name": "LINE 官方帳號", "bot_enabled": true, "required_skills": ["zh"]},
        {"id": "email", "kind": "email", "name": "E-mail (English)", "bot_enabled": false, "required_skills": ["english"]},
        {"id": "webchat", "kind": "webchat", "name": "網站即時聊天 Web chat", "bot_enabled": true, "required_skills": ["webchat"]}
    ],
    "agents": [
        {"id": "amy", "name": "Amy", "skills": ["zh", "english"], "capacity": 3},
        {"id": "ben", "name": "Ben", "skills": ["zh"], "capacity": 2},
        {"id": "chen", "name": "Chen", "skills": ["english"], "capacity": 2},
        {"id": "dana", "name": "Dana (you, at the desk)", "skills": ["webchat"], "capacity": 3}
    ]
}]}"#;

/// The demo's agent that is not simulated: the desk the demo prints signs in as her.
pub const DESK_AGENT: &str = "dana";

/// The demo tenant's bot: keyword rules, articles, a flow, the surveys of `line` and `webchat`.
pub const DEMO_BOT: &str = include_str!("../../../config/demo-bot.yaml");

/// Configures the demo tenant ([`DEMO_SETUP`]) and loads its bot ([`DEMO_BOT`]): what
/// `firstline demo` (so `scripts/up`) does first, and what `tests/it/try_it.rs` runs on.
pub async fn configure(database_url: &str) -> anyhow::Result<()> {
    crate::setup::configure(database_url, &SetupFile::parse(DEMO_SETUP)?).await?;
    let bot = firstline_bot_router::setup::BotFile::parse(DEMO_BOT, false)?;
    firstline_bot_router::setup::load(database_url, &bot).await?;
    Ok(())
}

/// The demo's agents that the simulation drives: every agent of [`DEMO_SETUP`] but
/// [`DESK_AGENT`].
pub fn simulated_agents() -> anyhow::Result<Vec<crate::setup::AgentSetup>> {
    let setup = SetupFile::parse(DEMO_SETUP)?;
    Ok(setup
        .tenants
        .into_iter()
        .flat_map(|t| t.agents)
        .filter(|a| a.id.as_str() != DESK_AGENT)
        .collect())
}

/// Options of `firstline demo`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Stop after this many conversations are completed (None: until Ctrl-C).
    pub conversations: Option<usize>,
    /// Seconds between two new customers.
    pub every: Duration,
    /// Where the API serves the dashboard, if it runs: the demo prints its address with a
    /// supervisor token.
    pub api_addr: Option<std::net::SocketAddr>,
    /// Run the simulated customers and agents (`firstline demo --no-simulation`: false). Off,
    /// the simulated agents are set offline and only the newcomer's chat and Dana remain.
    pub simulate: bool,
}

/// Runs the simulation against running workers until `shutdown`, or until
/// `options.conversations` are completed. Returns how many were completed.
pub async fn run(
    nats_url: &str,
    database_url: &str,
    options: DemoOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<usize> {
    configure(database_url).await?;
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client.clone());
    bus::ensure_streams(&js).await?;
    let tenant = TenantId::parse("demo")?;
    if let Some(addr) = options.api_addr {
        let (pg, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let (_, token) = firstline_api::auth::create_token(
            &pg,
            &tenant,
            firstline_api::auth::Role::Supervisor,
            None,
            "demo dashboard",
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        println!("queue dashboard (交談佇列): http://{addr}/dashboard#token={token}");
        println!("{}", desk_address(&pg, addr).await?);
        println!("API: http://{addr}/openapi.json");
    }

    let completed = Arc::new(Mutex::new(HashSet::<Uuid>::new()));
    let done = CancellationToken::new();
    let mut events = client
        .subscribe(subjects::conversation_events(&tenant))
        .await?;
    let mut outbound = client.subscribe(format!("fl.{tenant}.outbound.*")).await?;
    {
        let completed = completed.clone();
        let done = done.clone();
        let limit = options.conversations;
        tokio::spawn(async move {
            while let Some(m) = events.next().await {
                let Ok(e) = wire::decode::<ConversationEvent>(&m.payload) else {
                    continue;
                };
                let from = e.from.map(|s| s.as_str()).unwrap_or("(new)");
                let agent = e
                    .agent_id
                    .map(|a| format!(" agent={a}"))
                    .unwrap_or_default();
                println!(
                    "{}  {:<8} {:<9} {:>10} -> {:<10} {}{agent}",
                    e.at.format("%H:%M:%S%.3f"),
                    &e.conversation_id.to_string()[28..],
                    e.channel,
                    from,
                    e.to,
                    e.reason
                );
                if e.to == firstline_shared::domain::ConversationState::Completed {
                    let mut c = completed.lock().await;
                    c.insert(e.conversation_id);
                    if limit.is_some_and(|n| c.len() >= n) {
                        done.cancel();
                    }
                }
            }
        });
    }
    tokio::spawn(async move {
        while let Some(m) = outbound.next().await {
            if let Ok(o) = wire::decode::<OutboundMessage>(&m.payload) {
                println!(
                    "              -> customer {:<6} [{}] {}",
                    o.customer_id,
                    o.author.as_str(),
                    o.text
                );
            }
        }
    });

    let agents = simulated_agents()?;
    if options.simulate {
        for a in &agents {
            tokio::spawn(simulated_agent(
                client.clone(),
                js.clone(),
                tenant.clone(),
                a.id.clone(),
                done.clone(),
            ));
            let capacity = u32::try_from(a.capacity).unwrap_or(0);
            set_presence(&js, &tenant, a, AgentStatus::Ready, Some(capacity)).await?;
        }
    } else {
        // Not left ready by an earlier run with the simulation: nobody would answer them.
        for a in &agents {
            set_presence(&js, &tenant, a, AgentStatus::LoggedOut, None).await?;
        }
    }

    if options.simulate {
        simulated_customers(&js, &tenant, &options, &shutdown, &done).await?;
    } else {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = done.cancelled() => {}
        }
    }
    done.cancel();
    if options.simulate {
        // The simulated agents go with the simulation (a next run without it finds them offline).
        for a in &agents {
            set_presence(&js, &tenant, a, AgentStatus::LoggedOut, None).await?;
        }
    }
    let count = completed.lock().await.len();
    Ok(count)
}

/// A new simulated customer every `options.every` (two on `line`, then one on `email`), until
/// `shutdown`, or `done` (the conversations of `options.conversations` completed).
async fn simulated_customers(
    js: &jetstream::Context,
    tenant: &TenantId,
    options: &DemoOptions,
    shutdown: &CancellationToken,
    done: &CancellationToken,
) -> anyhow::Result<()> {
    let mut n = 0u32;
    loop {
        n += 1;
        let (channel, handover) = if n.is_multiple_of(3) {
            ("email", false)
        } else {
            ("line", true)
        };
        tokio::spawn(simulated_customer(
            js.clone(),
            tenant.clone(),
            ChannelId::parse(channel)?,
            n,
            handover,
        ));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = done.cancelled() => break,
            _ = tokio::time::sleep(options.every) => {}
        }
        if options
            .conversations
            .is_some_and(|limit| n as usize >= limit)
        {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = done.cancelled() => break,
            }
        }
    }
    Ok(())
}

/// Publishes a simulated agent's presence: `status`, with its skills of [`DEMO_SETUP`].
async fn set_presence(
    js: &jetstream::Context,
    tenant: &TenantId,
    agent: &crate::setup::AgentSetup,
    status: AgentStatus,
    capacity: Option<u32>,
) -> anyhow::Result<()> {
    let presence = AgentPresence {
        version: Version,
        status,
        reason: None,
        capacity,
        skills: Some(agent.skills.clone()),
        display_name: None,
    };
    bus::publish(
        js,
        subjects::presence(tenant, &agent.id),
        &Uuid::now_v7().to_string(),
        Default::default(),
        wire::encode(&AgentPresenceMessage::from(presence)),
    )
    .await?;
    Ok(())
}

/// The agent desk's address with a new token of [`DESK_AGENT`], the agent no simulation
/// drives: whoever opens it answers as her (scripts/up prints it beside the dashboard's).
pub async fn desk_address(
    pg: &tokio_postgres::Client,
    addr: std::net::SocketAddr,
) -> anyhow::Result<String> {
    let (_, token) = firstline_api::auth::create_token(
        pg,
        &TenantId::parse("demo")?,
        firstline_api::auth::Role::Agent,
        Some(&AgentId::parse(DESK_AGENT)?),
        "demo desk",
    )
    .await
    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    Ok(desk_line(addr, &token))
}

/// The line [`desk_address`] prints for the API on `addr` and the agent token `token` (the
/// README shows it: `readme::` checks).
pub fn desk_line(addr: std::net::SocketAddr, token: &str) -> String {
    format!(
        "agent desk (專員工作台) as {DESK_AGENT}, press Ready for offers: http://{addr}/desk#token={token}"
    )
}

async fn send_inbound(
    js: &jetstream::Context,
    tenant: &TenantId,
    channel: &ChannelId,
    customer: &CustomerRef,
    text: &str,
) -> anyhow::Result<()> {
    let message_id = Uuid::now_v7().to_string();
    let body = InboundMessage {
        version: Version,
        message_id: message_id.clone(),
        customer: customer.clone(),
        text: text.to_owned(),
        sent_at: Some(chrono::Utc::now()),
        postback: None,
        email: None,
    };
    bus::publish(
        js,
        subjects::inbound_for_customer(tenant, channel, &customer.id),
        &format!("{tenant}:{channel}:{message_id}"),
        Default::default(),
        wire::encode(&body),
    )
    .await?;
    Ok(())
}

async fn simulated_customer(
    js: jetstream::Context,
    tenant: TenantId,
    channel: ChannelId,
    n: u32,
    handover: bool,
) {
    let names = ["王小明", "陳美玲", "Alice", "林志豪", "Bob", "張雅婷"];
    let customer = CustomerRef {
        id: format!("U{n:03}"),
        name: Some(names[n as usize % names.len()].to_owned()),
    };
    let result = async {
        // The bot answers each from its keyword rules or knowledge base (or says it does not know).
        let first = [
            "你好，請問營業時間？",
            "請問怎麼查詢我的訂單狀態？",
            "退貨的退款要多久？",
            "I forgot my password",
        ];
        let text = if handover {
            first[n as usize % first.len()]
        } else {
            "Hello, my order has not arrived"
        };
        send_inbound(&js, &tenant, &channel, &customer, text).await?;
        if handover {
            tokio::time::sleep(Duration::from_millis(700)).await;
            send_inbound(&js, &tenant, &channel, &customer, "轉真人").await?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("customer {}: {e:#}", customer.id);
    }
}

/// A simulated agent's action (the demo's and the load generator's agents).
pub(crate) async fn act(
    js: &jetstream::Context,
    tenant: &TenantId,
    agent: &AgentId,
    kind: AgentActionKind,
) -> anyhow::Result<()> {
    let action = AgentAction {
        version: Version,
        action_id: Uuid::now_v7(),
        kind,
    };
    bus::publish_action(js, tenant, agent, &action).await
}

async fn simulated_agent(
    client: async_nats::Client,
    js: jetstream::Context,
    tenant: TenantId,
    agent: AgentId,
    done: CancellationToken,
) {
    let Ok(mut notes) = client.subscribe(subjects::notify(&tenant, &agent)).await else {
        return;
    };
    let mut offers_seen = 0u32;
    loop {
        let m = tokio::select! {
            _ = done.cancelled() => return,
            m = notes.next() => match m { Some(m) => m, None => return },
        };
        let Ok(note) = wire::decode::<AgentNotification>(&m.payload) else {
            continue;
        };
        let (js, tenant, agent) = (js.clone(), tenant.clone(), agent.clone());
        let conversation_id = note.conversation_id;
        match note.kind {
            NotificationKind::Offer { customer, .. } => {
                offers_seen += 1;
                let decline = offers_seen.is_multiple_of(7);
                println!(
                    "              => offer to {agent:<5} {} ({})",
                    customer.id,
                    customer.name.unwrap_or_default()
                );
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    let kind = if decline {
                        AgentActionKind::Decline {
                            conversation_id,
                            reason: Some("on another call".into()),
                        }
                    } else {
                        AgentActionKind::Accept { conversation_id }
                    };
                    let _ = act(&js, &tenant, &agent, kind).await;
                });
            }
            // Accepted, or transferred to them by a colleague (SPEC D12): served alike.
            NotificationKind::Assigned { .. } | NotificationKind::TransferredToYou { .. } => {
                tokio::spawn(async move {
                    let text = format!("您好，我是 {agent}，很高興為您服務！");
                    let _ = act(
                        &js,
                        &tenant,
                        &agent,
                        AgentActionKind::Reply {
                            conversation_id,
                            text,
                        },
                    )
                    .await;
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    let _ = act(
                        &js,
                        &tenant,
                        &agent,
                        AgentActionKind::Close { conversation_id },
                    )
                    .await;
                });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPEC D4 on the demo's configuration: only Dana can be offered a `webchat` conversation,
    /// and she none of the channels the simulated customers write on (`line`, `email`), each of
    /// which a simulated agent can take.
    #[test]
    fn the_web_chat_is_dana_s_alone_and_the_simulation_never_reaches_her() {
        let setup = SetupFile::parse(DEMO_SETUP).unwrap();
        let tenant = &setup.tenants[0];
        let skills_of = |channel: &str| {
            &tenant
                .channels
                .iter()
                .find(|c| c.id.as_str() == channel)
                .unwrap()
                .required_skills
        };
        let can_take = |channel: &str| -> Vec<&str> {
            tenant
                .agents
                .iter()
                .filter(|a| a.skills.covers(skills_of(channel)))
                .map(|a| a.id.as_str())
                .collect()
        };
        assert_eq!(can_take("webchat"), [DESK_AGENT]);
        assert!(tenant
            .channels
            .iter()
            .any(|c| c.id.as_str() == "webchat" && c.bot_enabled));
        for channel in ["line", "email"] {
            let agents = can_take(channel);
            assert!(!agents.is_empty(), "{channel}: nobody");
            assert!(!agents.contains(&DESK_AGENT), "{channel}: {agents:?}");
        }
        let simulated: Vec<String> = simulated_agents()
            .unwrap()
            .iter()
            .map(|a| a.id.to_string())
            .collect();
        assert_eq!(simulated, ["amy", "ben", "chen"]);
    }
}
