//! Group commit over an instance's partitions: at most `FL_PARTITION_TRANSACTIONS`
//! transactions at once; the batches of other partitions that become ready meanwhile wait and
//! go together, as one batch, into the next ([`crate::batch::in_one_transaction`] fences and
//! moves each partition's mark in it, and splits it by partition again if it cannot commit it
//! whole). With many partitions each holding a message or two, what a transaction costs
//! Postgres (the marks, the outbox rows, the commit and its WAL flush) is paid once for many
//! partitions instead of once for each (issue 22: docs/benchmarks.md).
//!
//! The readers are futures of one task (the supervisor's): a reader's batch is queued, and
//! the first reader to find a free slot takes every queued batch, runs the handler on them
//! together, and hands each reader its results. Each partition's order is kept: a reader
//! queues its next batch only once its last one is settled.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::{oneshot, Semaphore};

use crate::bus::Delivered;
use crate::error::HandleError;

type Results = Vec<Result<(), HandleError>>;

/// Runs the handler on the batches of several partitions at once (see the module).
pub(super) struct Combiner<'a, F> {
    handler: &'a F,
    /// `None`: no combining, every batch its own transaction, as many at once as come.
    slots: Option<Semaphore>,
    /// The most messages one combined batch takes.
    max_messages: usize,
    queued: Mutex<Vec<(Vec<Delivered>, oneshot::Sender<Results>)>>,
}

impl<'a, F, Fut> Combiner<'a, F>
where
    F: Fn(Vec<Delivered>) -> Fut,
    Fut: Future<Output = Results>,
{
    /// `transactions`: the most at once (0: no combining); `max_messages`: the most messages
    /// one combined batch takes (a single partition's batch is never cut).
    pub(super) fn new(handler: &'a F, transactions: usize, max_messages: usize) -> Self {
        Self {
            handler,
            slots: (transactions > 0).then(|| Semaphore::new(transactions)),
            max_messages: max_messages.max(1),
            queued: Mutex::new(Vec::new()),
        }
    }

    /// Handles one partition's batch, with whatever other partitions' batches are queued.
    pub(super) async fn handle(&self, batch: Vec<Delivered>) -> Results {
        let Some(slots) = &self.slots else {
            return (self.handler)(batch).await;
        };
        let n = batch.len();
        let (tx, mut rx) = oneshot::channel();
        self.queued.lock().expect("queue").push((batch, tx));
        loop {
            let permit = tokio::select! {
                // Another reader's group took this batch and has settled it.
                out = &mut rx => return out.unwrap_or_else(|_| lost(n)),
                permit = slots.acquire() => permit.expect("never closed"),
            };
            let group = self.take();
            if group.is_empty() {
                // Taken by a group still running: wait for its results.
                drop(permit);
                return rx.await.unwrap_or_else(|_| lost(n));
            }
            self.run(group).await;
            drop(permit);
            if let Ok(out) = rx.try_recv() {
                return out;
            }
            // This reader ran a group without its own batch (queued after the group was
            // taken, over the size limit): go on to run or wait for the next.
        }
    }

    /// The queued batches, oldest first, up to `max_messages` (at least one batch).
    fn take(&self) -> Vec<(Vec<Delivered>, oneshot::Sender<Results>)> {
        let mut queued = self.queued.lock().expect("queue");
        let mut total = 0;
        let mut n = 0;
        for (batch, _) in queued.iter() {
            if n > 0 && total + batch.len() > self.max_messages {
                break;
            }
            total += batch.len();
            n += 1;
        }
        queued.drain(..n).collect()
    }

    /// One transaction for the group's batches; each reader gets its batch's results.
    async fn run(&self, group: Vec<(Vec<Delivered>, oneshot::Sender<Results>)>) {
        if group.len() > 1 {
            crate::metrics::batches_combined(group.len());
        }
        let lens: Vec<usize> = group.iter().map(|(b, _)| b.len()).collect();
        let mut senders = Vec::with_capacity(group.len());
        let mut all = Vec::with_capacity(lens.iter().sum());
        for (batch, tx) in group {
            all.extend(batch);
            senders.push(tx);
        }
        let total = all.len();
        let mut results = (self.handler)(all).await;
        results.resize_with(total, || {
            Err(HandleError::transient("the handler gave no result"))
        });
        let mut results = results.into_iter();
        for (len, tx) in lens.into_iter().zip(senders) {
            let _ = tx.send(results.by_ref().take(len).collect());
        }
    }
}

