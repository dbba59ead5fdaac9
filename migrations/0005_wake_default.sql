-- mailroom schema, version 5: the wake lock taken by a column default.
--
-- Version 3 took the wake lock (see version 3) in the WHEN condition of a
-- statement trigger. Firing a trigger costs every INSERT more than the lock:
-- PostgreSQL reads the WHEN expression back from the catalog and compiles
-- it at each statement. That was about a tenth of Add's cost in a minimal
-- business transaction. A column default is part of the INSERT's plan and
-- costs nothing of the sort, so the lock moves into the default of a new
-- column, notified:
--
--   false: the row's writer took the wake lock shared (no relay asleep);
--   true:  it could not, so its commit sends the NOTIFY that wakes the
--          sleeping relay.
--
-- The protocol is unchanged, and so are the relay's side and the writers'
-- statements: every INSERT that leaves out notified (outbox.Add, a
-- dead-letter replay, plain SQL, COPY) evaluates the default for each row.
-- The lock is taken once per transaction; each further row finds it in the
-- session's own lock table. The CASE fixes the order: the NOTIFY only when
-- the lock was refused.
--
-- The column is added without a default and the default set afterwards, so
-- no existing row is rewritten; those rows read NULL.
DROP TRIGGER IF EXISTS mailroom_outbox_notify_trg ON mailroom_outbox;
DROP FUNCTION IF EXISTS mailroom_outbox_notify();

CREATE OR REPLACE FUNCTION mailroom_outbox_notify(outbox regclass) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mailroom_' || outbox::oid::text, '');
    RETURN true;
END
$$;

ALTER TABLE mailroom_outbox ADD COLUMN IF NOT EXISTS notified boolean;
ALTER TABLE mailroom_outbox ALTER COLUMN notified SET DEFAULT (
    CASE WHEN pg_try_advisory_xact_lock_shared(1835100524, 'mailroom_outbox'::regclass::oid::integer)
         THEN false
         ELSE mailroom_outbox_notify('mailroom_outbox'::regclass)
    END);

-- The lease check of version 4 rejected the claims of older relays (a lease
-- without leased_until), but a CHECK constraint is evaluated, and compiled
-- first, for every INSERT as well: 3–4 microseconds of each Add. A row
-- trigger on UPDATE only does the same for claims and costs inserts
-- nothing measurable; its error says what to do. AFTER, not BEFORE: a
-- BEFORE row trigger makes PostgreSQL fetch and lock the old row version
-- first. Its WHEN is evaluated as each row is updated; the statement of
-- an older relay then fails as a whole, and nothing is leased.
ALTER TABLE mailroom_outbox DROP CONSTRAINT IF EXISTS mailroom_outbox_lease_check;

CREATE OR REPLACE FUNCTION mailroom_outbox_lease_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a relay older than mailroom schema version 4 tried to lease row % of %.%', NEW.seq, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'check_violation',
              HINT = 'Upgrade every relay of this table: it leases rows without leased_until, so it could claim rows that newer relays hold.';
END
$$;

DROP TRIGGER IF EXISTS mailroom_outbox_lease_guard_trg ON mailroom_outbox;
CREATE TRIGGER mailroom_outbox_lease_guard_trg
    AFTER UPDATE ON mailroom_outbox
    FOR EACH ROW
    WHEN (NEW.lease IS NOT NULL AND NEW.leased_until IS NULL)
    EXECUTE FUNCTION mailroom_outbox_lease_guard();
