//! The dispatcher worker: offers queued conversations to agents (SPEC D) and applies the
//! agents' accept, decline and close (SPEC L7, L8).
//!
//! It consumes the waiting-queue stream (`fl.<tenant>.queue.*`), the agent-presence stream
//! (`fl.<tenant>.presence.<agent>`) and the agent actions (`fl.<tenant>.agent.<agent>.action`),
//! in batches of what is already delivered. For each tenant of a batch, one transaction holds
//! the tenant's advisory lock (one writer per tenant across all instances), applies the
//! batch's events in order, and runs one dispatch pass ([`pass`]): expire offers past their
//! dispatch cycle (D8), load the ready agents and the heads of the queue they can serve, decide
//! with [`plan::plan`] (pure), write the offers. What the consumers and the timer hand in for
//! a tenant while its transaction runs is combined into the next one (one lock wait, one pass).
//! Offer deadlines are kept by a timer, not by polling; a slow backstop sweep catches tenants a
//! dead instance left behind.

pub mod db;
pub mod plan;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use firstline_shared::bus::{self, ConsumerSpec, Delivered};
use firstline_shared::config::CommonConfig;
use firstline_shared::db::{self as shared_db, TenantSettings, Transition};
use firstline_shared::domain::{AgentId, ConversationState, SkillSet, TenantId};
use firstline_shared::outbox::Outbox;
use firstline_shared::wire::{
    self, AgentAction, AgentActionKind, AgentPresence, NotificationKind, QueueSignal,
};
use firstline_shared::worker::Services;
use firstline_shared::{metrics, subjects, telemetry, HandleError};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "firstline-dispatcher",
    about = "Offers queued conversations to agents"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
    /// Most messages of one stream handled in one batch (one pass per tenant per batch).
    #[arg(long, env = "FL_DISPATCH_BATCH", default_value_t = 256)]
    pub batch: usize,
    /// Seconds between backstop sweeps for tenants left with due offers or an idle queue.
    #[arg(long, env = "FL_DISPATCH_BACKSTOP_SECS", default_value_t = 10)]
    pub backstop_secs: u64,
}

impl Config {
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            batch: 256,
            backstop_secs: 10,
        }
    }
}

/// One event of a tenant, applied under its lock before the pass.
#[derive(Clone, Debug)]
enum Event {
    /// The waiting queue changed; only the pass is needed.
    Queue,
    Presence {
        agent: AgentId,
        presence: AgentPresence,
        published: DateTime<Utc>,
    },
    Action {
        agent: AgentId,
        action: AgentAction,
    },
}

/// Which stream a batch comes from.
#[derive(Clone, Copy, Debug)]
enum Source {
    Queue,
    Presence,
    Actions,
}

fn parse_event(source: Source, m: &Delivered) -> Result<(TenantId, Event), HandleError> {
    let poison = HandleError::Poison;
    match source {
        Source::Queue => {
            let tenant = TenantId::parse(m.tenant_token()).map_err(|e| poison(e.to_string()))?;
            let _signal: QueueSignal = wire::decode(&m.payload)?;
            Ok((tenant, Event::Queue))
        }
        Source::Presence => {
            let (tenant, agent) = subjects::parse_presence(&m.subject).map_err(poison)?;
            let presence: AgentPresence = wire::decode(&m.payload)?;
            Ok((
                tenant,
                Event::Presence {
                    agent,
                    presence,
                    published: m.published,
                },
            ))
        }
        Source::Actions => {
            let (tenant, agent) = subjects::parse_agent_action(&m.subject).map_err(poison)?;
            let action: AgentAction = wire::decode(&m.payload)?;
            Ok((tenant, Event::Action { agent, action }))
        }
    }
}

/// One dispatcher instance. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    services: Services,
    /// The next offer deadline per tenant this instance knows of (SPEC D8 timers).
    deadlines: Arc<Mutex<HashMap<TenantId, DateTime<Utc>>>>,
    deadlines_changed: Arc<Notify>,
    /// Per tenant with a transaction under way in this instance: what waits for the next one
    /// (see [`Dispatcher::apply_and_pass`]).
    waiting: Arc<Mutex<HashMap<TenantId, Vec<Submission>>>>,
}

