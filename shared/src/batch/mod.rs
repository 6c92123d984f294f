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
//! - A batch of a held partition (one with [`Delivered::partition`]) is committed only if the
//!   partition's mark is where its reader left it: the transaction's first statement locks the
//!   mark's row (so the batch's own statements run after the lock is granted) and checks it; the mark moves in the same transaction, over
//!   the messages handled from the first on (a poison message stops it: the reader moves it
//!   on once the dead letter is out). A batch that fails the check changes nothing; its
//!   messages fail with [`HandleError::out_of_order`] and the reader ends (docs/ordering.md).
//! - A batch may hold the batches of several partitions (group commit, `partitions::combine`):
//!   the first statement locks every partition's mark (in the partitions' order, so that two
//!   transactions never wait for each other's marks), each is checked and moved. Only the fast
//!   path runs such a batch: anything but a clean success splits it, and each partition's
//!   messages then run as a batch of their own, as above.

mod fence;
mod lanes;

use std::sync::Arc;

use deadpool_postgres::Transaction;
use futures::future::BoxFuture;
use tracing::Instrument;

use crate::bus::{self, Delivered, Partition};
use crate::outbox::Outbox;
use crate::worker::Services;
use crate::HandleError;
use fence::{prepare_lock, remember, Fence};
pub use lanes::{in_lanes, lanes, Memo};

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
    let mut client = match services.pool.get().await {
        Ok(c) => c,
        Err(e) => return all_failed(batch, e.into()),
    };
    let run = Run {
        services,
        consumer,
        ctx,
        handle: &handle,
    };
    let partitions = partitions_of(batch);
    if partitions.len() < 2 {
        return run
            .single(&mut client, batch, partitions.first().cloned(), &key)
            .await;
    }
    if let Whole::Done(done) = run.whole(&mut client, batch, &partitions, &key).await {
        return done;
    }
    // Split: each partition's messages as a batch of their own, in the order they came.
    crate::metrics::batch_handled(consumer, "split");
    let mut results: Vec<Option<Result<(), HandleError>>> = vec![None; batch.len()];
    let mut kept = Vec::new();
    for p in partitions {
        let (at, part): (Vec<usize>, Vec<Delivered>) = batch
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                m.partition
                    .as_ref()
                    .is_some_and(|q| q.consumer == p.consumer)
            })
            .map(|(i, m)| (i, m.clone()))
            .unzip();
        let (rs, ts) = run.single(&mut client, &part, Some(p), &key).await;
        for (i, r) in at.into_iter().zip(rs) {
            results[i] = Some(r);
        }
        kept.extend(ts);
    }
    let results = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(HandleError::transient("not handled"))))
        .collect();
    (results, kept)
}

/// The distinct partitions of `batch`'s messages, in the order of their names.
fn partitions_of(batch: &[Delivered]) -> Vec<Arc<Partition>> {
    let mut partitions: Vec<Arc<Partition>> = Vec::new();
    for p in batch.iter().filter_map(|m| m.partition.as_ref()) {
        if !partitions.iter().any(|q| q.consumer == p.consumer) {
            partitions.push(p.clone());
        }
    }
    partitions.sort_by_key(|p| p.consumer);
    partitions
}

fn all_failed<T>(batch: &[Delivered], e: HandleError) -> (Vec<Result<(), HandleError>>, Vec<T>) {
    (batch.iter().map(|_| Err(e.clone())).collect(), Vec::new())
}

/// One batch's run: the worker's handler and what it needs.
struct Run<'r, C: ?Sized, H> {
    services: &'r Services,
    consumer: &'static str,
    ctx: &'r C,
    handle: &'r H,
}

/// How the fast path ended.
enum Whole<T> {
    /// Committed: every message handled.
    Done((Vec<Result<(), HandleError>>, Vec<T>)),
    /// Nothing kept, for a reason every message shares.
    Failed(HandleError),
    /// Not committed: this instance no longer holds the partition, or its mark is not at
    /// this (where the reader left it).
    Fenced(u64),
    /// Rolled back (a message failed or was not to be kept): to be handled one by one, with
    /// the partition's mark as checked.
    OneByOne(Vec<Fence>),
}

