package inbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/cenkalti/backoff/v4"
	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/dedupe"
	"github.com/mailroom-go/mailroom/internal/amqpx"
	"github.com/mailroom-go/mailroom/internal/wait"
)

// Consumer applies the deliveries of one queue exactly once each (see the
// package doc). Create it with New and call Run.
type Consumer struct {
	db      *sqlx.DB
	cfg     Config
	nodes   *amqpx.Nodes
	store   *dedupe.Store
	running atomic.Bool
	stats   stats
	tel     *instruments

	afterCommit func(Message) // test hook: between commit and ack
}

// Stats are counters since New. The metrics (see the package doc) observe
// the same counters.
type Stats struct {
	Handled      uint64 // messages applied and committed
	Duplicates   uint64 // deliveries acked without calling the handler
	Failed       uint64 // handler errors and panics
	Retried      uint64 // deliveries sent to the retry queue or retried in place
	DeadLettered uint64 // deliveries sent to the dead-letter queue
	Requeued     uint64 // deliveries returned to the queue (unknown commit outcome, broker error)
	DBErrors     uint64 // database errors before a commit, retried in place
	Sessions     uint64 // connections established (1 + reconnections)
}

type stats struct {
	handled, duplicates, failed, retried, dead, requeued, dbErrors, sessions atomic.Uint64
}

// Stats returns the counters.
func (c *Consumer) Stats() Stats {
	s := &c.stats
	return Stats{
		Handled: s.handled.Load(), Duplicates: s.duplicates.Load(), Failed: s.failed.Load(),
		Retried: s.retried.Load(), DeadLettered: s.dead.Load(), Requeued: s.requeued.Load(),
		DBErrors: s.dbErrors.Load(), Sessions: s.sessions.Load(),
	}
}

// New validates cfg (errors name the field) and returns a Consumer that
// applies messages through db.
func New(db *sqlx.DB, cfg Config) (*Consumer, error) {
	if db == nil {
		return nil, errors.New("inbox: New: db is nil")
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	nodes, _ := amqpx.ParseNodes(cfg.URL, cfg.URLs) // checked by withDefaults
	store, err := dedupe.New(dedupe.Config{Table: cfg.Table})
	if err != nil {
		return nil, fmt.Errorf("inbox: %w", err) // unreachable: Table is validated above
	}
	tel, err := newInstruments(&cfg, nodes)
	if err != nil {
		return nil, err
	}
	return &Consumer{db: db, cfg: cfg, nodes: nodes, store: store, tel: tel}, nil
}

// Run consumes until ctx ends, reconnecting with backoff whenever the
// connection or channel is lost or the broker cancels the consumer. When
// ctx ends it stops consuming, handles the deliveries its workers already
// hold (not under OrderedByKey), waits for running handlers, for up to
// Config.ShutdownTimeout in all, and returns nil. Run may not be called
// twice at once.
func (c *Consumer) Run(ctx context.Context) error {
	if !c.running.CompareAndSwap(false, true) {
		return errors.New("inbox: Run called while this Consumer is already running")
	}
	defer c.running.Store(false)
	unregister, err := c.register()
	if err != nil {
		return err
	}
	defer unregister()
	var wg sync.WaitGroup
	defer wg.Wait()
	pctx, stopPurge := context.WithCancel(ctx) // also when Run returns an error
	defer stopPurge()
	if c.cfg.PurgeInterval > 0 {
		wg.Add(1)
		go func() { defer wg.Done(); c.purgeLoop(pctx) }()
	}
	log := c.cfg.Logger.With("consumer", c.cfg.Consumer)
	b := backoff.NewExponentialBackOff()
	b.InitialInterval, b.MaxInterval, b.MaxElapsedTime = 100*time.Millisecond, c.cfg.ReconnectMaxWait, 0
	for {
		conn, err := c.nodes.DialRetry(ctx, c.cfg.ConnectionName, c.cfg.ReconnectMaxWait, func(err error, d time.Duration) {
			log.Warn("inbox: cannot connect; retrying", "queue", c.cfg.Queue, "error", err, "retry_in", d.String())
		})
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("inbox: %w", err)
		}
		c.stats.sessions.Add(1)
		started := time.Now()
		err = c.session(ctx, conn)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, ErrQueueNotFound) {
			return err
		}
		if time.Since(started) > time.Minute {
			b.Reset()
		}
		d := b.NextBackOff()
		log.Warn("inbox: consumer stopped; reconnecting", "queue", c.cfg.Queue, "error", err, "retry_in", d.String())
		if !wait.Sleep(ctx, d) {
			return nil
		}
	}
}

