package main

import (
	"context"
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// No goroutine of the services outlives App.Run.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// database/sql's opener goroutine ends asynchronously after Close.
		goleak.IgnoreTopFunction("database/sql.(*DB).connectionOpener"),
	)
}

// testApp is the example wired on a test's own schema, exchanges and
// queues, cleaned up when the test ends.
type testApp struct {
	*App
	URL string // base URL of the API
}

// newTestApp sets up the example in its own schema with unique broker
// names and serves the API on a loopback port. With run, the relays and
// consumers run too; without, only the API does.
func newTestApp(t *testing.T, run bool) *testApp {
	t.Helper()
	schema := testenv.NewEmptySchema(t)
	broker := testenv.NewBroker(t)
	cfg := Config{
		DatabaseURL:      schema.URL,
		AMQPURL:          broker.URL,
		OrdersExchange:   testenv.Unique("orders"),
		PaymentsExchange: testenv.Unique("payments"),
		PaymentsQueue:    testenv.Unique("payments.order-placed"),
		OrdersQueue:      testenv.Unique("orders.payment-captured"),
		Name:             testenv.Unique("orderservice-test"),
	}
	for _, q := range []string{cfg.PaymentsQueue, cfg.OrdersQueue} {
		broker.CleanupQueues(q, inbox.RetryQueueName(q), inbox.DeadLetterQueueName(q))
		broker.CleanupExchanges(inbox.DeadLetterExchangeName(q))
	}
	broker.CleanupExchanges(cfg.OrdersExchange, cfg.PaymentsExchange)
	app, err := NewApp(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { app.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := app.Setup(ctx); err != nil {
		t.Fatalf("setup: %v", err)
	}
	ln := listen(t)
	if !run { // the API alone
		app.relays, app.consumers = nil, nil
	}
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- app.Run(runCtx, ln) }()
	t.Cleanup(func() { // runs before the schema and queues are dropped
		stop()
		if err := <-done; err != nil {
			t.Errorf("app.Run: %v", err)
		}
	})
	return &testApp{App: app, URL: "http://" + ln.Addr().String()}
}

// count runs a count(*) query.
func (a *testApp) count(t *testing.T, query string, args ...any) int {
	t.Helper()
	var n int
	if err := a.DB().Get(&n, query, args...); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// listen opens a loopback listener on a free port.
func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}
