//! Transactional outbox: a handler stages the messages its decision produces in the same
//! Postgres transaction as the decision, commits, then publishes them. If the process dies
//! between the commit and the publish, [`sweep`] (run by every worker) publishes them later;
//! each has a fixed `Nats-Msg-Id`, so a message published twice is stored once by the stream.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use deadpool_postgres::{GenericClient, Pool, Transaction};
use tokio_util::sync::CancellationToken;

use crate::bus::{self, JetStream};
use crate::wire::{self, WireMessage};

pub mod publisher;
pub use publisher::Publisher;

/// One message waiting for its transaction to commit.
#[derive(Clone, Debug)]
pub struct Pending {
    pub subject: String,
    pub msg_id: String,
    pub payload: Bytes,
    pub traceparent: Option<String>,
}

/// The messages a handler's transaction produces, in order.
#[derive(Debug, Default)]
pub struct Outbox {
    pending: Vec<Pending>,
}

/// Messages written to the outbox table, to publish once the transaction has committed: each
/// with the id of its row, in the order they were pushed (a row holds one lane's messages).
#[derive(Debug, Default)]
#[must_use = "publish the staged messages after commit"]
pub struct Staged {
    rows: Vec<(i64, Pending)>,
}

impl Outbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a message; `msg_id` must be the same whenever the same decision is replayed.
    pub fn push<T: WireMessage>(&mut self, subject: String, msg_id: String, message: &T) {
        self.pending.push(Pending {
            subject,
            msg_id,
            payload: wire::encode(message),
            traceparent: crate::telemetry::current_traceparent(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Adds `other`'s messages after these (one transaction's outbox for a batch).
    pub fn append(&mut self, other: Outbox) {
        self.pending.extend(other.pending);
    }

    /// Writes the messages in `tx`, one row per lane ([`lane_of`]: one tenant's messages of
    /// one kind) holding that lane's messages in order (issue 22: a row, its index entry and
    /// their WAL per lane of a transaction, not per message). Call just before `tx.commit()`.
    pub async fn stage(self, tx: &Transaction<'_>) -> Result<Staged, tokio_postgres::Error> {
        if self.pending.is_empty() {
            return Ok(Staged::default());
        }
        let lanes: Vec<String> = self.pending.iter().map(|p| lane_of(&p.subject)).collect();
        let subjects: Vec<&str> = self.pending.iter().map(|p| p.subject.as_str()).collect();
        let ids: Vec<&str> = self.pending.iter().map(|p| p.msg_id.as_str()).collect();
        let payloads: Vec<&[u8]> = self.pending.iter().map(|p| p.payload.as_ref()).collect();
        let traces: Vec<Option<&str>> = self
            .pending
            .iter()
            .map(|p| p.traceparent.as_deref())
            .collect();
        let stmt = tx
            .prepare_cached(
                "INSERT INTO outbox (subjects, msg_ids, payloads, traceparents)
                 SELECT array_agg(subject ORDER BY n), array_agg(msg_id ORDER BY n),
                        array_agg(payload ORDER BY n), array_agg(traceparent ORDER BY n)
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[])
                      WITH ORDINALITY AS m(lane, subject, msg_id, payload, traceparent, n)
                 GROUP BY lane
                 RETURNING id, subjects[1]",
            )
            .await?;
        let rows = tx
            .query(&stmt, &[&lanes, &subjects, &ids, &payloads, &traces])
            .await?;
        // Each row is told by its lane (a row's first subject names it; a transaction has one
        // row per lane), not by the order of RETURNING. A lane always has its row: the 0 that
        // cannot happen would only leave the row to the sweeper, which deletes it.
        let row_of: Vec<(String, i64)> = rows
            .iter()
            .map(|r| (lane_of(r.get::<_, &str>(1)), r.get::<_, i64>(0)))
            .collect();
        Ok(Staged {
            rows: lanes
                .iter()
                .map(|lane| {
                    row_of
                        .iter()
                        .find(|(l, _)| l == lane)
                        .map_or(0, |(_, id)| *id)
                })
                .zip(self.pending)
                .collect(),
        })
    }
}

impl Staged {
    /// Publishes the committed messages and removes them from the table, on `client`: the
    /// connection the handler already holds (taking a second one from the pool while holding
    /// the first deadlocks a busy pool). A failure leaves them for [`sweep`]; the decision
    /// itself is already safe in Postgres.
    pub async fn publish(self, js: &JetStream, client: &impl GenericClient) {
        if self.rows.is_empty() {
            return;
        }
        let (done, _) = publish_rows(js, self.rows).await;
        delete_published(client, &done).await;
    }
}

/// Publishes `rows` (messages with the id of their row) in order: returns the ids of the rows
/// whose every message the stream took (or that can never go and was dead-lettered,
/// [`unpublishable`]), and the messages of the other rows, in order, to try again (a message
/// of such a row that went out goes again: the stream keeps one, by its `Nats-Msg-Id`).
/// Each failure is logged.
async fn publish_rows(
    js: &JetStream,
    rows: Vec<(i64, Pending)>,
) -> (Vec<i64>, Vec<(i64, Pending)>) {
    let outgoing: Vec<bus::Outgoing> = rows.iter().map(|(_, p)| p.outgoing()).collect();
    let results = bus::publish_all(js, &outgoing).await;
    let mut failed_rows: Vec<i64> = Vec::new();
    for ((id, pending), result) in rows.iter().zip(results) {
        match result {
            Ok(()) => {}
            Err(e) if unpublishable(js, *id, pending, &e).await => {}
            Err(e) => {
                tracing::warn!(
                    msg_id = pending.msg_id,
                    "outbox publish not acknowledged (tried again, else by the sweeper): {e:#}"
                );
                if !failed_rows.contains(id) {
                    failed_rows.push(*id);
                }
            }
        }
    }
    let mut done: Vec<i64> = Vec::new();
    let mut again = Vec::new();
    for (id, pending) in rows {
        if failed_rows.contains(&id) {
            again.push((id, pending));
        } else if done.last() != Some(&id) && !done.contains(&id) {
            done.push(id);
        }
    }
    (done, again)
}

/// [`delete`]s published rows; a failure only means the sweeper sends them again.
async fn delete_published(client: &impl GenericClient, ids: &[i64]) {
    if let Err(e) = delete(client, ids).await {
        tracing::warn!("outbox rows published but not deleted (the sweeper will re-send them, deduplicated): {e:#}");
    }
}

/// `fl.<tenant>.<kind>`: the lane of a subject (the whole subject where it is not ours).
pub(crate) fn lane_of(subject: &str) -> String {
    match crate::subjects::split(subject) {
        Some((tenant, kind, _)) => format!("fl.{tenant}.{kind}"),
        None => subject.to_owned(),
    }
}

impl Pending {
    fn outgoing(&self) -> bus::Outgoing {
        let mut headers = HeaderMap::new();
        if let Some(tp) = &self.traceparent {
            headers.insert("traceparent", tp.as_str());
        }
        bus::Outgoing {
            subject: self.subject.clone(),
            msg_id: self.msg_id.clone(),
            headers,
            payload: self.payload.clone(),
        }
    }
}

/// A staged message the server refuses for its size (beyond `max_payload`: a reply built
/// from a huge text, say) never goes out, however often it is tried: it is dead-lettered
/// (`fl.<tenant>.deadletter.outbox`, cut to fit) instead, so that the row can go. True when
/// that is done; false for any other failure, which is tried again.
async fn unpublishable(js: &JetStream, id: i64, pending: &Pending, e: &anyhow::Error) -> bool {
    if !bus::is_too_large(e) {
        return false;
    }
    let original = bus::dead_letter::Original {
        subject: &pending.subject,
        headers: None,
        payload: &pending.payload,
        stream_sequence: id as u64,
    };
    let reason = format!("too large to publish: {e:#}");
    match bus::dead_letter::dead_letter_of(js, "outbox", "outbox", original, 1, &reason).await {
        Ok(()) => {
            tracing::warn!(msg_id = pending.msg_id, "{reason}; dead-lettered");
            true
        }
        Err(e) => {
            tracing::warn!(
                msg_id = pending.msg_id,
                "dead-lettering an outbox message: {e:#}"
            );
            false
        }
    }
}

/// Removes published rows, in one round trip and without waiting for the WAL flush
/// (`synchronous_commit = off` for this transaction only). Losing the delete in a Postgres
/// crash only makes the sweeper publish those rows again, which the streams de-duplicate by
/// `Nats-Msg-Id` and every handler tolerates; waiting for a flush per batch cost as much as
/// the batch's own commit. A simple query, planned on every call: a prepared statement would
/// keep the plan made when the table was last seen empty (a sequential scan, `FL_DB_PLAN_CACHE_MODE`),
/// and the table, rows written and deleted all day, is seldom as small as it was then
/// (1.3 ms a call instead of 0.02, docs/benchmarks.md).
async fn delete(client: &impl GenericClient, ids: &[i64]) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let list = ids
        .iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(",");
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL synchronous_commit = off; DELETE FROM outbox WHERE id IN ({list}); COMMIT"
        ))
        .await?;
    Ok(())
}

