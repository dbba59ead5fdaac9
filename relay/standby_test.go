package relay_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/relay"
)

// startNamed runs a relay whose database sessions carry an application
// name of their own, so that a test can terminate exactly them.
func (e *env) startNamed(suffix string, edit func(*relay.Config)) (*relay.Relay, string, func()) {
	e.t.Helper()
	cfg := e.config()
	cfg.Name = e.appTag + suffix
	cfg.DatabaseURL = testenv.WithAppName(e.s.URL, cfg.Name)
	if edit != nil {
		edit(&cfg)
	}
	stop := e.start(cfg)
	return e.relays[len(e.relays)-1], cfg.Name, stop
}

func (e *env) waitRole(name string, r *relay.Relay, standby bool) {
	e.t.Helper()
	testenv.Eventually(e.t, 15*time.Second, fmt.Sprintf("relay %s standing by: %v", name, standby), func() bool {
		return r.Stats().Standby == standby
	})
}

func (e *env) wantStatus(relays, publishing int64) {
	e.t.Helper()
	testenv.Eventually(e.t, 30*time.Second, fmt.Sprintf("status: %d relays running, %d publishing", relays, publishing), func() bool {
		st, err := relay.Status(context.Background(), e.s.DB.DB, mailroom.Tables{})
		return err == nil && st.Relays == relays && st.Publishing == publishing
	})
}

// publisherAndStandby starts relay a (edited by editA, if set) and waits
// until it publishes, then relay b, and waits until it stands by.
func (e *env) publisherAndStandby(editA func(*relay.Config)) (a *relay.Relay, appA string, stopA func(), b *relay.Relay) {
	e.t.Helper()
	a, appA, stopA = e.startNamed("-a", editA)
	e.waitRole("a", a, false)
	b, _, _ = e.startNamed("-b", nil)
	e.waitRole("b", b, true)
	return a, appA, stopA, b
}

// deliver writes n messages and checks each arrives once.
func (e *env) deliver(n int) {
	e.t.Helper()
	msgs, want := batch(e.ex, n)
	e.add(msgs...)
	if dups := e.consumeAll(e.queue, want, 60*time.Second); dups != 0 {
		e.t.Errorf("%d duplicates", dups)
	}
	e.waitDrained()
}

// By default one relay of a table publishes and the others stand by: the
// one publishing keeps the whole default window, the one standing by
// publishes nothing, and takes over when the first stops.
func TestStandbyRelayTakesOverWhenThePublisherStops(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, stopA, b := e.publisherAndStandby(nil)
	e.wantStatus(2, 1)
	e.deliver(1000)
	if w := a.Stats().ConfirmWindow; w != 1024 {
		t.Errorf("publishing relay's window %d, want the whole default 1024 (the standby does not share it)", w)
	}
	if p := b.Stats().Published; p != 0 {
		t.Errorf("the standby relay published %d messages", p)
	}
	stopA()
	e.waitRole("b", b, false)
	e.wantStatus(1, 1)
	e.deliver(1000)
	testenv.Eventually(t, 30*time.Second, "relay b to count 1000 published", func() bool { return b.Stats().Published == 1000 })
}

// The publishing relay's lock session is terminated: the standby takes
// the slot, and the first relay, coming back, stands by.
func TestStandbyRelayTakesOverWhenThePublishersSessionDies(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, appA, _, b := e.publisherAndStandby(nil)
	if testenv.TerminateBackends(t, appA) == 0 {
		t.Fatal("no session of relay a terminated")
	}
	e.waitRole("b", b, false)
	e.waitRole("a", a, true)
	e.wantStatus(2, 1)
	e.deliver(500)
}

// The publishing relay cannot reach the broker: it gives its slot up,
// the standby takes over and, once the leases of the rows the first relay
// claimed expire, publishes those too.
func TestStandbyRelayTakesOverWhenThePublisherLosesTheBroker(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _, b := e.publisherAndStandby(func(c *relay.Config) {
		c.URL = "amqp://guest:guest@127.0.0.1:1/" // nothing listens on port 1
		c.ConfirmTimeout, c.Lease = time.Second, 2*time.Second
	})
	msgs, want := batch(e.ex, 200)
	e.add(msgs...)
	e.waitRole("a", a, true)
	e.waitRole("b", b, false)
	if dups := e.consumeAll(e.queue, want, 60*time.Second); dups != 0 {
		t.Errorf("%d duplicates", dups)
	}
	e.waitDrained()
}