fn lost(n: usize) -> Results {
    (0..n)
        .map(|_| Err(HandleError::transient("the combined batch was dropped")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn delivered(sequence: u64) -> Delivered {
        Delivered {
            subject: "fl.t.inbound.c".into(),
            payload: bytes::Bytes::from_static(b"{}"),
            headers: None,
            stream_sequence: sequence,
            delivered: 1,
            published: chrono::Utc::now(),
            partition: None,
        }
    }

    /// Two transactions at once: while they run, the batches of three more partitions queue
    /// and go together into one; every reader gets the results of its own messages, in order.
    #[tokio::test]
    async fn batches_ready_together_share_one_handler_call_and_get_their_own_results() {
        let calls = RefCell::new(Vec::new());
        let handler = |batch: Vec<Delivered>| {
            let seqs: Vec<u64> = batch.iter().map(|m| m.stream_sequence).collect();
            calls.borrow_mut().push(seqs.clone());
            async move {
                tokio::task::yield_now().await;
                seqs.iter()
                    .map(|s| match s % 2 {
                        0 => Ok(()),
                        _ => Err(HandleError::poison(format!("odd {s}"))),
                    })
                    .collect()
            }
        };
        let combiner = Combiner::new(&handler, 2, 100);
        let batches: Vec<Vec<u64>> = vec![vec![1, 2], vec![10], vec![20, 21], vec![30], vec![40]];
        let outs = futures::future::join_all(batches.iter().map(|b| {
            let combiner = &combiner;
            async move {
                combiner
                    .handle(b.iter().map(|s| delivered(*s)).collect())
                    .await
            }
        }))
        .await;
        for (b, out) in batches.iter().zip(&outs) {
            let got: Vec<bool> = out.iter().map(Result::is_ok).collect();
            let want: Vec<bool> = b.iter().map(|s| s % 2 == 0).collect();
            assert_eq!(got, want, "batch {b:?}");
        }
        let calls = calls.into_inner();
        assert_eq!(
            calls.len(),
            3,
            "two at once, then the three queued together: {calls:?}"
        );
        assert_eq!(calls[2], vec![20, 21, 30, 40]);
    }

    /// A combined batch stops at the size limit (never cutting a partition's batch); the rest
    /// goes in the next.
    #[tokio::test]
    async fn a_group_takes_at_most_the_limit() {
        let calls = RefCell::new(Vec::new());
        let handler = |batch: Vec<Delivered>| {
            calls.borrow_mut().push(batch.len());
            async move {
                tokio::task::yield_now().await;
                batch.iter().map(|_| Ok(())).collect()
            }
        };
        let combiner = Combiner::new(&handler, 1, 4);
        let outs = futures::future::join_all((0..6).map(|i| {
            let combiner = &combiner;
            async move {
                combiner
                    .handle(vec![delivered(i), delivered(100 + i)])
                    .await
            }
        }))
        .await;
        assert!(outs
            .iter()
            .all(|o| o.len() == 2 && o.iter().all(Result::is_ok)));
        // The first alone (nothing else queued yet), then two batches of two to a group.
        assert_eq!(calls.into_inner(), vec![2, 4, 4, 2]);
    }

    /// Without combining (0), every batch is its own call.
    #[tokio::test]
    async fn zero_transactions_means_no_combining() {
        let calls = RefCell::new(0);
        let handler = |batch: Vec<Delivered>| {
            *calls.borrow_mut() += 1;
            async move { batch.iter().map(|_| Ok(())).collect() }
        };
        let combiner = Combiner::new(&handler, 0, 100);
        futures::future::join_all((0..4).map(|i| combiner.handle(vec![delivered(i)]))).await;
        assert_eq!(calls.into_inner(), 4);
    }
}
