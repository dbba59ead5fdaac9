package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
)

// The demo is a client of the running services: it places orders over
// HTTP like any client would, then reads the outcome from the database.

// Summary is the demo's result, computed from the database.
type Summary struct {
	Orders               int // orders placed by this run (rows in orders)
	Paid                 int // of those, marked paid
	Charges              int // charges for them (rows in charges)
	DuplicatesSuppressed int // requests answered with an existing order instead of a new one
	Lost                 int // orders requested but not placed, charged and paid
	DoubleCharged        int // orders with more than one charge
}

func (s Summary) String() string {
	return fmt.Sprintf("orders=%d paid=%d charges=%d duplicates_suppressed=%d lost=%d double_charged=%d",
		s.Orders, s.Paid, s.Charges, s.DuplicatesSuppressed, s.Lost, s.DoubleCharged)
}

// OK reports whether all n orders were placed once, charged once and paid.
func (s Summary) OK(n int) bool {
	return s.Orders == n && s.Paid == n && s.Charges == n && s.Lost == 0 && s.DoubleCharged == 0
}

// demoRun is what the client did: the Idempotency-Keys it placed orders
// with (one per order; they identify this run's orders in the database, so
// the demo can run again and again on the same tables) and how many
// requests were answered with an order.
type demoRun struct {
	keys     []string
	answered int64
}

// placeOrders places n orders against baseURL from concurrency clients.
// Every fifth order is sent twice with the same Idempotency-Key: half of
// those twice at once (a client that timed out and retried while the first
// request was still running), half one after the other (a client that lost
// the answer).
func placeOrders(ctx context.Context, baseURL string, n, concurrency int, progress io.Writer) *demoRun {
	run := &demoRun{keys: make([]string, n)}
	id := make([]byte, 4)
	_, _ = rand.Read(id)
	for i := range run.keys {
		run.keys[i] = fmt.Sprintf("demo-%s-%d", hex.EncodeToString(id), i)
	}
	client := &http.Client{Timeout: 30 * time.Second}
	var answered, failed, mismatched atomic.Int64
	var firstErr sync.Once
	place := func(i int) {
		req := PlaceOrder{CustomerID: fmt.Sprintf("demo-customer-%d", i%10), AmountCents: int64(500 + i), Currency: "EUR"}
		send := func() string {
			orderID, err := postOrder(ctx, client, baseURL, run.keys[i], req)
			if err != nil {
				failed.Add(1)
				firstErr.Do(func() { fmt.Fprintf(progress, "a request failed (the summary counts its order as lost): %v\n", err) })
				return ""
			}
			answered.Add(1)
			return orderID
		}
		var a, b string
		switch i % 10 {
		case 0:
			var wg sync.WaitGroup
			wg.Add(1)
			go func() { defer wg.Done(); b = send() }()
			a = send()
			wg.Wait()
		case 5:
			a, b = send(), send()
		default:
			send()
			return
		}
		if a != "" && b != "" && a != b {
			mismatched.Add(1)
		}
	}

	start := time.Now()
	fmt.Fprintf(progress, "placing %d orders over HTTP at %s (%d sent twice with the same Idempotency-Key)\n", n, baseURL, (n+4)/5)
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				place(i)
			}
		}()
	}
	for i := range n {
		select {
		case jobs <- i:
		case <-ctx.Done():
		}
	}
	close(jobs)
	wg.Wait()
	run.answered = answered.Load()
	fmt.Fprintf(progress, "placed: %d requests answered, %d failed, in %s\n", run.answered, failed.Load(), time.Since(start).Round(time.Millisecond))
	if m := mismatched.Load(); m > 0 {
		fmt.Fprintf(progress, "%d retried requests were answered with a different order than the first: duplicates placed\n", m)
	}
	return run
}

