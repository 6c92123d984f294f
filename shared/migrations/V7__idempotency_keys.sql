-- FIRST LINE routing: the HTTP API's Idempotency-Key for an agent's actions.

-- A key belongs to one tenant and one agent, and to the first request made with it (a hash of
-- the action, its conversation and its body): the same request again answers the same 202 and
-- is not applied twice, another request with the key is refused. Kept a day (the API deletes
-- older keys of the agent when it stores a new one).
CREATE TABLE api_idempotency_keys (
    tenant_id     text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    agent_id      text NOT NULL,
    key           uuid NOT NULL,
    request_hash  bytea NOT NULL,
    -- Set once the action is published; a retry before that publishes it again.
    published_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, agent_id, key)
);
