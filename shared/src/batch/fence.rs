//! A batch of a held partition against the partition's mark in Postgres: the fence that keeps
//! each conversation in order, and each message handled once, whoever read the partition
//! before or reads it too (docs/ordering.md).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use deadpool_postgres::Transaction;

use crate::bus::{Delivered, Partition};

/// A batch of a held partition against the partition's mark (see the module).
pub(super) struct Fence {
    partition: Arc<Partition>,
}

impl Fence {
    /// Locks the partition's mark for this transaction. `Some` if the mark is where this
    /// reader left it, so that the batch (read from right after the mark) continues it; `None`
    /// if not (another reader moved it): the batch must not be committed.
    pub(super) async fn check(
        tx: &Transaction<'_>,
        partition: Arc<Partition>,
    ) -> anyhow::Result<Option<Self>> {
        let fence = Self { partition };
        Ok(fence.lock(tx).await?.then_some(fence))
    }

    /// Locks the mark (again, in a new transaction of the same batch): true while it is where
    /// this reader left it.
    pub(super) async fn lock(&self, tx: &Transaction<'_>) -> anyhow::Result<bool> {
        let stmt = tx.prepare_cached(LOCK_MARK).await?;
        let row = tx.query_opt(&stmt, &[&self.partition.consumer]).await?;
        Ok(row.is_some_and(|r| r.get::<_, i64>(0) as u64 == self.partition.mark()))
    }

    /// The mark as this reader left it.
    pub(super) fn mark(&self) -> u64 {
        self.partition.mark()
    }

    /// The mark after `handled` (the batch's messages from the first, handled).
    pub(super) fn moved<'a>(
        &self,
        handled: impl Iterator<Item = &'a Delivered>,
    ) -> (&'static str, u64) {
        let last = handled
            .map(|m| m.stream_sequence)
            .fold(self.mark(), u64::max);
        (self.partition.consumer, last)
    }
}

/// Keeps a committed mark for the partition's next batch ([`Partition::mark`]).
pub(super) fn remember(fence: &Option<Fence>, mark: Option<(&'static str, u64)>) {
    if let (Some(fence), Some((_, sequence))) = (fence, mark) {
        fence.partition.mark.store(sequence, Ordering::Relaxed);
    }
}

const LOCK_MARK: &str =
    "SELECT stream_sequence FROM partition_marks WHERE consumer = $1 FOR UPDATE";

/// Prepares the mark's lock on the connection, so that, later, it goes out when first polled.
pub(super) async fn prepare_lock(tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    tx.prepare_cached(LOCK_MARK).await.map(|_| ())
}
