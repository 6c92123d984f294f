-- FIRST LINE routing: the HTTP API (tokens and roles) and webhooks.

-- Per-tenant API tokens. Only a SHA-256 of the token is kept: the token itself is shown once,
-- when it is made. An agent token acts as that agent and sees only their conversations.
CREATE TABLE api_tokens (
    id            uuid PRIMARY KEY,
    tenant_id     text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    role          text NOT NULL CHECK (role IN ('admin', 'supervisor', 'agent')),
    agent_id      text,
    name          text NOT NULL DEFAULT '',
    token_hash    bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    FOREIGN KEY (tenant_id, agent_id) REFERENCES agents (tenant_id, id) ON DELETE CASCADE,
    CHECK ((role = 'agent') = (agent_id IS NOT NULL))
);

-- A tenant's webhook endpoints for conversation events.
CREATE TABLE webhooks (
    id           uuid PRIMARY KEY,
    tenant_id    text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url          text NOT NULL CHECK (url ~ '^https?://'),
    -- The HMAC-SHA256 key of the signature (shown to the admin once, when it is made).
    secret       text NOT NULL,
    -- Only events into these states (empty: every event).
    states       text[] NOT NULL DEFAULT '{}',
    description  text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_by_tenant ON webhooks (tenant_id);

-- One event for one endpoint: written when the event is consumed (the event stream's consumer
-- only inserts, so a slow endpoint never holds the pipeline), sent and retried by the sender.
CREATE TABLE webhook_deliveries (
    id               uuid PRIMARY KEY,
    webhook_id       uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    tenant_id        text NOT NULL,
    event_id         uuid NOT NULL,
    -- The exact body that is signed and sent.
    body             text NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    -- Due time of the next try; while a sender holds it, the end of its lease.
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_status      integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    ended_at         timestamptz,
    -- An event redelivered by the stream makes no second delivery.
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, created_at DESC);
