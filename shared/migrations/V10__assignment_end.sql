-- An agent's actions on a conversation take effect in the order the agent sent them
-- (docs/dispatch.md, "An agent's actions in order"). The dispatcher applies them in FL_ACTIONS
-- order; when a redelivery comes out of order, a reply is judged by the conversation's state
-- at the reply's own stream sequence: these record where the last assignment ended (the
-- FL_ACTIONS stream sequence of the close or transfer that ended it) and whose it was.
ALTER TABLE conversations
    ADD COLUMN ended_agent text,
    ADD COLUMN ended_action_seq bigint;
