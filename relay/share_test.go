package relay

import (
	"context"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
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
		testenv.Eventually(t, 10*time.Second, "slots held", func() bool {
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
