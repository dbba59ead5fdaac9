//go:build chaos

package chaos

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand"
	"net"
	"net/url"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"

	"github.com/mailroom-go/mailroom/atcommit"
	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/internal/testenv/cluster"
	"github.com/mailroom-go/mailroom/outbox"
)

var (
	runFor  = flag.Duration("chaos.duration", 100*time.Second, "how long events are written and faults injected")
	seedArg = flag.Int64("chaos.seed", 0, "schedule seed (0 = from the clock); printed so a failing run can be replayed")
	// nodeCount > 1 is the cluster profile.
	nodeCount = flag.Int("chaos.nodes", 1, "private RabbitMQ nodes: 1, or 3 for the cluster profile (a node stopped and started again every 40 s)")
	nodes     *cluster.Cluster
	rate      = flag.Int("chaos.rate", 40, "events per second written")
)

const (
	// Three relay processes, two publishing at once (--active-relays 2):
	// one stands by, so kills exercise both relays publishing side by side
	// and a standby taking over.
	relays    = 3
	consumers = 2
	keys      = 40
	poisoned  = 5
)

// proc is a relay or consumer subprocess the driver can kill and restart.
type proc struct {
	name string
	bin  string
	args []string
	env  []string
	mu   sync.Mutex
	cmd  *exec.Cmd
	logs *lockedWriter
}

func (p *proc) start(t *testing.T) {
	p.mu.Lock()
	defer p.mu.Unlock()
	cmd := exec.Command(p.bin, p.args...)
	cmd.Env = append(os.Environ(), p.env...)
	if p.logs == nil {
		p.logs = &lockedWriter{b: &strings.Builder{}}
	}
	cmd.Stderr = p.logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", p.name, err)
	}
	p.cmd = cmd
	go cmd.Wait()
}

func (p *proc) kill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		p.cmd.Process.Kill() // SIGKILL: no cleanup at all
	}
}

// signal sends sig to the running process (SIGSTOP and SIGCONT freeze and
// thaw it: its connections stay open, as for a paused container).
func (p *proc) signal(sig os.Signal) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		p.cmd.Process.Signal(sig)
	}
}

// stop interrupts the process and waits for it to exit; it reports
// whether it did so within 20 s (else it is killed).
func (p *proc) stop() (graceful bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		p.cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { p.cmd.Process.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			p.cmd.Process.Kill()
			return false
		}
	}
	return true
}

type lockedWriter struct {
	mu sync.Mutex
	b  *strings.Builder
}

