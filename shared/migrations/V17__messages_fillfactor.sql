-- Issue 22: the bot-router marks each customer message it handles (`bot_handled_at`, its
-- idempotency mark) moments after ingest inserted it. No index holds that column, so the new
-- row version can stay in the row's page (a HOT update: no new index entry in the message's
-- three indexes) if the page has room for it; at the default fillfactor (100) the page is full
-- by then and most updates wrote an entry in every index. Pages filled to 80 % keep room for
-- those versions (the old one is pruned once no transaction needs it). Pages written from now
-- on; older ones are as they were.
ALTER TABLE messages SET (fillfactor = 80);
