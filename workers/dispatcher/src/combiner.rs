//! The per-tenant combiner: one tenant's transactions hold its advisory lock, so within an
//! instance the events handed in for a tenant while its transaction runs (by the queue,
//! presence and action consumers, the deadline timer and the backstop) wait and are applied
//! together in the next one: one lock wait and one pass (SPEC D) for all of them.

use firstline_shared::domain::TenantId;
use firstline_shared::{metrics, HandleError};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::dispatcher::Dispatcher;
use crate::events::Event;
use crate::pass::PassReport;

/// Events handed in for a tenant's next transaction, and where its outcome goes.
pub(crate) struct Submission {
    events: Vec<Event>,
    done: oneshot::Sender<Result<PassReport, HandleError>>,
}

impl Dispatcher {
    /// Applies `events`, then runs a dispatch pass for `tenant`, and returns once both are
    /// committed. One tenant's transactions hold its advisory lock, so within an instance
    /// they are combined rather than queued for it: the queue, presence and action consumers,
    /// the deadline timer and the backstop hand their events in, and while one transaction
    /// runs, whatever is handed in waits for the next, which applies it all in the order it
    /// came and runs one pass for all of it. Under load that is one pass (and one lock wait)
    /// where there were several. If a combined transaction fails, each hand-in is tried
    /// again alone, so that one bad event fails only its own batch.
    pub(crate) async fn apply_and_pass(
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
            // dropped. Not awaited: it ends by itself once nothing waits for its tenant, and
            // each caller awaits its own outcome.
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
