-- Issue 22: one outbox row per lane of a transaction (a lane: one tenant's messages of one
-- kind, `fl.<tenant>.<kind>`, one stream), holding that lane's messages in order, instead of
-- one row per message. An inbound message staged about four rows (its conversation's event,
-- the bot's work, the reply's delivery...), each inserted, then deleted once published: a
-- tuple, an index entry and their WAL each time; now a transaction writes a row per tenant and
-- kind it publishes to. The rows left over (normally none) become rows of one message each.
ALTER TABLE outbox RENAME COLUMN subject TO subjects;
ALTER TABLE outbox RENAME COLUMN msg_id TO msg_ids;
ALTER TABLE outbox RENAME COLUMN payload TO payloads;
ALTER TABLE outbox RENAME COLUMN traceparent TO traceparents;
ALTER TABLE outbox
    ALTER COLUMN subjects TYPE text[] USING ARRAY[subjects],
    ALTER COLUMN msg_ids TYPE text[] USING ARRAY[msg_ids],
    ALTER COLUMN payloads TYPE bytea[] USING ARRAY[payloads],
    ALTER COLUMN traceparents TYPE text[] USING ARRAY[traceparents];
ALTER TABLE outbox ALTER COLUMN traceparents SET NOT NULL;
ALTER TABLE outbox ADD CONSTRAINT outbox_one_length_per_row CHECK (
    cardinality(msg_ids) = cardinality(subjects)
    AND cardinality(payloads) = cardinality(subjects)
    AND cardinality(traceparents) = cardinality(subjects)
);
-- A row's payloads, several kilobytes together, are compressed on insert (TOAST): with lz4
-- where the server has it (Postgres 14 and later, built with it, as Debian's and the Docker
-- images are), several times cheaper in CPU than the default pglz; else pglz.
DO $$
BEGIN
    ALTER TABLE outbox ALTER COLUMN payloads SET COMPRESSION lz4;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'outbox.payloads keeps the default compression: %', SQLERRM;
END $$;
