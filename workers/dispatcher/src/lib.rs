//! The dispatcher worker: offers queued conversations to agents (SPEC D) and applies the
//! agents' accept, decline and close (SPEC L7, L8).
//!
//! It consumes the waiting-queue stream (`fl.<tenant>.queue.*`), the agent-presence stream
//! (`fl.<tenant>.presence.<agent>`) and the agent actions (`fl.<tenant>.agent.<agent>.action`).
//! Every event runs, for its tenant, one transaction that holds the tenant's advisory lock
//! (one writer per tenant across all instances), applies the event, and runs a dispatch pass:
//! expire offers past their dispatch cycle (D8), load the ready agents and the queue, decide
//! with [`plan::plan`] (pure), write the offers. Offer deadlines are kept by a timer, not by
//! polling; a slow backstop sweep catches tenants a dead instance left behind.

pub mod db;
pub mod plan;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use firstline_shared::bus::{self, ConsumerSpec, Delivered};
use firstline_shared::config::CommonConfig;
use firstline_shared::db::{self as shared_db, TenantSettings, Transition};
use firstline_shared::domain::{AgentId, ConversationState, TenantId};
use firstline_shared::outbox::Outbox;
use firstline_shared::wire::{
    self, AgentAction, AgentActionKind, AgentPresence, NotificationKind, QueueSignal,
};
use firstline_shared::worker::Services;
use firstline_shared::{subjects, HandleError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "firstline-dispatcher",
    about = "Offers queued conversations to agents"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
    /// Most queued conversations one pass looks at.
    #[arg(long, env = "FL_DISPATCH_SCAN_LIMIT", default_value_t = 5_000)]
    pub scan_limit: i64,
    /// Seconds between backstop sweeps for tenants left with due offers or an idle queue.
    #[arg(long, env = "FL_DISPATCH_BACKSTOP_SECS", default_value_t = 10)]
    pub backstop_secs: u64,
}

/// One dispatcher instance.
#[derive(Clone)]
struct Dispatcher {
    services: Services,
    scan_limit: i64,
    /// The next offer deadline per tenant this instance knows of (SPEC D8 timers).
    deadlines: Arc<Mutex<HashMap<TenantId, DateTime<Utc>>>>,
    deadlines_changed: Arc<Notify>,
}

/// Consumes the waiting-queue, presence and action streams until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let services = Services::start(&config.common, &shutdown).await?;
    let dispatcher = Dispatcher {
        services: services.clone(),
        scan_limit: config.scan_limit,
        deadlines: Arc::default(),
        deadlines_changed: Arc::default(),
    };
    let consumer = |stream, durable| ConsumerSpec {
        stream,
        durable,
        filter_subject: String::new(),
    };
    let js = &services.js;
    let common = &config.common;
    let queue = bus::consume(
        js,
        common,
        consumer(subjects::QUEUE, "dispatcher-queue"),
        shutdown.clone(),
        |m| dispatcher.on_queue_signal(m),
    );
    let presence = bus::consume(
        js,
        common,
        consumer(subjects::PRESENCE, "dispatcher-presence"),
        shutdown.clone(),
        |m| dispatcher.on_presence(m),
    );
    let actions = bus::consume(
        js,
        common,
        consumer(subjects::ACTIONS, "dispatcher-actions"),
        shutdown.clone(),
        |m| dispatcher.on_action(m),
    );
    let timers = dispatcher.deadline_timer(shutdown.clone());
    let backstop = dispatcher.backstop(Duration::from_secs(config.backstop_secs), shutdown);
    let result = tokio::try_join!(queue, presence, actions, async {
        tokio::join!(timers, backstop);
        Ok(())
    })
    .map(|_| ());
    services.close().await;
    result
}

fn tenant_of(m: &Delivered) -> Result<TenantId, HandleError> {
    TenantId::parse(m.tenant_token()).map_err(|e| HandleError::poison(e.to_string()))
}

impl Dispatcher {
    async fn on_queue_signal(&self, m: Delivered) -> Result<(), HandleError> {
        let tenant = tenant_of(&m)?;
        let _signal: QueueSignal = wire::decode(&m.payload)?;
        self.with_tenant(&tenant, |_, _, _| Box::pin(async { Ok(()) }))
            .await
    }

    async fn on_presence(&self, m: Delivered) -> Result<(), HandleError> {
        let tenant = tenant_of(&m)?;
        let (_, agent) = subjects::parse_presence(&m.subject).map_err(HandleError::Poison)?;
        let presence: AgentPresence = wire::decode(&m.payload)?;
        let published = m.published;
        self.with_tenant(&tenant, move |tx, _, settings| {
            Box::pin(async move {
                if !db::apply_presence(tx, &settings.id, &agent, &presence, published).await? {
                    tracing::debug!(%agent, "stale presence ignored");
                }
                Ok(())
            })
        })
        .await
    }

