package main

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/outbox"
)

// PaymentService charges placed orders. In a real deployment it is its own
// service with its own database; here it shares the process and the
// database but keeps its own tables (charges, payments_outbox,
// payments_inbox).
type PaymentService struct {
	outbox   *outbox.Outbox // payments_outbox
	exchange string         // where payment.captured goes
}

// HandleOrderPlaced is the payments service's inbox handler.
//
// Transaction 2 of the flow: the inbox has recorded the message id in tx;
// the charge and the payment.captured event commit with it. A redelivered
// order.placed is acked without reaching this function, so each order is
// charged once, and a rollback leaves neither a charge nor an event.
//
// A real handler calling a payment provider outside tx would pass m.ID as
// the provider's idempotency key: after a failure the handler runs again.
func (p *PaymentService) HandleOrderPlaced(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
	if m.Type != EventOrderPlaced {
		return nil
	}
	var e OrderPlaced
	if err := json.Unmarshal(m.Payload, &e); err != nil {
		return fmt.Errorf("decode %s: %w", m.Type, err)
	}
	if _, err := uuid.Parse(e.OrderID); err != nil || e.AmountCents <= 0 {
		return fmt.Errorf("%s %s: bad order id %q or amount %d", m.Type, m.ID, e.OrderID, e.AmountCents)
	}
	chargeID := uuid.Must(uuid.NewV7()).String()
	if _, err := tx.ExecContext(ctx, `INSERT INTO charges (id, order_id, amount_cents, currency) VALUES ($1, $2, $3, $4)`,
		chargeID, e.OrderID, e.AmountCents, e.Currency); err != nil {
		return fmt.Errorf("charge order %s: %w", e.OrderID, err)
	}
	payload, err := json.Marshal(PaymentCaptured{OrderID: e.OrderID, ChargeID: chargeID, AmountCents: e.AmountCents, Currency: e.Currency})
	if err != nil {
		return err
	}
	return p.outbox.Add(ctx, tx, outbox.Message{
		Exchange: p.exchange, RoutingKey: EventPaymentCaptured, Type: EventPaymentCaptured,
		Key: e.OrderID, Payload: payload,
	})
}