impl<C: ?Sized, H> Run<'_, C, H> {
    /// One partition's batch (or messages of no partition): the fast path, and the slow one
    /// if it does not succeed.
    async fn single<T, K>(
        &self,
        client: &mut deadpool_postgres::Object,
        batch: &[Delivered],
        partition: Option<Arc<Partition>>,
        key: &K,
    ) -> (Vec<Result<(), HandleError>>, Vec<T>)
    where
        K: Fn(&Delivered) -> Option<String>,
        H: for<'a> Fn(&'a C, &'a Transaction<'a>, &'a mut Outbox, &'a Delivered) -> Step<'a, T>,
    {
        let fenced = |mark: u64| all_failed(batch, HandleError::out_of_order(mark + 1));
        let partitions: Vec<Arc<Partition>> = partition.into_iter().collect();
        let fence = if batch.len() > 1 || !partitions.is_empty() {
            match self.whole(client, batch, &partitions, key).await {
                Whole::Done(done) => return done,
                Whole::Failed(e) => return all_failed(batch, e),
                Whole::Fenced(mark) => return fenced(mark),
                Whole::OneByOne(fences) => fences.into_iter().next(),
            }
        } else {
            None
        };
        self.one_by_one(client, batch, &fence).await
    }

    /// The fast path: the whole batch in lanes (one per key) on one transaction, while the
    /// marks of its partitions are locked and checked. The lock is the connection's first
    /// statement, so Postgres runs the batch's statements after it is granted; the batch is
    /// kept only if every check passes and every message is kept.
    async fn whole<T, K>(
        &self,
        client: &mut deadpool_postgres::Object,
        batch: &[Delivered],
        partitions: &[Arc<Partition>],
        key: &K,
    ) -> Whole<T>
    where
        K: Fn(&Delivered) -> Option<String>,
        H: for<'a> Fn(&'a C, &'a Transaction<'a>, &'a mut Outbox, &'a Delivered) -> Step<'a, T>,
    {
        let mark_failed = |e: &dyn std::fmt::Display| {
            Whole::Failed(HandleError::transient(format!("partition mark: {e:#}")))
        };
        let tx = match client.transaction().await {
            Ok(tx) => tx,
            Err(e) => return Whole::Failed(e.into()),
        };
        if !partitions.is_empty() {
            if let Err(e) = prepare_lock(&tx).await {
                return mark_failed(&e);
            }
        }
        let tx_ref = &tx;
        let checking = async {
            match partitions {
                [] => None,
                _ => Some(Fence::check(tx_ref, partitions).await),
            }
        };
        let handling = in_lanes(lanes(batch, key), |i| async move {
            let m = &batch[i];
            let mut own = Outbox::new();
            let span = bus::message_span(self.consumer, m);
            match (self.handle)(self.ctx, tx_ref, &mut own, m)
                .instrument(span)
                .await
            {
                Ok(Some(t)) => Ok((own, t)),
                _ => Err(()),
            }
        });
        // `futures::join!` polls in the order given: the lock is sent before the batch.
        let (checked, done) = futures::join!(checking, handling);
        let fences = match checked {
            Some(Ok(Ok(fences))) => fences,
            Some(Ok(Err(moved))) => {
                let _ = tx.rollback().await;
                return Whole::Fenced(moved.mark());
            }
            Some(Err(e)) => return mark_failed(&e),
            None => Vec::new(),
        };
        if let Ok(done) = done {
            let mut outbox = Outbox::new();
            let mut kept = Vec::with_capacity(batch.len());
            for (own, t) in done {
                outbox.append(own);
                kept.push(t);
            }
            let marks: Vec<_> = fences.iter().map(|f| f.moved(batch.iter())).collect();
            return match commit(tx, outbox, &marks).await {
                Ok(staged) => {
                    for (fence, mark) in fences.iter().zip(&marks) {
                        remember(fence, *mark);
                    }
                    crate::metrics::batch_handled(self.consumer, "lanes");
                    staged.publish(&self.services.js, &*client).await;
                    Whole::Done((batch.iter().map(|_| Ok(())).collect(), kept))
                }
                Err(e) => Whole::Failed(HandleError::transient(format!(
                    "batch not committed: {e:#}"
                ))),
            };
        }
        if let Err(e) = tx.rollback().await {
            return Whole::Failed(e.into());
        }
        Whole::OneByOne(fences)
    }

    /// The slow path: each message of `batch` in a savepoint of its own, so that a poison
    /// message is rolled back alone (the consume loop dead-letters it); a transient failure
    /// stops the batch there (what follows is retried after it, in order). The mark, if any,
    /// is locked and checked again first: the fast path's rollback let it go.
    async fn one_by_one<T>(
        &self,
        client: &mut deadpool_postgres::Object,
        batch: &[Delivered],
        fence: &Option<Fence>,
    ) -> (Vec<Result<(), HandleError>>, Vec<T>)
    where
        H: for<'a> Fn(&'a C, &'a Transaction<'a>, &'a mut Outbox, &'a Delivered) -> Step<'a, T>,
    {
        let mut tx = match client.transaction().await {
            Ok(tx) => tx,
            Err(e) => return all_failed(batch, e.into()),
        };
        if let Some(fence) = fence {
            match fence.lock(&tx).await {
                Ok(true) => {}
                Ok(false) => {
                    return all_failed(batch, HandleError::out_of_order(fence.mark() + 1));
                }
                Err(e) => {
                    let e = HandleError::transient(format!("partition mark: {e:#}"));
                    return all_failed(batch, e);
                }
            }
        }
        let mut outbox = Outbox::new();
        let mut kept = Vec::new();
        let mut results: Vec<Result<(), HandleError>> = Vec::with_capacity(batch.len());
        for m in batch {
            if results
                .last()
                .is_some_and(|r| r.as_ref().is_err_and(HandleError::is_transient))
            {
                results.push(Err(HandleError::transient(
                    "an earlier message of this partition is retried first",
                )));
                continue;
            }
            results.push(match self.in_savepoint(&mut tx, m).await {
                Ok(Some((own, t))) => {
                    outbox.append(own);
                    kept.push(t);
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            });
        }
        // Handled from the first on: kept or rolled back as a duplicate. The mark stops before
        // a poison message: the reader moves it on once its dead letter is out.
        let handled = batch
            .iter()
            .zip(&results)
            .take_while(|(_, r)| r.is_ok())
            .map(|(m, _)| m);
        let marks: Vec<_> = fence.iter().map(|f| f.moved(handled.clone())).collect();
        match commit(tx, outbox, &marks).await {
            Ok(staged) => {
                if let (Some(fence), Some(mark)) = (fence, marks.first()) {
                    remember(fence, *mark);
                }
                crate::metrics::batch_handled(self.consumer, "one_by_one");
                staged.publish(&self.services.js, &*client).await;
                (results, kept)
            }
            Err(e) => {
                let failed = HandleError::transient(format!("batch not committed: {e:#}"));
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(failed.clone());
                }
                (results, Vec::new())
            }
        }
    }

    /// One message in a savepoint: its work and outbox kept (`Some`), rolled back as not to be
    /// kept (`None`), or rolled back with its error.
    async fn in_savepoint<T>(
        &self,
        tx: &mut Transaction<'_>,
        m: &Delivered,
    ) -> Result<Option<(Outbox, T)>, HandleError>
    where
        H: for<'a> Fn(&'a C, &'a Transaction<'a>, &'a mut Outbox, &'a Delivered) -> Step<'a, T>,
    {
        let span = bus::message_span(self.consumer, m);
        async {
            let sp = tx.savepoint("m").await?;
            let mut own = Outbox::new();
            match (self.handle)(self.ctx, &sp, &mut own, m).await {
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
        .await
    }
}

async fn commit(
    tx: Transaction<'_>,
    outbox: Outbox,
    marks: &[(&'static str, u64)],
) -> anyhow::Result<crate::outbox::Staged> {
    let staged = outbox.stage(&tx).await?;
    if !marks.is_empty() {
        let consumers: Vec<&str> = marks.iter().map(|(c, _)| *c).collect();
        let sequences: Vec<i64> = marks.iter().map(|(_, s)| *s as i64).collect();
        let stmt = tx
            .prepare_cached(
                "UPDATE partition_marks p SET stream_sequence = m.sequence
                 FROM unnest($1::text[], $2::bigint[]) AS m(consumer, sequence)
                 WHERE p.consumer = m.consumer",
            )
            .await?;
        tx.execute(&stmt, &[&consumers, &sequences]).await?;
    }
    tx.commit().await?;
    Ok(staged)
}
