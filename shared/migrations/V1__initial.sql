-- FIRST LINE routing: the initial schema. SPEC rules are cited where the database enforces them.

CREATE TABLE tenants (
    id                      text PRIMARY KEY,
    name                    text NOT NULL,
    -- SPEC D8: how long an offer stands before it is re-dispatched (當指派專員未接應時).
    dispatch_cycle_seconds  integer NOT NULL DEFAULT 60 CHECK (dispatch_cycle_seconds BETWEEN 5 AND 86400),
    -- SPEC D1: at most this many open offers per agent (the seeds say 3).
    offer_limit             integer NOT NULL DEFAULT 3 CHECK (offer_limit BETWEEN 1 AND 50),
    -- SPEC L4: a customer message equal to one of these (trimmed, case-insensitive) hands over.
    handover_keywords       text[] NOT NULL DEFAULT ARRAY['轉真人', '真人', 'agent', 'human'],
    -- What the minimal bot answers to anything else, and when it hands over.
    bot_reply               text NOT NULL DEFAULT '您好，我是客服機器人。輸入「轉真人」由專員為您服務。Type "agent" to talk to a person.',
    handover_reply          text NOT NULL DEFAULT '正在為您轉接專員，請稍候。Connecting you to an agent, please wait.',
    created_at              timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE channels (
    tenant_id        text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id               text NOT NULL,
    kind             text NOT NULL DEFAULT 'webchat',
    name             text NOT NULL DEFAULT '',
    -- SPEC D4: skills a conversation of this channel requires by default.
    required_skills  text[] NOT NULL DEFAULT '{}',
    -- SPEC L2: new conversations go to the bot when true, else straight to waiting.
    bot_enabled      boolean NOT NULL DEFAULT true,
    -- SPEC D5 "unless a priority says otherwise": conversations of this channel are queued with it
    -- (higher first).
    priority         integer NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE customers (
    id            uuid PRIMARY KEY,
    tenant_id     text NOT NULL,
    channel_id    text NOT NULL,
    external_id   text NOT NULL,
    display_name  text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, channel_id) REFERENCES channels (tenant_id, id) ON DELETE CASCADE,
    UNIQUE (tenant_id, channel_id, external_id)
);

CREATE TABLE agents (
    tenant_id      text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id             text NOT NULL,
    display_name   text NOT NULL DEFAULT '',
    skills         text[] NOT NULL DEFAULT '{}',
    -- SPEC capacity (服務上限): conversations in processing at once.
    capacity       integer NOT NULL DEFAULT 10 CHECK (capacity BETWEEN 0 AND 1000),
    -- Presence (SPEC online/ready).
    status         text NOT NULL DEFAULT 'offline' CHECK (status IN ('ready', 'not_ready', 'offline')),
    status_reason  text,
    status_since   timestamptz NOT NULL DEFAULT now(),
    -- SPEC D5 tie-break: when the agent last received an offer or was made ready.
    idle_since     timestamptz NOT NULL DEFAULT now(),
    -- When the server received the last presence message applied: an older one redelivered
    -- late is ignored. (Not the stream sequence: it restarts if the stream is ever recreated.)
    presence_at    timestamptz NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE conversations (
    id               uuid PRIMARY KEY,
    tenant_id        text NOT NULL,
    channel_id       text NOT NULL,
    customer_id      uuid NOT NULL REFERENCES customers (id),
    state            text NOT NULL CHECK (state IN ('script', 'bot', 'waiting', 'assigning', 'processing', 'completed')),
    -- SPEC D4, sorted and lower-case. By default the channel's (and then kept equal to the
    -- channel's while skills_from_channel: an edit reaches it, SPEC D9); a flow or a transfer sets
    -- its own.
    required_skills  text[] NOT NULL DEFAULT '{}',
    skills_from_channel boolean NOT NULL DEFAULT true,
    priority         integer NOT NULL DEFAULT 0,
    -- Transfer (README): offered only to this agent when set; never to the excluded ones.
    target_agent     text,
    excluded_agents  text[] NOT NULL DEFAULT '{}',
    -- The agent serving it (processing) or who served it (completed).
    agent_id         text,
    closed_by        text,
    -- A timestamp per transition (SPEC S); the full history is in conversation_transitions.
    created_at       timestamptz NOT NULL DEFAULT now(),
    bot_at           timestamptz,
    queued_at        timestamptz,
    assigning_at     timestamptz,
    processing_at    timestamptz,
    completed_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, channel_id) REFERENCES channels (tenant_id, id) ON DELETE CASCADE,
    CHECK (state <> 'processing' OR agent_id IS NOT NULL),
    CHECK (state NOT IN ('waiting', 'assigning') OR queued_at IS NOT NULL)
);
-- SPEC L1/L9: at most one open conversation per customer (a customer is per channel), so two
-- first messages arriving at once make one conversation.
CREATE UNIQUE INDEX conversations_one_open_per_customer
    ON conversations (customer_id) WHERE state <> 'completed';
-- The waiting queue by skill group, each in dispatch order (SPEC D4, D5): the dispatcher reads
-- the distinct groups (a skip scan) and the heads of the groups some ready agent can serve.
CREATE INDEX conversations_waiting_by_skills
    ON conversations (tenant_id, required_skills, priority DESC, queued_at, id) WHERE state = 'waiting';
CREATE INDEX conversations_assigning
    ON conversations (tenant_id) WHERE state = 'assigning';
CREATE INDEX conversations_processing_by_agent
    ON conversations (tenant_id, agent_id) WHERE state = 'processing';

CREATE TABLE conversation_transitions (
    id               bigserial PRIMARY KEY,
    conversation_id  uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    from_state       text,
    to_state         text NOT NULL,
    agent_id         text,
    reason           text NOT NULL,
    -- When the statement ran (after any lock was taken), not when its transaction began.
    at               timestamptz NOT NULL DEFAULT statement_timestamp()
);
CREATE INDEX conversation_transitions_by_conversation ON conversation_transitions (conversation_id, id);

CREATE TABLE messages (
    id               uuid PRIMARY KEY,
    tenant_id        text NOT NULL,
    channel_id       text NOT NULL,
    conversation_id  uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    -- The gateway's message id for inbound messages; ours (agent action, bot) for the rest.
    external_id      text NOT NULL,
    author           text NOT NULL CHECK (author IN ('customer', 'bot', 'agent')),
    agent_id         text,
    body             text NOT NULL,
    -- What the handler did with an inbound message: bot, queued, stored, agent.
    routed_to        text,
    sent_at          timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- Inbound de-duplication (DESIGN.md): the same message published twice is stored once.
    UNIQUE (tenant_id, channel_id, external_id)
);
CREATE INDEX messages_by_conversation ON messages (conversation_id, created_at);

CREATE TABLE offers (
    id               uuid PRIMARY KEY,
    tenant_id        text NOT NULL,
    conversation_id  uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    agent_id         text NOT NULL,
    status           text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'accepted', 'declined', 'expired', 'revoked')),
    -- Offer times are taken when the statement runs (statement_timestamp()), after the tenant's
    -- lock is held, not at the transaction's start: so the history of one conversation's or one
    -- agent's offers is in the order the single writer made it.
    created_at       timestamptz NOT NULL DEFAULT statement_timestamp(),
    -- SPEC D8: created_at + the tenant's dispatch cycle.
    deadline         timestamptz NOT NULL,
    ended_at         timestamptz,
    end_reason       text,
    FOREIGN KEY (tenant_id, agent_id) REFERENCES agents (tenant_id, id) ON DELETE CASCADE,
    CHECK ((status = 'open') = (ended_at IS NULL))
);
-- A conversation is offered to one agent at a time, whatever any dispatcher instance believes.
CREATE UNIQUE INDEX offers_one_open_per_conversation ON offers (conversation_id) WHERE status = 'open';
CREATE INDEX offers_open_by_agent ON offers (tenant_id, agent_id) WHERE status = 'open';
CREATE INDEX offers_open_by_deadline ON offers (deadline) WHERE status = 'open';
CREATE INDEX offers_by_conversation ON offers (conversation_id, created_at);