func (w *lockedWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.b.Len() > 1<<20 { // keep the tail bounded
		w.b.Reset()
	}
	return w.b.Write(p)
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func rabbitmqctl(t *testing.T, args ...string) {
	if out, err := testenv.Ctl(args...); err != nil {
		t.Logf("rabbitmqctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// TestMain runs the suite on private RabbitMQ nodes (its faults stop and
// restart the broker's app): one, or with -chaos.nodes 3 a cluster (the
// cluster profile: the relays and consumers get every node, and the
// broker's restart becomes a node's, repeated). The relay and consumer
// processes get the URLs through AMQP_URL, each node behind a proxy.
func TestMain(m *testing.M) {
	flag.Parse()
	testenv.SkipWithoutServices(true)
	var stop func()
	nodes, stop = cluster.Private(*nodeCount)
	code := m.Run()
	stop()
	os.Exit(code)
}

func TestChaos(t *testing.T) {
	seed := *seedArg
	if seed == 0 {
		seed = time.Now().UnixNano() % 1_000_000
	}
	t.Logf("chaos seed %d (replay: -chaos.seed %d), duration %s, %d events/s", seed, seed, *runFor, *rate)
	rng := rand.New(rand.NewSource(seed))
	t.Cleanup(func() { // the broker as we found it, even on failure
		testenv.Ctl("start_app")
		testenv.Ctl("await_startup")
	})

	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	exchange := b.Exchange()
	queue := testenv.Unique("chaos")
	if err := inbox.DeclareTopology(b.Channel(), inbox.Topology{
		Queue: queue, Exchange: exchange, ExchangeKind: "topic", BindingKeys: []string{"#"}, SingleActiveConsumer: true,
	}); err != nil {
		t.Fatal(err)
	}
	b.CleanupQueues(queue, inbox.RetryQueueName(queue), inbox.DeadLetterQueueName(queue))
	b.CleanupExchanges(inbox.DeadLetterExchangeName(queue))
	for _, q := range []string{
		`CREATE TABLE chaos_effects (seq bigserial PRIMARY KEY, message_id text NOT NULL, key text NOT NULL, n int NOT NULL, consumer text NOT NULL)`,
		`CREATE TABLE chaos_stats (process text PRIMARY KEY, duplicates bigint, requeued bigint, retried bigint, sessions bigint)`,
	} {
		if _, err := s.DB.Exec(q); err != nil {
			t.Fatal(err)
		}
	}

	// Proxies between the processes and the services.
	tp := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	pgProxy := toxiproxy.NewProxy(tp, "pg", freeAddr(t), "127.0.0.1:5432")
	// One proxy for each private node (TestMain), and the URL list the
	// processes get: every node, through its proxy.
	proxies := []*toxiproxy.Proxy{pgProxy}
	var amqpURLs []string
	for i, node := range nodes.URLs() {
		u, err := url.Parse(node)
		if err != nil {
			t.Fatal(err)
		}
		p := toxiproxy.NewProxy(tp, fmt.Sprint("amqp", i), freeAddr(t), u.Host)
		proxies = append(proxies, p)
		amqpURLs = append(amqpURLs, strings.Replace(node, u.Host, p.Listen, 1))
	}
	for _, p := range proxies {
		if err := p.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Stop)
	}
	amqpURL := strings.Join(amqpURLs, ",")
	viaProxy := func(dsn, hostport, app string) string {
		u := strings.Replace(dsn, "127.0.0.1:5432", hostport, 1)
		if app != "" {
			u = testenv.WithAppName(u, app)
		}
		return u
	}
	tag := testenv.Unique("chaos")
	relayBin := testenv.BuildBinary(t, "github.com/mailroom-go/mailroom/cmd/mailroom-relay")
	consumerBin := testenv.BuildBinary(t, "github.com/mailroom-go/mailroom/test/chaos/consumer")
	var procs []*proc
	for i := 0; i < relays; i++ {
		name := fmt.Sprintf("%s-relay-%d", tag, i)
		procs = append(procs, &proc{name: name, bin: relayBin,
			args: []string{"run", "--name", name, "--batch-size", "50", "--lease", "3s", "--confirm-timeout", "1s", "--poll-interval", "100ms", "--max-attempts", "1000", "--active-relays", "2", "--http", "127.0.0.1:0"},
			env:  []string{"DATABASE_URL=" + viaProxy(s.URL, pgProxy.Listen, name), "AMQP_URL=" + amqpURL},
		})
	}
	for i := 0; i < consumers; i++ {
		name := fmt.Sprintf("%s-consumer-%d", tag, i)
		procs = append(procs, &proc{name: name, bin: consumerBin,
			env: []string{"DATABASE_URL=" + viaProxy(s.URL, pgProxy.Listen, name), "AMQP_URL=" + amqpURL,
				"CHAOS_QUEUE=" + queue, "CHAOS_NAME=" + name},
		})
	}
	for _, p := range procs {
		p.start(t)
		t.Cleanup(p.kill)
	}
	defer func() {
		if t.Failed() {
			for _, p := range procs {
				logs := p.logs.String()
				if len(logs) > 4000 {
					logs = logs[len(logs)-4000:]
				}
				t.Logf("--- %s (tail)\n%s", p.name, logs)
			}
		}
	}()

	// Writers: each key belongs to one writer, which writes its events in
	// consecutive transactions — the condition under which per-key order
	// is promised. Odd writers add in a transaction of a database of
	// atcommit.OpenDB (the insert sent with the COMMIT), even ones directly.
	ob, err := outbox.New(outbox.Config{})
	if err != nil {
		t.Fatal(err)
	}
	atDB, err := atcommit.OpenDB(s.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer atDB.Close()
	atCommit, err := outbox.New(outbox.Config{DB: atDB})
	if err != nil {
		t.Fatal(err)
	}
	add := func(w int, m outbox.Message) error {
		if w%2 == 0 {
			return ob.Add(context.Background(), s.DB, m)
		}
		tx, err := atDB.Begin()
		if err != nil {
			return err
		}
		defer tx.Rollback()
		if err := atCommit.Add(context.Background(), tx, m); err != nil {
			return err
		}
		return tx.Commit()
	}
	ctx, stopWriting := context.WithTimeout(context.Background(), *runFor)
	defer stopWriting()
	var (
		wmu     sync.Mutex
		written = map[string]bool{}
		poison  = map[string]bool{}
		wg      sync.WaitGroup
	)
	const writers = 4
	poisonAt := map[int]bool{}
	for len(poisonAt) < poisoned {
		poisonAt[rng.Intn(*rate*int(runFor.Seconds())/writers/2+1)] = true
	}
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			next := map[string]int{}
			tick := time.NewTicker(time.Second * writers / time.Duration(*rate))
			defer tick.Stop()
			for i := 0; ctx.Err() == nil; i++ {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				key := fmt.Sprintf("k%02d", w+writers*(i%(keys/writers)))
				var m outbox.Message
				body, _ := json.Marshal(map[string]any{"key": key, "n": next[key]})
				m = outbox.Message{ID: outbox.NewID(), Exchange: exchange, RoutingKey: "chaos." + key, Key: key, Payload: body}
				isPoison := w == 0 && poisonAt[i]
				if isPoison { // unkeyed: a poisoned message must not hold up a key forever
					body, _ = json.Marshal(map[string]any{"poison": true})
					m = outbox.Message{ID: outbox.NewID(), Exchange: exchange, RoutingKey: "chaos.poison", Payload: body}
				}
				if err := add(w, m); err != nil {
					t.Errorf("write: %v", err)
					return
				}
				if !isPoison {
					next[key]++
				}
				wmu.Lock()
				if isPoison {
					poison[m.ID] = true
				} else {
					written[m.ID] = true
				}
				wmu.Unlock()
			}
		}()
	}

	// Faults, from the seeded schedule.
	faults := map[string]int{}
	brokerRestartAt := time.Duration(rng.Int63n(int64(*runFor)/2)) + *runFor/4
	restarted := false
	// Every freezeEvery, one publishing relay is frozen (SIGSTOP) for
	// longer than a standby waits before it ends a silent publisher's
	// session, then thawed.
	const freezeEvery = 90 * time.Second
	// In the cluster profile a node stops and starts again every
	// nodeStopEvery, from brokerRestartAt on.
	const nodeStopEvery = 40 * time.Second
	nextFreeze := time.Duration(rng.Int63n(int64(freezeEvery)/2)) + freezeEvery/4
	start := time.Now()
	for ctx.Err() == nil {
		wait := time.Duration(1000+rng.Intn(2500)) * time.Millisecond
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
		if ctx.Err() != nil {
			break
		}
		if time.Since(start) > nextFreeze {
			nextFreeze += freezeEvery
			faults["SIGSTOP relay (12-15 s)"]++
			p := procs[rng.Intn(relays)]         // the relays come first
			for _, i := range rng.Perm(relays) { // a publisher, by its last role change logged
				l := procs[i].logs.String()
				if strings.LastIndex(l, "publishing from the outbox table") > strings.LastIndex(l, "standing by:") {
					p = procs[i]
					break
				}
			}
			p.signal(syscall.SIGSTOP)
			time.Sleep(time.Duration(12000+rng.Intn(3000)) * time.Millisecond) // frozen
			p.signal(syscall.SIGCONT)
			continue
		}
		if !restarted && time.Since(start) > brokerRestartAt && *nodeCount == 1 {
			restarted = true
			faults["broker stop_app/start_app"]++
			rabbitmqctl(t, "stop_app")
			time.Sleep(time.Duration(500+rng.Intn(1500)) * time.Millisecond) // the outage itself
			rabbitmqctl(t, "start_app")
			rabbitmqctl(t, "await_startup")
			continue
		}
		if *nodeCount > 1 && time.Since(start) > brokerRestartAt {
			brokerRestartAt += nodeStopEvery
			faults["node stop_app/start_app"]++
			i := rng.Intn(*nodeCount)
			nodes.StopNode(t, i)
			time.Sleep(time.Duration(2000+rng.Intn(4000)) * time.Millisecond) // the node's outage
			nodes.StartNode(t, i)
			continue
		}
		switch k := rng.Intn(7); k {
		case 0, 1:
			p := procs[rng.Intn(len(procs))]
			who := "relay"
			if strings.Contains(p.name, "consumer") {
				who = "consumer"
			}
			// A crash, or one time in three a deploy: a graceful stop
			// (a consumer hands the queue to the next one), a restart.
			if rng.Intn(3) == 0 {
				if p.stop() {
					faults["SIGINT (graceful restart) "+who]++
				} else {
					faults["SIGINT, killed after 20 s "+who]++
				}
			} else {
				faults["SIGKILL "+who]++
				p.kill()
			}
			time.Sleep(time.Duration(200+rng.Intn(1500)) * time.Millisecond) // down time
			p.start(t)
		case 2:
			faults["close_all_connections"]++
			rabbitmqctl(t, "close_all_connections", "chaos")
		case 3:
			faults["pg_terminate_backend"]++
			for _, p := range procs {
				testenv.TerminateBackends(t, p.name)
			}
		case 4:
			faults["latency (toxiproxy)"]++
			p := proxies[rng.Intn(len(proxies))]
			lat := 50 + rng.Intn(400)
			if _, err := p.Toxics.AddToxicJson(strings.NewReader(fmt.Sprintf(`{"name":"lat","type":"latency","stream":"downstream","attributes":{"latency":%d,"jitter":%d}}`, lat, lat/4))); err != nil {
				t.Fatalf("add latency toxic: %v", err)
			}
			time.Sleep(time.Duration(1000+rng.Intn(3000)) * time.Millisecond)
			p.Toxics.RemoveToxic(context.Background(), "lat")
		case 5, 6:
			faults["cut connections (toxiproxy)"]++
			p := proxies[rng.Intn(len(proxies))]
			p.Stop() // closes every proxied connection and refuses new ones
			time.Sleep(time.Duration(300+rng.Intn(2000)) * time.Millisecond)
			if err := p.Start(); err != nil {
				t.Fatalf("restart proxy: %v", err)
			}
		}
	}
	wg.Wait()
	if t.Failed() {
		return
	}

	// Drain: every process up, no toxics; wait until every event had its
	// effect and the outbox is empty.
	drainStart := time.Now()
	var effects, pending int
	deadline := time.Now().Add(3 * time.Minute)
	for {
		s.DB.Get(&effects, `SELECT count(DISTINCT message_id) FROM chaos_effects`)
		s.DB.Get(&pending, `SELECT count(*) FROM mailroom_outbox`)
		if effects >= len(written) && pending == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("not drained within 3 minutes: %d of %d effects, %d outbox rows pending", effects, len(written), pending)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	drain := time.Since(drainStart)
	// Let poisoned messages reach the dead-letter queue.
	dlq := inbox.DeadLetterQueueName(queue)
	// Dead letters by message id. A poisoned message can be dead-lettered
	// twice (the relay published it twice, or the ack of the original was
	// lost to a fault after its dead letter was confirmed): the invariant
	// is that every poisoned message, and nothing else, is there.
	inDLQ := map[string]int{}
	// A fresh connection: the faults closed the test's own.
	checkConn, err := testenv.Dial(b.URL, "chaos-check")
	if err != nil {
		t.Fatal(err)
	}
	defer checkConn.Close()
	takeDLQ := func() bool {
		ch, err := checkConn.Channel()
		if err != nil {
			return false
		}
		defer ch.Close()
		for {
			d, ok, err := ch.Get(dlq, true)
			if err != nil || !ok {
				return err == nil
			}
			inDLQ[d.MessageId]++
		}
	}
	testenv.Eventually(t, 60*time.Second, "poisoned messages dead-lettered", func() bool {
		takeDLQ()
		for id := range poison {
			if inDLQ[id] == 0 {
				return false
			}
		}
		return true
	})
	for _, p := range procs {
		p.stop()
	}
	if !takeDLQ() { // a late second copy
		t.Error("could not read the dead-letter queue after the processes stopped")
	}
	dlqCopies, dlqOther := 0, 0
	for id, n := range inDLQ {
		dlqCopies += n
		if !poison[id] {
			dlqOther++
		}
	}

	// Invariants, from the database and the broker.
	var rows []struct {
		MessageID string `db:"message_id"`
		Key       string `db:"key"`
		N         int    `db:"n"`
	}
	if err := s.DB.Select(&rows, `SELECT message_id, key, n FROM chaos_effects ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	count := map[string]int{}
	lastN := map[string]int{}
	orderViolations := 0
	for _, r := range rows {
		count[r.MessageID]++
		if count[r.MessageID] > 1 {
			continue
		}
		if prev, ok := lastN[r.Key]; ok && r.N != prev+1 {
			orderViolations++
			if orderViolations <= 5 {
				t.Errorf("key %s: effect n=%d after n=%d", r.Key, r.N, prev)
			}
		} else if !ok && r.N != 0 {
			orderViolations++
			t.Errorf("key %s: first effect n=%d, want 0", r.Key, r.N)
		}
		lastN[r.Key] = r.N
	}
	lost, double, unexpected := 0, 0, 0
	for id := range written {
		switch count[id] {
		case 0:
			lost++
		case 1:
		default:
			double++
		}
	}
	for id := range count {
		if !written[id] {
			unexpected++
		}
	}
	var dead int
	s.DB.Get(&dead, `SELECT count(*) FROM mailroom_outbox_dead`)
	s.DB.Get(&pending, `SELECT count(*) FROM mailroom_outbox`)
	var st struct {
		Duplicates int64 `db:"duplicates"`
		Requeued   int64 `db:"requeued"`
		Retried    int64 `db:"retried"`
		Sessions   int64 `db:"sessions"`
	}
	s.DB.Get(&st, `SELECT coalesce(sum(duplicates),0) AS duplicates, coalesce(sum(requeued),0) AS requeued, coalesce(sum(retried),0) AS retried, coalesce(sum(sessions),0) AS sessions FROM chaos_stats`)

	var kinds []string
	total := 0
	for k, n := range faults {
		kinds = append(kinds, fmt.Sprintf("%s=%d", k, n))
		total += n
	}
	sort.Strings(kinds)
	// Standbys that ended a frozen publisher's session (their log line);
	// the logs keep a bounded tail, so this can undercount in long runs.
	frozenEnded := 0
	for _, p := range procs[:relays] {
		frozenEnded += strings.Count(p.logs.String(), "stopped checking in")
	}
	t.Logf("chaos summary: seed=%d events=%d poisoned=%d faults=%d [%s] frozen_publishers_ended=%d consumer_sessions=%d requeued=%d retried=%d duplicates_suppressed=%d lost=%d double_effects=%d order_violations=%d outbox_pending=%d outbox_dead=%d dlq=%d (copies %d) drain=%s",
		seed, len(written), len(poison), total, strings.Join(kinds, ", "), frozenEnded, st.Sessions, st.Requeued, st.Retried, st.Duplicates,
		lost, double, orderViolations, pending, dead, len(inDLQ), dlqCopies, drain.Round(time.Millisecond))
	if lost != 0 || double != 0 || unexpected != 0 || orderViolations != 0 || pending != 0 || dead != 0 || len(inDLQ) != len(poison) || dlqOther != 0 {
		t.Errorf("invariants broken (seed %d): lost=%d double=%d unexpected=%d order=%d pending=%d dead=%d dlq=%d messages (want the %d poisoned), %d of them not poisoned",
			seed, lost, double, unexpected, orderViolations, pending, dead, len(inDLQ), len(poison), dlqOther)
	}
}
