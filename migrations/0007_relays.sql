-- mailroom schema, version 7: relays without a session of their own show
-- themselves by a row.
--
-- A running relay holds a session advisory lock (presence), which
-- `mailroom-relay status` counts. A relay behind PgBouncer in transaction
-- mode (DisableListen, `--no-listen`) cannot hold a session: it writes its
-- row here every few seconds instead, deletes it when it stops, and status
-- counts the rows seen in the last 15 seconds. A relay that died leaves its
-- row to age out; the others delete rows older than a minute.
CREATE TABLE IF NOT EXISTS mailroom_outbox_relays (
    instance uuid        PRIMARY KEY,
    name     text        NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now()
);
