package main

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"
)

type response struct {
	status int
	header http.Header
	order  Order
	err    string // the "error" field of an error body
}

func (a *testApp) do(t *testing.T, method, path, key, body string) response {
	t.Helper()
	req, err := http.NewRequest(method, a.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	r := response{status: resp.StatusCode, header: resp.Header}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("%s %s: Content-Type %q, want application/json; body %s", method, path, ct, raw)
	}
	target := any(&r.order)
	var e struct{ Error string }
	if resp.StatusCode >= 400 {
		target = &e
	}
	if err := json.Unmarshal(raw, target); err != nil {
		t.Fatalf("%s %s: %s: body is not JSON: %v: %s", method, path, resp.Status, err, raw)
	}
	r.err = e.Error
	return r
}

const validBody = `{"customer_id": "c-1", "amount_cents": 1299, "currency": "EUR"}`

// Every bad request gets a 4xx with a JSON error that names the problem,
// and writes nothing: no order, no event, no claimed Idempotency-Key.
func TestPlaceOrderBadInput(t *testing.T) {
	t.Parallel()
	a := newTestApp(t, false)
	for _, tc := range []struct {
		name, key, body string
		status          int
		mention         string
	}{
		{"malformed JSON", "", `{"customer_id": "c-1",`, 400, "malformed JSON"},
		{"not an object", "", `[1, 2]`, 400, "malformed JSON"},
		{"empty body", "", ``, 400, "empty body"},
		{"trailing data", "", validBody + ` {}`, 400, "trailing data"},
		{"unknown field", "", `{"customer_id": "c-1", "amount": 5, "currency": "EUR"}`, 400, `unknown field "amount"`},
		{"amount as string", "", `{"customer_id": "c-1", "amount_cents": "12", "currency": "EUR"}`, 400, "amount_cents: must be a whole number"},
		{"fractional amount", "", `{"customer_id": "c-1", "amount_cents": 12.5, "currency": "EUR"}`, 400, "amount_cents"},
		{"missing fields", "", `{}`, 422, "customer_id: required"},
		{"missing amount", "", `{"customer_id": "c-1", "currency": "EUR"}`, 422, "amount_cents: must be a positive"},
		{"negative amount", "", `{"customer_id": "c-1", "amount_cents": -5, "currency": "EUR"}`, 422, "got -5"},
		{"zero amount", "", `{"customer_id": "c-1", "amount_cents": 0, "currency": "EUR"}`, 422, "amount_cents"},
		{"bad currency", "", `{"customer_id": "c-1", "amount_cents": 5, "currency": "euro"}`, 422, "currency"},
		{"null body", "", `null`, 422, "customer_id: required"},
		{"oversize body", "", `{"customer_id": "` + strings.Repeat("x", maxBodyBytes) + `", "amount_cents": 5, "currency": "EUR"}`, 413, "larger than"},
		{"oversize whitespace", "", validBody + strings.Repeat(" ", maxBodyBytes), 413, "larger than"},
		{"long Idempotency-Key", strings.Repeat("k", maxKeyBytes+1), validBody, 400, "Idempotency-Key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			keys := []string{"", uuid.NewString()} // without and with a key
			if tc.key != "" {
				keys = []string{tc.key}
			}
			for _, key := range keys {
				r := a.do(t, "POST", "/orders", key, tc.body)
				if r.status != tc.status || !strings.Contains(r.err, tc.mention) {
					t.Errorf("key %q: %d %q, want %d mentioning %q", key, r.status, r.err, tc.status, tc.mention)
				}
			}
		})
	}
	for _, table := range []string{"orders", "orders_outbox", "orders_inbox"} {
		if n := a.count(t, `SELECT count(*) FROM `+table); n != 0 {
			t.Errorf("%d rows in %s after bad requests, want 0", n, table)
		}
	}
}