// postOrder sends POST /orders, retrying transport errors and 5xx answers
// with the same Idempotency-Key (which is what makes retrying safe), and
// returns the order id.
func postOrder(ctx context.Context, client *http.Client, baseURL, key string, order PlaceOrder) (string, error) {
	body, err := json.Marshal(order)
	if err != nil {
		return "", err
	}
	var last error
	for attempt := 1; attempt <= 5; attempt++ {
		if attempt > 1 {
			select {
			case <-time.After(time.Duration(attempt) * 100 * time.Millisecond):
			case <-ctx.Done():
				return "", ctx.Err()
			}
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, baseURL+"/orders", bytes.NewReader(body))
		if err != nil {
			return "", err
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", key)
		resp, err := client.Do(req)
		if err != nil {
			last = err
			continue
		}
		var out struct {
			ID    string `json:"id"`
			Error string `json:"error"`
		}
		err = json.NewDecoder(resp.Body).Decode(&out)
		resp.Body.Close()
		switch {
		case resp.StatusCode >= 500:
			last = fmt.Errorf("POST /orders: %s: %s", resp.Status, out.Error)
			continue
		case resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK:
			return "", fmt.Errorf("POST /orders: %s: %s", resp.Status, out.Error)
		case err != nil || out.ID == "":
			return "", fmt.Errorf("POST /orders: %s with an unreadable body: %v", resp.Status, err)
		}
		return out.ID, nil
	}
	return "", last
}

// waitPaid polls the database until every order of run is paid or wait
// passes, reporting progress about once a second.
func waitPaid(ctx context.Context, db *sqlx.DB, run *demoRun, wait time.Duration, progress io.Writer) error {
	start := time.Now()
	deadline := start.Add(wait)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	fmt.Fprintf(progress, "waiting until every order is charged and paid (at most %s)\n", wait)
	var shown Summary
	lastShown := start
	for {
		s, err := summarize(ctx, db, run)
		if err != nil {
			return err
		}
		if s.Lost == 0 {
			fmt.Fprintf(progress, "all %d orders paid %s after the last was placed\n", len(run.keys), time.Since(start).Round(time.Millisecond))
			return nil
		}
		if time.Now().After(deadline) {
			fmt.Fprintf(progress, "gave up waiting after %s: %d of %d orders are not paid\n", wait, s.Lost, len(run.keys))
			return nil
		}
		if s != shown && time.Since(lastShown) >= time.Second {
			fmt.Fprintf(progress, "waiting: %d/%d orders paid, %d charges\n", s.Paid, len(run.keys), s.Charges)
			shown, lastShown = s, time.Now()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// summarize counts this run's orders, charges and payments in the
// database. Only what the client asked for comes from memory: the keys
// and how many requests were answered.
func summarize(ctx context.Context, db *sqlx.DB, run *demoRun) (Summary, error) {
	var s Summary
	err := db.QueryRowContext(ctx, `
WITH run AS (SELECT id, status FROM orders WHERE idempotency_key = ANY($1)),
     run_charges AS (SELECT c.order_id FROM charges c JOIN run ON run.id = c.order_id)
SELECT
  (SELECT count(*) FROM run),
  (SELECT count(*) FROM run WHERE status = 'paid'),
  (SELECT count(*) FROM run_charges),
  (SELECT count(*) FROM (SELECT order_id FROM run_charges GROUP BY order_id HAVING count(*) > 1) d),
  (SELECT count(*) FROM unnest($1::text[]) AS k(key) WHERE NOT EXISTS (
     SELECT 1 FROM orders o JOIN charges c ON c.order_id = o.id
     WHERE o.idempotency_key = k.key AND o.status = 'paid'))`,
		pq.StringArray(run.keys)).Scan(&s.Orders, &s.Paid, &s.Charges, &s.DoubleCharged, &s.Lost)
	if err != nil {
		return s, fmt.Errorf("count results: %w", err)
	}
	s.DuplicatesSuppressed = max(int(run.answered)-s.Orders, 0)
	return s, nil
}
