package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/wire"
	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

var (
	keyedEvents  = flag.Int("keyed-events", 100000, "keyed: backlog size for the unkeyed, 50-key and 10,000-key drains")
	oneKeyEvents = flag.Int("one-key-events", 10000, "keyed: backlog size of the one-key drain (a key moves at one confirm round trip per message)")
	keyedRate    = flag.Int("keyed-rate", 200, "keyedlatency: transactions per second, each writing -keyed-per-tx events of one key")
	keyedPerTx   = flag.Int("keyed-per-tx", 10, "keyedlatency: events per transaction, all of one key")
	keyedKeys    = flag.String("keyed-keys", "0,10000,50,1", "keyed: the backlogs' key counts, comma-separated (0: no key; 1 drains -one-key-events)")
	keyedModes   = flag.String("keyed-modes", "one,two,sidecar", "keyed, keyedlatency: the relay setups, comma-separated: one (relay in process), two (two publishing), sidecar (the binary)")
)

// A relay setup the keyed figures compare: the relay in this process, two
// in this process both publishing (ActiveRelays 2), and the sidecar binary
// as users run it (a process of its own, every setting at its default).
type relayMode struct {
	flag, name string
	start      func(w *world) (stop func(), err error)
}

var allRelayModes = []relayMode{
	{"one", "one relay", func(w *world) (func(), error) { return w.startInProcess(1, 0) }},
	{"two", "two relays publishing", func(w *world) (func(), error) { return w.startInProcess(2, 2) }},
	{"sidecar", "sidecar binary", func(w *world) (func(), error) { return w.startSidecar() }},
}

// relayModes are the setups -keyed-modes names.
func relayModes() []relayMode {
	var modes []relayMode
	for _, m := range allRelayModes {
		if slices.Contains(strings.Split(*keyedModes, ","), m.flag) {
			modes = append(modes, m)
		}
	}
	return modes
}

func (w *world) startInProcess(n, active int) (func(), error) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i := range n {
		r, err := newRelay(w, fmt.Sprintf("bench-%d", i), func(c *relay.Config) { c.ActiveRelays = active })
		if err != nil {
			cancel()
			wg.Wait()
			return nil, err
		}
		wg.Add(1)
		go func() { defer wg.Done(); r.Run(ctx) }()
	}
	return func() { cancel(); wg.Wait() }, nil
}

var sidecarBin = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "mailroom-bench")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "mailroom-relay")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/mailroom-go/mailroom/cmd/mailroom-relay").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("build the sidecar: %v: %s", err, out)
	}
	return bin, nil
})

// startSidecar runs `mailroom-relay run` with its defaults on the world's
// schema; stop sends SIGTERM and waits.
func (w *world) startSidecar() (func(), error) {
	bin, err := sidecarBin()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "run", "--name", "bench-sidecar", "--http", "127.0.0.1:0")
	cmd.Env = append(os.Environ(), "DATABASE_URL="+w.dbURL, "AMQP_URL="+amqpURL())
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}, nil
}

// fillKeyed writes n rows over keys ordering keys (0: none) with one
// INSERT … SELECT; each row carries its place in its key.
func (w *world) fillKeyed(n, keys int) error {
	_, err := w.db.Exec(`INSERT INTO mailroom_outbox (id, exchange, routing_key, key, payload)
SELECT gen_random_uuid(), $1, 'k', CASE WHEN $3 > 0 THEN 'key-' || (g % $3) ELSE '' END, convert_to('{"n":' || (g / greatest($3, 1)) || '}', 'UTF8')
FROM generate_series(0, $2 - 1) g`, w.exchange, n, keys)
	if err == nil {
		_, err = w.db.Exec(`VACUUM ANALYZE mailroom_outbox`)
	}
	return err
}

// countDisorder makes the consumer count deliveries that arrive after a
// later event of their key.
func (w *world) countDisorder() *atomic.Int64 {
	last := map[string]int{}
	var bad atomic.Int64
	w.onMsg = func(d amqp.Delivery) { // the consumer goroutine: no lock needed
		key, _ := d.Headers[wire.HeaderKey].(string)
		if key == "" {
			return // no order promised
		}
		var m struct{ N int }
		json.Unmarshal(d.Body, &m)
		if prev, ok := last[key]; ok && m.N < prev {
			bad.Add(1)
		}
		last[key] = m.N
	}
	return &bad
}

