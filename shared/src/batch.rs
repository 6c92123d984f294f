//! A partition's batch in one transaction, for the workers that consume partitions in order
//! (ingest, bot-router; see [`crate::bus::consume_partitioned_batched`]).
//!
//! - Fast path: every message handled in the one transaction, without savepoints (two round
//!   trips and a subtransaction less per message). Messages with different keys (the customer,
//!   the conversation) are handled concurrently: their statements share the transaction's
//!   connection as one pipeline (tokio-postgres sends a statement without waiting for the
//!   answer to the one before), so Postgres and the worker wake up once per burst of
//!   statements instead of once per statement. Messages with the same key run one after the
//!   other, in the batch's order; what they publish is staged in the batch's order.
//! - Anything but a clean success (an error, or a message whose work is to be rolled back, such
//!   as a duplicate) rolls the batch back, and it runs again with a savepoint per message: a
//!   poison message is rolled back alone (the consume loop dead-letters it), and a transient
//!   failure stops the batch there (what follows is retried after it, in order).
//! - The outbox of everything kept is staged in the transaction and published after the commit.
//! - A batch of a batched partition (one with [`Delivered::partition`]) is kept only as far
//!   as it continues the partition: the transaction locks the partition's mark (the last
//!   stream sequence handled; its first statement, so the batch's own statements run after
//!   the lock is granted) and, meanwhile, asks the stream for the partition's next messages
//!   after it, while the fast path handles the batch. If the batch does not all continue
//!   them (an older message is still out with another instance, or lost in transit), it is
//!   rolled back and the slow path handles only the part before the first message that is
//!   not the next one; the rest fail with [`HandleError::out_of_order`], and the partition
//!   pauses until the older one comes again. The mark moves in the same transaction. So
//!   messages are committed in the partition's order whatever the server delivers to whom
//!   (README: Scaling out).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use deadpool_postgres::Transaction;
use futures::future::BoxFuture;
use tracing::Instrument;

use crate::bus::{self, Delivered, Partition};
use crate::outbox::Outbox;
use crate::worker::Services;
use crate::HandleError;

/// What handling one message gives: `Ok(Some(t))` keeps its work (and `t`, for the caller
/// after the commit), `Ok(None)` rolls its work back and keeps nothing.
pub type Step<'a, T> = BoxFuture<'a, Result<Option<T>, HandleError>>;

