package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/mailroom-go/mailroom/dedupe"
	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/outbox"
)

// idempotencyScope is the dedupe scope of Idempotency-Keys. Keys come from
// clients, so a service with several clients (tenants) would scope them per
// client: "orders-api:" + clientID.
const idempotencyScope = "orders-api"

// ErrKeyReused is returned by Place when an Idempotency-Key comes back with
// a different request.
var ErrKeyReused = errors.New("this Idempotency-Key was already used with a different request; use a new key for a new order")

// ErrNotFound is returned by Get for an unknown order.
var ErrNotFound = errors.New("order not found")

// Order is an order as stored and as the API returns it.
type Order struct {
	ID          string     `json:"id" db:"id"`
	CustomerID  string     `json:"customer_id" db:"customer_id"`
	AmountCents int64      `json:"amount_cents" db:"amount_cents"`
	Currency    string     `json:"currency" db:"currency"`
	Status      string     `json:"status" db:"status"` // "placed", then "paid"
	ChargeID    string     `json:"charge_id,omitempty" db:"charge_id"`
	CreatedAt   time.Time  `json:"created_at" db:"created_at"`
	PaidAt      *time.Time `json:"paid_at,omitempty" db:"paid_at"`
}

const orderColumns = `id, customer_id, amount_cents, currency, status, coalesce(charge_id::text, '') AS charge_id, created_at, paid_at`

// PlaceOrder is the body of POST /orders.
type PlaceOrder struct {
	CustomerID  string `json:"customer_id"`
	AmountCents int64  `json:"amount_cents"`
	Currency    string `json:"currency"`
}

var currencyCode = regexp.MustCompile(`^[A-Z]{3}$`)

