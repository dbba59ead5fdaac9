package relay

import (
	"context"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/locks"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

// The share is held as tokens in the publisher's window: with a second
// relay publishing, half of the default window's slots are taken out (so at
// most 512 messages can await confirms); they are given back when that
// relay leaves, taken again when it returns, and given back when this
// relay stops.
func TestSharedWindowHoldsSlots(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	cfg := Config{URL: testenv.AMQPURL(), DatabaseURL: s.URL, ActiveRelays: 2}
	r, err := New(s.DB.DB, cfg)
	if err != nil {
		t.Fatal(err)
	}
	pub := newPublisher(r, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); r.coordinate(ctx, pub, true, make(chan struct{}, 1)) }()
	held := func(want int) {
		t.Helper()
		testenv.Eventually(t, 30*time.Second, "slots held", func() bool {
			return len(pub.slots) == want && r.Stats().ConfirmWindow == 1024-want
		})
	}
	other := func() (leave func()) {
		o, err := New(s.DB.DB, cfg)
		if err != nil {
			t.Fatal(err)
		}
		octx, ocancel := context.WithCancel(ctx)
		odone := make(chan struct{})
		go func() { defer close(odone); o.coordinate(octx, newPublisher(o, nil), false, make(chan struct{}, 1)) }()
		return func() { ocancel(); <-odone }
	}
	leave := other()
	held(512)
	leave()
	held(0)
	leave = other()
	defer leave()
	held(512)
	cancel()
	<-done
	if n := len(pub.slots); n != 0 {
		t.Fatalf("%d slots still held after the relay stopped", n)
	}
}

// A session holding the publishing slot that stays idle is what a frozen
// relay (a paused container, a stopped process) leaves behind: a standby
// ends it after frozenAfter and takes over. A live publisher, checking in
// every second, is left alone.
func TestStandbyEndsTheSessionOfAFrozenPublisher(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	ex := b.Exchange()
	b.Queue(ex, "#", nil)
	ctx := context.Background()
	frozen, err := s.DB.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer frozen.Close()
	if _, err := frozen.ExecContext(ctx, `SELECT pg_advisory_lock($1, 'mailroom_outbox'::regclass::oid::integer)`, locks.Active); err != nil {
		t.Fatal(err)
	}
	start := func() *Relay {
		r, err := New(s.DB.DB, Config{URL: b.URL, DatabaseURL: s.URL, PollInterval: 50 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		r.frozenAfter = 4 * time.Second // presenceInterval (1 s) and a margin for a loaded machine
		rctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); r.Run(rctx) }()
		t.Cleanup(func() { cancel(); <-done })
		return r
	}
	r := start()
	testenv.Eventually(t, 30*time.Second, "the standby to take over from the frozen session", func() bool { return !r.Stats().Standby })
	if err := frozen.PingContext(ctx); err == nil {
		t.Error("the frozen session is still alive")
	}
	ob, err := outbox.New(outbox.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Add(ctx, s.DB, outbox.Message{Exchange: ex, RoutingKey: "k", Payload: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 30*time.Second, "the message published", func() bool { return r.Stats().Published == 1 })

	// A second relay stands by for longer than frozenAfter: the publishing
	// relay checks in every second, so it keeps its slot.
	other := start()
	testenv.Eventually(t, 30*time.Second, "the second relay standing by", func() bool { return other.Stats().Standby && !r.Stats().Standby })
	for deadline := time.Now().Add(2*other.frozenAfter + presenceInterval); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if r.Stats().Standby || !other.Stats().Standby {
			t.Fatal("the second relay took the slot of a publisher that checks in")
		}
	}

	// The publisher's claim waits on the table (an ALTER TABLE queued
	// behind a long transaction would do that): it still checks in.
	lock, err := s.DB.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Rollback()
	if _, err := lock.ExecContext(ctx, `LOCK TABLE mailroom_outbox IN ACCESS EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 30*time.Second, "the publisher's claim waiting for the table", func() bool {
		var n int
		s.DB.Get(&n, `SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FROM "mailroom_outbox" o%'`)
		return n > 0
	})
	for deadline := time.Now().Add(2*other.frozenAfter + presenceInterval); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if r.Stats().Standby || !other.Stats().Standby {
			t.Fatal("the second relay took the slot of a publisher whose claim waits on the table")
		}
	}
}
