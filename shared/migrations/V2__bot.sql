-- FIRST LINE routing: the bot (keyword replies, knowledge base, scripted flows, business hours,
-- satisfaction survey). SPEC L2-L5.

-- The bot's per-tenant settings. `bot_reply` (V1) is what the bot says when nothing matches.
ALTER TABLE tenants
    -- A knowledge-base article answers when its score (0..1) reaches this.
    ADD COLUMN kb_min_score real NOT NULL DEFAULT 0.5 CHECK (kb_min_score > 0 AND kb_min_score <= 1),
    -- Bumped by every change to keyword rules, articles or published flows: bot-router
    -- instances rebuild their in-memory matchers when it moves.
    ADD COLUMN bot_config_version bigint NOT NULL DEFAULT 0;

ALTER TABLE channels
    -- SPEC L2 (script): new conversations of the channel start in this flow (its latest
    -- published version) instead of the keyword/knowledge-base bot.
    ADD COLUMN welcome_flow text,
    -- The bot completes a conversation idle this long (no customer message); NULL: never.
    ADD COLUMN bot_idle_seconds integer DEFAULT 1800 CHECK (bot_idle_seconds IS NULL OR bot_idle_seconds >= 1),
    -- 營業時間: {timezone, weekly, closed_dates, closed_message, after_hours_handover}; NULL: always open.
    ADD COLUMN business_hours jsonb,
    -- 滿意度調查: {question, scale, thanks, window_minutes}; NULL: no survey.
    ADD COLUMN survey jsonb;

-- 關鍵字回應: matched in priority order (higher first, then id).
CREATE TABLE keyword_rules (
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          text NOT NULL,
    priority    integer NOT NULL DEFAULT 0,
    match_kind  text NOT NULL CHECK (match_kind IN ('exact', 'contains', 'regex')),
    pattern     text NOT NULL CHECK (pattern <> ''),
    -- Empty: every channel of the tenant.
    channels    text[] NOT NULL DEFAULT '{}',
    -- {text, buttons, image_url} or {flow}.
    reply       jsonb NOT NULL,
    PRIMARY KEY (tenant_id, id)
);

-- 知識庫.
CREATE TABLE kb_articles (
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          text NOT NULL,
    title       text NOT NULL,
    body        text NOT NULL,
    tags        text[] NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

-- 交談腳本: the draft is edited freely; publishing checks it and freezes it as a version
-- (草稿與發佈). A conversation keeps the version it started with.
CREATE TABLE flows (
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          text NOT NULL,
    name        text NOT NULL DEFAULT '',
    draft       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE TABLE flow_versions (
    tenant_id     text NOT NULL,
    flow_id       text NOT NULL,
    version       integer NOT NULL CHECK (version >= 1),
    definition    jsonb NOT NULL,
    published_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, flow_id, version),
    FOREIGN KEY (tenant_id, flow_id) REFERENCES flows (tenant_id, id) ON DELETE CASCADE
);

ALTER TABLE channels
    ADD FOREIGN KEY (tenant_id, welcome_flow) REFERENCES flows (tenant_id, id);

ALTER TABLE conversations
    -- The flow a conversation in `script` runs: its pinned version, the step it waits at, and
    -- the answers it kept ({"order_no": "A123"}).
    ADD COLUMN flow_id text,
    ADD COLUMN flow_version integer,
    ADD COLUMN flow_step text,
    ADD COLUMN flow_vars jsonb NOT NULL DEFAULT '{}',
    -- The last customer message the bot handled (or the conversation's start): idle completion.
    ADD COLUMN bot_active_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    -- 滿意度調查: when the rating question was sent, and the answer.
    ADD COLUMN survey_sent_at timestamptz,
    ADD COLUMN rating smallint,
    ADD COLUMN rated_at timestamptz;
CREATE INDEX conversations_bot_idle
    ON conversations (bot_active_at) WHERE state IN ('bot', 'script');
-- A customer's latest conversation (the survey answer finds the one it answers).
CREATE INDEX conversations_by_customer ON conversations (customer_id, created_at DESC);

-- A bot message with buttons or an image keeps them here ({buttons, image_url}).
ALTER TABLE messages ADD COLUMN attachments jsonb;
-- When the bot handled this customer message: each is answered once, whatever is redelivered.
ALTER TABLE messages ADD COLUMN bot_handled_at timestamptz;

-- Any change to a tenant's rules, articles or published flows moves its bot_config_version,
-- once per statement (a load of 10,000 articles bumps it once).
CREATE FUNCTION bump_bot_config() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE tenants SET bot_config_version = bot_config_version + 1
        WHERE id IN (SELECT DISTINCT tenant_id FROM old_rows);
    ELSE
        UPDATE tenants SET bot_config_version = bot_config_version + 1
        WHERE id IN (SELECT DISTINCT tenant_id FROM new_rows);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER keyword_rules_ins AFTER INSERT ON keyword_rules
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION bump_bot_config();
CREATE TRIGGER keyword_rules_upd AFTER UPDATE ON keyword_rules
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION bump_bot_config();
CREATE TRIGGER keyword_rules_del AFTER DELETE ON keyword_rules
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION bump_bot_config();
CREATE TRIGGER kb_articles_ins AFTER INSERT ON kb_articles
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION bump_bot_config();
CREATE TRIGGER kb_articles_upd AFTER UPDATE ON kb_articles
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION bump_bot_config();
CREATE TRIGGER kb_articles_del AFTER DELETE ON kb_articles
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION bump_bot_config();
CREATE TRIGGER flow_versions_ins AFTER INSERT ON flow_versions
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION bump_bot_config();
