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

use deadpool_postgres::Transaction;
use futures::future::BoxFuture;
use tracing::Instrument;

use crate::bus::{self, Delivered};
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
    if batch.len() > 1 {
        let tx_ref = &tx;
        let handle = &handle;
        let done = in_lanes(lanes(batch, key), |i| async move {
            let m = &batch[i];
            let mut own = Outbox::new();
            let span = bus::message_span(consumer, m);
            match handle(ctx, tx_ref, &mut own, m).instrument(span).await {
                Ok(Some(t)) => Ok((own, t)),
                _ => Err(()),
            }
        })
        .await;
        if let Ok(done) = done {
            let mut outbox = Outbox::new();
            let mut kept = Vec::with_capacity(batch.len());
            for (own, t) in done {
                outbox.append(own);
                kept.push(t);
            }
            return match commit(tx, outbox).await {
                Ok(staged) => {
                    staged.publish(&services.js, &client).await;
                    (batch.iter().map(|_| Ok(())).collect(), kept)
                }
                Err(e) => all_failed(&format!("batch not committed: {e:#}")),
            };
        }
        if let Err(e) = tx.rollback().await {
            return all_failed(&e);
        }
        tx = match client.transaction().await {
            Ok(tx) => tx,
            Err(e) => return all_failed(&e),
        };
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
    match commit(tx, outbox).await {
        Ok(staged) => {
            staged.publish(&services.js, &client).await;
            (results, kept)
        }
        Err(e) => {
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(HandleError::Transient(anyhow::anyhow!(
                    "batch not committed: {e:#}"
                )));
            }
            (results, Vec::new())
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

async fn commit(tx: Transaction<'_>, outbox: Outbox) -> anyhow::Result<crate::outbox::Staged> {
    let staged = outbox.stage(&tx).await?;
    tx.commit().await?;
    Ok(staged)
}

#[cfg(test)]
mod tests {
    use super::{in_lanes, lanes};

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
}
