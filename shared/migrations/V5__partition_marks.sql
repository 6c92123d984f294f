-- The last stream sequence handled of each batched partition, by its consumer (`ingest-p3`,
-- `bot-router-p12`, ...). A batch is handled only if it continues its partition right after
-- this mark (README: Scaling out), checked and moved in the batch's own transaction, so a
-- conversation's messages are stored in order whatever the NATS server delivers to whom.
CREATE TABLE partition_marks (
    consumer        text PRIMARY KEY,
    stream_sequence bigint NOT NULL
);
