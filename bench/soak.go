package main

import (
	"context"
	"database/sql"
	"flag"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/mailroom-go/mailroom/internal/telemetry"
	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

var (
	soakDuration = flag.Duration("soak-duration", 30*time.Minute, "soak: how long the writers write at each rate (before + hold + after)")
	soakRates    = flag.String("soak-rate", "0.5,0.8", "soak: the writers' rates as fractions of the relay's capacity, comma-separated; each runs a soak of its own")
	soakHold     = flag.Duration("soak-hold", 10*time.Minute, "soak: how long a REPEATABLE READ snapshot stays open in the middle of the run (the hold phase); before and after share the rest equally")
	soakEvery    = flag.Duration("soak-every", time.Minute, "soak: the interval of the printed samples")
	soakCapacity = flag.Float64("soak-capacity", 0, "soak: the relay's capacity in events/s; 0 = measure it first by draining a backlog of -events events over -soak-keys keys with the same relay setup")
	soakKeys     = flag.Int("soak-keys", 1000, "soak: ordering keys the events cycle through (0: no key)")
	soakSidecar  = flag.Bool("soak-sidecar", false, "soak: run the mailroom-relay binary as a process of its own, every setting at its default (as the keyed figures' sidecar mode), instead of the relay in this process")
	soakVacuum   = flag.Duration("soak-vacuum", time.Minute, "soak: on a server whose autovacuum is off (as this project's CI configuration has it), VACUUM ANALYZE the outbox this often in its place (autovacuum's default naptime is 1m); 0: never")
	soakNaive    = flag.Bool("soak-naive", false, "soak: run the naive reference relay (claim 500, publish, wait, delete, in one transaction; a 10 ms pause when it finds nothing) instead of mailroom's")
)

// soakPerTx is how many events each writer transaction commits.
const soakPerTx = 10

// soakHeader carries each event's number, so the consumer can tell which
// events it received.
const soakHeader = "x-bench-n"

// soakBody is a payload of about 200 bytes.
var soakBody = []byte(`{"order_id":"0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60","customer_id":"0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f61","amount_cents":1999,"currency":"EUR","note":"` + strings.Repeat("x", 54) + `"}`)

// runSoak prints the soak figure: for each -soak-rate, the relay under a
// steady write load for -soak-duration, with a snapshot held open for
// -soak-hold in the middle; a line every -soak-every and a summary.
func runSoak() {
	if *soakHold <= 0 || *soakHold >= *soakDuration {
		must(0, fmt.Errorf("soak: -soak-hold %s must be positive and shorter than -soak-duration %s", *soakHold, *soakDuration))
	}
	if *soakSidecar && *soakNaive {
		must(0, fmt.Errorf("soak: -soak-sidecar and -soak-naive exclude each other"))
	}
	var fracs []float64
	for _, s := range strings.Split(*soakRates, ",") {
		f, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
		if err != nil || f <= 0 {
			must(0, fmt.Errorf("soak: -soak-rate %q: want fractions of the capacity such as 0.5,0.8", s))
		}
		fracs = append(fracs, f)
	}
	capacity, how := *soakCapacity, "-soak-capacity"
	if capacity <= 0 {
		var err error
		if *soakNaive {
			capacity, err = benchNaive()
			how = fmt.Sprintf("measured: drain of %d events without keys", *events)
		} else {
			capacity, _, _, err = benchKeyedDrain(soakRelayMode(), *events, *soakKeys)
			how = fmt.Sprintf("measured: drain of %d events over %d keys", *events, *soakKeys)
		}
		must(capacity, err)
	}
	fmt.Printf("soak     %s: capacity %.0f events/s (%s)\n", soakRelayName(), capacity, how)
	for _, f := range fracs {
		res, err := soakOnce(f, capacity)
		must(0, err)
		res.print()
	}
}

// soakRelayMode is the keyed figures' relay setup the soak runs.
func soakRelayMode() relayMode {
	want := "one"
	if *soakSidecar {
		want = "sidecar"
	}
	i := slices.IndexFunc(allRelayModes, func(m relayMode) bool { return m.flag == want })
	return allRelayModes[i]
}

func soakRelayName() string {
	switch {
	case *soakNaive:
		return "naive relay"
	case *soakSidecar:
		return "sidecar binary"
	}
	return "relay in process"
}

// soakRelay is the relay under test, as the sampler sees it.
type soakRelay struct {
	pid   int                     // the relay's process: this one, or the sidecar's
	claim func() (histSnap, bool) // claim statement durations so far; nil: not measured
	stop  func()
}

// startSoakRelay starts the relay the flags name on w; its stop may be
// called more than once.
func startSoakRelay(w *world) (*soakRelay, error) {
	rel, err := startSoakRelayOnce(w)
	if err == nil {
		rel.stop = sync.OnceFunc(rel.stop)
	}
	return rel, err
}

func startSoakRelayOnce(w *world) (*soakRelay, error) {
	switch {
	case *soakNaive:
		return startNaiveRelay(w)
	case *soakSidecar:
		stop, err := soakRelayMode().start(w)
		if err != nil {
			return nil, err
		}
		pid, err := sidecarPID()
		if err != nil {
			stop()
			return nil, err
		}
		return &soakRelay{pid: pid, claim: sidecarClaims(pid), stop: stop}, nil
	}
	// In this process, read the relay's claim histogram through a manual
	// OpenTelemetry reader.
	reader := sdkmetric.NewManualReader()
	r, err := newRelay(w, "bench", func(c *relay.Config) {
		c.MeterProvider = sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	claim := func() (histSnap, bool) {
		var rm metricdata.ResourceMetrics
		if reader.Collect(context.Background(), &rm) != nil {
			return histSnap{}, false
		}
		for _, sm := range rm.ScopeMetrics {
			for _, m := range sm.Metrics {
				if h, ok := m.Data.(metricdata.Histogram[float64]); ok && m.Name == telemetry.RelayClaimDuration && len(h.DataPoints) > 0 {
					dp := h.DataPoints[0]
					return histSnap{count: dp.Count, sum: dp.Sum, bounds: dp.Bounds, counts: dp.BucketCounts}, true
				}
			}
		}
		return histSnap{}, false
	}
	return &soakRelay{pid: os.Getpid(), claim: claim, stop: func() { cancel(); <-done }}, nil
}

// startNaiveRelay runs naiveBatch in a loop, pausing 10 ms when it finds
// nothing.
func startNaiveRelay(w *world) (*soakRelay, error) {
	ch, err := w.conn.Channel()
	if err != nil {
		return nil, err
	}
	if err := ch.Confirm(false); err != nil {
		return nil, err
	}
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 500))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			n, err := naiveBatch(w.db, ch, confirms)
			if err != nil {
				fmt.Fprintln(os.Stderr, "bench: naive relay:", err)
				return
			}
			if n == 0 {
				time.Sleep(10 * time.Millisecond)
			}
		}
	}()
	return &soakRelay{pid: os.Getpid(), stop: func() { cancel(); <-done; ch.Close() }}, nil
}

