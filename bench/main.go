// Command bench measures the relay against the raw broker, side by side in
// one run, on the local services (DATABASE_URL, AMQP_URL override):
//
//	go run ./bench                 # the default figures (see -run)
//	go run ./bench -run scale,dedupe  # the slow ones: millions of rows
//	go run ./bench -run drain -events 100000
//	go run ./bench -run soak -soak-duration 30m -soak-rate 0.5,0.8 -soak-hold 10m
//	go run ./bench -cluster 3 -run broker,drain,partitions  # a private 3-node cluster
//
// Each figure sets up its own schema, exchange and queue (a consumer
// attached: prefetch 1000, multiple acks), prints one line, and cleans up.
// Absolute numbers drift with the machine's load: compare figures of one run.
package main

import (
	"context"
	"database/sql"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"runtime/pprof"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	_ "github.com/lib/pq"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/amqpx"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

var (
	runFlag      = flag.String("run", "broker,naive,drain,latency,relays,writecost,keyed,keyedlatency", "figures to run, comma-separated: broker, naive, drain, latency, relays, keyed, keyedlatency, scale, dedupe, writecost, soak (long: see -soak-duration), partitions (needs -cluster)")
	events       = flag.Int("events", 100000, "backlog size for broker and drain, and of the soak's capacity drain")
	rates        = flag.String("rates", "200,5000", "steady event rates (events/s) for latency, comma-separated")
	duration     = flag.Duration("duration", 10*time.Second, "how long each latency rate runs")
	quorum       = flag.Bool("quorum", false, "use a quorum queue instead of a classic one")
	batchSize    = flag.Int("batch", 0, "relay BatchSize (0 = default)")
	window       = flag.Int("window", 0, "relay ConfirmWindow (0 = default)")
	repeat       = flag.Int("repeat", 3, "how many times broker and drain alternate (medians are compared)")
	keys         = flag.Int("keys", 10000, "ordering keys over the relays figure's events (0 = none)")
	writeRounds  = flag.Int("write-rounds", 15, "how many times the writecost variants alternate (medians are compared)")
	cpuProf      = flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	brokerDBLoad = flag.Bool("broker-db-load", false, "latency: also measure RabbitMQ alone while each tick commits its messages to the outbox (the writers' database load, no relay)")
	splitFlag    = flag.Bool("split", false, "latency: also split the relay's commit→consumer at each message's publish (traces every publish, which costs the relay CPU: use a run of its own)")
)

func main() {
	flag.Parse()
	if *cpuProf != "" {
		f, err := os.Create(*cpuProf)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(2)
		}
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	defer useCluster()()
	want := map[string]bool{}
	for _, f := range strings.Split(*runFlag, ",") {
		want[strings.TrimSpace(f)] = true
	}
	// The broker ceiling and the relay drain alternate, -repeat times, and
	// the medians are compared: this machine's rate drifts run to run.
	var brokerRates, drainRates, naiveRates []float64
	for i := 0; i < *repeat; i++ {
		if want["broker"] {
			r, cpu, err := benchBroker(1, 0, brokerWindow)
			must(r, err)
			brokerRates = append(brokerRates, r)
			fmt.Printf("broker   %7d persistent msgs, pipelined confirms (window 512): %8.0f msg/s  (CPU per 100,000: %s)\n", *events, r, cpu.per100k(int64(*events)))
		}
		if want["naive"] {
			r := must(benchNaive())
			naiveRates = append(naiveRates, r)
			fmt.Printf("naive    %7d events, claim 500/publish/wait/delete in turn:   %8.0f events/s\n", *events, r)
		}
		if want["drain"] {
			r, cpu, err := benchDrain()
			must(r, err)
			drainRates = append(drainRates, r)
			fmt.Printf("drain    %7d events, one relay, consumer attached:            %8.0f events/s  (CPU per 100,000: %s)\n", *events, r, cpu.per100k(int64(*events)))
		}
	}
	if len(brokerRates) > 0 && len(drainRates) > 0 {
		b, d := median(brokerRates), median(drainRates)
		fmt.Printf("ratio    median drain %.0f events/s / median broker %.0f msg/s = %.2f× (%d runs each)\n", d, b, d/b, *repeat)
		if len(naiveRates) > 0 {
			n := median(naiveRates)
			fmt.Printf("ratio    median naive relay %.0f events/s / median broker = %.2f×; mailroom / naive = %.2f×\n", n, n/b, d/n)
		}
	}
	if want["drain"] {
		defer func() {
			fmt.Printf("memory   peak RSS of this process (relays, consumer and writers together): %d MiB\n", peakRSS()>>20)
		}()
	}
	if want["relays"] {
		// Two relays as they run by default (one publishes, the other
		// stands by) and with ActiveRelays 2 (both publish at once).
		var one, two, both, b1, b2 []float64
		var disorder int64
		for i := 0; i < *repeat; i++ {
			// The broker's own figure for one and two publishing
			// connections, with the relays' messages' key header: what a
			// second relay can add at most.
			for n, rates := range map[int]*[]float64{1: &b1, 2: &b2} {
				r, cpu, err := benchBroker(n, *keys, brokerWindow)
				*rates = append(*rates, must(r, err))
				fmt.Printf("relays   the broker alone, %d publishing connection(s): CPU per 100,000 messages: %s\n", n, cpu.per100k(int64(*events)))
			}
			variants := []struct {
				name      string
				n, active int
				rates     *[]float64
			}{{"one relay", 1, 0, &one}, {"two relays, one standing by", 2, 0, &two}, {"two relays both publishing", 2, 2, &both}}
			if i%2 == 1 { // alternate the order: the machine drifts within a round too
				slices.Reverse(variants)
			}
			for _, c := range variants {
				r, cpu, bad, err := benchRelays(c.n, c.active)
				must(r, err)
				*c.rates = append(*c.rates, r)
				disorder += bad
				fmt.Printf("relays   %s: CPU per 100,000 events: %s\n", c.name, cpu.per100k(int64(*events)))
			}
			fmt.Printf("relays   %7d events over %d keys: one relay %8.0f events/s, two relays (one standing by) %8.0f events/s, two relays both publishing %8.0f events/s\n", *events, *keys, one[i], two[i], both[i])
		}
		fmt.Printf("relays   median: one relay %8.0f events/s, two relays %8.0f events/s  (%.2f×, %d runs each); deliveries out of key order: %d\n",
			median(one), median(two), median(two)/median(one), *repeat, disorder)
		fmt.Printf("relays   median: two relays both publishing (ActiveRelays 2) %8.0f events/s  (%.2f× one relay)\n",
			median(both), median(both)/median(one))
		fmt.Printf("relays   the broker alone, same runs: one publishing connection %8.0f msg/s, two %8.0f msg/s  (%.2f×)\n",
			median(b1), median(b2), median(b2)/median(b1))
	}
	if want["keyed"] {
		runKeyed()
	}
	if want["keyedlatency"] {
		runKeyedLatency()
	}
	if want["scale"] {
		var small, large []float64
		for i := 0; i < *repeat; i++ {
			small = append(small, must(benchScale(10_000, 10_000)))
			large = append(large, must(benchScale(1_000_000, 100_000)))
			fmt.Printf("scale    drain rate: 10,000 pending %8.0f events/s, first 100,000 of 1,000,000 pending %8.0f events/s\n", small[i], large[i])
		}
		s, l := median(small), median(large)
		fmt.Printf("scale    median: 10,000 pending %8.0f events/s, 1,000,000 pending %8.0f events/s  (%.2f×, %d runs each)\n", s, l, l/s, *repeat)
	}
	if want["writecost"] {
		vs, err := benchWriteCost(*writeRounds, time.Second)
		must(0, err)
		base := vs[0]
		fmt.Printf("write    8 clients, BEGIN; INSERT an order; COMMIT: %.0f tx/s (median of %d alternating 1 s rounds)\n", median(base.rates), *writeRounds)
		for _, v := range vs {
			pg, client := v.perTx()
			fmt.Printf("write    %-28s %5.2f× the cost of the order alone; CPU per transaction: PostgreSQL %4d µs, client %4d µs\n", v.name, v.cost(base), pg.Microseconds(), client.Microseconds())
		}
	}
	if want["dedupe"] {
		empty, full := must(benchDedupe(0)), must(benchDedupe(10_000_000))
		fmt.Printf("dedupe   Claim (new ids, 8 clients): empty table %8.0f claims/s, 10,000,000 entries %8.0f claims/s  (%.2f×)\n", empty, full, full/empty)
	}
	if want["soak"] {
		runSoak()
	}
	if want["partitions"] {
		runPartitions()
	}
	if want["latency"] {
		for _, s := range strings.Split(*rates, ",") {
			var rate int
			fmt.Sscan(s, &rate)
			mustLatency(benchBrokerLatency(rate, false)).print(rate, "msgs/s", "tick", "RabbitMQ alone, publish→consumer")
			if *brokerDBLoad {
				mustLatency(benchBrokerLatency(rate, true)).print(rate, "msgs/s", "tick", "RabbitMQ alone beside the writers' database load, publish→consumer")
			}
			mustLatency(benchLatency(rate)).print(rate, "events/s", "tx", "commit→consumer")
		}
	}
}

func must(v float64, err error) float64 {
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	return v
}

func mustLatency(f latencyFigure, err error) latencyFigure {
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	return f
}

// perTx is how many events one business transaction writes at a rate: this
// machine commits ~1,000–2,000 small transactions/s, so higher rates come
// from transactions that write several events.
func perTx(rate int) int { return max(1, (rate+499)/500) }

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// world is one figure's schema, exchange, queue and consumer.
type world struct {
	db       *sql.DB
	dbURL    string
	schema   string
	conn     *amqp.Connection
	exchange string
	queue    string
	received atomic.Int64
	onMsg    func(amqp.Delivery)
	stop     func()
	closers  []func() error // the relays' connection pools
}

func setup() (*world, error) {
	ctx := context.Background()
	w := &world{schema: testenv.Unique("bench"), exchange: testenv.Unique("bench"), queue: testenv.Unique("bench")}
	admin, err := sql.Open("postgres", testenv.DatabaseURL())
	if err != nil {
		return nil, err
	}
	if _, err := admin.Exec(`CREATE SCHEMA ` + w.schema); err != nil {
		return nil, fmt.Errorf("PostgreSQL at %s: %w", testenv.Redact(testenv.DatabaseURL()), err)
	}
	w.dbURL, _ = testenv.WithSearchPath(testenv.DatabaseURL(), w.schema)
	w.db, _ = sql.Open("postgres", w.dbURL)
	w.db.SetMaxOpenConns(32)
	w.db.SetMaxIdleConns(32)
	if err := mailroom.Migrate(ctx, w.db, mailroom.Tables{}); err != nil {
		return nil, err
	}
	w.conn, err = amqpx.Dial(firstNode(), "bench")
	if err != nil {
		return nil, err
	}
	ch, err := w.conn.Channel()
	if err != nil {
		return nil, err
	}
	args := amqp.Table{}
	if *quorum {
		args["x-queue-type"] = "quorum"
	}
	if err := ch.ExchangeDeclare(w.exchange, "topic", true, false, false, false, nil); err != nil {
		return nil, err
	}
	if _, err := ch.QueueDeclare(w.queue, true, false, false, false, args); err != nil {
		return nil, err
	}
	if err := ch.QueueBind(w.queue, "#", w.exchange, false, nil); err != nil {
		return nil, err
	}
	// The consumer: prefetch 1000, one multiple ack per 250 deliveries or
	// after 1 ms without one (acking each delivery would spend the
	// broker's CPU on acks, in this figure and in the yardstick alike).
	cch, _ := w.conn.Channel()
	cch.Qos(1000, 0, false)
	ds, err := cch.Consume(w.queue, "", false, false, false, false, nil)
	if err != nil {
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		var last amqp.Delivery
		n := 0
		idle := time.NewTimer(time.Hour)
		for {
			select {
			case d, ok := <-ds:
				if !ok {
					return
				}
				if w.onMsg != nil {
					w.onMsg(d)
				}
				w.received.Add(1)
				last = d
				if n++; n == 250 {
					d.Ack(true)
					n = 0
				}
				idle.Reset(time.Millisecond)
			case <-idle.C:
				if n > 0 {
					last.Ack(true)
					n = 0
				}
			}
		}
	}()
	w.stop = func() {
		ch.QueueDelete(w.queue, false, false, false)
		ch.ExchangeDelete(w.exchange, false, false)
		w.conn.Close()
		<-done
		for _, c := range w.closers {
			c()
		}
		w.db.Close()
		admin.Exec(`DROP SCHEMA ` + w.schema + ` CASCADE`)
		admin.Close()
	}
	return w, nil
}

func (w *world) waitReceived(n int64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for w.received.Load() < n {
		if time.Now().After(deadline) {
			return fmt.Errorf("consumer got %d of %d within %s", w.received.Load(), n, timeout)
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

// benchBroker: the ceiling — RabbitMQ alone with pipelined confirms, from
// publishers connections at once (each its share of the messages).
func benchBroker(publishers, keys, window int) (float64, cpuUse, error) {
	w, err := setup()
	if err != nil {
		return 0, cpuUse{}, err
	}
	defer w.stop()
	body := []byte(`{"order_id":"0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60","amount_cents":1999}`)
	conns := make([]*amqp.Connection, publishers)
	for p := range conns {
		if conns[p], err = amqpx.Dial(firstNode(), fmt.Sprintf("bench-publisher-%d", p)); err != nil {
			return 0, cpuUse{}, err
		}
		defer conns[p].Close()
	}
	start, cpu := time.Now(), readCPU()
	errs := make(chan error, publishers)
	for p, conn := range conns {
		n := *events / publishers
		if p == 0 {
			n += *events % publishers
		}
		go func() { errs <- publishConfirmed(conn, w.exchange, body, n, keys, window) }()
	}
	for p := 0; p < publishers; p++ {
		if err := <-errs; err != nil {
			return 0, cpuUse{}, err
		}
	}
	if err := w.waitReceived(int64(*events), time.Minute); err != nil {
		return 0, cpuUse{}, err
	}
	return float64(*events) / time.Since(start).Seconds(), readCPU().since(cpu), nil
}

// brokerWindow is how many messages the broker-alone yardstick keeps
// unconfirmed.
const brokerWindow = 512

// publishConfirmed publishes n persistent messages with up to window
// unconfirmed, and returns once all are confirmed. With keys > 0 each
// message carries an x-mailroom-key header, round-robin over keys values,
// as the relay publishes keyed rows; with window = keys, one message of
// each key is in flight at a time (confirms come in publish order), as the
// relay's ordering allows.
func publishConfirmed(conn *amqp.Connection, exchange string, body []byte, n, keys, window int) error {
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	if err := ch.Confirm(false); err != nil {
		return err
	}
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 1024))
	slots := make(chan struct{}, window)
	acked := make(chan error, 1)
	go func() {
		for i := 0; i < n; i++ {
			c := <-confirms
			<-slots
			if !c.Ack {
				acked <- fmt.Errorf("nack")
				return
			}
		}
		acked <- nil
	}()
	for i := 0; i < n; i++ {
		slots <- struct{}{}
		var h amqp.Table
		if keys > 0 {
			h = amqp.Table{"x-mailroom-key": "key-" + strconv.Itoa(i%keys)}
		}
		if err := ch.PublishWithContext(context.Background(), exchange, "k", true, false, amqp.Publishing{
			MessageId: outbox.NewID(), DeliveryMode: amqp.Persistent, ContentType: "application/json", Body: body, Headers: h,
		}); err != nil {
			return err
		}
	}
	return <-acked
}

func amqpURL() string { return testenv.AMQPURL() }

func newID() string { return outbox.NewID() }

// newRelay gives the relay its own connection pool, as the sidecar has:
// sharing the writers' pool makes its claims queue behind their
// transactions for a free connection.
func newRelay(w *world, name string, edit func(*relay.Config)) (*relay.Relay, error) {
	db, err := sql.Open("postgres", w.dbURL)
	if err != nil {
		return nil, err
	}
	db.SetMaxIdleConns(4)
	w.closers = append(w.closers, db.Close)
	cfg := relay.Config{
		URL: relayURL(), DatabaseURL: w.dbURL, Name: name,
		BatchSize: *batchSize, ConfirmWindow: *window,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
	if edit != nil {
		edit(&cfg)
	}
	return relay.New(db, cfg)
}

// benchDrain: a backlog of events drained by one relay into the consumer.
func benchDrain() (float64, cpuUse, error) {
	w, err := setup()
	if err != nil {
		return 0, cpuUse{}, err
	}
	defer w.stop()
	if err := w.fillWithAdd(); err != nil {
		return 0, cpuUse{}, err
	}
	r, err := newRelay(w, "bench", nil)
	if err != nil {
		return 0, cpuUse{}, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	start, cpu := time.Now(), readCPU()
	go func() { done <- r.Run(ctx) }()
	err = w.waitReceived(int64(*events), 5*time.Minute)
	elapsed, used := time.Since(start), readCPU().since(cpu)
	cancel()
	<-done
	if err != nil {
		return 0, cpuUse{}, err
	}
	return float64(*events) / elapsed.Seconds(), used, nil
}
