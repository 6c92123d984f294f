//! A batch of an ordered partition against the partition's mark in Postgres: the fence that
//! keeps each conversation in order whatever the server delivers to whom (docs/ordering.md).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use deadpool_postgres::Transaction;

use crate::bus::{self, Delivered, Partition};
use crate::worker::Services;
use crate::HandleError;

/// A batch of a batched partition against the partition's mark (see the module).
pub(super) struct Fence {
    partition: Arc<Partition>,
    /// The mark as locked.
    pub(super) locked: u64,
    /// Every message of the partition up to this stream sequence is handled (the mark, or
    /// the ack floor when that is ahead).
    mark: u64,
    /// How many of the batch's messages, from the first, continue the partition.
    pub(super) continues: usize,
    /// The message the rest wait for, when not all continue.
    waits_for: Option<u64>,
}

impl Fence {
    /// Locks the partition's mark for this transaction and finds how far `batch` continues
    /// the partition after it. A mark behind the consumer's ack floor (the partition was
    /// consumed one message at a time before, with no mark) is taken up to the floor: every
    /// message up to it is acknowledged, so handled or dead-lettered.
    pub(super) async fn check(
        services: &Services,
        tx: &Transaction<'_>,
        partition: Arc<Partition>,
        batch: &[Delivered],
    ) -> anyhow::Result<Self> {
        let sequences: Vec<u64> = batch.iter().map(|m| m.stream_sequence).collect();
        // The stream is asked about the mark this instance last committed while the mark is
        // being locked: one round trip less in the usual case, where nobody else moved it.
        // Not before this instance has committed one (a question from sequence 1 would make
        // the server look through the whole stream, to be thrown away).
        let guess = partition.last_mark.load(Ordering::Relaxed);
        let speculate = async {
            match guess {
                0 => None,
                _ => Some(Self::against(services, &partition, guess, &sequences).await),
            }
        };
        let (locked, guessed) = futures::join!(lock_mark(tx, partition.consumer), speculate);
        let locked = locked?;
        let mark = locked;
        let verdict = match guessed {
            Some(Ok(verdict)) if mark == guess => {
                Self::with_floor(services, &partition, mark, &sequences, verdict).await
            }
            _ => Self::against_stream(services, &partition, mark, &sequences).await,
        };
        // NATS not answering (restarting, say) is no reason to count a delivery towards
        // dead-lettering: the partition pauses instead, as for a message it must wait for.
        let (mark, continues, waits_for) = match verdict {
            Ok(verdict) => verdict,
            Err(e) => {
                tracing::warn!(
                    consumer = partition.consumer,
                    "asking the stream for the partition's next messages failed: {e:#}"
                );
                (mark, 0, sequences.first().copied())
            }
        };
        Ok(Self {
            partition,
            locked,
            mark,
            continues,
            waits_for,
        })
    }

    /// The mark (taken up to the ack floor if that helps) and how far the batch continues it.
    async fn against_stream(
        services: &Services,
        partition: &Partition,
        mark: u64,
        sequences: &[u64],
    ) -> anyhow::Result<(u64, usize, Option<u64>)> {
        let verdict = Self::against(services, partition, mark, sequences).await?;
        Self::with_floor(services, partition, mark, sequences, verdict).await
    }

    /// `verdict` of the batch against `mark`; if it does not continue, against the ack floor
    /// when that is ahead of the mark.
    async fn with_floor(
        services: &Services,
        partition: &Partition,
        mark: u64,
        sequences: &[u64],
        (continues, waits_for): (usize, Option<u64>),
    ) -> anyhow::Result<(u64, usize, Option<u64>)> {
        if waits_for.is_none() {
            return Ok((mark, continues, waits_for));
        }
        let floor = bus::ack_floor(&services.js, partition).await?;
        if floor <= mark {
            return Ok((mark, continues, waits_for));
        }
        let (continues, waits_for) = Self::against(services, partition, floor, sequences).await?;
        Ok((floor, continues, waits_for))
    }

    /// Locks the mark again (in a new transaction of the same batch) and returns it.
    pub(super) async fn lock(&self, tx: &Transaction<'_>) -> anyhow::Result<u64> {
        lock_mark(tx, self.partition.consumer).await
    }

    async fn against(
        services: &Services,
        partition: &Partition,
        mark: u64,
        sequences: &[u64],
    ) -> anyhow::Result<(usize, Option<u64>)> {
        let newer = sequences.iter().filter(|&&s| s > mark).count();
        let next = bus::partition_sequences(&services.nats, partition, mark, newer).await?;
        Ok(continuing(mark, &next, sequences))
    }

    /// The mark after `settled` (messages of the batch, handled or dead-lettered).
    pub(super) fn moved<'a>(
        &self,
        settled: impl Iterator<Item = &'a Delivered>,
    ) -> (&'static str, u64) {
        let last = settled.map(|m| m.stream_sequence).fold(self.mark, u64::max);
        (self.partition.consumer, last)
    }
}