// A replay returns the same order and writes nothing; the same key with
// another body is refused with 422.
func TestIdempotencyKey(t *testing.T) {
	t.Parallel()
	a := newTestApp(t, false)
	key := uuid.NewString()
	first := a.do(t, "POST", "/orders", key, validBody)
	if first.status != http.StatusCreated || first.header.Get("Location") != "/orders/"+first.order.ID {
		t.Fatalf("first: %d, Location %q, want 201 with /orders/%s", first.status, first.header.Get("Location"), first.order.ID)
	}
	// The same fields, formatted differently, are the same request.
	replay := a.do(t, "POST", "/orders", key, `{"currency":"EUR","amount_cents":1299,"customer_id":"c-1"}`)
	if replay.status != http.StatusOK || replay.header.Get("Idempotent-Replayed") != "true" || replay.order != first.order {
		t.Fatalf("replay: %d %+v (replayed %q), want 200 with %+v", replay.status, replay.order, replay.header.Get("Idempotent-Replayed"), first.order)
	}
	mismatch := a.do(t, "POST", "/orders", key, `{"customer_id": "c-1", "amount_cents": 9999, "currency": "EUR"}`)
	if mismatch.status != http.StatusUnprocessableEntity || !strings.Contains(mismatch.err, "Idempotency-Key") {
		t.Fatalf("reused key with another body: %d %q, want 422 naming the Idempotency-Key", mismatch.status, mismatch.err)
	}
	if n := a.count(t, `SELECT count(*) FROM orders`); n != 1 {
		t.Errorf("%d orders, want 1", n)
	}
	if n := a.count(t, `SELECT count(*) FROM orders_outbox`); n != 1 {
		t.Errorf("%d order.placed events, want 1", n)
	}
	// Without a key every request is a new order.
	for range 2 {
		if r := a.do(t, "POST", "/orders", "", validBody); r.status != http.StatusCreated {
			t.Fatalf("without a key: %d %q, want 201", r.status, r.err)
		}
	}
	if n := a.count(t, `SELECT count(*) FROM orders`); n != 3 {
		t.Errorf("%d orders, want 3", n)
	}
}

// Concurrent requests with one key (a client retrying while its first
// request still runs) place one order and all get it back.
func TestIdempotencyKeyConcurrent(t *testing.T) {
	t.Parallel()
	a := newTestApp(t, false)
	key := uuid.NewString()
	const clients = 10
	ids := make([]string, clients)
	statuses := make([]int, clients)
	var wg sync.WaitGroup
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := a.do(t, "POST", "/orders", key, validBody)
			ids[i], statuses[i] = r.order.ID, r.status
		}()
	}
	wg.Wait()
	created := 0
	for i := range clients {
		if statuses[i] == http.StatusCreated {
			created++
		}
		if ids[i] == "" || ids[i] != ids[0] {
			t.Errorf("client %d: status %d, order %q; want the same order as client 0 (%q)", i, statuses[i], ids[i], ids[0])
		}
	}
	if created != 1 {
		t.Errorf("%d requests answered 201 Created, want exactly 1", created)
	}
	if n := a.count(t, `SELECT count(*) FROM orders`); n != 1 {
		t.Errorf("%d orders, want 1", n)
	}
}

func TestGetOrder(t *testing.T) {
	t.Parallel()
	a := newTestApp(t, false)
	placed := a.do(t, "POST", "/orders", "", validBody)
	got := a.do(t, "GET", "/orders/"+placed.order.ID, "", "")
	if got.status != http.StatusOK || got.order != placed.order {
		t.Fatalf("GET: %d %+v, want 200 %+v", got.status, got.order, placed.order)
	}
	unknown := uuid.NewString()
	for _, tc := range []struct {
		path    string
		status  int
		mention string
	}{
		{"/orders/" + unknown, 404, unknown},
		{"/orders/not-a-uuid", 400, "not a UUID"},
	} {
		if r := a.do(t, "GET", tc.path, "", ""); r.status != tc.status || !strings.Contains(r.err, tc.mention) {
			t.Errorf("GET %s: %d %q, want %d mentioning %q", tc.path, r.status, r.err, tc.status, tc.mention)
		}
	}
}

// healthcheck exits 0 against a serving API (GET /healthz) and 1, saying
// why, against an address nothing listens on: the image's health check.
func TestHealthcheck(t *testing.T) {
	t.Parallel()
	a := newTestApp(t, false)
	addr := strings.TrimPrefix(a.URL, "http://")
	var out, errs strings.Builder
	if code := run([]string{"healthcheck", "--addr", addr}, func(string) string { return "" }, &out, &errs); code != 0 || !strings.Contains(out.String(), "healthy") {
		t.Fatalf("healthcheck of a serving API: exit %d, stdout %q, stderr %q", code, out.String(), errs.String())
	}
	errs.Reset()
	if code := run([]string{"healthcheck", "--addr", "127.0.0.1:1"}, func(string) string { return "" }, &out, &errs); code != 1 || !strings.Contains(errs.String(), "not healthy") {
		t.Fatalf("healthcheck of nothing: exit %d, stderr %q; want 1 and why", code, errs.String())
	}
}