-- SPEC D1, enforced by the database in the statement that writes the offers: after it, every
-- agent who got an open offer is ready and holds at most min(offer_limit, capacity - processing)
-- open offers. One check per statement (over its transition table), not per row, so a pass that
-- writes thousands of offers pays for it once.
CREATE FUNCTION offers_check_agent_limits() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT a.id, a.status, t.offer_limit, a.capacity,
           (SELECT count(*) FROM offers o
             WHERE o.tenant_id = a.tenant_id AND o.agent_id = a.id AND o.status = 'open') AS open_offers,
           (SELECT count(*) FROM conversations c
             WHERE c.tenant_id = a.tenant_id AND c.agent_id = a.id AND c.state = 'processing') AS serving
      INTO bad
      FROM (SELECT DISTINCT tenant_id, agent_id FROM new_offers WHERE status = 'open') n
      JOIN agents a ON a.tenant_id = n.tenant_id AND a.id = n.agent_id
      JOIN tenants t ON t.id = a.tenant_id
     WHERE a.status <> 'ready'
        OR (SELECT count(*) FROM offers o
             WHERE o.tenant_id = a.tenant_id AND o.agent_id = a.id AND o.status = 'open')
           > LEAST(t.offer_limit, a.capacity - (SELECT count(*) FROM conversations c
                    WHERE c.tenant_id = a.tenant_id AND c.agent_id = a.id AND c.state = 'processing'))
     LIMIT 1;
    IF FOUND THEN
        IF bad.status <> 'ready' THEN
            RAISE EXCEPTION 'SPEC D1: agent % is % and cannot be offered a conversation', bad.id, bad.status
                USING ERRCODE = 'check_violation';
        END IF;
        RAISE EXCEPTION 'SPEC D1: agent % would hold % open offers (limit %, capacity %, processing %)',
            bad.id, bad.open_offers, bad.offer_limit, bad.capacity, bad.serving
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER offers_check_agent_limits
    AFTER INSERT ON offers
    REFERENCING NEW TABLE AS new_offers
    FOR EACH STATEMENT EXECUTE FUNCTION offers_check_agent_limits();

-- Messages to publish after the transaction that decided them commits (transactional outbox).
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    subject      text NOT NULL,
    msg_id       text NOT NULL,
    payload      bytea NOT NULL,
    traceparent  text,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- SPEC D9: when a channel's required skills change, its open conversations that use the
-- channel's default take the new skills. A waiting one is dispatched under them at once; one
-- already offered keeps its offer until the offer's dispatch cycle ends, and is re-dispatched
-- under the new skills then.
CREATE FUNCTION channels_propagate_required_skills() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.required_skills IS DISTINCT FROM OLD.required_skills THEN
        UPDATE conversations SET required_skills = NEW.required_skills, updated_at = now()
        WHERE tenant_id = NEW.tenant_id AND channel_id = NEW.id AND skills_from_channel
          AND state IN ('script', 'bot', 'waiting', 'assigning');
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER channels_propagate_required_skills
    AFTER UPDATE OF required_skills ON channels
    FOR EACH ROW EXECUTE FUNCTION channels_propagate_required_skills();
