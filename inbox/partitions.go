package inbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/locks"
	"github.com/mailroom-go/mailroom/internal/wait"
	"github.com/mailroom-go/mailroom/internal/wire"
)

// Partitions spreads one stream over Count partition queues by its
// messages' keys, so that ordered consumption scales past one process:
// each partition has a single active consumer, and the consumer processes
// of a Group share the partitions between them.
//
// The relay puts each keyed message's bucket (KeyHeaders: FNV-1a of the
// key modulo 64, a fixed part of the wire contract) in the
// mailroom-bucket header, and a headers exchange routes bucket b to
// partition b mod Count: all messages of a key go to one partition, and
// the same one after any restart of any broker node, which RabbitMQ's
// consistent-hash exchange did not keep (after a restart of the whole
// cluster it placed half the keys in another partition:
// TestPartitionOfAKeySurvivesRestarts). Messages without a key (no bucket)
// go to partition 0 through the hash exchange's alternate exchange; give
// ordered streams a key. Another publisher sets KeyHeaders(key).
//
// Count is fixed once declared: adding or removing a partition moves some
// keys to another partition, and messages of those keys already queued in
// the old one would be applied alongside newer ones in the new one.
// Change it only with the queues drained and the publishers stopped, and
// delete the exchange Queue.hash first (its bindings go with it): declared
// again with another Count, the old bindings would stay beside the new
// ones and route a bucket to two partitions.
type Partitions struct {
	// Queue names the partitions: Queue.p0 … Queue.p<Count-1> (see
	// PartitionQueueName), each with its own retry and dead-letter queues.
	// The headers exchange is Queue.hash, its alternate Queue.nokey.
	Queue string
	// Count is how many partitions: the most consumer processes that work
	// at once (more stand by). Between 1 and MaxPartitions.
	Count int
	// Exchange, when set, is declared (durable, of kind ExchangeKind,
	// default "topic") and bound to the hash exchange with each of
	// BindingKeys (default "#"): publish to Exchange.
	Exchange     string
	ExchangeKind string
	BindingKeys  []string
	// Classic and DeliveryLimit apply to every partition (see Topology).
	Classic       bool
	DeliveryLimit int
}

// MaxPartitions bounds Partitions.Count: one bucket each at most.
const MaxPartitions = wire.Buckets

// PartitionQueueName is the queue of partition i of queue.
func PartitionQueueName(queue string, i int) string { return fmt.Sprintf("%s.p%d", queue, i) }

// hashExchangeName is the headers exchange in front of queue's partitions,
// and noKeyExchangeName its alternate exchange, for messages without a
// bucket.
func hashExchangeName(queue string) string  { return queue + ".hash" }
func noKeyExchangeName(queue string) string { return queue + ".nokey" }

// KeyHeaders are the headers that route a message of key to its partition,
// as the relay sets them: for a publisher other than the relay.
func KeyHeaders(key string) amqp.Table {
	return amqp.Table{wire.HeaderKey: key, wire.HeaderBucket: wire.Bucket(key)}
}

// DeclarePartitions declares, idempotently, the headers exchange with its
// alternate, every partition queue as DeclareTopology does (with
// SingleActiveConsumer), the binding of each bucket to its partition, and
// Exchange bound to the headers exchange.
func DeclarePartitions(ch *amqp.Channel, p Partitions) error {
	if p.Queue == "" {
		return errors.New("inbox: Partitions.Queue: required")
	}
	if p.Count < 1 || p.Count > MaxPartitions {
		return fmt.Errorf("inbox: Partitions.Count %d: must be between 1 and %d", p.Count, MaxPartitions)
	}
	hx, nx := hashExchangeName(p.Queue), noKeyExchangeName(p.Queue)
	if err := ch.ExchangeDeclare(nx, "fanout", true, false, false, false, nil); err != nil {
		return fmt.Errorf("inbox: declare exchange %q: %w", nx, err)
	}
	if err := ch.ExchangeDeclare(hx, "headers", true, false, false, false, amqp.Table{"alternate-exchange": nx}); err != nil {
		var ae *amqp.Error
		if errors.As(err, &ae) && ae.Code == amqp.PreconditionFailed {
			return fmt.Errorf("inbox: declare headers exchange %q: one of that name exists with other settings (declared by an earlier mailroom as x-consistent-hash?): delete it, with the partitions drained, and declare again: %w", hx, err)
		}
		return fmt.Errorf("inbox: declare headers exchange %q: %w", hx, err)
	}
	for i := range p.Count {
		q := PartitionQueueName(p.Queue, i)
		if err := DeclareTopology(ch, Topology{Queue: q, SingleActiveConsumer: true, Classic: p.Classic, DeliveryLimit: p.DeliveryLimit}); err != nil {
			return err
		}
	}
	if err := ch.QueueBind(PartitionQueueName(p.Queue, 0), "", nx, false, nil); err != nil {
		return fmt.Errorf("inbox: bind %q to %q: %w", PartitionQueueName(p.Queue, 0), nx, err)
	}
	for b := range wire.Buckets {
		q := PartitionQueueName(p.Queue, b%p.Count)
		if err := ch.QueueBind(q, "", hx, false, amqp.Table{"x-match": "all", wire.HeaderBucket: strconv.Itoa(b)}); err != nil {
			return fmt.Errorf("inbox: bind %q to %q for bucket %d: %w", q, hx, b, err)
		}
	}
	if p.Exchange == "" {
		return nil
	}
	if p.ExchangeKind == "" {
		p.ExchangeKind = "topic"
	}
	if len(p.BindingKeys) == 0 {
		p.BindingKeys = []string{"#"}
	}
	if err := ch.ExchangeDeclare(p.Exchange, p.ExchangeKind, true, false, false, false, nil); err != nil {
		return fmt.Errorf("inbox: declare exchange %q (%s): %w", p.Exchange, p.ExchangeKind, err)
	}
	for _, k := range p.BindingKeys {
		if err := ch.ExchangeBind(hx, k, p.Exchange, false, nil); err != nil {
			return fmt.Errorf("inbox: bind %q to %q with %q: %w", hx, p.Exchange, k, err)
		}
	}
	return nil
}

