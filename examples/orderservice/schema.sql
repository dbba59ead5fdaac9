-- The example's own tables. mailroom's tables (orders_outbox, orders_inbox,
-- payments_outbox, payments_inbox) come from mailroom.Migrate; a real
-- service ships both through its migration tool.

-- Owned by the order service.
CREATE TABLE IF NOT EXISTS orders (
    id              uuid        PRIMARY KEY,
    customer_id     text        NOT NULL,
    amount_cents    bigint      NOT NULL CHECK (amount_cents > 0),
    currency        text        NOT NULL,
    status          text        NOT NULL DEFAULT 'placed' CHECK (status IN ('placed', 'paid')),
    charge_id       uuid,
    -- The Idempotency-Key the order was placed with and a hash of the
    -- request, so a replay returns this order and a reused key with another
    -- body is refused. The key itself is claimed in orders_inbox (dedupe).
    idempotency_key text,
    request_hash    bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    paid_at         timestamptz
);

-- A replayed request finds its order by key.
CREATE INDEX IF NOT EXISTS orders_idempotency_key_idx
    ON orders (idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Owned by the payments service (its own database, in a real deployment).
-- No unique constraint on order_id on purpose: the demo counts double
-- charges to show the inbox preventing them. A real service would add one as
-- a second line of defence.
CREATE TABLE IF NOT EXISTS charges (
    id           uuid        PRIMARY KEY,
    order_id     uuid        NOT NULL,
    amount_cents bigint      NOT NULL,
    currency     text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS charges_order_id_idx ON charges (order_id);
