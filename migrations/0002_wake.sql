-- mailroom schema, version 2: NOTIFY on demand.
--
-- A NOTIFY serialises committing transactions on a database-wide lock, which
-- costs writers more than the insert itself. So Add notifies only while some
-- relay is asleep and has asked to be woken: each such relay keeps a row here
-- with wake_until in the near future (refreshed at every poll while idle).
-- A busy relay claims again by itself and needs no NOTIFY; a dead relay's row
-- simply expires.
CREATE TABLE IF NOT EXISTS mailroom_outbox_wake (
    relay      text        PRIMARY KEY,
    wake_until timestamptz NOT NULL
);