/// Publishes rows older than `min_age` that no handler published (its process died, or NATS
/// was away). Rows are locked with `SKIP LOCKED`, so several workers can sweep at once.
pub async fn sweep_once(js: &JetStream, pool: &Pool, min_age: Duration) -> anyhow::Result<usize> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT id, subjects, msg_ids, payloads, traceparents FROM outbox
             WHERE created_at < now() - make_interval(secs => $1)
             ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED",
            &[&min_age.as_secs_f64()],
        )
        .await?;
    let mut messages: Vec<(i64, Pending)> = Vec::new();
    for row in &rows {
        let id: i64 = row.get(0);
        let subjects: Vec<String> = row.get(1);
        let msg_ids: Vec<String> = row.get(2);
        let payloads: Vec<Vec<u8>> = row.get(3);
        let traces: Vec<Option<String>> = row.get(4);
        for (((subject, msg_id), payload), traceparent) in
            subjects.into_iter().zip(msg_ids).zip(payloads).zip(traces)
        {
            let pending = Pending {
                subject,
                msg_id,
                payload: Bytes::from(payload),
                traceparent,
            };
            messages.push((id, pending));
        }
    }
    let (done, _) = publish_rows(js, messages).await;
    tx.execute("DELETE FROM outbox WHERE id = ANY($1)", &[&done])
        .await?;
    tx.commit().await?;
    Ok(done.len())
}

