package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/amqpx"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/internal/testenv/cluster"
)

var (
	clusterNodes = flag.Int("cluster", 0, "run on a private RabbitMQ cluster of this many nodes started for the run (quorum queues), instead of the machine's broker")
	partitions   = flag.String("partitions", "1,2,4", "partitions: the partition counts, each consumed by as many inbox.Group members (on a private cluster: use -cluster)")
	partEvents   = flag.Int("partition-events", 20000, "partitions: messages per count, over -partition-keys keys")
	partKeys     = flag.Int("partition-keys", 1000, "partitions: ordering keys")
	relayFirst   = flag.Bool("cluster-relay-first", false, "with -cluster: give the relays only node 1, where the bench's queue is declared (its leader), instead of every node")
)

// relayURL is the broker URL the relays get: every node of AMQP_URL, or
// with -cluster-relay-first only the first.
func relayURL() string {
	if *relayFirst {
		return firstNode()
	}
	return testenv.AMQPURL()
}

// useCluster starts the private cluster of -cluster and makes it the run's
// broker: AMQP_URL lists its nodes (the relays get them all), the bench's
// own connections go to the first, and queues are quorum queues.
func useCluster() (stop func()) {
	if *clusterNodes == 0 {
		return func() {}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	began := time.Now()
	c, stopNodes, err := cluster.StartNodes(ctx, *clusterNodes)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench: start a private cluster:", err)
		os.Exit(1)
	}
	testenv.UseBroker(strings.Join(c.URLs(), ","), func(args ...string) (string, error) { return c.Ctl(0, args...) })
	*quorum = true
	relays := "any node (all given)"
	if *relayFirst {
		relays = "node 1 only"
	}
	fmt.Printf("cluster  %d private RabbitMQ nodes started in %s; quorum queues declared through node 1; the bench publishes and consumes through node 1, relays connect to %s\n",
		*clusterNodes, time.Since(began).Round(time.Second), relays)
	return func() {
		if err := stopNodes(); err != nil {
			fmt.Fprintln(os.Stderr, "bench: stop the private cluster:", err)
		}
	}
}

// firstNode is the broker URL the bench's own connections use: the first
// node of AMQP_URL.
func firstNode() string {
	u, _, _ := strings.Cut(testenv.AMQPURL(), ",")
	return u
}

// runPartitions prints, for each partition count P, the rate at which P
// inbox.Group members (in this process, each its own connections) apply a
// backlog spread over P partitions in key order.
func runPartitions() {
	for _, s := range strings.Split(*partitions, ",") {
		var p int
		if _, err := fmt.Sscan(strings.TrimSpace(s), &p); err != nil || p < 1 {
			fmt.Fprintf(os.Stderr, "bench: -partitions %q: want counts like 1,2,4\n", *partitions)
			os.Exit(2)
		}
		rate, err := benchPartitions(p, *partEvents, *partKeys)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench: partitions:", err)
			os.Exit(1)
		}
		fmt.Printf("partition %d partition(s), %d Group members, %d messages over %d keys, handler inserts a row: %8.0f msg/s applied in key order\n", p, p, *partEvents, *partKeys, rate)
	}
}

func benchPartitions(parts, n, keys int) (float64, error) {
	w, err := setup()
	if err != nil {
		return 0, err
	}
	defer w.stop()
	conn, err := amqpx.Dial(firstNode(), "bench-partitions")
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return 0, err
	}
	queue := testenv.Unique("bench-part")
	if err := inbox.DeclarePartitions(ch, inbox.Partitions{Queue: queue, Count: parts, Exchange: w.exchange, Classic: !*quorum}); err != nil {
		return 0, err
	}
	defer func() {
		dch, err := conn.Channel()
		if err != nil {
			return
		}
		for i := range parts {
			q := inbox.PartitionQueueName(queue, i)
			for _, name := range []string{q, inbox.RetryQueueName(q), inbox.DeadLetterQueueName(q)} {
				dch.QueueDelete(name, false, false, false)
			}
			dch.ExchangeDelete(inbox.DeadLetterExchangeName(q), false, false)
		}
		dch.ExchangeDelete(queue+".hash", false, false)
		dch.ExchangeDelete(queue+".nokey", false, false)
	}()
	if _, err := w.db.Exec(`CREATE TABLE applied (id text PRIMARY KEY, key text NOT NULL, n int NOT NULL)`); err != nil {
		return 0, err
	}
	if err := publishKeyed(ch, w.exchange, n, keys); err != nil {
		return 0, err
	}
	db := sqlx.NewDb(w.db, "postgres")
	var applied atomic.Int64
	handler := func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		if _, err := tx.ExecContext(ctx, `INSERT INTO applied (id, key, n) VALUES ($1, $2, 0)`, m.ID, m.Key); err != nil {
			return err
		}
		applied.Add(1)
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make(chan error, parts)
	start := time.Now()
	for i := range parts {
		g, err := inbox.NewGroup(db, inbox.Config{URL: testenv.AMQPURL(), Queue: queue, Consumer: "bench", Handler: handler,
			ConnectionName: fmt.Sprintf("bench-member-%d", i)}, parts)
		if err != nil {
			cancel()
			return 0, err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := g.Run(ctx); err != nil {
				errs <- err
			}
		}()
	}
	deadline := time.Now().Add(10 * time.Minute)
	for applied.Load() < int64(n) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	elapsed := time.Since(start)
	cancel()
	wg.Wait()
	select {
	case err := <-errs:
		return 0, err
	default:
	}
	if got := applied.Load(); got < int64(n) {
		return 0, fmt.Errorf("%d of %d applied within 10 minutes", got, n)
	}
	return float64(n) / elapsed.Seconds(), nil
}

// publishKeyed publishes n messages over keys keys to exchange, as the
// relay would (message id, x-mailroom-key), with pipelined confirms.
func publishKeyed(ch *amqp.Channel, exchange string, n, keys int) error {
	if err := ch.Confirm(false); err != nil {
		return err
	}
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 1024))
	var inFlight int
	for i := range n {
		for inFlight >= 512 {
			if c := <-confirms; !c.Ack {
				return errors.New("publish nacked")
			}
			inFlight--
		}
		err := ch.PublishWithContext(context.Background(), exchange, "e", false, false, amqp.Publishing{
			MessageId: newID(), DeliveryMode: amqp.Persistent, ContentType: "application/json", Body: []byte(`{}`),
			Headers: inbox.KeyHeaders(fmt.Sprint("k", i%keys)), // as the relay sets them
		})
		if err != nil {
			return err
		}
		inFlight++
	}
	for ; inFlight > 0; inFlight-- {
		if c := <-confirms; !c.Ack {
			return errors.New("publish nacked")
		}
	}
	return nil
}
