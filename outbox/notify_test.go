package outbox_test

import (
	"context"
	"testing"
	"time"

	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/internal/wakeup"
	"github.com/mailroom-go/mailroom/outbox"
)

// Add sends a NOTIFY only while a relay is asleep (a live wake row). To
// check for the absence of a notification without waiting on a clock, a
// marker NOTIFY is committed after each Add: notifications arrive in commit
// order, so the first one received tells whether Add notified.
func TestAddNotifiesOnlyWhileARelaySleeps(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ob := newOutbox(t, outbox.Config{})
	ctx := context.Background()
	var channel string
	if err := s.DB.Get(&channel, `SELECT `+wakeup.ChannelExpr("$1"), `"mailroom_outbox"`); err != nil {
		t.Fatal(err)
	}
	l := pq.NewListener(s.URL, 10*time.Millisecond, time.Second, nil)
	defer l.Close()
	if err := l.Listen(channel); err != nil {
		t.Fatal(err)
	}
	first := func() string {
		t.Helper()
		if _, err := s.DB.Exec(`SELECT pg_notify($1, 'marker')`, channel); err != nil {
			t.Fatal(err)
		}
		select {
		case n := <-l.Notify:
			if n == nil {
				t.Fatal("listener reconnected; notifications may be lost")
			}
			extra := n.Extra
			if extra != "marker" { // consume the marker too
				<-l.Notify
			}
			return extra
		case <-time.After(10 * time.Second):
			t.Fatal("no notification at all within 10s")
		}
		return ""
	}
	add := func() {
		t.Helper()
		if err := ob.Add(ctx, s.DB, msg(1)); err != nil {
			t.Fatal(err)
		}
	}

	add() // no relay asleep: no NOTIFY
	if got := first(); got != "marker" {
		t.Fatalf("Add notified with no relay asleep (first notification %q)", got)
	}
	if _, err := s.DB.Exec(`INSERT INTO mailroom_outbox_wake (relay, wake_until) VALUES ('r1', now() + interval '1 minute')`); err != nil {
		t.Fatal(err)
	}
	add() // a relay asleep: NOTIFY
	if got := first(); got != "" {
		t.Fatalf("Add did not notify a sleeping relay (first notification %q)", got)
	}
	if _, err := s.DB.Exec(`UPDATE mailroom_outbox_wake SET wake_until = '-infinity'`); err != nil {
		t.Fatal(err)
	}
	add() // the relay is awake again: no NOTIFY
	if got := first(); got != "marker" {
		t.Fatalf("Add notified an awake relay (first notification %q)", got)
	}
	quiet := newOutbox(t, outbox.Config{DisableNotify: true})
	if _, err := s.DB.Exec(`UPDATE mailroom_outbox_wake SET wake_until = now() + interval '1 minute'`); err != nil {
		t.Fatal(err)
	}
	if err := quiet.Add(ctx, s.DB, msg(2)); err != nil {
		t.Fatal(err)
	}
	if got := first(); got != "marker" {
		t.Fatalf("DisableNotify: Add notified (first notification %q)", got)
	}
}