// ActiveRelays is validated.
func TestActiveRelaysOutOfRange(t *testing.T) {
	for _, n := range []int{-1, 65} {
		_, err := relay.New(nil, relay.Config{URL: "amqp://x", DisableListen: true, ActiveRelays: n})
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("ActiveRelays %d: must be between 1 and 64", n)) {
			t.Errorf("ActiveRelays %d: error %v, want one naming the field and its range", n, err)
		}
	}
}

// Bad values get an error naming the field; a BatchSize above the default
// window raises the window with it.
func TestNewValidatesConfig(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		cfg  relay.Config
		want string
	}{
		{relay.Config{URL: "http://x"}, "Config.URL: http://x is not an amqp:// or amqps:// URL"},
		{relay.Config{}, "Config.URL: required"},
		{relay.Config{URL: "amqp://a/, amqp://u:secret@b:bad/"}, "Config.URL: node 2 of 2: (unparsable URL) is not an amqp:// or amqps:// URL"},
		{relay.Config{URLs: []string{"amqp://a/", ""}}, "Config.URLs: node 2 of 2: empty"},
		{relay.Config{URL: "amqp://a/", URLs: []string{"amqp://b/"}}, "Config.URL and URLs: both set"},
		{relay.Config{URL: "amqp://x", ConfirmTimeout: 3}, "ConfirmTimeout 3ns: must be at least 100ms"},
		{relay.Config{URL: "amqp://x", ConfirmTimeout: 200 * 365 * 24 * time.Hour, Lease: time.Second}, "Lease 1s must be at least twice ConfirmTimeout (1752000h0m0s)"}, // 2× overflows
		{relay.Config{URL: "amqp://x", MinBackoff: -time.Second}, "MinBackoff -1s"},
	} {
		tc.cfg.DisableListen = true
		if _, err := relay.New(nil, tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: error %v, want %q", tc.cfg, err, tc.want)
		}
	}
	r, err := relay.New(nil, relay.Config{URL: "amqp://x", DisableListen: true, BatchSize: 2000})
	if err != nil {
		t.Fatalf("BatchSize 2000 with the default window: %v", err)
	}
	if w := r.Stats().ConfirmWindow; w != 2000 {
		t.Errorf("default window with BatchSize 2000: %d, want 2000", w)
	}
}