/// Events handed in for a tenant's next transaction, and where its outcome goes.
struct Submission {
    events: Vec<Event>,
    done: oneshot::Sender<Result<PassReport, HandleError>>,
}

/// Consumes the waiting-queue, presence and action streams until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let services = Services::start(&config.common, &shutdown).await?;
    let dispatcher = Dispatcher::new(services.clone());
    let consumer = ConsumerSpec::new;
    let js = &services.js;
    let common = &config.common;
    let batch = config.batch;
    let consume = |source: Source, stream, durable| {
        let dispatcher = dispatcher.clone();
        bus::consume_batched(
            js,
            common,
            consumer(stream, durable),
            batch,
            shutdown.clone(),
            move |msgs| {
                let dispatcher = dispatcher.clone();
                async move { dispatcher.on_batch(source, msgs).await }
            },
        )
    };
    let queue = consume(Source::Queue, subjects::QUEUE, "dispatcher-queue");
    let presence = consume(Source::Presence, subjects::PRESENCE, "dispatcher-presence");
    let actions = consume(Source::Actions, subjects::ACTIONS, "dispatcher-actions");
    let timers = dispatcher.deadline_timer(shutdown.clone());
    tokio::spawn(sample_conversations(
        services.pool.clone(),
        shutdown.clone(),
    ));
    let backstop = dispatcher.backstop(Duration::from_secs(config.backstop_secs), shutdown);
    let result = tokio::try_join!(queue, presence, actions, async {
        tokio::join!(timers, backstop);
        Ok(())
    })
    .map(|_| ());
    services.close().await;
    result
}

impl Dispatcher {
    pub fn new(services: Services) -> Self {
        Self {
            services,
            deadlines: Arc::default(),
            deadlines_changed: Arc::default(),
            waiting: Arc::default(),
        }
    }

