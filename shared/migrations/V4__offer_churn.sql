-- Found with the end-to-end benchmark (pg_stat_user_indexes): `offers_open_by_deadline`
-- (deadline only) made the dispatcher's per-tenant "earliest open deadline" and "offers past
-- their deadline" walk every tenant's open offers and the dead entries that accepted offers
-- leave behind: about 1,100 index entries read per lookup, twenty lookups per offer.
CREATE INDEX offers_open_by_tenant_deadline ON offers (tenant_id, deadline) WHERE status = 'open';
DROP INDEX offers_open_by_deadline;

-- Offers and queued conversations change state within seconds of being written: vacuum them
-- early, so that partial indexes on open offers and queue states keep few dead entries.
ALTER TABLE offers SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 200,
                        autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE conversations SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 200,
                               autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);
