-- SPEC S2 (服務狀態): an agent's statuses take the product's names: ready (就緒), away (離開,
-- with a reason) and logged_out (登出), for what were not_ready and offline. Presence
-- messages of version 1 and the API still accept the old names and store the new ones
-- (shared/src/wire/presence.rs). Upgrade the dispatchers together with this migration: an
-- older dispatcher would write the old names, which the check below refuses.
ALTER TABLE agents DROP CONSTRAINT agents_status_check;
UPDATE agents SET status = CASE status WHEN 'not_ready' THEN 'away' WHEN 'offline' THEN 'logged_out' ELSE status END
 WHERE status IN ('not_ready', 'offline');
UPDATE agents SET status_reason = NULL WHERE status <> 'away';
ALTER TABLE agents
    ALTER COLUMN status SET DEFAULT 'logged_out',
    ADD CONSTRAINT agents_status_check CHECK (status IN ('ready', 'away', 'logged_out'));
