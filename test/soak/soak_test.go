//go:build soak

// Package soak is the short version of the bench's soak figure (issue 28):
// the mailroom-relay binary with its defaults under a steady write load
// for two minutes, a REPEATABLE READ snapshot held for the middle minute.
// It checks that nothing is lost and that the relay catches up after the
// release; the figures per phase are logged, not asserted (see
// `go run ./bench -run soak` for the measurement).
package soak

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

func TestMain(m *testing.M) {
	testenv.SkipWithoutServices(true)
	m.Run()
}

const (
	phase   = 30 * time.Second // before and after; the hold is twice as long
	perTx   = 10
	txEvery = 20 * time.Millisecond // 500 events/s
	keys    = 100
)

func TestHeldSnapshotLosesNothingAndTheRelayRecovers(t *testing.T) {
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	ex := b.Exchange()
	q := b.Queue(ex, "#", nil)

	// The consumer: notes each event once, with its commit→receive time.
	var mu sync.Mutex
	got := map[string]bool{}
	var lat []time.Duration // of the current phase
	dups := 0
	ch := b.Channel()
	if err := ch.Qos(1000, 0, false); err != nil {
		t.Fatal(err)
	}
	ds, err := ch.Consume(q, "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for d := range ds {
			at, _ := strconv.ParseInt(fmt.Sprint(d.Headers["commit"]), 10, 64)
			mu.Lock()
			if got[d.MessageId] {
				dups++
			}
			got[d.MessageId] = true
			lat = append(lat, time.Since(time.Unix(0, at)))
			mu.Unlock()
		}
	}()

	bin := testenv.BuildBinary(t, "github.com/mailroom-go/mailroom/cmd/mailroom-relay")
	relay := exec.Command(bin, "run", "--http", "127.0.0.1:0")
	relay.Env = append(relay.Environ(), "DATABASE_URL="+s.URL, "AMQP_URL="+testenv.AMQPURL())
	stderr, _ := relay.StderrPipe()
	if err := relay.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relay.Process.Signal(syscall.SIGTERM); relay.Wait() })
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			var l struct{ Level, Msg string }
			if json.Unmarshal(sc.Bytes(), &l) == nil && (l.Level == "WARN" || l.Level == "ERROR") {
				t.Logf("relay: %s", sc.Text())
			}
		}
	}()

	// The writers: perTx events every txEvery, each with its commit time
	// (taken just before the commit).
	ob, err := outbox.New(outbox.Config{})
	if err != nil {
		t.Fatal(err)
	}
	var written []string
	ctx, stopWriting := context.WithCancel(context.Background())
	writing := make(chan struct{})
	go func() {
		defer close(writing)
		tick := time.NewTicker(txEvery)
		defer tick.Stop()
		for n := 0; ; n++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			tx, err := s.DB.Begin()
			if err != nil {
				t.Error(err)
				return
			}
			commit := strconv.FormatInt(time.Now().UnixNano(), 10)
			var ids []string
			for i := range perTx {
				id := outbox.NewID()
				// Not ctx: the stop ends the loop at the next tick, not mid-transaction.
				if err := ob.Add(context.Background(), tx, outbox.Message{ID: id, Exchange: ex, RoutingKey: "soak", Key: fmt.Sprint("k", (n*perTx+i)%keys),
					Headers: map[string]string{"commit": commit}, Payload: []byte(`{"pad":"` + fmt.Sprintf("%0180d", n) + `"}`)}); err != nil {
					tx.Rollback()
					t.Error(err)
					return
				}
				ids = append(ids, id)
			}
			if err := tx.Commit(); err != nil {
				t.Error(err)
				return
			}
			written = append(written, ids...)
		}
	}()

	report := func(name string, over time.Duration) {
		mu.Lock()
		l := lat
		lat = nil
		mu.Unlock()
		sort.Slice(l, func(i, j int) bool { return l[i] < l[j] })
		if len(l) == 0 {
			t.Logf("%-6s nothing received", name)
			return
		}
		var dead int64
		s.DB.Get(&dead, `SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'mailroom_outbox'::regclass`)
		t.Logf("%-8s %6d events (%4.0f/s)  commit→consumer p50 %v p99 %v  outbox dead tuples %d", name, len(l), float64(len(l))/over.Seconds(),
			l[len(l)/2].Round(time.Millisecond), l[len(l)*99/100].Round(time.Millisecond), dead)
	}
	time.Sleep(phase) // the load's phases are durations, not synchronisation
	report("before", phase)
	_, release := testenv.HoldSnapshot(t, s.URL)
	time.Sleep(2 * phase)
	release()
	report("hold", 2*phase)
	time.Sleep(phase)
	report("after", phase)
	stopWriting()
	<-writing

	// Nothing lost, and the relay catches up with what the hold left.
	caughtUp := time.Now()
	testenv.Eventually(t, 3*time.Minute, "every written event received", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, id := range written {
			if !got[id] {
				return false
			}
		}
		return true
	})
	// The relay deletes what was confirmed just after the consumer got it.
	testenv.Eventually(t, time.Minute, "the outbox empty after the catch-up", func() bool {
		var pending int
		return s.DB.Get(&pending, `SELECT count(*) FROM mailroom_outbox`) == nil && pending == 0
	})
	report("catch-up", time.Since(caughtUp))
	mu.Lock()
	t.Logf("written %d, received %d distinct, %d duplicate deliveries", len(written), len(got), dups)
	mu.Unlock()
}
