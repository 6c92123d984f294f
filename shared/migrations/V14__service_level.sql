-- SPEC SL (服務水平): the tenant's threshold T, and when each conversation was first accepted
-- by an agent (processing_at is the latest accept: a transfer and a second accept move it).
ALTER TABLE tenants
    ADD COLUMN service_level_seconds integer NOT NULL DEFAULT 20
        CHECK (service_level_seconds BETWEEN 1 AND 3600);

ALTER TABLE conversations ADD COLUMN accepted_at timestamptz;
UPDATE conversations c SET accepted_at = t.first
  FROM (SELECT conversation_id, min(at) AS first FROM conversation_transitions
         WHERE to_state = 'processing' GROUP BY conversation_id) t
 WHERE t.conversation_id = c.id;

-- A day's queued conversations of a tenant, read by an index-only scan
-- (workers/api/src/routes/service_level.rs).
CREATE INDEX conversations_service_level
    ON conversations (tenant_id, queued_at)
    INCLUDE (channel_id, accepted_at, completed_at)
    WHERE queued_at IS NOT NULL;