    async fn on_action(&self, m: Delivered) -> Result<(), HandleError> {
        let (tenant, agent) =
            subjects::parse_agent_action(&m.subject).map_err(HandleError::Poison)?;
        let action: AgentAction = wire::decode(&m.payload)?;
        if matches!(action.kind, AgentActionKind::Reply { .. }) {
            return Ok(()); // the notifier's
        }
        self.with_tenant(&tenant, move |tx, outbox, settings| {
            Box::pin(async move { apply_action(tx, outbox, &settings.id, &agent, &action).await })
        })
        .await
    }

    /// Runs `apply` then a dispatch pass for `tenant`, in one transaction holding the
    /// tenant's advisory lock; publishes the outputs after commit and arms the deadline timer.
    async fn with_tenant<F>(&self, tenant: &TenantId, apply: F) -> Result<(), HandleError>
    where
        F: for<'a> FnOnce(
            &'a Transaction<'a>,
            &'a mut Outbox,
            &'a TenantSettings,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send + 'a>,
        >,
    {
        let mut client = self.services.pool.get().await?;
        let tx = client.transaction().await?;
        db::lock_tenant(&tx, tenant).await?;
        let Some(settings) = shared_db::tenant_settings(&tx, tenant).await? else {
            return Err(HandleError::poison(format!("unknown tenant {tenant:?}")));
        };
        let mut outbox = Outbox::new();
        apply(&tx, &mut outbox, &settings).await?;
        let next = pass(&tx, &mut outbox, &settings, self.scan_limit).await?;
        let staged = outbox.stage(&tx).await?;
        tx.commit().await?;
        staged.publish(&self.services.js, &self.services.pool).await;
        self.arm(tenant, next);
        Ok(())
    }

    fn arm(&self, tenant: &TenantId, next: Option<DateTime<Utc>>) {
        let mut deadlines = self.deadlines.lock().expect("deadline map");
        match next {
            Some(at) => {
                deadlines.insert(tenant.clone(), at);
            }
            None => {
                deadlines.remove(tenant);
            }
        }
        drop(deadlines);
        self.deadlines_changed.notify_one();
    }

