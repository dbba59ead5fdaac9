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
