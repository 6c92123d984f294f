//! Publishing committed outbox rows in the background, so that a transaction does not wait for
//! NATS: the dispatcher's tenant transactions hand their [`Staged`] rows here and go on with the
//! next batch (issue 21: while a stream's leader was being elected, each transaction waited for
//! its acks, and offers and accepts stopped for as long as the outage).
//!
//! The rows are published in the order they were handed in per lane, a lane being one tenant's
//! messages of one kind (`fl.<tenant>.<kind>...`, one kind a stream): a stream that takes nothing
//! holds up its own lane only, not the tenant's other streams. A row is deleted once its stream
//! has acknowledged it; one that is not is tried again, in order, until it is (or the worker
//! stops, which leaves it to [`super::sweep`]). A message the lane publishes twice (it and the
//! sweeper both) is stored once, by its `Nats-Msg-Id`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{delete_published, lane_of, Pending, Staged};
use crate::bus::JetStream;
use crate::worker::Services;

/// How many handed-in batches a lane holds before [`Publisher::hand`] waits: a stream that takes
/// nothing for long slows its producers down instead of filling the memory.
const LANE_DEPTH: usize = 1024;
/// How many rows a lane publishes in one [`bus::publish_all`].
const LANE_BATCH: usize = 512;
/// The pause before a lane tries again the rows its stream did not acknowledge.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// At shutdown, how long a lane goes on publishing what it holds before it leaves it to the
/// sweeper of the next start.
const DRAIN_PATIENCE: Duration = Duration::from_secs(5);

type Row = (i64, Pending);

/// The background publisher of one worker. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    services: Services,
    lanes: Arc<Mutex<HashMap<String, mpsc::Sender<Vec<Row>>>>>,
}

impl Publisher {
    /// Its lanes are tasks of `services` ([`Services::close`] waits for them to drain).
    pub fn new(services: Services) -> Self {
        Self {
            services,
            lanes: Arc::default(),
        }
    }

    /// Publishes `staged` (committed rows) in the background, after every row handed in before
    /// on the same lane. Waits only when a lane is full.
    pub async fn hand(&self, staged: Staged) {
        let mut by_lane: Vec<(String, Vec<Row>)> = Vec::new();
        for row in staged.rows {
            let lane = lane_of(&row.1.subject);
            match by_lane.iter_mut().find(|(l, _)| *l == lane) {
                Some((_, rows)) => rows.push(row),
                None => by_lane.push((lane, vec![row])),
            }
        }
        for (lane, rows) in by_lane {
            let sender = self.sender(&lane);
            if let Err(mpsc::error::SendError(rows)) = sender.send(rows).await {
                // The lane ended (the worker is stopping): the rows stay for the sweeper.
                tracing::debug!(lane, rows = rows.len(), "outbox lane closed");
            }
        }
    }

    fn sender(&self, lane: &str) -> mpsc::Sender<Vec<Row>> {
        let mut lanes = self.lanes.lock().expect("lanes lock");
        if let Some(sender) = lanes.get(lane) {
            return sender.clone();
        }
        let (sender, receiver) = mpsc::channel(LANE_DEPTH);
        self.services.spawn(run_lane(
            self.services.js.clone(),
            self.services.pool.clone(),
            receiver,
            self.services.stopping(),
        ));
        lanes.insert(lane.to_owned(), sender.clone());
        sender
    }
}

async fn run_lane(
    js: JetStream,
    pool: Pool,
    mut receiver: mpsc::Receiver<Vec<Row>>,
    stopping: CancellationToken,
) {
    let mut rows: Vec<Row> = Vec::new();
    loop {
        if rows.is_empty() {
            tokio::select! {
                handed = receiver.recv() => match handed {
                    Some(handed) => rows = handed,
                    None => return,
                },
                _ = stopping.cancelled() => break,
            }
        }
        while rows.len() < LANE_BATCH {
            match receiver.try_recv() {
                Ok(more) => rows.extend(more),
                Err(_) => break,
            }
        }
        rows = publish_rows(&js, &pool, rows).await;
        if !rows.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(RETRY_PAUSE) => {}
                _ = stopping.cancelled() => break,
            }
        }
    }
    // Stopping: what is held and what is still handed in gets a last, bounded try.
    receiver.close();
    let drain = async {
        while let Some(more) = receiver.recv().await {
            rows.extend(more);
        }
        while !rows.is_empty() {
            rows = publish_rows(&js, &pool, rows).await;
        }
    };
    if tokio::time::timeout(DRAIN_PATIENCE, drain).await.is_err() {
        tracing::warn!("outbox lane stopped with rows unpublished: the sweeper sends them");
    }
}

/// Publishes `rows` in order and deletes those the stream took (or that can never go and are
/// dead-lettered); returns the others, in order, to try again.
async fn publish_rows(js: &JetStream, pool: &Pool, rows: Vec<Row>) -> Vec<Row> {
    let (done, again) = super::publish_rows(js, rows).await;
    if !done.is_empty() {
        match pool.get().await {
            Ok(client) => delete_published(&client, &done).await,
            Err(e) => tracing::warn!("outbox rows published but not deleted (the sweeper will re-send them, deduplicated): {e:#}"),
        }
    }
    again
}

#[cfg(test)]
mod tests {
    use crate::outbox::lane_of;

    #[test]
    fn a_lane_is_one_tenants_one_kind_of_message() {
        assert_eq!(lane_of("fl.t1.delivery.agent"), "fl.t1.delivery");
        assert_eq!(lane_of("fl.t1.delivery.customer"), "fl.t1.delivery");
        assert_eq!(lane_of("fl.t1.events.conversation"), "fl.t1.events");
        assert_eq!(lane_of("fl.t2.delivery.agent"), "fl.t2.delivery");
        assert_eq!(lane_of("other"), "other");
    }
}