// RebalanceInterval is how often a Group looks at its members and takes or
// gives up partitions.
const RebalanceInterval = time.Second

// Group consumes the partitions of a Partitions topology, sharing them with
// the other processes running a Group of the same Consumer and Queue on the
// same database. Members find each other through PostgreSQL session
// advisory locks (one slot each; see internal/locks), and each member
// consumes the partitions p with p mod members = its rank. Members join,
// leave and die at any time: within RebalanceInterval the others take the
// partitions over.
//
// Order per key holds through every handover because each partition queue
// has a single active consumer: the broker lets a newcomer consume only
// once the previous holder has stopped, and that one stops under
// OrderedByKey by returning what it held, in order. The assignment only
// spreads the load; two members that briefly both claim a partition
// cannot both consume it.
type Group struct {
	db    *sqlx.DB
	cfg   Config // with defaults; each partition's differs in Queue and ConnectionName
	count int
	key   int64 // member slot s locks key+s (see locks.GroupSlots)
	parts []*Consumer

	mu    sync.Mutex
	owned map[int]*partitionRun
}

type partitionRun struct {
	stop func()
	done chan error
}

// NewGroup prepares a member of the group consuming partitions of
// cfg.Queue (as named by PartitionQueueName) with cfg for each partition:
// OrderedByKey is implied, and each partition's connection is named
// cfg.ConnectionName + " p<i>". RetryQueue and DeadLetterQueue must be
// left empty: each partition has its own.
func NewGroup(db *sqlx.DB, cfg Config, partitions int) (*Group, error) {
	if partitions < 1 || partitions > MaxPartitions {
		return nil, fmt.Errorf("inbox: NewGroup: partitions %d: must be between 1 and %d, as declared (Partitions.Count)", partitions, MaxPartitions)
	}
	if cfg.RetryQueue != "" || cfg.DeadLetterQueue != "" {
		return nil, errors.New("inbox: NewGroup: Config.RetryQueue and DeadLetterQueue must be empty: each partition has its own (Queue.p<i>.retry, .dead)")
	}
	cfg.OrderedByKey = true
	base, err := cfg.withDefaults() // checks the template once, with the partitions' names below
	if err != nil {
		return nil, err
	}
	g := &Group{db: db, cfg: base, count: partitions, owned: map[int]*partitionRun{}}
	for i := range partitions {
		pc := cfg
		pc.Queue = PartitionQueueName(cfg.Queue, i)
		pc.ConnectionName = fmt.Sprintf("%s p%d", base.ConnectionName, i)
		c, err := New(db, pc)
		if err != nil {
			return nil, err
		}
		g.parts = append(g.parts, c)
	}
	h := fnv.New32a()
	h.Write([]byte(base.Consumer + "\x00" + cfg.Queue))
	g.key = int64(h.Sum32())<<32 | locks.GroupSlots
	return g, nil
}

// Stats adds up the partitions' consumers' counters.
func (g *Group) Stats() Stats {
	var s Stats
	for _, c := range g.parts {
		p := c.Stats()
		s.Handled += p.Handled
		s.Duplicates += p.Duplicates
		s.Failed += p.Failed
		s.Retried += p.Retried
		s.DeadLettered += p.DeadLettered
		s.Requeued += p.Requeued
		s.DBErrors += p.DBErrors
		s.Sessions += p.Sessions
	}
	return s
}