/// Handles `batch` in one transaction with `handle`, as the module says; `handle` gets `ctx`
/// (the worker's caches...) with each message, so that it need not borrow it. Returns a result
/// per message and the `T` of every message kept, once committed (none when the commit failed).
pub async fn in_one_transaction<C, T, K, H>(
    services: &Services,
    consumer: &'static str,
    batch: &[Delivered],
    ctx: &C,
    key: K,
    handle: H,
) -> (Vec<Result<(), HandleError>>, Vec<T>)
where
    C: ?Sized,
    K: Fn(&Delivered) -> Option<String>,
    H: for<'a> Fn(&'a C, &'a Transaction<'a>, &'a mut Outbox, &'a Delivered) -> Step<'a, T>,
{
    let all_failed = |e: &dyn std::fmt::Display| {
        let results = batch
            .iter()
            .map(|_| Err(HandleError::Transient(anyhow::anyhow!("{e}"))))
            .collect();
        (results, Vec::new())
    };
    let mut client = match services.pool.get().await {
        Ok(c) => c,
        Err(e) => return all_failed(&e),
    };
    let mut tx = match client.transaction().await {
        Ok(tx) => tx,
        Err(e) => return all_failed(&e),
    };
    let whole = batch;
    let partition = whole.first().and_then(|m| m.partition.clone());
    let mut fence: Option<Fence> = None;
    // What the slow path below handles: the whole batch, or the part that continues the mark.
    let mut batch = whole;
    if whole.len() > 1 || partition.is_some() {
        // Fast path: the whole batch while, for a batched partition, its mark is locked and the
        // stream asked. The lock is the connection's first statement, so Postgres runs the
        // batch's statements after it is granted; the batch is kept only if it all continues.
        if partition.is_some() {
            if let Err(e) = prepare_lock(&tx).await {
                return all_failed(&format!("partition mark: {e:#}"));
            }
        }
        let tx_ref = &tx;
        let handle = &handle;
        let checking = async {
            match &partition {
                Some(p) => Some(Fence::check(services, tx_ref, p.clone(), whole).await),
                None => None,
            }
        };
        let handling = in_lanes(lanes(whole, &key), |i| async move {
            let m = &whole[i];
            let mut own = Outbox::new();
            let span = bus::message_span(consumer, m);
            match handle(ctx, tx_ref, &mut own, m).instrument(span).await {
                Ok(Some(t)) => Ok((own, t)),
                _ => Err(()),
            }
        });
        // `futures::join!` polls in the order given: the lock is sent before the batch.
        let (checked, done) = futures::join!(checking, handling);
        match checked {
            Some(Ok(checked)) => fence = Some(checked),
            Some(Err(e)) => return all_failed(&format!("partition mark: {e:#}")),
            None => {}
        }
        let continues = fence.as_ref().map_or(whole.len(), |f| f.continues);
        if let (true, Ok(done)) = (continues == whole.len(), done) {
            let mut outbox = Outbox::new();
            let mut kept = Vec::with_capacity(whole.len());
            for (own, t) in done {
                outbox.append(own);
                kept.push(t);
            }
            let mark = fence.as_ref().map(|f| f.moved(whole.iter()));
            return match commit(tx, outbox, mark).await {
                Ok(staged) => {
                    remember(&fence, mark);
                    crate::metrics::batch_handled(consumer, "lanes");
                    staged.publish(&services.js, &client).await;
                    (whole.iter().map(|_| Ok(())).collect(), kept)
                }
                Err(e) => all_failed(&format!("batch not committed: {e:#}")),
            };
        }
        if let Err(e) = tx.rollback().await {
            return all_failed(&e);
        }
        batch = &whole[..continues];
        if batch.is_empty() {
            return (with_cut(Vec::new(), &fence, whole.len()), Vec::new());
        }
        tx = match client.transaction().await {
            Ok(tx) => tx,
            Err(e) => return all_failed(&e),
        };
        // The rollback let the mark go: take it again, as it was checked.
        if let Some(fence) = &fence {
            match fence.lock(&tx).await {
                Ok(mark) if mark == fence.locked => {}
                Ok(_) => return all_failed(&"the partition's mark moved meanwhile"),
                Err(e) => return all_failed(&format!("partition mark: {e:#}")),
            }
        }
    }
    let mut outbox = Outbox::new();
    let mut kept = Vec::new();
    let mut results: Vec<Result<(), HandleError>> = Vec::with_capacity(batch.len());
    let mut stopped = false;
    for m in batch {
        if stopped {
            results.push(Err(HandleError::Transient(anyhow::anyhow!(
                "an earlier message of this partition is retried first"
            ))));
            continue;
        }
        let span = bus::message_span(consumer, m);
        let result = async {
            let sp = tx.savepoint("m").await?;
            let mut own = Outbox::new();
            match handle(ctx, &sp, &mut own, m).await {
                Ok(Some(t)) => {
                    sp.commit().await?;
                    Ok(Some((own, t)))
                }
                Ok(None) => {
                    sp.rollback().await?;
                    Ok(None)
                }
                Err(e) => {
                    let _ = sp.rollback().await;
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await;
        match result {
            Ok(Some((own, t))) => {
                outbox.append(own);
                kept.push(t);
                results.push(Ok(()));
            }
            Ok(None) => results.push(Ok(())),
            Err(e) => {
                stopped = matches!(e, HandleError::Transient(_));
                results.push(Err(e));
            }
        }
    }
    // Settled: kept, rolled back as a duplicate, or poison (dead-lettered after the commit).
    let settled = batch
        .iter()
        .zip(&results)
        .filter(|(_, r)| !matches!(r, Err(HandleError::Transient(_))))
        .map(|(m, _)| m);
    let mark = fence.as_ref().map(|f| f.moved(settled));
    match commit(tx, outbox, mark).await {
        Ok(staged) => {
            remember(&fence, mark);
            crate::metrics::batch_handled(consumer, "one_by_one");
            staged.publish(&services.js, &client).await;
            (with_cut(results, &fence, whole.len()), kept)
        }
        Err(e) => {
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(HandleError::Transient(anyhow::anyhow!(
                    "batch not committed: {e:#}"
                )));
            }
            (with_cut(results, &fence, whole.len()), Vec::new())
        }
    }
}

/// The indexes of `items` grouped by `key`, each group in the items' order, the groups in the
/// order of their first item; an item without a key (one that does not decode: it fails
/// alone) is a group of its own. The lanes of [`in_one_transaction`], and of the dispatcher's
/// agent actions.
pub fn lanes<T, K: std::hash::Hash + Eq>(
    items: &[T],
    key: impl Fn(&T) -> Option<K>,
) -> Vec<Vec<usize>> {
    let mut lanes: Vec<Vec<usize>> = Vec::new();
    let mut by_key: std::collections::HashMap<K, usize> = std::collections::HashMap::new();
    for (i, item) in items.iter().enumerate() {
        match key(item) {
            Some(k) => match by_key.entry(k) {
                std::collections::hash_map::Entry::Occupied(e) => lanes[*e.get()].push(i),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(lanes.len());
                    lanes.push(vec![i]);
                }
            },
            None => lanes.push(vec![i]),
        }
    }
    lanes
}

/// Runs `step` for every index of `lanes`: the lanes side by side (on one transaction, their
/// statements pipelined), each lane's indexes one after the other, a lane stopping at its
/// first error. The outputs in index order, as if run one by one; or every lane's error.
pub async fn in_lanes<T, E, F, Fut>(lanes: Vec<Vec<usize>>, step: F) -> Result<Vec<T>, Vec<E>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let step = &step;
    let done = futures::future::join_all(lanes.into_iter().map(|lane| async move {
        let mut out = Vec::with_capacity(lane.len());
        for i in lane {
            out.push((i, step(i).await?));
        }
        Ok(out)
    }))
    .await;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for lane in done {
        match lane {
            Ok(o) => out.extend(o),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, t)| t).collect())
}

