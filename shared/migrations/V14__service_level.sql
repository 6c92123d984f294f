-- SPEC SL (服務水平), and the customer's place in line (below). SL: the tenant's threshold T, and when each conversation was first accepted
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

-- The customer's place in line (shared/src/place_in_line.rs): the keywords a waiting
-- customer asks with, the two texts (with an estimate, {position} and {minutes}; without one,
-- {position}), and the recent accepts of a set of skills, for the estimate.
ALTER TABLE tenants
    ADD COLUMN queue_position_keywords text[] NOT NULL
        DEFAULT ARRAY['排第幾', '還要等多久', '等多久', 'queue position', 'how long'],
    ADD COLUMN queue_position_reply text NOT NULL
        DEFAULT '您目前排在第 {position} 位，預計約 {minutes} 分鐘後由專員為您服務。You are number {position} in line; an agent should be with you in about {minutes} min.',
    ADD COLUMN queue_position_reply_no_estimate text NOT NULL
        DEFAULT '您目前排在第 {position} 位，專員將盡快為您服務。You are number {position} in line; an agent will be with you as soon as possible.';
CREATE INDEX conversations_recent_accepts
    ON conversations (tenant_id, required_skills, accepted_at)
    WHERE accepted_at IS NOT NULL;
