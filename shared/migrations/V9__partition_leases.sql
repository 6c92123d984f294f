-- Partitions are dealt over the live instances of a worker (docs/ordering.md): each instance
-- says it is alive here, and holds the partitions it reads by a lease on their mark's row. A
-- batch commits only while its instance is the partition's holder and the mark is where that
-- instance left it, so one partition is never handled by two instances at once.
ALTER TABLE partition_marks
    ADD COLUMN holder      text,
    ADD COLUMN lease_until timestamptz;

-- The instances of each worker (`ingest`, `bot-router`) seen lately: alive while `seen_until`
-- is ahead. Each instance renews its row a few times per lease and removes it when it stops.
CREATE TABLE worker_instances (
    worker     text NOT NULL,
    instance   text NOT NULL,
    seen_until timestamptz NOT NULL,
    PRIMARY KEY (worker, instance)
);
