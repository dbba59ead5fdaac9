-- mailroom schema, version 4: leases that leave the indexes alone.
--
-- A claim used to lease a row by moving available_at, an indexed column:
-- every lease was then a non-HOT update, with a new entry in each of the
-- outbox's three indexes and dead entries for the key probe to walk. The
-- lease's end now lives in leased_until, which no index covers, and new
-- pages of the outbox are filled to 40%, so the new versions of all rows of
-- a page (each 24 bytes longer: lease and leased_until) fit on that page:
-- HOT updates, no index touched. That saves about a third of a claim's
-- database time, two fifths with ordering keys. The table is a queue, small
-- when the relay keeps up; the free space costs writers nothing measurable.
-- available_at keeps its meaning: due from (delayed delivery, retry
-- backoff).
ALTER TABLE mailroom_outbox ADD COLUMN IF NOT EXISTS leased_until timestamptz;
ALTER TABLE mailroom_outbox SET (fillfactor = 40);

-- Relays of earlier versions lease by available_at and do not read
-- leased_until, so next to a relay of this version they could claim a row it
-- has leased. This check rejects their claims (a lease without an end):
-- they fail with its name in the error, publish nothing and lose nothing
-- until they are upgraded. NOT VALID: rows such a relay leased before the
-- upgrade are left as they are and become due when their lease ends.
ALTER TABLE mailroom_outbox DROP CONSTRAINT IF EXISTS mailroom_outbox_lease_check;
ALTER TABLE mailroom_outbox ADD CONSTRAINT mailroom_outbox_lease_check
    CHECK (lease IS NULL OR leased_until IS NOT NULL) NOT VALID;