type soakPhase int

const (
	before soakPhase = iota
	hold
	after
)

var phaseNames = [...]string{"before", "hold", "after"}

// phaseStats add up a phase's samples.
type phaseStats struct {
	delivered int64
	seconds   float64
	lat       durHist
}

func (p *phaseStats) rate() float64 { return float64(p.delivered) / p.seconds }

// soakResult is one rate's soak, as the summary needs it.
type soakResult struct {
	frac, rate         float64
	phases             [3]phaseStats
	recovered          time.Duration // after the release, until p99 ≤ 1.2× before's; < 0: not within the run
	sizeStart, sizePk  int64
	sizeEnd            int64
	rssFirst, rssLast  int64
	written, received  int64
	pending            int64 // not received, still in the outbox once the relay stopped
	duplicates, failed int64
	firstErr           error
}

// soakOnce runs one soak at frac of capacity on a world of its own.
func soakOnce(frac, capacity float64) (*soakResult, error) {
	w, err := setup()
	if err != nil {
		return nil, err
	}
	defer w.stop()
	rate := int(frac * capacity)
	txs := int(float64(rate)*soakDuration.Seconds()) / soakPerTx
	res := &soakResult{frac: frac, rate: float64(rate), recovered: -1}
	written, received := newBitset(txs*soakPerTx), newBitset(txs*soakPerTx)
	l := newLatencies()
	var dups atomic.Int64
	w.onMsg = func(d amqp.Delivery) {
		if n, err := strconv.Atoi(fmt.Sprint(d.Headers[soakHeader])); err == nil && !received.set(n) {
			dups.Add(1)
		}
		l.arrived(d.MessageId, time.Now())
	}
	rel, err := startSoakRelay(w)
	if err != nil {
		return nil, err
	}
	defer rel.stop()

	ob, _ := outbox.New(outbox.Config{})
	var next, failed atomic.Int64
	var firstErr atomic.Value
	send := func() error {
		base := int(next.Add(soakPerTx)) - soakPerTx
		msgs := make([]outbox.Message, soakPerTx)
		for i := range msgs {
			n := base + i
			msgs[i] = outbox.Message{ID: newID(), Exchange: w.exchange, RoutingKey: "k", Payload: soakBody,
				Headers: map[string]string{soakHeader: strconv.Itoa(n)}}
			if *soakKeys > 0 {
				msgs[i].Key = "key-" + strconv.Itoa(n%*soakKeys)
			}
		}
		if err := commitEvents(w.db, ob, msgs); err != nil {
			failed.Add(1) // a soak goes on; the summary counts failures
			firstErr.CompareAndSwap(nil, err)
			return nil
		}
		now := time.Now()
		for i, m := range msgs {
			l.started(m.ID, now)
			written.set(base + i)
		}
		return nil
	}

	s := &soakSampler{w: w, rel: rel, l: l, res: res}
	if res.sizeStart, _, _, err = outboxSize(w.db); err != nil {
		return nil, err
	}
	beforeLen := (*soakDuration - *soakHold) / 2
	fmt.Printf("soak     %.2f× capacity = %d events/s (%d tx/s × %d events over %d keys, %d-byte payloads), %s; before %s, hold %s, after %s\n",
		frac, rate, rate/soakPerTx, soakPerTx, *soakKeys, len(soakBody), soakRelayName(), beforeLen, *soakHold, *soakDuration-beforeLen-*soakHold)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var autovacuum bool
	if err := w.db.QueryRow(`SELECT current_setting('autovacuum')::bool`).Scan(&autovacuum); err != nil {
		return nil, err
	}
	if !autovacuum && *soakVacuum > 0 {
		fmt.Printf("soak     autovacuum is off on this server: the bench runs VACUUM ANALYZE on the outbox every %s in its place\n", *soakVacuum)
		go vacuumEvery(ctx, w.db, *soakVacuum)
	} else if !autovacuum {
		fmt.Printf("soak     autovacuum is off on this server and -soak-vacuum is 0: nothing removes the outbox's dead rows\n")
	}
	s.start = time.Now()
	s.holdAt, s.releaseAt = s.start.Add(beforeLen), s.start.Add(beforeLen+*soakHold)
	s.last = s.start
	holdErr := make(chan error, 1)
	go func() { holdErr <- holdSnapshot(ctx, w.db, s.holdAt, s.releaseAt) }()
	writing := make(chan struct{})
	go func() { paced(rate, soakPerTx, txs, send); close(writing) }()

	// Sample every -soak-every until the writers are done and the consumer
	// has every event written (or two minutes more have passed).
	tick, poll := time.NewTicker(*soakEvery), time.NewTicker(100*time.Millisecond)
	defer tick.Stop()
	defer poll.Stop()
	var doneAt time.Time
	for {
		select {
		case <-tick.C:
			if err := s.sample(); err != nil {
				return nil, err
			}
			continue
		case <-poll.C:
		}
		if doneAt.IsZero() {
			select {
			case <-writing:
				doneAt = time.Now()
			default:
				continue
			}
		}
		if received.count() >= written.count() || time.Since(doneAt) > 2*time.Minute {
			break
		}
	}
	if err := s.sample(); err != nil { // the last, partial interval
		return nil, err
	}
	cancel()
	if err := <-holdErr; err != nil {
		return nil, fmt.Errorf("soak: the held snapshot: %w", err)
	}
	// Whatever was neither received nor left in the outbox is lost: stop
	// the relay, let the consumer take what was published, then read the
	// rows still pending.
	rel.stop()
	for n := int64(-1); n != w.received.Load(); time.Sleep(time.Second) {
		n = w.received.Load()
	}
	rs, err := w.db.Query(`SELECT (headers->>'` + soakHeader + `')::int FROM mailroom_outbox`)
	if err != nil {
		return nil, err
	}
	defer rs.Close()
	for rs.Next() {
		var n int
		if err := rs.Scan(&n); err != nil {
			return nil, err
		}
		if written.has(n) && !received.has(n) {
			res.pending++
		}
	}
	if err := rs.Err(); err != nil {
		return nil, err
	}
	res.written, res.received, res.duplicates, res.failed = written.count(), received.count(), dups.Load(), failed.Load()
	res.firstErr, _ = firstErr.Load().(error)
	return res, nil
}

