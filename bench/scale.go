package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mailroom-go/mailroom/dedupe"
	"github.com/mailroom-go/mailroom/relay"
)

// fill writes n outbox rows with one INSERT … SELECT (bench setup only:
// fast, and the rows are exactly what Add writes).
func (w *world) fill(n int) error {
	_, err := w.db.Exec(`INSERT INTO mailroom_outbox (id, exchange, routing_key, payload)
SELECT gen_random_uuid(), $1, 'k', convert_to('{"order_id":"0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60","amount_cents":1999}', 'UTF8')
FROM generate_series(1, $2)`, w.exchange, n)
	if err == nil {
		_, err = w.db.Exec(`VACUUM ANALYZE mailroom_outbox`)
	}
	if err == nil {
		// Write the bulk load's pages out now, not in a checkpoint during
		// the drain: a backlog that built up over time was checkpointed
		// as it grew.
		_, err = w.db.Exec(`CHECKPOINT`)
	}
	return err
}

// drainWith runs n relays, with Config.ActiveRelays active (0: the
// default), until the consumer has received want events and returns the
// rate from the first delivery on.
func (w *world) drainWith(n, active int, want int64) (float64, cpuUse, error) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		r, err := newRelay(w, fmt.Sprintf("bench-%d", i), func(c *relay.Config) { c.ActiveRelays = active })
		if err != nil {
			cancel()
			return 0, cpuUse{}, err
		}
		wg.Add(1)
		go func() { defer wg.Done(); r.Run(ctx) }()
	}
	// The clock starts at the first delivery: both sides of these ratios
	// compare draining, not connecting.
	err := w.waitReceived(1, time.Minute)
	start, cpu := time.Now(), readCPU()
	if err == nil {
		err = w.waitReceived(want, 10*time.Minute)
	}
	elapsed, used := time.Since(start), readCPU().since(cpu)
	cancel()
	wg.Wait()
	if err != nil {
		return 0, cpuUse{}, err
	}
	return float64(want-1) / elapsed.Seconds(), used, nil
}

// benchRelays: the same backlog drained by n relays in one process (each
// with its own connections, as separate processes would have). The events
// carry -keys ordering keys (0: none); the consumer counts deliveries that
// arrive after a later event of their key.
func benchRelays(n, active int) (rate float64, cpu cpuUse, outOfOrder int64, err error) {
	w, err := setup()
	if err != nil {
		return 0, cpu, 0, err
	}
	defer w.stop()
	if err := w.fillKeyed(*events, *keys); err != nil {
		return 0, cpu, 0, err
	}
	bad := w.countDisorder()
	rate, cpu, err = w.drainWith(n, active, int64(*events))
	return rate, cpu, bad.Load(), err
}

// benchScale: the drain rate over the first measure events of a backlog.
func benchScale(backlog, measure int) (float64, error) {
	w, err := setup()
	if err != nil {
		return 0, err
	}
	defer w.stop()
	if err := w.fill(backlog); err != nil {
		return 0, err
	}
	rate, _, err := w.drainWith(1, 0, int64(measure))
	return rate, err
}

// benchDedupe: Claim throughput for new ids with 8 clients, after the inbox
// table was filled with prefill entries.
func benchDedupe(prefill int) (float64, error) {
	w, err := setup()
	if err != nil {
		return 0, err
	}
	defer w.stop()
	for done := 0; done < prefill; done += 1_000_000 {
		if _, err := w.db.Exec(`INSERT INTO mailroom_inbox (scope, id) SELECT 'bench', gen_random_uuid()::text FROM generate_series(1, $1)`, min(1_000_000, prefill-done)); err != nil {
			return 0, err
		}
	}
	w.db.Exec(`VACUUM ANALYZE mailroom_inbox`)
	store, err := dedupe.New(dedupe.Config{})
	if err != nil {
		return 0, err
	}
	const clients, perClient = 8, 2500
	var failed atomic.Value
	var wg sync.WaitGroup
	start := time.Now()
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < perClient; i++ {
				tx, err := w.db.Begin()
				if err != nil {
					failed.Store(err)
					return
				}
				if _, err := store.Claim(context.Background(), tx, "bench", newID()); err != nil {
					tx.Rollback()
					failed.Store(err)
					return
				}
				if err := tx.Commit(); err != nil {
					failed.Store(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		return 0, err
	}
	return float64(clients*perClient) / time.Since(start).Seconds(), nil
}

// peakRSS is the process's high-water resident set size (VmHWM), in bytes.
func peakRSS() int64 { return procStatusBytes("self", "VmHWM:") }

// procStatusBytes reads field (a size in kB) of /proc/<pid>/status, in
// bytes; 0 if unknown.
func procStatusBytes(pid, field string) int64 {
	b, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}
