-- Partitions are dealt over the live instances of a worker (docs/ordering.md): each instance
-- says it is alive here, and holds the partitions it reads by a lease. The lease is a row of its
-- own, apart from the partition's mark: renewing an instance's leases never waits for a batch
-- that holds its mark's row locked, nor a batch for a renewal. What keeps a partition's
-- messages in order and each once is the mark (a batch commits only if the mark is where its
-- reader left it); the lease only keeps two instances from reading one partition at once.
CREATE TABLE partition_leases (
    partition   text PRIMARY KEY,
    holder      text,
    lease_until timestamptz
);

-- The instances of each worker (`ingest`, `bot-router`) seen lately: alive while `seen_until`
-- is ahead. Each instance renews its row a few times per lease and removes it when it stops.
CREATE TABLE worker_instances (
    worker     text NOT NULL,
    instance   text NOT NULL,
    seen_until timestamptz NOT NULL,
    PRIMARY KEY (worker, instance)
);
