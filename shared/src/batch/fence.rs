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
    /// Locks the marks of `partitions` for this transaction, in one statement and in the
    /// partitions' order. `Ok` with their fences if every mark is where its reader left it,
    /// so that the batch (each partition's messages read from right after its mark) continues
    /// them; `Err` with a partition whose mark moved (another reader moved it): the batch must
    /// not be committed.
    pub(super) async fn check(
        tx: &Transaction<'_>,
        partitions: &[Arc<Partition>],
    ) -> anyhow::Result<Result<Vec<Self>, Self>> {
        let names: Vec<&str> = partitions.iter().map(|p| p.consumer).collect();
        let stmt = tx.prepare_cached(LOCK_MARKS).await?;
        let rows = tx.query(&stmt, &[&names]).await?;
        let mut fences = Vec::with_capacity(partitions.len());
        for p in partitions {
            let fence = Self {
                partition: p.clone(),
            };
            let at = rows
                .iter()
                .find(|r| r.get::<_, &str>(0) == p.consumer)
                .map(|r| r.get::<_, i64>(1) as u64);
            if at != Some(p.mark()) {
                return Ok(Err(fence));
            }
            fences.push(fence);
        }
        Ok(Ok(fences))
    }

    /// Locks the mark (again, in a new transaction of the same batch): true while it is where
    /// this reader left it.
    pub(super) async fn lock(&self, tx: &Transaction<'_>) -> anyhow::Result<bool> {
        Ok(Self::check(tx, std::slice::from_ref(&self.partition))
            .await?
            .is_ok())
    }

    /// The mark as this reader left it.
    pub(super) fn mark(&self) -> u64 {
        self.partition.mark()
    }

    /// The mark after `handled` (the batch's messages from the first, handled): the last of
    /// this partition's.
    pub(super) fn moved<'a>(
        &self,
        handled: impl Iterator<Item = &'a Delivered>,
    ) -> (&'static str, u64) {
        let last = handled
            .filter(|m| {
                m.partition
                    .as_ref()
                    .is_some_and(|p| p.consumer == self.partition.consumer)
            })
            .map(|m| m.stream_sequence)
            .fold(self.mark(), u64::max);
        (self.partition.consumer, last)
    }
}

/// Keeps a committed mark for the partition's next batch ([`Partition::mark`]).
pub(super) fn remember(fence: &Fence, (_, sequence): (&'static str, u64)) {
    fence.partition.mark.store(sequence, Ordering::Relaxed);
}

/// The marks' rows locked in the order of their names: two transactions that lock some of the
/// same marks never wait for each other in a circle.
const LOCK_MARKS: &str = "SELECT consumer, stream_sequence FROM partition_marks
     WHERE consumer = ANY($1) ORDER BY consumer FOR UPDATE";

/// Prepares the mark's lock on the connection, so that, later, it goes out when first polled.
pub(super) async fn prepare_lock(tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    tx.prepare_cached(LOCK_MARKS).await.map(|_| ())
}