// Validate reports every problem of the request in one error.
func (p PlaceOrder) Validate() error {
	var problems []string
	switch {
	case p.CustomerID == "":
		problems = append(problems, "customer_id: required")
	case len(p.CustomerID) > 100:
		problems = append(problems, "customer_id: at most 100 bytes")
	}
	if p.AmountCents <= 0 {
		problems = append(problems, fmt.Sprintf("amount_cents: must be a positive number of cents (got %d; missing counts as 0)", p.AmountCents))
	}
	if !currencyCode.MatchString(p.Currency) {
		problems = append(problems, fmt.Sprintf("currency: must be a three-letter ISO 4217 code such as \"EUR\" (got %q)", p.Currency))
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// hash identifies the request for Idempotency-Key reuse checks: the same
// fields give the same hash whatever the JSON formatting.
func (p PlaceOrder) hash() []byte {
	b, _ := json.Marshal(p) // a struct of strings and ints always marshals
	h := sha256.Sum256(b)
	return h[:]
}

// OrderService places orders and marks them paid. It is the write side of
// the order service: every change and the event announcing it commit in one
// transaction.
type OrderService struct {
	db       *sqlx.DB
	outbox   *outbox.Outbox // orders_outbox
	keys     *dedupe.Store  // orders_inbox, scope idempotencyScope
	exchange string         // where order.placed goes
}

// Place places an order, or, when key was seen before, returns the order it
// placed then (replayed = true) without writing anything.
//
// Transaction 1 of the flow: claim the Idempotency-Key, insert the order and
// add order.placed to the outbox, all or nothing. A concurrent request with
// the same key waits in Claim until this one commits, then finds the order.
func (s *OrderService) Place(ctx context.Context, key string, req PlaceOrder) (o Order, replayed bool, err error) {
	tx, err := s.db.BeginTxx(ctx, nil)
	if err != nil {
		return o, false, fmt.Errorf("place order: begin: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // a no-op after Commit

	hash := req.hash()
	if key != "" {
		first, err := s.keys.Claim(ctx, tx, idempotencyScope, key)
		if err != nil {
			return o, false, fmt.Errorf("place order: %w", err)
		}
		if !first {
			var stored []byte
			err := tx.QueryRowxContext(ctx, `SELECT `+orderColumns+`, request_hash FROM orders WHERE idempotency_key = $1 ORDER BY created_at DESC LIMIT 1`, key).
				Scan(&o.ID, &o.CustomerID, &o.AmountCents, &o.Currency, &o.Status, &o.ChargeID, &o.CreatedAt, &o.PaidAt, &stored)
			if err != nil {
				return o, false, fmt.Errorf("place order: find order of Idempotency-Key %q: %w", key, err)
			}
			if !bytes.Equal(stored, hash) {
				return Order{}, false, ErrKeyReused
			}
			return o, true, nil
		}
	}

	o = Order{
		ID: uuid.Must(uuid.NewV7()).String(), CustomerID: req.CustomerID,
		AmountCents: req.AmountCents, Currency: req.Currency, Status: "placed",
	}
	err = tx.QueryRowContext(ctx, `INSERT INTO orders (id, customer_id, amount_cents, currency, idempotency_key, request_hash)
		VALUES ($1, $2, $3, $4, nullif($5, ''), $6) RETURNING created_at`,
		o.ID, o.CustomerID, o.AmountCents, o.Currency, key, hash).Scan(&o.CreatedAt)
	if err != nil {
		return o, false, fmt.Errorf("place order: insert: %w", err)
	}
	payload, err := json.Marshal(OrderPlaced{OrderID: o.ID, CustomerID: o.CustomerID, AmountCents: o.AmountCents, Currency: o.Currency})
	if err != nil {
		return o, false, err
	}
	err = s.outbox.Add(ctx, tx, outbox.Message{
		Exchange: s.exchange, RoutingKey: EventOrderPlaced, Type: EventOrderPlaced,
		Key: o.ID, Payload: payload,
	})
	if err != nil {
		return o, false, fmt.Errorf("place order: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return o, false, fmt.Errorf("place order: commit: %w", err)
	}
	return o, false, nil
}

// keyRetention is how long an Idempotency-Key is remembered.
const keyRetention = dedupe.DefaultRetention

// PurgeKeys deletes Idempotency-Keys older than keyRetention. The keys
// share orders_inbox with the "orders" consumer, which purges only its own
// scope, so the API purges its own.
func (s *OrderService) PurgeKeys(ctx context.Context) (int64, error) {
	return s.keys.Purge(ctx, s.db, idempotencyScope, keyRetention)
}

// Get returns one order.
func (s *OrderService) Get(ctx context.Context, id string) (Order, error) {
	var o Order
	err := s.db.GetContext(ctx, &o, `SELECT `+orderColumns+` FROM orders WHERE id = $1`, id)
	if errors.Is(err, sql.ErrNoRows) {
		return o, ErrNotFound
	}
	return o, err
}

// HandlePaymentCaptured is the order service's inbox handler.
//
// Transaction 3 of the flow: the inbox has recorded the message id in tx;
// marking the order paid commits with it, so a redelivered
// payment.captured changes nothing.
func (s *OrderService) HandlePaymentCaptured(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
	if m.Type != EventPaymentCaptured {
		return nil // not ours: acked and remembered, nothing to do
	}
	var e PaymentCaptured
	if err := json.Unmarshal(m.Payload, &e); err != nil {
		return fmt.Errorf("decode %s: %w", m.Type, err) // retried, then dead-lettered with this reason
	}
	res, err := tx.ExecContext(ctx, `UPDATE orders SET status = 'paid', charge_id = $2, paid_at = now()
		WHERE id = $1 AND status = 'placed'`, e.OrderID, e.ChargeID)
	if err != nil {
		return fmt.Errorf("mark order %s paid: %w", e.OrderID, err)
	}
	if n, _ := res.RowsAffected(); n == 1 {
		return nil
	}
	// Either already paid (a second capture under another message id: keep
	// the first) or unknown, which is worth a retry and then a dead letter.
	var status string
	err = tx.GetContext(ctx, &status, `SELECT status FROM orders WHERE id = $1`, e.OrderID)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("payment captured for unknown order %s", e.OrderID)
	}
	return err
}