/// Runs [`sweep_once`] every `every` until shutdown.
pub async fn sweep(js: JetStream, pool: Pool, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match sweep_once(&js, &pool, every).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(published = n, "outbox sweep published stale messages"),
            Err(e) => tracing::warn!("outbox sweep failed: {e:#}"),
        }
    }
}

impl Outbox {
    /// Stages a notification for `agent`, delivered by the notifier on
    /// `fl.<tenant>.notify.<agent>`. `notification_id` must be fixed for a replayed decision.
    pub fn notify_agent(
        &mut self,
        tenant: &crate::domain::TenantId,
        agent: &crate::domain::AgentId,
        conversation_id: uuid::Uuid,
        notification_id: uuid::Uuid,
        kind: crate::wire::NotificationKind,
    ) {
        self.push(
            crate::subjects::delivery(tenant, "agent"),
            format!("delivery:{notification_id}"),
            &crate::wire::Delivery::ToAgent {
                version: crate::wire::Version,
                agent_id: agent.clone(),
                notification: crate::wire::AgentNotification {
                    version: crate::wire::Version,
                    notification_id,
                    conversation_id,
                    kind,
                },
            },
        );
    }

    /// Stages the `action_rejected` notification for an action `agent` may not take. Its id
    /// derives from the action's, so a redelivered action is refused once.
    pub fn reject_action(
        &mut self,
        tenant: &crate::domain::TenantId,
        agent: &crate::domain::AgentId,
        conversation_id: uuid::Uuid,
        action_id: uuid::Uuid,
        reason: &str,
    ) {
        self.notify_agent(
            tenant,
            agent,
            conversation_id,
            uuid::Uuid::new_v5(&action_id, b"rejected"),
            crate::wire::NotificationKind::ActionRejected {
                action_id,
                reason: reason.to_owned(),
            },
        );
    }
}