/// `results` of the part of a batch that was handled, followed by those of the messages after
/// the cut, which wait for the older one.
pub(super) fn with_cut(
    mut results: Vec<Result<(), HandleError>>,
    fence: &Option<Fence>,
    whole: usize,
) -> Vec<Result<(), HandleError>> {
    if let Some(Fence {
        waits_for: Some(expected),
        ..
    }) = fence
    {
        let handled = results.len();
        results.extend((handled..whole).map(|_| Err(HandleError::out_of_order(*expected))));
    }
    results
}

/// Keeps a committed mark for the partition's next batch ([`Partition::last_mark`]).
pub(super) fn remember(fence: &Option<Fence>, mark: Option<(&'static str, u64)>) {
    if let (Some(fence), Some((_, sequence))) = (fence, mark) {
        fence.partition.last_mark.store(sequence, Ordering::Relaxed);
    }
}

const LOCK_MARK: &str = "INSERT INTO partition_marks (consumer, stream_sequence) VALUES ($1, 0)
     ON CONFLICT (consumer) DO UPDATE SET stream_sequence = partition_marks.stream_sequence
     RETURNING stream_sequence";

/// Prepares the mark's lock on the connection, so that, later, it goes out when first polled.
pub(super) async fn prepare_lock(tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    tx.prepare_cached(LOCK_MARK).await.map(|_| ())
}

/// The partition's mark, created at 0 if there is none, locked until the transaction ends.
async fn lock_mark(tx: &Transaction<'_>, consumer: &str) -> anyhow::Result<u64> {
    let stmt = tx.prepare_cached(LOCK_MARK).await?;
    Ok(tx.query_one(&stmt, &[&consumer]).await?.get::<_, i64>(0) as u64)
}

/// How many of a batch's messages (`sequences`, in delivery order), from the first, continue
/// a partition handled up to `mark`, whose next messages are `next`: each one after the mark
/// (and after those before it in the batch) must be the partition's next one. One at or
/// before them was handled already (handling it again changes nothing). With the sequence
/// the first one that does not continue waits for.
pub fn continuing(mark: u64, next: &[u64], sequences: &[u64]) -> (usize, Option<u64>) {
    let mut done = mark;
    let mut next = next.iter();
    for (i, &sequence) in sequences.iter().enumerate() {
        if sequence <= done {
            continue;
        }
        match next.next() {
            Some(&expected) if expected == sequence => done = sequence,
            Some(&expected) => return (i, Some(expected)),
            // Not in the stream as the partition's next: wait for it to come again.
            None => return (i, Some(sequence)),
        }
    }
    (sequences.len(), None)
}

#[cfg(test)]
mod tests {
    use super::continuing;
    use proptest::prelude::*;

    #[test]
    fn a_batch_continues_its_partition_up_to_the_first_message_that_skips_one() {
        // The partition's messages are 3, 5, 8, 9 (other partitions have the rest).
        let next = [3, 5, 8, 9];
        assert_eq!(continuing(0, &next, &[3, 5, 8]), (3, None));
        assert_eq!(continuing(0, &next, &[5, 8]), (0, Some(3)));
        assert_eq!(continuing(0, &next, &[3, 8, 9]), (1, Some(5)));
        // At or before the mark, or repeated: handled already, no gap.
        assert_eq!(continuing(5, &[8, 9], &[3, 5, 8, 5, 8, 9]), (6, None));
        // Going back after a newer one was taken: the older one was not the next.
        assert_eq!(continuing(0, &next, &[3, 8, 5]), (1, Some(5)));
        // The stream does not know it as the partition's next: it waits for itself.
        assert_eq!(continuing(9, &[], &[12]), (0, Some(12)));
    }

    proptest! {
        /// Whatever a partition's batch holds (redeliveries, skips, repeats, any order), what
        /// it hands over continues the partition without a gap: the mark followed by exactly
        /// the partition's next messages, in order.
        #[test]
        fn what_continues_is_the_partition_in_order_without_a_gap(
            handled in 0usize..6,
            picks in proptest::collection::vec(0usize..12, 0..12),
        ) {
            let partition: Vec<u64> = (1..=12u64).map(|i| i * 2 + 1).collect();
            let mark = if handled == 0 { 0 } else { partition[handled - 1] };
            let next: Vec<u64> = partition[handled..].to_vec();
            let batch: Vec<u64> = picks.iter().map(|&i| partition[i]).collect();
            let (n, waits) = continuing(mark, &next, &batch);
            let mut committed: Vec<u64> = partition[..handled].to_vec();
            for &s in &batch[..n] {
                if !committed.contains(&s) {
                    committed.push(s);
                }
            }
            prop_assert_eq!(&committed[..], &partition[..committed.len()]);
            if n < batch.len() {
                prop_assert_eq!(waits, Some(partition[committed.len()]));
            } else {
                prop_assert_eq!(waits, None);
            }
        }
    }
}
