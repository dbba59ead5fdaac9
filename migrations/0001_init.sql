-- mailroom schema, version 1.
--
-- Table names here are the defaults. mailroom.Migrate applies this file with
-- the configured names substituted; golang-migrate or goose users can copy it
-- as it is (one "up" migration, no down: drop the tables to undo).

-- The outbox: one row per event not yet confirmed by the broker.
CREATE TABLE IF NOT EXISTS mailroom_outbox (
    -- seq orders rows of one key: a transaction that commits before another
    -- starts always takes the lower seq. Never used as a read cursor (ids
    -- become visible out of commit order).
    seq          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           uuid        NOT NULL,
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL,
    key          text        NOT NULL DEFAULT '',
    type         text        NOT NULL DEFAULT '',
    content_type text        NOT NULL DEFAULT 'application/json',
    headers      jsonb,
    payload      bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- available_at is the one clock the relay claims by: delayed delivery,
    -- the retry backoff and the lease of a claimed row all move it forward.
    available_at timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text,
    -- lease identifies the claim that owns the row until available_at, so a
    -- relay whose lease expired cannot overwrite a newer claim's state.
    lease        uuid
);

-- The claim scans due rows oldest first: WHERE available_at <= now()
-- ORDER BY available_at. Leased and backing-off rows sit in the future part
-- of the index and cost the scan nothing.
CREATE INDEX IF NOT EXISTS mailroom_outbox_available_idx
    ON mailroom_outbox (available_at);

-- Per-key ordering asks "is there an earlier row of this key?" for each
-- keyed candidate. Partial: messages without a key add no entry here.
CREATE INDEX IF NOT EXISTS mailroom_outbox_key_idx
    ON mailroom_outbox (key, seq) WHERE key <> '';

-- Rows that failed MaxAttempts times, with the last error, kept for an
-- operator to replay or discard. Off the claim path entirely.
CREATE TABLE IF NOT EXISTS mailroom_outbox_dead (
    seq          bigint      PRIMARY KEY,
    id           uuid        NOT NULL,
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL,
    key          text        NOT NULL DEFAULT '',
    type         text        NOT NULL DEFAULT '',
    content_type text        NOT NULL DEFAULT 'application/json',
    headers      jsonb,
    payload      bytea       NOT NULL,
    created_at   timestamptz NOT NULL,
    attempts     integer     NOT NULL,
    last_error   text        NOT NULL,
    dead_at      timestamptz NOT NULL DEFAULT now()
);

-- Operators replay and discard dead letters by message id.
CREATE INDEX IF NOT EXISTS mailroom_outbox_dead_id_idx
    ON mailroom_outbox_dead (id);

-- Published rows, kept only when the relay is configured to retain them
-- (audit, replay). A separate table so retained rows never slow the claim.
CREATE TABLE IF NOT EXISTS mailroom_outbox_published (
    seq          bigint      PRIMARY KEY,
    id           uuid        NOT NULL,
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL,
    key          text        NOT NULL DEFAULT '',
    type         text        NOT NULL DEFAULT '',
    content_type text        NOT NULL DEFAULT 'application/json',
    headers      jsonb,
    payload      bytea       NOT NULL,
    created_at   timestamptz NOT NULL,
    attempts     integer     NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now()
);

-- Retention purges the oldest published rows in bounded batches.
CREATE INDEX IF NOT EXISTS mailroom_outbox_published_at_idx
    ON mailroom_outbox_published (published_at);

-- The consumer side: message ids (or idempotency keys) already applied,
-- per scope (consumer name).
CREATE TABLE IF NOT EXISTS mailroom_inbox (
    scope       text        NOT NULL,
    id          text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, id)
);

-- Purging entries older than the retention window walks this index in
-- bounded batches.
CREATE INDEX IF NOT EXISTS mailroom_inbox_recorded_idx
    ON mailroom_inbox (recorded_at);