    /// SPEC D8: sleeps until the earliest known offer deadline, then runs that tenant's pass.
    async fn deadline_timer(&self, shutdown: CancellationToken) {
        loop {
            let earliest = {
                let deadlines = self.deadlines.lock().expect("deadline map");
                deadlines
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(t, at)| (t.clone(), *at))
            };
            let sleep = match &earliest {
                Some((_, at)) => (*at - Utc::now()).to_std().unwrap_or_default(),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.deadlines_changed.notified() => continue,
                _ = tokio::time::sleep(sleep) => {}
            }
            if let Some((tenant, _)) = earliest {
                // Small grace so that now() in Postgres is past the deadline too.
                tokio::time::sleep(Duration::from_millis(5)).await;
                if let Err(e) = self
                    .with_tenant(&tenant, |_, _, _| Box::pin(async { Ok(()) }))
                    .await
                {
                    tracing::warn!(%tenant, "deadline pass failed, retrying soon: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// At start and then every `every`: passes for tenants with due offers or an idle queue
    /// and ready agents, which a dispatcher that died mid-way may have left.
    async fn backstop(&self, every: Duration, shutdown: CancellationToken) {
        loop {
            match self.services.pool.get().await {
                Ok(client) => match db::tenants_needing_a_pass(&client).await {
                    Ok(tenants) => {
                        for tenant in tenants {
                            if let Err(e) = self
                                .with_tenant(&tenant, |_, _, _| Box::pin(async { Ok(()) }))
                                .await
                            {
                                tracing::warn!(%tenant, "backstop pass failed: {e}");
                            }
                        }
                    }
                    Err(e) => tracing::warn!("backstop query failed: {e:#}"),
                },
                Err(e) => tracing::warn!("backstop: no database connection: {e}"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// Applies accept (SPEC L7), decline (README) or close (SPEC L8) of `agent`.
async fn apply_action(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    tenant: &TenantId,
    agent: &AgentId,
    action: &AgentAction,
) -> anyhow::Result<()> {
    let conversation_id = action.kind.conversation_id();
    let reject = |outbox: &mut Outbox, reason: &str| {
        outbox.notify_agent(
            tenant,
            agent,
            conversation_id,
            Uuid::new_v5(&action.action_id, b"rejected"),
            NotificationKind::ActionRejected {
                action_id: action.action_id,
                reason: reason.to_owned(),
            },
        );
    };
    let Some(mut conversation) =
        shared_db::conversation_for_update(tx, tenant, conversation_id).await?
    else {
        reject(outbox, "no such conversation");
        return Ok(());
    };
    match &action.kind {
        AgentActionKind::Accept { .. } | AgentActionKind::Decline { .. } => {
            let Some(offer) = db::open_offer(tx, conversation_id, agent).await? else {
                reject(
                    outbox,
                    &format!(
                        "no open offer of this conversation for you (it is {})",
                        conversation.state
                    ),
                );
                return Ok(());
            };
            if let AgentActionKind::Decline { reason, .. } = &action.kind {
                db::end_offer(
                    tx,
                    offer,
                    "declined",
                    reason.as_deref().unwrap_or("declined"),
                )
                .await?;
                // Back in the queue at its place; the pass re-dispatches it at once, never
                // to this agent again.
                shared_db::transition(
                    tx,
                    outbox,
                    &mut conversation,
                    Transition {
                        to: ConversationState::Waiting,
                        agent: None,
                        reason: "declined",
                    },
                )
                .await?;
                return Ok(());
            }
            db::end_offer(tx, offer, "accepted", "accepted").await?;
            shared_db::transition(
                tx,
                outbox,
                &mut conversation,
                Transition {
                    to: ConversationState::Processing,
                    agent: Some(agent),
                    reason: "accepted",
                },
            )
            .await?;
            outbox.notify_agent(
                tenant,
                agent,
                conversation_id,
                Uuid::new_v5(&offer, b"assigned"),
                NotificationKind::Assigned { offer_id: offer },
            );
        }
        AgentActionKind::Close { .. } => {
            if conversation.state != ConversationState::Processing
                || conversation.agent_id.as_ref() != Some(agent)
            {
                reject(
                    outbox,
                    &format!(
                        "you are not serving this conversation (it is {})",
                        conversation.state
                    ),
                );
                return Ok(());
            }
            shared_db::transition(
                tx,
                outbox,
                &mut conversation,
                Transition {
                    to: ConversationState::Completed,
                    agent: Some(agent),
                    reason: "closed_by_agent",
                },
            )
            .await?;
            outbox.notify_agent(
                tenant,
                agent,
                conversation_id,
                Uuid::new_v5(&action.action_id, b"closed"),
                NotificationKind::Closed,
            );
        }
        AgentActionKind::Reply { .. } => {}
    }
    Ok(())
}

/// One dispatch pass for a tenant, inside its locked transaction. Returns the next deadline.
async fn pass(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    settings: &TenantSettings,
    scan_limit: i64,
) -> anyhow::Result<Option<DateTime<Utc>>> {
    let tenant = &settings.id;
    // SPEC D8: offers past the dispatch cycle end; their conversations stay `assigning`
    // (D7) and are re-offered below, to another suitable agent first.
    for expired in db::expire_due_offers(tx, tenant).await? {
        outbox.notify_agent(
            tenant,
            &expired.agent,
            expired.conversation_id,
            Uuid::new_v5(&expired.offer_id, b"revoked"),
            NotificationKind::OfferRevoked {
                offer_id: expired.offer_id,
                reason: "not accepted within the dispatch cycle".into(),
            },
        );
    }
    let offer_limit = settings.offer_limit.max(1) as u32;
    let agents = db::ready_agents(tx, tenant).await?;
    let free: u32 = agents.iter().map(|a| a.free_slots(offer_limit)).sum();
    if free > 0 {
        let queue = db::candidates(tx, tenant, scan_limit).await?;
        for planned in plan::plan(&agents, &queue, offer_limit) {
            offer(tx, outbox, settings, planned).await?;
        }
    }
    Ok(db::next_deadline(tx, tenant).await?)
}

async fn offer(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    settings: &TenantSettings,
    planned: plan::PlannedOffer,
) -> anyhow::Result<()> {
    let tenant = &settings.id;
    let Some(mut conversation) =
        shared_db::conversation_for_update(tx, tenant, planned.conversation_id).await?
    else {
        return Ok(());
    };
    let offer_id = Uuid::now_v7();
    let deadline = db::insert_offer(
        tx,
        tenant,
        offer_id,
        conversation.id,
        &planned.agent,
        settings.dispatch_cycle_seconds,
    )
    .await?;
    let t = Transition {
        to: ConversationState::Assigning,
        agent: Some(&planned.agent),
        reason: "offered",
    };
    if conversation.state == ConversationState::Assigning {
        // Re-dispatched after its offer expired (D8): an event, no state change.
        shared_db::record_history(
            tx,
            outbox,
            &conversation,
            Some(ConversationState::Assigning),
            Transition {
                reason: "reoffered",
                ..t
            },
        )
        .await?;
    } else {
        shared_db::transition(tx, outbox, &mut conversation, t).await?;
    }
    outbox.notify_agent(
        tenant,
        &planned.agent,
        conversation.id,
        offer_id,
        NotificationKind::Offer {
            offer_id,
            channel: conversation.channel.clone(),
            customer: wire::CustomerRef {
                id: conversation.customer_external_id.clone(),
                name: conversation.customer_name.clone(),
            },
            required_skills: conversation.required_skills.clone(),
            deadline,
        },
    );
    Ok(())
}