// benchKeyedDrain: a backlog of n events over keys keys, drained by mode;
// the rate from the first delivery on.
func benchKeyedDrain(mode relayMode, n, keys int) (rate float64, cpu cpuUse, disorder int64, err error) {
	w, err := setup()
	if err != nil {
		return 0, cpu, 0, err
	}
	defer w.stop()
	if err := w.fillKeyed(n, keys); err != nil {
		return 0, cpu, 0, err
	}
	bad := w.countDisorder()
	stop, err := mode.start(w)
	if err != nil {
		return 0, cpu, 0, err
	}
	defer stop()
	if err := w.waitReceived(1, time.Minute); err != nil {
		return 0, cpu, 0, err
	}
	start, before := time.Now(), readCPU()
	if err := w.waitReceived(int64(n), 10*time.Minute); err != nil {
		return 0, cpu, 0, err
	}
	return float64(n-1) / time.Since(start).Seconds(), readCPU().since(before), bad.Load(), nil
}

// runKeyed prints the keyed backlog figures: each mode drains a backlog
// without keys, over 10,000, 50 and 1 key, -repeat times alternating with
// RabbitMQ alone, and compares medians of one run.
func runKeyed() {
	type cell struct{ keys, n int }
	var cells []cell
	for _, f := range strings.Split(*keyedKeys, ",") {
		k, err := strconv.Atoi(f)
		must(0, err)
		n := *keyedEvents
		if k == 1 {
			n = *oneKeyEvents
		}
		cells = append(cells, cell{k, n})
	}
	modes := relayModes()
	rates := map[string]map[int][]float64{}
	var broker []float64
	perKey := map[int][]float64{} // keys: RabbitMQ alone, one in flight per key
	var disorder int64
	saved := *events
	for i := range *repeat {
		*events = *keyedEvents
		r, _, err := benchBroker(1, 0, brokerWindow)
		*events = saved
		broker = append(broker, must(r, err))
		fmt.Printf("keyed    RabbitMQ alone, %d msgs: %8.0f msg/s\n", *keyedEvents, r)
		// The bound of a keyed drain: RabbitMQ alone with one message of
		// each key in flight (a window of as many messages as keys).
		for _, c := range cells {
			if c.keys == 0 || c.keys > brokerWindow {
				continue
			}
			*events = c.n
			r, cpu, err := benchBroker(1, c.keys, c.keys)
			*events = saved
			perKey[c.keys] = append(perKey[c.keys], must(r, err))
			fmt.Printf("keyed    RabbitMQ alone, one in flight per key, %7d msgs over %5d keys: %8.0f msg/s  (CPU per 100,000: %s)\n", c.n, c.keys, r, cpu.per100k(int64(c.n)))
		}
		for j := range modes {
			m := modes[(i+j)%len(modes)] // rotate the order: the machine drifts within a round
			if rates[m.name] == nil {
				rates[m.name] = map[int][]float64{}
			}
			for _, c := range cells {
				r, cpu, bad, err := benchKeyedDrain(m, c.n, c.keys)
				must(r, err)
				disorder += bad
				rates[m.name][c.keys] = append(rates[m.name][c.keys], r)
				fmt.Printf("keyed    %-22s %7d events over %5d keys: %8.0f events/s  (CPU per 100,000: %s)\n", m.name, c.n, c.keys, r, cpu.per100k(int64(c.n)))
			}
		}
	}
	b := median(broker)
	fmt.Printf("keyed    medians of %d runs; RabbitMQ alone %.0f msg/s; deliveries out of key order: %d\n", *repeat, b, disorder)
	for _, c := range cells {
		if v := perKey[c.keys]; len(v) > 0 {
			fmt.Printf("keyed    RabbitMQ alone, one in flight per key, over %d keys: %.0f msg/s (%.2f× RabbitMQ alone pipelined)\n", c.keys, median(v), median(v)/b)
		}
	}
	for _, m := range modes {
		fmt.Printf("keyed    %-22s", m.name)
		unkeyed := 0.0
		for i, c := range cells {
			r := median(rates[m.name][c.keys])
			if i > 0 {
				fmt.Print(",")
			}
			switch {
			case c.keys == 0:
				unkeyed = r
				fmt.Printf(" no key %.0f (%.2f× RabbitMQ alone)", r, r/b)
			case unkeyed > 0 && len(perKey[c.keys]) > 0:
				fmt.Printf(" %d keys %.0f (%.2f× no key, %.2f× RabbitMQ alone one in flight per key)", c.keys, r, r/unkeyed, r/median(perKey[c.keys]))
			case unkeyed > 0:
				fmt.Printf(" %d keys %.0f (%.2f× no key)", c.keys, r, r/unkeyed)
			default:
				fmt.Printf(" %d keys %.0f", c.keys, r)
			}
		}
		fmt.Println()
	}
}

