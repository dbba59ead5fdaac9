-- mailroom schema, version 3: wake-ups by an advisory lock and a trigger.
--
-- A relay about to sleep takes the advisory lock (1835100524, outbox table
-- OID) in exclusive mode, looks for due rows once more, and holds the lock
-- while it sleeps. Every INSERT into the outbox takes the same lock in
-- shared mode for its transaction (the trigger's WHEN condition); if it
-- cannot — a relay sleeps, or is about to — the trigger sends the NOTIFY
-- that wakes the relay at commit. So a NOTIFY, which serialises
-- committing transactions, is paid only while a relay sleeps; the shared
-- lock costs a writer a few microseconds. And no commit can slip between
-- the relay's last look and its sleep: the relay's exclusive lock waits
-- for every transaction that took the shared one. The lock dies with the
-- relay's session.
--
-- The trigger covers every way rows arrive (outbox.Add, a dead-letter
-- replay, plain SQL, COPY). 1835100524 is "mail" in ASCII; the channel is
-- "mailroom_" and the table OID, as the relay LISTENs.
--
-- The wake table of version 2 is no longer read by this version; it is
-- kept so that writers of the previous version keep working during an
-- upgrade.
CREATE OR REPLACE FUNCTION mailroom_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mailroom_' || TG_RELID::text, '');
    RETURN NULL;
END
$$;

-- The lock is taken in the trigger's WHEN condition, an expression that
-- costs a writer far less than a function call; the function runs only
-- when a relay sleeps. The table name is resolved to its OID once, here.
DROP TRIGGER IF EXISTS mailroom_outbox_notify_trg ON mailroom_outbox;
CREATE TRIGGER mailroom_outbox_notify_trg
    BEFORE INSERT ON mailroom_outbox
    FOR EACH STATEMENT
    WHEN (NOT pg_try_advisory_xact_lock_shared(1835100524, 'mailroom_outbox'::regclass::oid::integer))
    EXECUTE FUNCTION mailroom_outbox_notify();
