//! What runs passes without an event: the offer-deadline timer (SPEC D8: an offer not
//! accepted within the dispatch cycle is re-dispatched), armed after each transaction, and the
//! slow backstop sweep for tenants a dead instance left behind; and the sampler of the
//! `fl_conversations` gauge.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use firstline_shared::domain::TenantId;
use firstline_shared::metrics;
use tokio_util::sync::CancellationToken;

use crate::db;
use crate::dispatcher::Dispatcher;

impl Dispatcher {
    pub(crate) fn arm(&self, tenant: &TenantId, next: Option<DateTime<Utc>>) {
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
    pub(crate) async fn deadline_timer(&self, shutdown: CancellationToken) {
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
    pub(crate) async fn backstop(&self, every: Duration, shutdown: CancellationToken) {
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

/// Every 5 s, the open conversations by tenant and state for the `fl_conversations` gauge.
pub(crate) async fn sample_conversations(
    pool: deadpool_postgres::Pool,
    shutdown: CancellationToken,
) {
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