// lastOfTx notes the arrival of each transaction's last event (place
// perTx-1) under its key.
func lastOfTx(l *latencies, perTx int) func(amqp.Delivery) {
	return func(d amqp.Delivery) {
		var m struct{ N int }
		if json.Unmarshal(d.Body, &m) == nil && m.N == perTx-1 {
			key, _ := d.Headers[wire.HeaderKey].(string)
			l.arrived(key, time.Now())
		}
	}
}

// benchKeyedLatency: transactions at -keyed-rate, each writing
// -keyed-per-tx events of a key of its own, through mode; the latency from
// each commit to the consumer's receipt of the transaction's last event.
func benchKeyedLatency(mode relayMode) (latencyFigure, error) {
	perTx := *keyedPerTx
	return measureLatencyOf(*keyedRate*perTx, perTx, func(w *world, l *latencies) (func(int) error, func(), error) {
		w.onMsg = lastOfTx(l, perTx)
		stop, err := mode.start(w)
		if err != nil {
			return nil, nil, err
		}
		ob, _ := outbox.New(outbox.Config{})
		var seq atomic.Int64
		send := func(k int) error {
			key := "agg-" + strconv.FormatInt(seq.Add(1), 10)
			msgs := make([]outbox.Message, k)
			for i := range msgs {
				msgs[i] = outbox.Message{Exchange: w.exchange, RoutingKey: "k", Key: key, Payload: []byte(`{"n":` + strconv.Itoa(i) + `}`)}
			}
			tx, err := w.db.Begin()
			if err != nil {
				return err
			}
			defer tx.Rollback()
			if err := ob.Add(context.Background(), tx, msgs...); err != nil {
				return err
			}
			if err := tx.Commit(); err != nil {
				return err
			}
			l.started(key, time.Now())
			return nil
		}
		return send, stop, nil
	})
}

// benchKeyedBrokerLatency is the yardstick for benchKeyedLatency: RabbitMQ
// alone under the same rule, each transaction's events published one at a
// time on one confirm channel, the next once the previous is confirmed
// (transactions side by side); from the send to the consumer's receipt of
// the last event.
func benchKeyedBrokerLatency() (latencyFigure, error) {
	perTx := *keyedPerTx
	return measureLatencyOf(*keyedRate*perTx, perTx, func(w *world, l *latencies) (func(int) error, func(), error) {
		w.onMsg = lastOfTx(l, perTx)
		ch, err := w.conn.Channel()
		if err != nil {
			return nil, nil, err
		}
		if err := ch.Confirm(false); err != nil {
			return nil, nil, err
		}
		var mu sync.Mutex
		waiting := map[uint64]chan bool{}
		confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 1024))
		go func() {
			for c := range confirms {
				mu.Lock()
				done := waiting[c.DeliveryTag]
				delete(waiting, c.DeliveryTag)
				mu.Unlock()
				done <- c.Ack
			}
		}()
		var seq atomic.Int64
		var wg sync.WaitGroup
		send := func(k int) error {
			key := "agg-" + strconv.FormatInt(seq.Add(1), 10)
			l.started(key, time.Now())
			wg.Add(1)
			go func() {
				defer wg.Done()
				done := make(chan bool, 1)
				for i := range k {
					mu.Lock()
					waiting[ch.GetNextPublishSeqNo()] = done
					err := ch.Publish(w.exchange, "k", false, false, amqp.Publishing{DeliveryMode: amqp.Persistent,
						Headers: amqp.Table{wire.HeaderKey: key}, Body: []byte(`{"n":` + strconv.Itoa(i) + `}`)})
					mu.Unlock()
					if err != nil || !<-done {
						return
					}
				}
			}()
			return nil
		}
		return send, func() { wg.Wait(); ch.Close() }, nil
	})
}

func runKeyedLatency() {
	f, err := benchKeyedBrokerLatency()
	if err != nil {
		must(0, fmt.Errorf("keyed latency, RabbitMQ alone: %w", err))
	}
	fmt.Printf("keyedlat %d tx/s × %d events of one key, RabbitMQ alone, one at a time (%d tx): send→last event  p50 %6.2f ms  p99 %6.2f ms\n",
		*keyedRate, *keyedPerTx, f.n, ms(f.p50), ms(f.p99))
	for _, m := range relayModes() {
		f, err := benchKeyedLatency(m)
		if err != nil {
			must(0, errors.Join(fmt.Errorf("keyed latency, %s", m.name), err))
		}
		fmt.Printf("keyedlat %d tx/s × %d events of one key, %s (%d tx): commit→last event  p50 %6.2f ms  p99 %6.2f ms\n",
			*keyedRate, *keyedPerTx, m.name, f.n, ms(f.p50), ms(f.p99))
	}
}