    /// Groups a batch by tenant (keeping each tenant's order), applies each group and runs
    /// one pass for it. A message's result is its tenant group's, unless it is poison alone.
    async fn on_batch(
        &self,
        source: Source,
        batch: Vec<Delivered>,
    ) -> Vec<Result<(), HandleError>> {
        let mut results: Vec<Result<(), HandleError>> = Vec::with_capacity(batch.len());
        let mut groups: Vec<(TenantId, Vec<(usize, Event)>)> = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            match parse_event(source, m) {
                Ok((tenant, event)) => {
                    match groups.iter_mut().find(|(t, _)| *t == tenant) {
                        Some((_, events)) => events.push((i, event)),
                        None => groups.push((tenant, vec![(i, event)])),
                    }
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if let [(tenant, _)] = groups.as_slice() {
            telemetry::record_ids(Some(tenant), None, None, None);
        }
        // Each tenant's transaction holds only its own lock: the tenants of a batch are
        // applied side by side, not one after the other.
        let outcomes = futures::future::join_all(groups.into_iter().map(|(tenant, events)| {
            let (indexes, events): (Vec<usize>, Vec<Event>) = events.into_iter().unzip();
            async move { (indexes, self.apply_and_pass(&tenant, events).await) }
        }))
        .await;
        for (indexes, outcome) in outcomes {
            if let Err(e) = outcome {
                for i in indexes {
                    results[i] = Err(e.clone());
                }
            }
        }
        results
    }

    /// Applies `events`, then runs a dispatch pass for `tenant`, and returns once both are
    /// committed. One tenant's transactions hold its advisory lock, so within an instance
    /// they are combined rather than queued for it: the queue, presence and action consumers,
    /// the deadline timer and the backstop hand their events in, and while one transaction
    /// runs, whatever is handed in waits for the next, which applies it all in the order it
    /// came and runs one pass for all of it. Under load that is one pass (and one lock wait)
    /// where there were several. If a combined transaction fails, each hand-in is tried
    /// again alone, so that one bad event fails only its own batch.
    async fn apply_and_pass(
        &self,
        tenant: &TenantId,
        events: Vec<Event>,
    ) -> Result<PassReport, HandleError> {
        let (done, outcome) = oneshot::channel();
        let lead = {
            let mut waiting = self.waiting.lock().expect("waiting map");
            match waiting.get_mut(tenant) {
                Some(queue) => {
                    queue.push(Submission { events, done });
                    false
                }
                None => {
                    waiting.insert(tenant.clone(), vec![Submission { events, done }]);
                    true
                }
            }
        };
        if lead {
            // Its own task: the transactions go on for the others even if this caller is
            // dropped.
            let combiner = Combiner {
                dispatcher: self.clone(),
                tenant: tenant.clone(),
                finished: false,
            };
            tokio::spawn(combiner.run().instrument(tracing::Span::current()));
        }
        outcome.await.unwrap_or_else(|_| {
            Err(HandleError::transient(
                "the tenant's transaction was abandoned",
            ))
        })
    }

    /// Runs what was handed in together, or each alone (a single one, or when together
    /// fails); tells each its outcome.
    async fn run_together(&self, tenant: &TenantId, submissions: Vec<Submission>) {
        let together = submissions.len();
        if together > 1 {
            metrics::dispatch_combined(together);
            let events = submissions
                .iter()
                .flat_map(|s| s.events.iter().cloned())
                .collect();
            match self.transaction(tenant, events, together).await {
                Ok(report) => {
                    for s in submissions {
                        let _ = s.done.send(Ok(report.clone()));
                    }
                    return;
                }
                Err(e) => tracing::debug!(%tenant, "combined transaction failed, each alone: {e}"),
            }
        }
        for Submission { events, done } in submissions {
            let _ = done.send(self.transaction(tenant, events, 1).await);
        }
    }

    /// One transaction holding the tenant's advisory lock: applies `events` in order, runs one
    /// pass, commits; then publishes the outputs and arms the deadline timer.
    async fn transaction(
        &self,
        tenant: &TenantId,
        events: Vec<Event>,
        together: usize,
    ) -> Result<PassReport, HandleError> {
        let mut client = self.services.pool.get().await?;
        let tx = client.transaction().await?;
        // The lock and the settings read in one round trip, the lock first (see
        // db::prepare_pipelined): the settings are read once it is held.
        db::prepare_pipelined(&tx).await?;
        let (locked, settings) = futures::join!(
            db::lock_tenant(&tx, tenant),
            shared_db::tenant_settings(&tx, tenant)
        );
        locked?;
        let Some(settings) = settings? else {
            return Err(HandleError::poison(format!("unknown tenant {tenant:?}")));
        };
        let mut outbox = Outbox::new();
        let mut actions = Vec::new();
        for event in events {
            match event {
                Event::Queue => {}
                Event::Presence {
                    agent,
                    presence,
                    published,
                } => {
                    apply_actions(&tx, &mut outbox, tenant, std::mem::take(&mut actions)).await?;
                    if !db::apply_presence(&tx, tenant, &agent, &presence, published).await? {
                        tracing::debug!(%agent, "stale presence ignored");
                    }
                }
                Event::Action { agent, action } => {
                    if !matches!(action.kind, AgentActionKind::Reply { .. }) {
                        actions.push((agent, action));
                    } // a reply is the notifier's
                }
            }
        }
        apply_actions(&tx, &mut outbox, tenant, actions).await?;
        let report = PassReport {
            together,
            ..pass(&tx, &mut outbox, &settings).await?
        };
        let staged = outbox.stage(&tx).await?;
        tx.commit().await?;
        staged.publish(&self.services.js, &client).await;
        self.arm(tenant, report.next_deadline);
        Ok(report)
    }

    /// A pass with no event: after a deadline, at start, from the backstop, or from a benchmark.
    pub async fn pass_for(&self, tenant: &TenantId) -> Result<PassReport, HandleError> {
        self.apply_and_pass(tenant, Vec::new()).await
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
                if let Err(e) = self.pass_for(&tenant).await {
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
                            if let Err(e) = self.pass_for(&tenant).await {
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

/// Runs a tenant's transactions while events are handed in (see
/// [`Dispatcher::apply_and_pass`]); its map entry marks it running.
struct Combiner {
    dispatcher: Dispatcher,
    tenant: TenantId,
    finished: bool,
}

impl Combiner {
    async fn run(mut self) {
        loop {
            let submissions = {
                let mut waiting = self.dispatcher.waiting.lock().expect("waiting map");
                let queue = waiting
                    .get_mut(&self.tenant)
                    .expect("a running tenant's entry");
                if queue.is_empty() {
                    waiting.remove(&self.tenant);
                    self.finished = true;
                    return;
                }
                std::mem::take(queue)
            };
            self.dispatcher
                .run_together(&self.tenant, submissions)
                .await;
        }
    }
}

impl Drop for Combiner {
    /// A combiner that panicked must not leave its tenant marked running: what waits is
    /// dropped (its callers get an error and their messages come again).
    fn drop(&mut self) {
        if !self.finished {
            if let Ok(mut waiting) = self.dispatcher.waiting.lock() {
                waiting.remove(&self.tenant);
            }
        }
    }
}

/// Applies a run of agent actions: one conversation's in order, different conversations'
/// side by side on the transaction's connection (tokio-postgres pipelines their statements,
/// so an accept does not wait for the round trips of the close before it). Their outputs are
/// staged in the actions' order, as if applied one by one.
async fn apply_actions(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    tenant: &TenantId,
    actions: Vec<(AgentId, AgentAction)>,
) -> anyhow::Result<()> {
    let lanes =
        firstline_shared::batch::lanes(&actions, |(_, action)| Some(action.kind.conversation_id()));
    let actions = &actions;
    let staged = firstline_shared::batch::in_lanes(lanes, |i| async move {
        let (agent, action) = &actions[i];
        let mut own = Outbox::new();
        apply_action(tx, &mut own, tenant, agent, action).await?;
        anyhow::Ok(own)
    })
    .await;
    match staged {
        Ok(staged) => {
            for own in staged {
                outbox.append(own);
            }
            Ok(())
        }
        // The failing statement aborts the transaction, and the other lanes' next statements
        // fail with "current transaction is aborted": report the cause.
        Err(mut errors) => {
            let cause = errors
                .iter()
                .position(|e| !aborted_by_another(e))
                .unwrap_or(0);
            Err(errors.swap_remove(cause))
        }
    }
}

fn aborted_by_another(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        == Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION)
}

/// Applies accept (SPEC L7), decline (README), close (SPEC L8) or transfer of `agent`.
async fn apply_action(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    tenant: &TenantId,
    agent: &AgentId,
    action: &AgentAction,
) -> anyhow::Result<()> {
    let conversation_id = action.kind.conversation_id();
    let reject = |outbox: &mut Outbox, reason: &str| {
        outbox.reject_action(tenant, agent, conversation_id, action.action_id, reason)
    };
    // An accept or decline ends the agent's open offer in the same round trip as the
    // conversation's lock. Their order does not matter: both run under the tenant's lock,
    // and only this worker writes offers.
    let ending = match &action.kind {
        AgentActionKind::Accept { .. } => Some(("accepted", "accepted")),
        AgentActionKind::Decline { reason, .. } => {
            Some(("declined", reason.as_deref().unwrap_or("declined")))
        }
        _ => None,
    };
    let lock = shared_db::conversation_for_update(tx, tenant, conversation_id);
    let (conversation, offer) = match ending {
        Some((status, reason)) => {
            let end = db::end_open_offer(tx, conversation_id, agent, status, reason);
            let (conversation, offer) = futures::join!(lock, end);
            (conversation?, offer?)
        }
        None => (lock.await?, None),
    };
    let Some(mut conversation) = conversation else {
        reject(outbox, "no such conversation");
        return Ok(());
    };
    match &action.kind {
        AgentActionKind::Accept { .. } | AgentActionKind::Decline { .. } => {
            let Some((offer, offered_at)) = offer else {
                reject(
                    outbox,
                    &format!(
                        "no open offer of this conversation for you (it is {})",
                        conversation.state
                    ),
                );
                return Ok(());
            };
            if let AgentActionKind::Decline { .. } = &action.kind {
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
            metrics::offer_accepted(
                tenant.as_str(),
                (Utc::now() - offered_at).to_std().unwrap_or_default(),
            );
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
            if !conversation.is_served_by(agent) {
                reject(outbox, &conversation.not_served_reason());
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
            // 滿意度調查, if the channel asks one.
            firstline_shared::survey::ask(tx, outbox, &conversation).await?;
            outbox.notify_agent(
                tenant,
                agent,
                conversation_id,
                Uuid::new_v5(&action.action_id, b"closed"),
                NotificationKind::Closed,
            );
        }
        AgentActionKind::Transfer {
            to_agent, skills, ..
        } => {
            if !conversation.is_served_by(agent) {
                reject(outbox, &conversation.not_served_reason());
                return Ok(());
            }
            if to_agent.as_ref() == Some(agent) {
                reject(
                    outbox,
                    "a conversation cannot be transferred to the agent serving it",
                );
                return Ok(());
            }
            let required_skills = db::prepare_transfer(
                tx,
                conversation_id,
                agent,
                to_agent.as_ref(),
                skills.as_ref(),
            )
            .await?;
            shared_db::transition(
                tx,
                outbox,
                &mut conversation,
                Transition {
                    to: ConversationState::Waiting,
                    agent: None,
                    reason: "transferred",
                },
            )
            .await?;
            outbox.notify_agent(
                tenant,
                agent,
                conversation_id,
                Uuid::new_v5(&action.action_id, b"transferred"),
                NotificationKind::Transferred {
                    to_agent: to_agent.clone(),
                    required_skills,
                },
            );
        }
        AgentActionKind::Reply { .. } => {}
    }
    Ok(())
}

/// Every 5 s, the open conversations by tenant and state for the `fl_conversations` gauge.
async fn sample_conversations(pool: deadpool_postgres::Pool, shutdown: CancellationToken) {
    // What was reported last time: a (tenant, state) that has no row now is back to 0.
    let mut reported: HashSet<(String, String)> = HashSet::new();
    loop {
        if let Ok(client) = pool.get().await {
            match db::conversation_counts(&client).await {
                Ok(counts) => {
                    let now: HashSet<(String, String)> = counts
                        .iter()
                        .map(|(t, s, _)| (t.clone(), s.clone()))
                        .collect();
                    for (tenant, state) in reported.difference(&now) {
                        metrics::conversations(tenant, state, 0);
                    }
                    for (tenant, state, n) in counts {
                        metrics::conversations(&tenant, &state, n);
                    }
                    reported = now;
                }
                Err(e) => tracing::debug!("sampling conversation counts: {e}"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    pub expired: usize,
    pub offered: usize,
    /// The earliest deadline of the tenant's open offers, for the timer (SPEC D8).
    pub next_deadline: Option<DateTime<Utc>>,
    /// How many hand-ins (batches, timer or backstop passes) the transaction applied at once.
    pub together: usize,
}

/// Reads of the queue one pass may make before it stops (only repeated declines need more
/// than one: see [`pass`]).
const MAX_ROUNDS: usize = 8;

/// One dispatch pass for a tenant, inside its locked transaction.
///
/// The waiting queue is read by skill group: a group is read only if a ready agent with a
/// free slot covers it, and only as many of its heads as those agents have free slots. That is
/// exact: a group's conversation is left only when every agent who could take it is full,
/// and then so is every one behind it; so the cost of a pass follows the offers it makes, not
/// the queue's length. A conversation skipped because the free agents declined it can leave
/// room in its group; then the next heads are read, for up to [`MAX_ROUNDS`] rounds.
pub async fn pass(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    settings: &TenantSettings,
) -> anyhow::Result<PassReport> {
    let tenant = &settings.id;
    let mut report = PassReport::default();
    // The pass's first reads in one round trip, after the expiry they depend on (see
    // db::prepare_pipelined). The waiting groups are read even if no agent turns out to
    // have room (one index probe per group).
    db::prepare_pipelined(tx).await?;
    let orphans_now = async {
        match settings.orphans_possible {
            true => db::orphaned_assigning(tx, tenant).await.map(Some),
            false => Ok(None),
        }
    };
    let (expired, agents, orphans_now, groups) = futures::join!(
        db::expire_due_offers(tx, tenant),
        db::ready_agents(tx, tenant),
        orphans_now,
        db::waiting_groups(tx, tenant)
    );
    // The first failure is the cause; the statements after it fail as aborted.
    let (expired, mut agents, orphans_now, groups) = (expired?, agents?, orphans_now?, groups?);
    // SPEC D8: offers past the dispatch cycle end; their conversations stay `assigning`
    // (D7) and are re-offered below, to another suitable agent first.
    for expired in expired {
        report.expired += 1;
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
    metrics::offers_expired(tenant.as_str(), report.expired);
    let offer_limit = settings.offer_limit.max(1) as u32;
    // Orphans (assigning, no open offer: D7) come only from expiries; looked for while the
    // tenant may have some (V6), and the mark kept for the next pass while some are left.
    let orphans_possible = settings.orphans_possible || report.expired > 0;
    let mut orphans_left = orphans_possible;
    if agents.iter().any(|a| a.free_slots(offer_limit) > 0) {
        let mut orphans = match orphans_now {
            Some(orphans) => orphans,
            // Expired in this pass, the tenant marked clear before it.
            None if orphans_possible => db::orphaned_assigning(tx, tenant).await?,
            None => Vec::new(),
        };
        let mut unplaced: HashSet<Uuid> = orphans.iter().map(|c| c.conversation_id).collect();
        let mut read: HashMap<&SkillSet, i64> = HashMap::new();
        let mut exhausted: HashSet<&SkillSet> = HashSet::new();
        let mut planned_all = Vec::new();
        for _ in 0..MAX_ROUNDS {
            let reads: Vec<db::GroupRead> = groups
                .iter()
                .filter(|g| !exhausted.contains(g))
                .filter_map(|g| {
                    let free: u32 = agents
                        .iter()
                        .filter(|a| a.skills.covers(g))
                        .map(|a| a.free_slots(offer_limit))
                        .sum();
                    (free > 0).then(|| db::GroupRead {
                        skills: g,
                        limit: i64::from(free),
                        skip: read.get(g).copied().unwrap_or(0),
                    })
                })
                .collect();
            if reads.is_empty() && orphans.is_empty() {
                break;
            }
            let mut queue = db::waiting_heads(tx, tenant, &reads).await?;
            for r in &reads {
                let got = queue
                    .iter()
                    .filter(|c| &c.required_skills == r.skills)
                    .count() as i64;
                *read.entry(r.skills).or_default() += got;
                if got < r.limit {
                    exhausted.insert(r.skills);
                }
            }
            queue.append(&mut orphans);
            queue.sort_by_key(plan::Candidate::order_key);
            db::attach_offer_history(tx, &mut queue).await?;
            let planned = plan::plan(&agents, &queue, offer_limit);
            if planned.is_empty() {
                break;
            }
            for p in &planned {
                if let Some(a) = agents.iter_mut().find(|a| a.id == p.agent) {
                    a.open_offers += 1;
                }
            }
            planned_all.extend(planned);
        }
        for offered in
            db::write_offers(tx, tenant, settings.dispatch_cycle_seconds, &planned_all).await?
        {
            report.offered += 1;
            unplaced.remove(&offered.conversation.id);
            stage_offer(outbox, offered);
        }
        orphans_left = !unplaced.is_empty();
    }
    if orphans_left != settings.orphans_possible {
        db::set_orphans_possible(tx, tenant, orphans_left).await?;
    }
    report.next_deadline = db::next_deadline(tx, tenant).await?;
    Ok(report)
}

/// The event (`waiting -> assigning`, or `reoffered`) and the agent's offer notification.
fn stage_offer(outbox: &mut Outbox, offered: db::Offered) {
    let db::Offered {
        offer_id,
        agent,
        conversation,
        from,
        transition_id,
        at,
        deadline,
    } = offered;
    let since_queued = conversation
        .queued_at
        .map(|q| (at - q).to_std().unwrap_or_default());
    metrics::offer_made(conversation.tenant.as_str(), since_queued);
    let reason = if from == ConversationState::Waiting {
        "offered"
    } else {
        "reoffered"
    };
    shared_db::stage_event(
        outbox,
        &conversation,
        Some(from),
        Transition {
            to: ConversationState::Assigning,
            agent: Some(&agent),
            reason,
        },
        transition_id,
        at,
    );
    outbox.notify_agent(
        &conversation.tenant,
        &agent,
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
}

impl firstline_shared::worker::WorkerConfig for Config {
    fn common(&self) -> &CommonConfig {
        &self.common
    }
}
