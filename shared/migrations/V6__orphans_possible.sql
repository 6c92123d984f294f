-- Whether the tenant may have `assigning` conversations without an open offer (their offer
-- expired and nobody took them yet: SPEC D7, D8). Only an expiry makes one, and only the
-- dispatcher's pass, under the tenant's lock, expires offers, sets this and clears it again
-- once it has found none left (or offered all it found): so its passes look for them only
-- while some may exist. The look costs an index probe per assigning conversation, 2.6 ms a
-- pass at 1,500 messages/s in the e2e benchmark, and almost always finds none.
ALTER TABLE tenants ADD COLUMN orphans_possible boolean NOT NULL DEFAULT true;
