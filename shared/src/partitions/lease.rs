//! The instances of a worker and their holds on partitions, in Postgres next to the marks
//! (`worker_instances`, `partition_leases`; migration V9). Times are the database's `now()`,
//! so the instances' clocks do not matter. A lease is a row apart from its partition's mark, so
//! that renewing never waits for a batch holding the mark's row, nor a batch for a renewal.

use std::time::Duration;

use deadpool_postgres::Pool;

/// One instance of one worker, as the lease statements know it.
#[derive(Clone, Debug)]
pub struct Member {
    /// `ingest`, `bot-router`.
    pub worker: &'static str,
    /// This process: unique per start.
    pub instance: String,
    pub lease: Duration,
}

impl Member {
    /// Says this instance is alive (for another lease) and returns the live instances of its
    /// worker, itself included.
    pub async fn heartbeat(&self, pool: &Pool) -> anyhow::Result<Vec<String>> {
        let client = pool.get().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO worker_instances (worker, instance, seen_until)
                 VALUES ($1, $2, now() + make_interval(secs => $3))
                 ON CONFLICT (worker, instance) DO UPDATE SET seen_until = excluded.seen_until",
            )
            .await?;
        client
            .execute(&stmt, &[&self.worker, &self.instance, &self.lease_secs()])
            .await?;
        let live = client
            .prepare_cached(
                "SELECT instance FROM worker_instances WHERE worker = $1 AND seen_until > now()",
            )
            .await?;
        Ok(client
            .query(&live, &[&self.worker])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Takes or renews the hold on each of `partitions` that is free, lapsed or this
    /// instance's already; returns those it now holds, with their marks as committed (a batch
    /// of the previous holder still in flight may move one: the new reader's first batch then
    /// finds the mark moved and starts again after it).
    pub async fn hold(
        &self,
        pool: &Pool,
        partitions: &[&str],
    ) -> anyhow::Result<Vec<(String, u64)>> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let client = pool.get().await?;
        let stmt = client
            .prepare_cached(
                "WITH held AS (
                     UPDATE partition_leases
                     SET holder = $2, lease_until = now() + make_interval(secs => $3)
                     WHERE partition = ANY($1)
                       AND (holder IS NULL OR holder = $2 OR lease_until < now())
                     RETURNING partition)
                 SELECT h.partition, m.stream_sequence
                 FROM held h JOIN partition_marks m ON m.consumer = h.partition",
            )
            .await?;
        let rows = client
            .query(&stmt, &[&partitions, &self.instance, &self.lease_secs()])
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    /// Lets go of `partitions` (those this instance holds), for another instance to take at
    /// once.
    pub async fn release(&self, pool: &Pool, partitions: &[&str]) -> anyhow::Result<()> {
        let client = pool.get().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE partition_leases SET holder = NULL, lease_until = NULL
                 WHERE partition = ANY($1) AND holder = $2",
            )
            .await?;
        client
            .execute(&stmt, &[&partitions, &self.instance])
            .await?;
        Ok(())
    }

    /// Leaves: no longer live, nothing held.
    pub async fn leave(&self, pool: &Pool) -> anyhow::Result<()> {
        let client = pool.get().await?;
        client
            .execute(
                "UPDATE partition_leases SET holder = NULL, lease_until = NULL WHERE holder = $1",
                &[&self.instance],
            )
            .await?;
        client
            .execute(
                "DELETE FROM worker_instances WHERE worker = $1 AND instance = $2",
                &[&self.worker, &self.instance],
            )
            .await?;
        Ok(())
    }

    fn lease_secs(&self) -> f64 {
        self.lease.as_secs_f64()
    }
}

/// Makes sure every partition of `names` has a mark, at `floors` (from the durable consumers
/// of a version before leases) where one is given and no mark is ahead of it, else at 0 (a
/// new partition: read from the stream's first message on). Removes instances not seen for an
/// hour.
pub async fn ensure_marks(
    pool: &Pool,
    names: &[String],
    floors: &[(String, u64)],
) -> anyhow::Result<()> {
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO partition_marks (consumer, stream_sequence)
             SELECT unnest($1::text[]), 0 ON CONFLICT (consumer) DO NOTHING",
            &[&names],
        )
        .await?;
    client
        .execute(
            "INSERT INTO partition_leases (partition) SELECT unnest($1::text[])
             ON CONFLICT (partition) DO NOTHING",
            &[&names],
        )
        .await?;
    for (name, floor) in floors {
        client
            .execute(
                "UPDATE partition_marks SET stream_sequence = $2
                 WHERE consumer = $1 AND stream_sequence < $2",
                &[name, &(*floor as i64)],
            )
            .await?;
    }
    client
        .execute(
            "DELETE FROM worker_instances WHERE seen_until < now() - interval '1 hour'",
            &[],
        )
        .await?;
    Ok(())
}
