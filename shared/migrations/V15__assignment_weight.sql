-- SPEC D10 assignment weight (分派權重): every queued conversation has a weight >= 1, and the
-- queue is dispatched by score = weight x seconds since it was queued, highest first. It
-- replaces the first version's strict channel `priority` (higher first, whatever the wait).
--
-- A channel's weight is the default of its conversations; a bot flow's condition step may set
-- another (workers/bot-router/src/flow.rs). Migration: a channel's or a conversation's priority p
-- becomes the weight p + 1 (priority 0, the default, is weight 1; a priority-10 channel's
-- conversations, weight 11, go before ordinary ones that have waited less than 11 times as long);
-- negative priorities become 1.
ALTER TABLE channels
    ADD COLUMN weight integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000000);
UPDATE channels SET weight = greatest(1, least(priority, 999999) + 1) WHERE priority <> 0;

ALTER TABLE conversations
    ADD COLUMN weight integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000000);
UPDATE conversations SET weight = greatest(1, least(priority, 999999) + 1)
 WHERE priority <> 0 AND state <> 'completed';

-- The waiting queue by class (skill set, weight), each class in queue order: within a class the
-- score order is the queue order, so the dispatcher reads the distinct classes (a skip scan) and
-- the heads of the classes some ready agent can serve, and merges them by score.
DROP INDEX conversations_waiting_by_skills;
CREATE INDEX conversations_waiting_by_class
    ON conversations (tenant_id, required_skills, weight, queued_at, id) WHERE state = 'waiting';

ALTER TABLE channels DROP COLUMN priority;
ALTER TABLE conversations DROP COLUMN priority;