// commitEvents commits msgs to the outbox in one transaction.
func commitEvents(db *sql.DB, ob *outbox.Outbox, msgs []outbox.Message) error {
	tx, err := db.Begin()
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := ob.Add(context.Background(), tx, msgs...); err != nil {
		return err
	}
	return tx.Commit()
}

// vacuumEvery runs VACUUM ANALYZE on the outbox every interval until ctx
// ends, as autovacuum would.
func vacuumEvery(ctx context.Context, db *sql.DB, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, err := db.ExecContext(ctx, `VACUUM ANALYZE mailroom_outbox`); err != nil && ctx.Err() == nil {
			fmt.Fprintln(os.Stderr, "bench: soak: VACUUM:", err)
		}
	}
}

// holdSnapshot holds a snapshot from at until until: a transaction of its
// own, REPEATABLE READ, that ran one SELECT and then does nothing. Its
// xmin keeps every row version deleted since from being vacuumed away.
func holdSnapshot(ctx context.Context, db *sql.DB, at, until time.Time) error {
	select {
	case <-time.After(time.Until(at)):
	case <-ctx.Done():
		return nil
	}
	tx, err := db.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead})
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.Exec(`SELECT 1`); err != nil {
		return err
	}
	select {
	case <-time.After(time.Until(until)):
	case <-ctx.Done():
		return nil
	}
	return tx.Commit()
}

