package inbox_test

import (
	"context"
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// member is one running Group.
type member struct {
	g    *inbox.Group
	stop func()
}

// Three members share four partitions, each partition with one of them;
// when one leaves, the others take its partitions, and a newcomer gets a
// share. Throughout, every message is applied once and each key's
// messages in order. (The test routes by key to the partitions itself;
// TestDeclarePartitionsRoutesByKey checks the exchange's routing, and
// test/cluster runs the whole topology.)
func TestGroupSharesPartitions(t *testing.T) {
	t.Parallel()
	const parts, keys, perKey = 4, 40, 30
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	queue := testenv.Unique("q")
	ch := b.Channel()
	for i := range parts {
		q := inbox.PartitionQueueName(queue, i)
		b.CleanupQueues(q, inbox.RetryQueueName(q), inbox.DeadLetterQueueName(q))
		b.CleanupExchanges(inbox.DeadLetterExchangeName(q))
		if err := inbox.DeclareTopology(ch, inbox.Topology{Queue: q, SingleActiveConsumer: true}); err != nil {
			t.Fatal(err)
		}
	}
	s.DB.MustExec(`CREATE TABLE effects (seq bigserial PRIMARY KEY, msg_id text NOT NULL, key text NOT NULL, n int NOT NULL)`)
	handler := func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		var n int
		fmt.Sscanf(string(m.Payload), `{"n":%d}`, &n)
		_, err := tx.ExecContext(ctx, `INSERT INTO effects (msg_id, key, n) VALUES ($1, $2, $3)`, m.ID, m.Key, n)
		return err
	}
	start := func() *member {
		g, err := inbox.NewGroup(s.DB, inbox.Config{
			URL: testenv.AMQPURL(), Queue: queue, Consumer: "test", Handler: handler,
			ConnectionName: testenv.Unique("group-test"), Concurrency: 2,
			MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, Logger: testLogger(t),
		}, parts)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- g.Run(ctx) }()
		var once sync.Once
		m := &member{g: g, stop: func() {
			once.Do(func() {
				cancel()
				if err := <-done; err != nil {
					t.Errorf("Group.Run: %v", err)
				}
			})
		}}
		t.Cleanup(m.stop)
		return m
	}
	// shared waits until the running members own every partition once.
	shared := func(ms ...*member) {
		t.Helper()
		testenv.Eventually(t, wait, fmt.Sprintf("%d members sharing %d partitions", len(ms), parts), func() bool {
			var all []int
			for _, m := range ms {
				own := m.g.Owned()
				if len(own) == 0 || len(own) > (parts+len(ms)-1)/len(ms) {
					return false
				}
				all = append(all, own...)
			}
			slices.Sort(all)
			return slices.Equal(all, []int{0, 1, 2, 3})
		})
	}
	pub := b.Channel()
	if err := pub.Confirm(false); err != nil {
		t.Fatal(err)
	}
	sent := 0
	publish := func(round int) { // one message per key
		t.Helper()
		for k := range keys {
			key := fmt.Sprint("k", k)
			h := fnv.New32a()
			h.Write([]byte(key))
			q := inbox.PartitionQueueName(queue, int(h.Sum32()%parts))
			dc, err := pub.PublishWithDeferredConfirm("", q, true, false, msg(fmt.Sprintf("%s-%03d", key, round), key, round))
			if err != nil || !dc.Wait() {
				t.Fatalf("publish: %v", err)
			}
			sent++
		}
	}
	applied := func() int {
		var n int
		if err := s.DB.Get(&n, `SELECT count(DISTINCT msg_id) FROM effects`); err != nil {
			t.Fatal(err)
		}
		return n
	}

	a, b2, c := start(), start(), start()
	shared(a, b2, c)
	for r := range perKey / 3 {
		publish(r)
	}
	testenv.Eventually(t, wait, "the first third applied", func() bool { return applied() == sent })
	b2.stop() // leaves mid-stream: its partitions move to a and c
	for r := perKey / 3; r < 2*perKey/3; r++ {
		publish(r)
	}
	shared(a, c)
	d := start() // joins
	for r := 2 * perKey / 3; r < perKey; r++ {
		publish(r)
	}
	shared(a, c, d)
	testenv.Eventually(t, wait, "every message applied", func() bool { return applied() == sent })

	var rows []struct {
		ID  string `db:"msg_id"`
		Key string `db:"key"`
		N   int    `db:"n"`
	}
	if err := s.DB.Select(&rows, `SELECT msg_id, key, n FROM effects ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	if len(rows) != keys*perKey {
		t.Errorf("%d effects for %d messages", len(rows), keys*perKey)
	}
	last := map[string]int{}
	for _, r := range rows {
		if prev, ok := last[r.Key]; ok && r.N != prev+1 {
			t.Fatalf("key %s: message %d applied after %d", r.Key, r.N, prev)
		}
		last[r.Key] = r.N
	}
	if s := a.g.Stats(); s.Handled == 0 {
		t.Errorf("member a handled nothing: %+v", s)
	}
}

func TestNewGroupValidates(t *testing.T) {
	t.Parallel()
	h := func(context.Context, *sqlx.Tx, inbox.Message) error { return nil }
	ok := inbox.Config{URL: "amqp://localhost/", Queue: "q", Consumer: "c", Handler: h}
	for _, tc := range []struct {
		n    int
		edit func(*inbox.Config)
		want string
	}{
		{0, nil, "partitions 0"},
		{inbox.MaxPartitions + 1, nil, "partitions 65"},
		{2, func(c *inbox.Config) { c.RetryQueue = "r" }, "RetryQueue and DeadLetterQueue must be empty"},
		{2, func(c *inbox.Config) { c.Queue = "" }, "Config.Queue"},
	} {
		cfg := ok
		if tc.edit != nil {
			tc.edit(&cfg)
		}
		if _, err := inbox.NewGroup(&sqlx.DB{}, cfg, tc.n); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewGroup(%d): %v, want %q", tc.n, err, tc.want)
		}
	}
}

// DeclarePartitions routes each key's messages to partition Bucket mod
// Count, every time, and messages without a key to partition 0; none is
// routed twice. (A headers exchange: no plugin, so on the machine's broker.)
func TestDeclarePartitionsRoutesByKey(t *testing.T) {
	t.Parallel()
	const parts, keys = 3, 60
	b := testenv.NewBroker(t)
	queue, ex := testenv.Unique("q"), testenv.Unique("ex")
	for i := range parts {
		q := inbox.PartitionQueueName(queue, i)
		b.CleanupQueues(q, inbox.RetryQueueName(q), inbox.DeadLetterQueueName(q))
		b.CleanupExchanges(inbox.DeadLetterExchangeName(q))
	}
	b.CleanupExchanges(ex, queue+".hash", queue+".nokey")
	ch := b.Channel()
	if err := inbox.DeclarePartitions(ch, inbox.Partitions{Queue: queue, Count: parts, Exchange: ex}); err != nil {
		t.Fatal(err)
	}
	if err := inbox.DeclarePartitions(ch, inbox.Partitions{Queue: queue, Count: parts, Exchange: ex}); err != nil {
		t.Fatalf("declared again: %v", err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	want := map[string]int{}
	for k := range keys {
		key := fmt.Sprint("key-", k)
		bucket, _ := strconv.Atoi(fmt.Sprint(inbox.KeyHeaders(key)["mailroom-bucket"]))
		want[key] = bucket % parts
		for range 2 {
			if _, err := ch.PublishWithDeferredConfirm(ex, "e", true, false, amqp.Publishing{MessageId: key, Headers: inbox.KeyHeaders(key), Body: []byte("{}")}); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i := range 5 {
		if _, err := ch.PublishWithDeferredConfirm(ex, "e", true, false, amqp.Publishing{MessageId: fmt.Sprint("nokey-", i), Body: []byte("{}")}); err != nil {
			t.Fatal(err)
		}
		want[fmt.Sprint("nokey-", i)] = 0
	}
	// A consumer on each partition (a single active consumer's quorum
	// queue refuses basic.get), until every copy has arrived.
	type arrival struct {
		id string
		p  int
	}
	arrived := make(chan arrival)
	for p := range parts {
		ds, err := b.Channel().Consume(inbox.PartitionQueueName(queue, p), "", true, false, false, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			for d := range ds {
				arrived <- arrival{d.MessageId, p}
			}
		}()
	}
	got := map[string][]int{}
	deadline := time.After(30 * time.Second)
	for n := 0; n < 2*keys+5; n++ {
		select {
		case a := <-arrived:
			got[a.id] = append(got[a.id], a.p)
		case <-deadline:
			t.Fatalf("%d of %d messages arrived in the partitions", n, 2*keys+5)
		}
	}
	for id, p := range want {
		copies := 2
		if strings.HasPrefix(id, "nokey-") {
			copies = 1
		}
		if len(got[id]) != copies || got[id][0] != p || got[id][copies-1] != p {
			t.Errorf("%s: in partitions %v, want %d×%d", id, got[id], copies, p)
		}
	}
}