/// Lookups shared by a batch's messages: the first message that needs a key's value reads it
/// (in the batch's transaction), the others, in the same lane or another, wait for that read
/// and take its answer. Settings read once per batch rather than once per message: a batch is
/// handled as of one moment, and the statements saved were a third of a message's.
pub struct Memo<K, V> {
    cells: std::sync::Mutex<std::collections::HashMap<K, Arc<tokio::sync::OnceCell<V>>>>,
}

impl<K, V> Default for Memo<K, V> {
    fn default() -> Self {
        Self {
            cells: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl<K: std::hash::Hash + Eq, V: Clone> Memo<K, V> {
    /// `key`'s value: read by `read` the first time; a failed read is not remembered.
    pub async fn get<E, F, Fut>(&self, key: K, read: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<V, E>>,
    {
        let cell = self
            .cells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        cell.get_or_try_init(read).await.cloned()
    }
}

async fn commit(
    tx: Transaction<'_>,
    outbox: Outbox,
    mark: Option<(&'static str, u64)>,
) -> anyhow::Result<crate::outbox::Staged> {
    let staged = outbox.stage(&tx).await?;
    if let Some((consumer, sequence)) = mark {
        let stmt = tx
            .prepare_cached("UPDATE partition_marks SET stream_sequence = $2 WHERE consumer = $1")
            .await?;
        tx.execute(&stmt, &[&consumer, &(sequence as i64)]).await?;
    }
    tx.commit().await?;
    Ok(staged)
}

/// A batch of a batched partition against the partition's mark (see the module).
struct Fence {
    partition: Arc<Partition>,
    /// The mark as locked.
    locked: u64,
    /// Every message of the partition up to this stream sequence is handled (the mark, or
    /// the ack floor when that is ahead).
    mark: u64,
    /// How many of the batch's messages, from the first, continue the partition.
    continues: usize,
    /// The message the rest wait for, when not all continue.
    waits_for: Option<u64>,
}

impl Fence {
    /// Locks the partition's mark for this transaction and finds how far `batch` continues
    /// the partition after it. A mark behind the consumer's ack floor (the partition was
    /// consumed one message at a time before, with no mark) is taken up to the floor: every
    /// message up to it is acknowledged, so handled or dead-lettered.
    async fn check(
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
    async fn lock(&self, tx: &Transaction<'_>) -> anyhow::Result<u64> {
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
    fn moved<'a>(&self, settled: impl Iterator<Item = &'a Delivered>) -> (&'static str, u64) {
        let last = settled.map(|m| m.stream_sequence).fold(self.mark, u64::max);
        (self.partition.consumer, last)
    }
}

/// `results` of the part of a batch that was handled, followed by those of the messages after
/// the cut, which wait for the older one.
fn with_cut(
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
fn remember(fence: &Option<Fence>, mark: Option<(&'static str, u64)>) {
    if let (Some(fence), Some((_, sequence))) = (fence, mark) {
        fence.partition.last_mark.store(sequence, Ordering::Relaxed);
    }
}

const LOCK_MARK: &str = "INSERT INTO partition_marks (consumer, stream_sequence) VALUES ($1, 0)
     ON CONFLICT (consumer) DO UPDATE SET stream_sequence = partition_marks.stream_sequence
     RETURNING stream_sequence";

/// Prepares the mark's lock on the connection, so that, later, it goes out when first polled.
async fn prepare_lock(tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
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
    use super::{continuing, in_lanes, lanes, Memo};
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

    #[test]
    fn lanes_keep_each_keys_order_and_put_keyless_items_alone() {
        let items = ["a1", "b1", "x", "a2", "x", "b2", "a3"];
        let key = |s: &&str| (!s.starts_with('x')).then(|| s.as_bytes()[0]);
        assert_eq!(
            lanes(&items, key),
            vec![vec![0, 3, 6], vec![1, 5], vec![2], vec![4]]
        );
    }

    #[tokio::test]
    async fn in_lanes_returns_outputs_in_index_order_or_every_lanes_error() {
        let lanes = vec![vec![1, 3], vec![0, 2]];
        let out: Result<Vec<usize>, Vec<usize>> =
            in_lanes(lanes.clone(), |i| async move { Ok(i * 10) }).await;
        assert_eq!(out, Ok(vec![0, 10, 20, 30]));
        // Each lane stops at its first error; index 3 is never run after 1 failed.
        let ran = std::sync::Mutex::new(Vec::new());
        let out: Result<Vec<usize>, Vec<usize>> = in_lanes(lanes, |i| {
            ran.lock().unwrap().push(i);
            async move {
                if i == 1 || i == 2 {
                    Err(i)
                } else {
                    Ok(i)
                }
            }
        })
        .await;
        assert_eq!(out, Err(vec![1, 2]));
        assert!(!ran.lock().unwrap().contains(&3));
    }

    #[tokio::test]
    async fn a_memo_reads_a_key_once_for_concurrent_askers_and_forgets_a_failed_read() {
        let memo: Memo<&str, u32> = Memo::default();
        let reads = std::sync::atomic::AtomicU32::new(0);
        let read = |v: u32| {
            let reads = &reads;
            move || async move {
                reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::task::yield_now().await;
                Ok::<_, ()>(v)
            }
        };
        let got = futures::future::join_all((0..5).map(|i| memo.get("a", read(i)))).await;
        // The first asker read; the others, side by side, waited for its answer.
        assert_eq!(got, vec![Ok(0); 5]);
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(memo.get("b", read(7)).await, Ok(7));
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
        // A failed read is not kept: the next asker reads again.
        assert_eq!(
            memo.get("c", || async { Err::<u32, _>("down") }).await,
            Err("down")
        );
        assert_eq!(memo.get("c", read(9)).await, Ok(9));
    }
}