// soakSampler prints one line per interval and adds it to its phase.
type soakSampler struct {
	w                        *world
	rel                      *soakRelay
	l                        *latencies
	res                      *soakResult
	start, holdAt, releaseAt time.Time
	last                     time.Time
	lastReceived             int64
	lastClaim                histSnap
	before99                 time.Duration // before's p99 so far
}

// phaseAt is the phase t falls in.
func (s *soakSampler) phaseAt(t time.Time) soakPhase {
	switch {
	case t.Before(s.holdAt):
		return before
	case t.Before(s.releaseAt):
		return hold
	}
	return after
}

func (s *soakSampler) sample() error {
	now := time.Now()
	secs := now.Sub(s.last).Seconds()
	if secs < 0.5 {
		return nil // nothing worth a line
	}
	ph := s.phaseAt(s.last.Add(now.Sub(s.last) / 2)) // the phase of most of the interval
	received := s.w.received.Load()
	lat := s.l.take()
	slices.Sort(lat)
	size, indexes, dead, err := outboxSize(s.w.db)
	if err != nil {
		return err
	}
	rss := vmRSS(s.rel.pid)

	p := &s.res.phases[ph]
	p.delivered += received - s.lastReceived
	p.seconds += secs
	for _, d := range lat {
		p.lat.add(d)
	}
	line := fmt.Sprintf("soak     %7s %-6s delivered %6.0f events/s", now.Sub(s.start).Round(time.Second), phaseNames[ph], float64(received-s.lastReceived)/secs)
	if len(lat) > 0 {
		p99 := lat[len(lat)*99/100]
		line += fmt.Sprintf("  p50 %7.2f ms  p99 %8.2f ms", ms(lat[len(lat)/2]), ms(p99))
		if ph == before {
			s.before99 = s.res.phases[before].lat.quantile(0.99)
		}
		if ph == after && s.res.recovered < 0 && s.before99 > 0 && p99 <= s.before99*12/10 {
			s.res.recovered = now.Sub(s.releaseAt)
		}
	} else {
		line += fmt.Sprintf("  %-31s", "no deliveries")
	}
	if s.rel.claim != nil {
		if c, ok := s.rel.claim(); ok {
			d := c.since(s.lastClaim)
			s.lastClaim = c
			if d.count > 0 {
				line += fmt.Sprintf("  claim mean %6.2f ms p99 ≤ %s (%d)", d.sum/float64(d.count)*1000, d.quantileBound(0.99), d.count)
			}
		}
	}
	line += fmt.Sprintf("  outbox %s (indexes %s) dead tuples %d  RSS %d MiB", mib(size), mib(indexes), dead, rss>>20)
	fmt.Println(line)

	if s.res.rssFirst == 0 {
		s.res.rssFirst = rss
	}
	s.res.rssLast, s.res.sizeEnd, s.res.sizePk = rss, size, max(s.res.sizePk, size)
	s.last, s.lastReceived = now, received
	return nil
}