func (c *Consumer) purgeLoop(ctx context.Context) {
	t := time.NewTicker(c.cfg.PurgeInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			// Only this consumer's ids: others on the table keep their own Retention.
			n, err := c.store.Purge(ctx, c.db, c.cfg.Consumer, c.cfg.Retention)
			if err != nil && ctx.Err() == nil {
				c.cfg.Logger.Warn("inbox: purge of old message ids failed; retrying next interval", "consumer", c.cfg.Consumer, "table", c.store.Table(), "error", err)
			} else if n > 0 {
				c.tel.purged.Add(ctx, n, c.tel.purgedOpts...)
				c.cfg.Logger.Debug("inbox: purged old message ids", "consumer", c.cfg.Consumer, "table", c.store.Table(), "deleted", n)
			}
		}
	}
}

// session is one connection: a consuming channel, a confirm channel for
// retries and dead letters, and the workers. Deliveries never outlive their
// session: each is acked on the channel it came from (its Acknowledger), so
// a tag can never be acked on a newer channel; after a reconnect, whatever
// was unacked is redelivered and deduplicated. session closes conn.
func (c *Consumer) session(ctx context.Context, conn *amqp.Connection) error {
	log := c.cfg.Logger.With("consumer", c.cfg.Consumer, "queue", c.cfg.Queue, "connection", c.cfg.ConnectionName)
	var bg sync.WaitGroup
	defer bg.Wait() // the returns drainer and watchHolds end once the session is
	w := amqpx.NewWatch(conn, log, "inbox: ")
	defer w.Close() // runs first: closes the connection, ends the session

	pub, ch, err := c.openChannels(w, &bg, log)
	if err != nil {
		return err
	}
	if err := c.waitDB(ctx, w.Broken(), log); err != nil {
		return err
	}
	tag := consumerTag(c.cfg.ConnectionName)
	since := time.Now() // nothing can be delivered before the consume
	deliveries, err := ch.Consume(c.cfg.Queue, tag, false, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume %q: %w", c.cfg.Queue, err)
	}

	// Handlers run on a context that survives ctx by ShutdownTimeout, so a
	// stop lets them finish and commit.
	hctx, hcancel := context.WithCancel(context.WithoutCancel(ctx))
	defer hcancel()
	stop := make(chan struct{}) // closed: workers stop (after what they hold, see work)
	// handBack ends the session and returns every unacked delivery to the
	// queue at once, in order, by closing the connection.
	handBack := func(why error) {
		log.Warn("inbox: handing every delivery back to the queue, in order, by closing the connection; consuming again once the database answers", "error", why)
		w.Close()
	}
	wk := &worker{c: c, ctx: hctx, stop: stop, finish: new(atomic.Bool), broken: w.Broken(), pub: pub, handBack: handBack, log: log, acks: newAcker(c.cfg.Prefetch)}
	if c.cfg.HoldLimit > 0 {
		bg.Add(1)
		go func() { defer bg.Done(); wk.watchHolds(c.cfg.HoldLimit) }()
	}
	d := startWorkers(wk, since)
	result := d.run(ctx, deliveries, w.Broken())
	// Stop. Running handlers finish (bounded), then the connection closes
	// and the broker requeues what was not acked. When Run stops (not a
	// broken session) the consumer is cancelled first and the workers
	// handle what was already delivered. Not under OrderedByKey: a quorum
	// queue with a single active consumer makes the next one active at the
	// cancel, while earlier deliveries of its keys are still here; without
	// it, the next one starts when the channel closes, with those
	// deliveries returned.
	timer := time.AfterFunc(c.cfg.ShutdownTimeout, hcancel) // ShutdownTimeout in all
	if result == nil && !c.cfg.OrderedByKey {
		cancelConsumer(ch, tag, w, &bg)
		wk.finish.Store(true)
		d.passOn(deliveries, c.cfg.ShutdownTimeout)
	}
	close(stop)
	d.workers.Wait()
	timer.Stop()
	wk.flushAcks()
	return result
}