// blockDeletes makes every DELETE from the test's outbox wait (a trigger
// takes an advisory lock the test holds) until unblock is called: rows a
// relay published stay held by it, their outcome unrecorded.
func (e *env) blockDeletes() (unblock func()) {
	e.t.Helper()
	ctx := context.Background()
	conn, err := e.s.DB.Conn(ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	var key int64
	if err := conn.QueryRowContext(ctx, `SELECT hashtext(current_schema())::bigint`).Scan(&key); err != nil {
		e.t.Fatal(err)
	}
	for _, q := range []string{
		`SELECT pg_advisory_lock(` + fmt.Sprint(key) + `)`,
		`CREATE FUNCTION block_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_advisory_xact_lock_shared(` + fmt.Sprint(key) + `); RETURN NULL; END $$`,
		`CREATE TRIGGER block_deletes BEFORE DELETE ON mailroom_outbox FOR EACH STATEMENT EXECUTE FUNCTION block_deletes()`,
	} {
		if _, err := conn.ExecContext(ctx, q); err != nil {
			e.t.Fatal(err)
		}
	}
	var once sync.Once
	unblock = func() {
		once.Do(func() {
			if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_unlock(`+fmt.Sprint(key)+`)`); err != nil {
				e.t.Error(err)
			}
			conn.Close()
		})
	}
	e.t.Cleanup(unblock)
	return unblock
}

// waitTicks waits until relay r, standing by, has checked in n more times
// (one tick a second).
func (e *env) waitTicks(r *relay.Relay, n int) {
	e.t.Helper()
	last := r.Stats().LastProgress
	for i := 0; i < n; i++ {
		testenv.Eventually(e.t, 15*time.Second, "the relay standing by to check in", func() bool {
			p := r.Stats().LastProgress
			if p.After(last) {
				last = p
				return true
			}
			return false
		})
	}
}

// publishHeld has relay a publish n messages and keep holding their rows
// (their deletes wait), and returns unblock, which lets them finish.
func (e *env) publishHeld(a *relay.Relay, n int) (unblock func()) {
	e.t.Helper()
	unblock = e.blockDeletes()
	msgs, want := batch(e.ex, n)
	e.add(msgs...)
	if dups := e.consumeAll(e.queue, want, 60*time.Second); dups != 0 {
		e.t.Errorf("%d duplicates", dups)
	}
	if st := a.Stats(); st.Published != 0 || st.Held != n {
		e.t.Fatalf("relay a with its deletes blocked: %d published, %d held; want 0 and %d", st.Published, st.Held, n)
	}
	return unblock
}

// A relay stopping keeps its publishing slot and the alone lock until the
// rows it holds are finished: the relay taking over claims without leases
// and would publish them again.
func TestStoppingRelayHandsOverOnlyWhatItFinished(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, stopA, b := e.publisherAndStandby(nil)
	unblock := e.publishHeld(a, 300)
	stopped := make(chan struct{})
	go func() { defer close(stopped); stopA() }()
	e.waitTicks(b, 3)
	if st := b.Stats(); !st.Standby || st.Published != 0 {
		t.Fatalf("relay b took over while relay a, stopping, still held its rows (standing by: %v, published %d)", st.Standby, st.Published)
	}
	unblock()
	<-stopped
	if st := a.Stats(); st.Published != 300 || st.Held != 0 {
		t.Errorf("relay a stopped with %d published, %d held; want 300 and 0", st.Published, st.Held)
	}
	e.waitRole("b", b, false)
	e.deliver(300) // fails on a message of the first 300 delivered again
}

// A relay joining one that publishes alone (ActiveRelays 2) waits until
// that one claims with leases again and has finished the rows it claimed
// without: the newcomer would publish those again.
func TestJoiningRelayWaitsForTheLoneOne(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	two := func(c *relay.Config) { c.ActiveRelays = 2 }
	a, _, _ := e.startNamed("-a", two)
	e.waitRole("a", a, false)
	unblock := e.publishHeld(a, 300)
	b, _, _ := e.startNamed("-b", two)
	e.wantStatus(2, 2) // both hold a publishing slot
	e.waitTicks(b, 3)
	if st := b.Stats(); !st.Standby || st.Published != 0 {
		t.Fatalf("relay b claimed while relay a held rows claimed without a lease (standing by: %v, published %d)", st.Standby, st.Published)
	}
	unblock()
	e.waitRole("b", b, false)
	e.deliver(600) // fails on a message of the first 300 delivered again
	if a.Stats().Published+b.Stats().Published < 600 {
		t.Errorf("published %d + %d, want at least 600 between the two relays", a.Stats().Published, b.Stats().Published)
	}
}

// A relay polling without LISTEN (PgBouncer) takes no publishing slot and
// so cannot wait for a relay publishing alone like the others do: its
// claims take nothing while one does (that relay's rows carry no lease),
// and it publishes once that relay stops.
func TestPollingRelayBesideALoneOne(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, stopA := e.startNamed("-a", nil)
	e.waitRole("a", a, false)
	poll := e.config()
	poll.Name = e.appTag + "-poll"
	poll.DisableListen, poll.DatabaseURL = true, ""
	poll.PollInterval = 10 * time.Millisecond
	e.start(poll)
	b := e.relays[len(e.relays)-1]
	e.deliver(3000) // fails on a message delivered twice
	if p := b.Stats().Published; p != 0 {
		t.Errorf("the polling relay published %d messages beside a relay publishing alone", p)
	}
	stopA()
	e.deliver(500)
	testenv.Eventually(t, 30*time.Second, "the polling relay to count 500 published", func() bool { return b.Stats().Published == 500 })
}