// take returns the latencies noted since the last take.
func (l *latencies) take() []time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	lat := l.lat
	l.lat = nil
	return lat
}

// outboxSize reads the outbox's size with its indexes and TOAST, its
// indexes' size, and its dead tuples as the statistics last reported them.
func outboxSize(db *sql.DB) (total, indexes, dead int64, err error) {
	err = db.QueryRow(`SELECT pg_total_relation_size(c.oid), pg_indexes_size(c.oid), coalesce(s.n_dead_tup, 0)
FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.oid = 'mailroom_outbox'::regclass`).Scan(&total, &indexes, &dead)
	return total, indexes, dead, err
}

// vmRSS reads a process's resident set size from /proc (0 if unknown).
func vmRSS(pid int) int64 { return procStatusBytes(strconv.Itoa(pid), "VmRSS:") }

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func (r *soakResult) print() {
	fmt.Printf("soak     summary, %.2f× capacity (%.0f events/s), %s:\n", r.frac, r.rate, soakRelayName())
	b := &r.phases[before]
	for ph := before; ph <= after; ph++ {
		p := &r.phases[ph]
		if p.seconds == 0 || p.lat.n == 0 {
			fmt.Printf("soak       %-6s no samples\n", phaseNames[ph])
			continue
		}
		fmt.Printf("soak       %-6s delivered %6.0f events/s  p99 %8.2f ms", phaseNames[ph], p.rate(), ms(p.lat.quantile(0.99)))
		if ph == hold && b.lat.n > 0 {
			tr, pr := p.rate()/b.rate(), float64(p.lat.quantile(0.99))/float64(b.lat.quantile(0.99))
			fmt.Printf("  hold/before: throughput %.2f× (target ≥ 0.9×: %s), p99 %.2f× (target ≤ 2×: %s)", tr, metOrNot(tr >= 0.9), pr, metOrNot(pr <= 2))
		}
		fmt.Println()
	}
	if r.recovered >= 0 {
		fmt.Printf("soak       p99 back within 1.2× of before's: %s after the release\n", r.recovered.Round(time.Second))
	} else {
		fmt.Printf("soak       p99 back within 1.2× of before's: not within the run\n")
	}
	fmt.Printf("soak       outbox size: start %s, peak %s, end %s; relay RSS first sample %d MiB, last %d MiB\n",
		mib(r.sizeStart), mib(r.sizePk), mib(r.sizeEnd), r.rssFirst>>20, r.rssLast>>20)
	fmt.Printf("soak       written %d, received %d (plus %d duplicates), still in the outbox at the end %d, lost=%d",
		r.written, r.received, r.duplicates, r.pending, r.written-r.received-r.pending)
	if r.failed > 0 {
		fmt.Printf("; %d writer transactions failed (first: %v)", r.failed, r.firstErr)
	}
	fmt.Println()
}