// cancelConsumer cancels the consumer. It waits for the broker's answer
// (in the background: a blocked connection is not read, see amqpx.Close),
// because amqp091-go drops what arrives for a consumer cancelled without
// waiting, and the broker may have sent more before it read the cancel.
// Either way the delivery channel closes once what arrived was read.
func cancelConsumer(ch *amqp.Channel, tag string, w *amqpx.Watch, bg *sync.WaitGroup) {
	if w.Blocked() {
		_ = ch.Cancel(tag, true)
		return
	}
	bg.Add(1)
	go func() { defer bg.Done(); _ = ch.Cancel(tag, false) }() // returns at the latest when the session closes the connection
}

// openChannels makes sure the queues exist and opens the session's two
// channels, both watched by w: the confirm channel of retries and dead
// letters, and the consuming channel (with its prefetch).
func (c *Consumer) openChannels(w *amqpx.Watch, bg *sync.WaitGroup, log *slog.Logger) (*publisher, *amqp.Channel, error) {
	if err := c.ensureQueues(w.Conn, log); err != nil {
		return nil, nil, err
	}
	pub, err := newPublisher(w.Conn, bg, w)
	if err != nil {
		return nil, nil, err
	}
	ch, err := w.Conn.Channel()
	if err != nil {
		return nil, nil, fmt.Errorf("open channel: %w", err)
	}
	if err := ch.Qos(c.cfg.Prefetch, 0, false); err != nil {
		return nil, nil, fmt.Errorf("set prefetch %d: %w", c.cfg.Prefetch, err)
	}
	w.Channel(ch, "consuming channel")
	return pub, ch, nil
}

// pingTimeout bounds one check of the database in waitDB.
const pingTimeout = 10 * time.Second

// waitDB pings the database until it answers: deliveries taken while it
// is unreachable would only be held, then handed back at HoldLimit, each
// return counted by a quorum queue against its delivery limit.
func (c *Consumer) waitDB(ctx context.Context, broken <-chan struct{}, log *slog.Logger) error {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval, b.MaxInterval, b.MaxElapsedTime = 100*time.Millisecond, c.cfg.ReconnectMaxWait, 0
	for {
		pctx, cancel := context.WithTimeout(ctx, pingTimeout)
		err := c.db.PingContext(pctx)
		cancel()
		if err == nil || ctx.Err() != nil {
			return ctx.Err()
		}
		wait := b.NextBackOff()
		log.Warn("inbox: database unreachable; consuming once it answers", "error", err, "retry_in", wait.String())
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-broken:
			t.Stop()
			return errors.New("session broken")
		}
	}
}

// watchHolds hands every delivery back once one has been held unacked
// for limit, until the session stops: the broker would close the channel
// at its consumer_timeout (see Config.HoldLimit).
func (s *worker) watchHolds(limit time.Duration) {
	t := time.NewTicker(limit / 10)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-s.broken:
			return
		case <-t.C:
			if at, ok := s.acks.oldest(); ok && time.Since(at) > limit {
				s.handBack(fmt.Errorf("a delivery held unacked for %s, longer than Config.HoldLimit (%s)", time.Since(at).Round(time.Millisecond), limit))
				return
			}
		}
	}
}

// shard picks the worker of a delivery: by key when it has one, so one key
// is handled by one worker in order.
func (c *Consumer) shard(d *amqp.Delivery, next *uint32) int {
	key := headerString(d.Headers[HeaderKey])
	if key == "" {
		*next++
		return int(*next % uint32(c.cfg.Concurrency))
	}
	h := fnv.New32a()
	h.Write([]byte(key))
	return int(h.Sum32() % uint32(c.cfg.Concurrency))
}

// consumerTag is name (cut to fit: a tag is an AMQP short string, at most
// 255 bytes) and a random suffix.
func consumerTag(name string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	if n := 255 - 1 - 2*len(b); len(name) > n {
		for n > 0 && !utf8.RuneStart(name[n]) {
			n--
		}
		name = name[:n]
	}
	return name + " " + hex.EncodeToString(b)
}
