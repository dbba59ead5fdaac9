package main

import (
	"context"
	"encoding/json"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

// The demo flow in-process on the real services: every order placed once
// (retries suppressed), charged once and paid, and nothing left behind in
// either outbox.
func TestDemoFlow(t *testing.T) {
	t.Parallel()
	a := newTestApp(t, true)
	const n = 200
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var progress strings.Builder
	run := placeOrders(ctx, a.URL, n, 16, &progress)
	if err := waitPaid(ctx, a.DB(), run, 2*time.Minute, &progress); err != nil {
		t.Fatal(err)
	}
	s, err := summarize(ctx, a.DB(), run)
	if err != nil {
		t.Fatal(err)
	}
	retried := 0 // placeOrders sends orders 0, 5, 10, … twice
	for i := range n {
		if i%5 == 0 {
			retried++
		}
	}
	want := Summary{Orders: n, Paid: n, Charges: n, DuplicatesSuppressed: retried}
	if s != want || !s.OK(n) {
		t.Fatalf("summary %s, want %s\nprogress:\n%s", s, want, progress.String())
	}

	// The same facts straight from the tables, not through summarize.
	if got := a.count(t, `SELECT count(*) FROM orders`); got != n {
		t.Errorf("%d orders, want %d", got, n)
	}
	if bad := a.count(t, `SELECT count(*) FROM orders o WHERE o.status <> 'paid' OR o.paid_at IS NULL
		OR (SELECT count(*) FROM charges c WHERE c.order_id = o.id AND c.id = o.charge_id AND c.amount_cents = o.amount_cents) <> 1
		OR (SELECT count(*) FROM charges c WHERE c.order_id = o.id) <> 1`); bad != 0 {
		t.Errorf("%d orders are not paid with exactly one matching charge", bad)
	}
	if got := a.count(t, `SELECT count(*) FROM orders_inbox WHERE scope = 'orders-api'`); got != n {
		t.Errorf("%d Idempotency-Keys recorded, want %d", got, n)
	}
	for _, c := range a.consumers {
		if st := c.Stats(); st.Failed != 0 || st.DeadLettered != 0 {
			t.Errorf("consumer stats %+v: a handler failed", st)
		}
	}
	for _, table := range []string{"orders_outbox", "payments_outbox"} {
		testenv.Eventually(t, 30*time.Second, table+" to be empty", func() bool {
			return a.count(t, `SELECT count(*) FROM `+table) == 0
		})
		if dead := a.count(t, `SELECT count(*) FROM `+table+`_dead`); dead != 0 {
			t.Errorf("%d dead letters in %s_dead", dead, table)
		}
	}
}

// A duplicated event (here: the same message id written to the outbox
// twice, as a relay crashing between publish and delete would redeliver
// it) reaches the payments worker twice and charges once.
func TestDuplicateEventChargesOnce(t *testing.T) {
	t.Parallel()
	a := newTestApp(t, true)
	ctx := context.Background()
	orderID, msgID := uuid.NewString(), outbox.NewID()
	payload, _ := json.Marshal(OrderPlaced{OrderID: orderID, CustomerID: "c-1", AmountCents: 700, Currency: "EUR"})
	msg := outbox.Message{ID: msgID, Exchange: a.cfg.OrdersExchange, RoutingKey: EventOrderPlaced, Type: EventOrderPlaced, Key: orderID, Payload: payload}
	tx := a.DB().MustBegin()
	tx.MustExec(`INSERT INTO orders (id, customer_id, amount_cents, currency) VALUES ($1, 'c-1', 700, 'EUR')`, orderID)
	if err := a.Orders.outbox.Add(ctx, tx, msg, msg); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	payments := a.consumers[0]
	testenv.Eventually(t, time.Minute, "the second delivery to be suppressed", func() bool {
		return payments.Stats().Duplicates >= 1
	})
	testenv.Eventually(t, time.Minute, "the order to be paid", func() bool {
		return a.count(t, `SELECT count(*) FROM orders WHERE id = $1 AND status = 'paid'`, orderID) == 1
	})
	if got := a.count(t, `SELECT count(*) FROM charges WHERE order_id = $1`, orderID); got != 1 {
		t.Fatalf("%d charges for the order, want 1", got)
	}
}

// The demo command says which service is missing, where, and how to start
// it, in a few lines without a stack trace or a password, and fails.
func TestDemoCommandServiceUnreachable(t *testing.T) {
	t.Parallel()
	closed := closedPort(t)
	for _, tc := range []struct {
		name, env, value, want string
	}{
		{"postgres", "DATABASE_URL", "postgres://root:s3cret@" + closed + "/test?sslmode=disable", "pg_ctlcluster"},
		{"rabbitmq", "AMQP_URL", "amqp://guest:s3cret@" + closed + "/", "rabbitmq-server -detached"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := map[string]string{"DATABASE_URL": testenv.DatabaseURL(), "AMQP_URL": testenv.AMQPURL(), tc.env: tc.value}
			var stdout, stderr strings.Builder
			code := run([]string{"demo", "--orders", "1"}, func(k string) string { return env[k] }, &stdout, &stderr)
			out := stderr.String()
			if code == 0 {
				t.Fatalf("exit 0, want non-zero; stderr:\n%s", out)
			}
			for _, want := range []string{closed, tc.want, tc.env} {
				if !strings.Contains(out, want) {
					t.Errorf("stderr does not mention %q:\n%s", want, out)
				}
			}
			if strings.Contains(out, "s3cret") || strings.Contains(out, "goroutine") || strings.Count(out, "\n") > 4 {
				t.Errorf("stderr leaks the password or is not a short message:\n%s", out)
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout: %q, want nothing", stdout.String())
			}
		})
	}
}

func TestCommandUsageErrors(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{}, {"bogus"}, {"demo", "--orders", "0"}, {"demo", "--orders", "x"}, {"demo", "extra"}, {"serve", "--nope"}} {
		var stderr strings.Builder
		code := run(args, func(string) string { return "" }, io.Discard, &stderr)
		if code != 2 || stderr.Len() == 0 {
			t.Errorf("%q: exit %d with %q, want exit 2 with a message", args, code, stderr.String())
		}
	}
}

// The demo runs again on the same tables and queues: setup is idempotent and
// each run counts only its own orders. The second run uses a second App (a
// new process, as `make demo` twice would) while the first still runs: two
// instances of each service on one database and broker.
func TestDemoRerun(t *testing.T) {
	t.Parallel()
	first := newTestApp(t, true)
	second, err := NewApp(first.cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { second.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := second.Setup(ctx); err != nil {
		t.Fatalf("second setup: %v", err)
	}
	ln := listen(t)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- second.Run(runCtx, ln) }()
	t.Cleanup(func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("second app.Run: %v", err)
		}
	})

	const n = 20
	for i, url := range []string{first.URL, "http://" + ln.Addr().String()} {
		var progress strings.Builder
		run := placeOrders(ctx, url, n, 4, &progress)
		if err := waitPaid(ctx, first.DB(), run, 2*time.Minute, &progress); err != nil {
			t.Fatal(err)
		}
		s, err := summarize(ctx, first.DB(), run)
		if err != nil {
			t.Fatal(err)
		}
		if want := (Summary{Orders: n, Paid: n, Charges: n, DuplicatesSuppressed: n / 5}); s != want {
			t.Fatalf("run %d: %s, want %s\n%s", i+1, s, want, progress.String())
		}
	}
	if got := first.count(t, `SELECT count(*) FROM orders`); got != 2*n {
		t.Errorf("%d orders in the table after two runs, want %d", got, 2*n)
	}
}