func metOrNot(ok bool) string {
	if ok {
		return "met"
	}
	return "missed"
}

// bitset notes which event numbers were seen, safe for concurrent use.
type bitset struct {
	words []atomic.Uint64
	n     atomic.Int64
}

func newBitset(size int) *bitset { return &bitset{words: make([]atomic.Uint64, size/64+1)} }

// set notes i and says whether it is new; numbers beyond the size are
// ignored (reported as not new).
func (b *bitset) set(i int) bool {
	if i < 0 || i/64 >= len(b.words) {
		return false
	}
	bit := uint64(1) << (i % 64)
	if b.words[i/64].Or(bit)&bit != 0 {
		return false
	}
	b.n.Add(1)
	return true
}

func (b *bitset) count() int64 { return b.n.Load() }

func (b *bitset) has(i int) bool {
	return i >= 0 && i/64 < len(b.words) && b.words[i/64].Load()&(1<<(i%64)) != 0
}

// durHist counts durations in buckets 2% wide from 1 µs, so a phase's
// percentiles need no list of its samples.
type durHist struct {
	counts [1100]int64 // up to 1.02^1100 µs, about 48 minutes
	n      int64
}

var logStep = math.Log(1.02)

func (h *durHist) add(d time.Duration) {
	i := int(math.Log(float64(max(d.Microseconds(), 1))) / logStep)
	h.counts[min(i, len(h.counts)-1)]++
	h.n++
}

// quantile is the upper bound of the bucket holding the q quantile.
func (h *durHist) quantile(q float64) time.Duration {
	want := int64(math.Ceil(q * float64(h.n)))
	var seen int64
	for i, c := range h.counts {
		if seen += c; seen >= max(want, 1) {
			return time.Duration(math.Pow(1.02, float64(i+1)) * float64(time.Microsecond))
		}
	}
	return 0
}

// histSnap is a cumulative histogram of seconds as the relay's metrics
// export it: counts[i] observations ≤ bounds[i] (and above the bound
// before), the last beyond every bound.
type histSnap struct {
	count  uint64
	sum    float64
	bounds []float64
	counts []uint64
}

// since is what was observed between prev and h.
func (h histSnap) since(prev histSnap) histSnap {
	d := histSnap{count: h.count - prev.count, sum: h.sum - prev.sum, bounds: h.bounds, counts: slices.Clone(h.counts)}
	if len(prev.counts) == len(h.counts) {
		for i := range d.counts {
			d.counts[i] -= prev.counts[i]
		}
	}
	return d
}

// quantileBound names the bucket bound the q quantile is under.
func (h histSnap) quantileBound(q float64) string {
	want := uint64(math.Ceil(q * float64(h.count)))
	var seen uint64
	for i, c := range h.counts {
		if seen += c; seen >= want && i < len(h.bounds) {
			return fmt.Sprintf("%g ms", h.bounds[i]*1000)
		}
	}
	return fmt.Sprintf("∞ (> %g ms)", h.bounds[len(h.bounds)-1]*1000)
}
