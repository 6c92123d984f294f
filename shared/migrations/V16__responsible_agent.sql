-- SPEC D11 responsible agent (負責專員, 客戶分派). A customer (per channel) may have a
-- responsible agent, set through the API by hand or dealt out in turn from a list of agents.
-- With the tenant's `last_agent_responsible`, the last agent who served the customer counts
-- as responsible when none is set. The dispatcher offers the customer's queued conversation to
-- that agent first when they are ready with a free slot, else (or after one unaccepted
-- dispatch cycle) to any suitable agent (workers/dispatcher/src/plan.rs).
ALTER TABLE customers
    ADD COLUMN responsible_agent_id text,
    ADD COLUMN responsible_set_by   text CHECK (responsible_set_by IN ('api', 'dealt')),
    ADD COLUMN responsible_set_at   timestamptz,
    -- The agent who last accepted (or was transferred) one of the customer's conversations.
    ADD COLUMN last_served_by       text;

ALTER TABLE tenants
    ADD COLUMN last_agent_responsible boolean NOT NULL DEFAULT false;

-- The responsible agent of a queued conversation, taken from its customer (and the tenant's
-- setting) when it enters `waiting`, and kept in step by the API when a customer's responsible
-- agent changes. The dispatcher reads the waiting conversations of each agent with a free slot.
ALTER TABLE conversations ADD COLUMN responsible_agent text;
CREATE INDEX conversations_waiting_by_responsible
    ON conversations (tenant_id, responsible_agent, queued_at)
    WHERE state = 'waiting' AND responsible_agent IS NOT NULL;

CREATE FUNCTION conversations_take_responsible_agent() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.responsible_agent := (
        SELECT coalesce(cu.responsible_agent_id,
                        CASE WHEN t.last_agent_responsible THEN cu.last_served_by END)
          FROM customers cu JOIN tenants t ON t.id = cu.tenant_id
         WHERE cu.id = NEW.customer_id);
    RETURN NEW;
END $$;

CREATE TRIGGER conversations_responsible_on_insert
    BEFORE INSERT ON conversations
    FOR EACH ROW WHEN (NEW.state = 'waiting')
    EXECUTE FUNCTION conversations_take_responsible_agent();

CREATE TRIGGER conversations_responsible_on_queue
    BEFORE UPDATE OF state ON conversations
    FOR EACH ROW WHEN (NEW.state = 'waiting' AND OLD.state <> 'waiting')
    EXECUTE FUNCTION conversations_take_responsible_agent();

CREATE FUNCTION customers_remember_last_agent() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE customers SET last_served_by = NEW.agent_id
     WHERE id = NEW.customer_id AND last_served_by IS DISTINCT FROM NEW.agent_id;
    RETURN NULL;
END $$;

CREATE TRIGGER conversations_remember_last_agent
    AFTER UPDATE OF state, agent_id ON conversations
    FOR EACH ROW WHEN (NEW.state = 'processing' AND NEW.agent_id IS NOT NULL
                       AND (OLD.state <> 'processing' OR OLD.agent_id IS DISTINCT FROM NEW.agent_id))
    EXECUTE FUNCTION customers_remember_last_agent();