// Owned lists the partitions this member consumes now (the broker may
// still hold one back while its previous consumer stops).
func (g *Group) Owned() []int {
	g.mu.Lock()
	defer g.mu.Unlock()
	var ps []int
	for p := range g.owned {
		ps = append(ps, p)
	}
	slices.Sort(ps)
	return ps
}

// Run is a member of the group until ctx ends, then stops every partition
// it consumes (see Consumer.Run) and returns nil; or until a partition's
// consumer fails for good (a missing queue with NoDeclare), which stops
// the others and is returned.
func (g *Group) Run(ctx context.Context) error {
	var conn *sql.Conn // holds the member slot
	slot := -1
	defer func() {
		g.stopAll()
		if conn != nil {
			conn.Close() // the slot goes with the session
		}
	}()
	failed := make(chan error, g.count)
	for {
		var err error
		if conn, slot, err = g.join(ctx, conn, slot); err == nil {
			var members []int
			if members, err = g.members(ctx, conn); err == nil {
				g.assign(ctx, members, slot, failed)
			}
		}
		if err != nil && ctx.Err() == nil {
			g.cfg.Logger.Warn("inbox: group membership unknown; keeping the partitions held until the database answers", "consumer", g.cfg.Consumer, "queue", g.cfg.Queue, "error", err)
		}
		select {
		case err := <-failed:
			return err
		default:
		}
		if !wait.Sleep(ctx, RebalanceInterval) {
			return nil
		}
	}
}

// maxMembers bounds the member slots tried; members past it stand by.
const maxMembers = 1024

// join makes sure this member holds a slot lock on a live session,
// reconnecting and taking the first free slot when the session was lost.
func (g *Group) join(ctx context.Context, conn *sql.Conn, slot int) (*sql.Conn, int, error) {
	if conn != nil {
		if err := conn.PingContext(ctx); err == nil {
			return conn, slot, nil
		}
		conn.Close()
	}
	conn, err := g.db.Conn(ctx)
	if err != nil {
		return nil, -1, err
	}
	for s := range maxMembers {
		var ok bool
		if err := conn.QueryRowContext(ctx, `SELECT pg_try_advisory_lock($1)`, g.key+int64(s)).Scan(&ok); err != nil {
			conn.Close()
			return nil, -1, err
		}
		if ok {
			return conn, s, nil
		}
	}
	return conn, -1, nil // standing by: every slot is taken
}

// members lists the slots held in this database: the group's members.
func (g *Group) members(ctx context.Context, conn *sql.Conn) ([]int, error) {
	rows, err := conn.QueryContext(ctx, `
		SELECT objid::bigint - $2 FROM pg_locks
		WHERE locktype = 'advisory' AND granted AND objsubid = 1
		  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
		  AND classid::bigint = $1 AND objid::bigint >= $2 AND objid::bigint < $2 + $3
		ORDER BY 1`, uint32(g.key>>32), int64(uint32(g.key)), maxMembers)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var slots []int
	for rows.Next() {
		var s int
		if err := rows.Scan(&s); err != nil {
			return nil, err
		}
		slots = append(slots, s)
	}
	return slots, rows.Err()
}

// assign starts the partitions that are this member's share and stops the
// others: partition p belongs to the member of rank p mod len(members).
func (g *Group) assign(ctx context.Context, members []int, slot int, failed chan<- error) {
	rank := slices.Index(members, slot)
	want := map[int]bool{}
	if rank >= 0 {
		for p := range g.count {
			if p%len(members) == rank {
				want[p] = true
			}
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	for p, run := range g.owned {
		if !want[p] {
			run.stop()
			delete(g.owned, p)
		}
	}
	for p := range want {
		if _, ok := g.owned[p]; ok {
			continue
		}
		pctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		run := &partitionRun{done: make(chan error, 1)}
		run.stop = func() { cancel(); <-run.done }
		c := g.parts[p]
		go func() {
			err := c.Run(pctx)
			if err != nil {
				failed <- fmt.Errorf("inbox: partition %d: %w", p, err)
			}
			run.done <- err
		}()
		g.owned[p] = run
		g.cfg.Logger.Info("inbox: consuming partition", "consumer", g.cfg.Consumer, "queue", c.cfg.Queue, "members", len(members), "rank", rank)
	}
}

// stopAll stops every partition this member consumes, at once.
func (g *Group) stopAll() {
	g.mu.Lock()
	defer g.mu.Unlock()
	var wg sync.WaitGroup
	for p, run := range g.owned {
		wg.Add(1)
		go func() { defer wg.Done(); run.stop() }()
		delete(g.owned, p)
	}
	wg.Wait()
}
