package main

// The events the two services exchange. Their JSON form is the contract
// between the services: add fields freely, never change or remove one that
// a consumer reads.

// Event types: the AMQP type property and the routing key.
const (
	EventOrderPlaced     = "order.placed"
	EventPaymentCaptured = "payment.captured"
)

// OrderPlaced is published by the order service when an order is placed.
type OrderPlaced struct {
	OrderID     string `json:"order_id"`
	CustomerID  string `json:"customer_id"`
	AmountCents int64  `json:"amount_cents"`
	Currency    string `json:"currency"`
}

// PaymentCaptured is published by the payments service when it has charged
// an order.
type PaymentCaptured struct {
	OrderID     string `json:"order_id"`
	ChargeID    string `json:"charge_id"`
	AmountCents int64  `json:"amount_cents"`
	Currency    string `json:"currency"`
}
