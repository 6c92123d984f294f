//! The dispatcher instance: groups each batch by tenant and runs, per tenant, one transaction
//! holding the tenant's advisory lock that applies the events in order (presence, the agent
//! actions of SPEC L7 and L8, and replies) and then one dispatch pass (SPEC D1-D9, see [`crate::pass()`]).
//! How a tenant's hand-ins share transactions is in [`crate::combiner`]; the offer-deadline
//! timer (D8) and the backstop are in [`crate::timers`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use firstline_shared::bus::Delivered;
use firstline_shared::db as shared_db;
use firstline_shared::domain::TenantId;
use firstline_shared::outbox::{Outbox, Publisher};
use firstline_shared::wire::AgentActionKind;
use firstline_shared::worker::Services;
use firstline_shared::{telemetry, HandleError};
use tokio::sync::Notify;

use crate::actions::apply_actions;
use crate::combiner::Submission;
use crate::db;
use crate::events::{parse_event, Event, Source};
use crate::pass::{pass, PassReport};

/// One dispatcher instance. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    pub(crate) services: Services,
    /// The next offer deadline per tenant this instance knows of (SPEC D8 timers).
    pub(crate) deadlines: Arc<Mutex<HashMap<TenantId, DateTime<Utc>>>>,
    pub(crate) deadlines_changed: Arc<Notify>,
    /// Per tenant with a transaction under way in this instance: what waits for the next one
    /// (see [`Dispatcher::apply_and_pass`]).
    pub(crate) waiting: Arc<Mutex<HashMap<TenantId, Vec<Submission>>>>,
    /// Publishes each transaction's outbox after the commit, in the background: a stream that
    /// takes nothing (its leader being elected) does not hold up the tenant's next transaction.
    publisher: Publisher,
}

impl Dispatcher {
    pub fn new(services: Services) -> Self {
        Self {
            publisher: Publisher::new(services.clone()),
            services,
            deadlines: Arc::default(),
            deadlines_changed: Arc::default(),
            waiting: Arc::default(),
        }
    }

    /// Groups a batch by tenant (keeping each tenant's order), applies each group and runs
    /// one pass for it. A message's result is its tenant group's, unless it is poison alone.
    pub(crate) async fn on_batch(
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

    /// One transaction holding the tenant's advisory lock: applies `events` in order, runs one
    /// pass, commits; then hands the outputs to the background publisher and arms the deadline
    /// timer.
    pub(crate) async fn transaction(
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
        let needs_pass = events.is_empty() || events.iter().any(|e| !is_reply(e));
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
                Event::Action { agent, action, seq } => actions.push((agent, action, seq)),
            }
        }
        apply_actions(&tx, &mut outbox, tenant, actions).await?;
        // Replies change no agent's load nor the queue: a transaction of replies alone needs
        // no pass (nor a new deadline).
        let report = if needs_pass {
            PassReport {
                together,
                ..pass(&tx, &mut outbox, &settings).await?
            }
        } else {
            PassReport {
                together,
                ..PassReport::default()
            }
        };
        let staged = outbox.stage(&tx).await?;
        tx.commit().await?;
        drop(client);
        self.publisher.hand(staged).await;
        if needs_pass {
            self.arm(tenant, report.next_deadline);
        }
        Ok(report)
    }

    /// A pass with no event: after a deadline, at start, from the backstop, or from a benchmark.
    pub async fn pass_for(&self, tenant: &TenantId) -> Result<PassReport, HandleError> {
        self.apply_and_pass(tenant, Vec::new()).await
    }
}

fn is_reply(event: &Event) -> bool {
    matches!(
        event,
        Event::Action { action, .. } if matches!(action.kind, AgentActionKind::Reply { .. })
    )
}
