-- One default for kb_min_score: the bot's knowledge-base scoring is tuned and tested against
-- 0.45 (workers/bot-router/src/kb.rs, DEFAULT_MIN_SCORE: relevant questions score from about
-- 0.46, off-topic ones below 0.3). Tenants created before keep the value they were given (0.5).
ALTER TABLE tenants ALTER COLUMN kb_min_score SET DEFAULT 0.45;
