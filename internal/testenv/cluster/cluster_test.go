//go:build linux && cluster

package cluster_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/testenv/cluster"
)

// TestThreeNodeCluster starts three nodes, checks they form one cluster,
// fills a quorum queue through node 1, stops node 1's application and reads
// the queue's depth through node 2, then starts node 1 again.
func TestThreeNodeCluster(t *testing.T) {
	began := time.Now()
	c := cluster.Start(t, 3, "rabbitmq_consistent_hash_exchange")
	t.Logf("Start(3) took %s", time.Since(began).Round(time.Millisecond))

	urls := c.URLs()
	if len(urls) != 3 {
		t.Fatalf("URLs() = %v, want 3", urls)
	}
	for i, u := range urls {
		if u != c.URL(i) || !strings.HasPrefix(u, "amqp://guest:guest@127.0.0.1:") || strings.HasSuffix(u, ":5672/") {
			t.Fatalf("URL(%d) = %q (URLs()[%d] = %q)", i, c.URL(i), i, u)
		}
		if n := c.Node(i); !strings.HasPrefix(n, "mrt") || !strings.HasSuffix(n, "@localhost") {
			t.Fatalf("Node(%d) = %q", i, n)
		}
	}
	if want := []string{c.Node(0), c.Node(1), c.Node(2)}; !sameSet(running(t, c, 0), want) {
		t.Fatalf("cluster_status running_nodes = %v, want %v", running(t, c, 0), want)
	}
	t.Run("ConsistentHashExchange", func(t *testing.T) { consistentHashExchange(t, c) })

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	conn, ch := dial(t, c.URL(0))
	const queue, total = "cluster_test_qq", 1000
	if _, err := ch.QueueDeclare(queue, true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil {
		t.Fatalf("declare quorum queue: %v", err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatalf("confirm mode: %v", err)
	}
	confirms := make([]*amqp.DeferredConfirmation, 0, total)
	for i := range total {
		dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", queue, true, false, amqp.Publishing{
			DeliveryMode: amqp.Persistent,
			Body:         fmt.Appendf(nil, "message %d", i),
		})
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		confirms = append(confirms, dc)
	}
	for i, dc := range confirms {
		if ack, err := dc.WaitContext(ctx); err != nil || !ack {
			t.Fatalf("confirm of message %d: ack=%v err=%v", i, ack, err)
		}
	}
	conn.Close()

	c.StopNode(t, 0)
	if got := running(t, c, 1); slices.Contains(got, c.Node(0)) || len(got) != 2 {
		t.Fatalf("after StopNode(0), node 2 sees running %v", got)
	}

	// The queue's leader was on node 1: wait for a new one to be elected.
	var depth int
	var last error
	for deadline := time.Now().Add(time.Minute); ; {
		depth, last = queueDepth(c.URL(1), queue)
		if last == nil && depth == total {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("quorum queue through node 2: %d messages, want %d (last error: %v)", depth, total, last)
		}
		time.Sleep(200 * time.Millisecond)
	}

	c.StartNode(t, 0)
	if want := []string{c.Node(0), c.Node(1), c.Node(2)}; !sameSet(running(t, c, 0), want) {
		t.Fatalf("after StartNode(0), running_nodes = %v, want %v", running(t, c, 0), want)
	}
	conn, _ = dial(t, c.URL(0))
	conn.Close()
}

// consistentHashExchange declares an x-consistent-hash exchange (the
// plugin enabled by Start) on node 3 and routes through it.
func consistentHashExchange(t *testing.T, c *cluster.Cluster) {
	out, err := c.Ctl(0, "list_exchanges", "name", "type")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, "x-consistent-hash") {
		t.Fatalf("a fresh node already has an x-consistent-hash exchange:\n%s", out)
	}

	_, ch := dial(t, c.URL(2))
	if err := ch.ExchangeDeclare("cluster_test_hash", "x-consistent-hash", true, false, false, false, nil); err != nil {
		t.Fatalf("declare x-consistent-hash exchange: %v", err)
	}
	for _, q := range []string{"cluster_test_h1", "cluster_test_h2"} {
		if _, err := ch.QueueDeclare(q, false, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
		if err := ch.QueueBind(q, "1", "cluster_test_hash", false, nil); err != nil { // "1": the weight
			t.Fatal(err)
		}
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i := range 100 {
		dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, "cluster_test_hash", fmt.Sprint(i), false, false, amqp.Publishing{Body: []byte("x")})
		if err != nil {
			t.Fatal(err)
		}
		if ack, err := dc.WaitContext(ctx); err != nil || !ack {
			t.Fatalf("confirm: %v %v", ack, err)
		}
	}
	var sum int
	for _, q := range []string{"cluster_test_h1", "cluster_test_h2"} {
		st, err := ch.QueueDeclarePassive(q, false, false, false, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		if st.Messages == 0 {
			t.Errorf("queue %s got none of the 100 messages", q)
		}
		sum += st.Messages
	}
	if sum != 100 {
		t.Fatalf("the hash exchange routed %d of 100 messages", sum)
	}
	out, err = c.Ctl(0, "list_exchanges", "name", "type")
	if err != nil || !strings.Contains(out, "x-consistent-hash") {
		t.Fatalf("list_exchanges: %v\n%s", err, out)
	}
}

// TestTwoClustersSideBySide starts two single-node clusters at once in one
// process: names, ports and cookies must not clash.
func TestTwoClustersSideBySide(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	var a, b *cluster.Cluster
	var wg sync.WaitGroup
	wg.Go(func() { a = startNodes(t) })
	wg.Go(func() { b = startNodes(t) })
	wg.Wait()
	if a == nil || b == nil {
		t.FailNow()
	}
	if a.Node(0) == b.Node(0) || a.URL(0) == b.URL(0) {
		t.Fatalf("clash: %s %s / %s %s", a.Node(0), a.URL(0), b.Node(0), b.URL(0))
	}
	// Each rabbitmqctl reaches its own node only: the cookies differ.
	_, err := a.Ctl(0, "-n", b.Node(0), "status")
	if err == nil {
		t.Fatalf("cluster a's rabbitmqctl could talk to cluster b's node %s", b.Node(0))
	}
	first, _, _ := strings.Cut(err.Error(), "\n")
	t.Logf("as expected, a's cookie does not open b: %s", first)
	for _, c := range []*cluster.Cluster{a, b} {
		conn, _ := dial(t, c.URL(0))
		conn.Close()
	}
}

// startNodes is Start for a goroutine: it reports failure with t.Error.
func startNodes(t *testing.T) *cluster.Cluster {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, stop, err := cluster.StartNodes(ctx, 1)
	if err != nil {
		t.Error(err)
		return nil
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Error(err)
		}
	})
	return c
}

func dial(t *testing.T, url string) (*amqp.Connection, *amqp.Channel) {
	t.Helper()
	conn, err := amqp.Dial(url)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	return conn, ch
}

func queueDepth(url, queue string) (int, error) {
	conn, err := amqp.Dial(url)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return 0, err
	}
	q, err := ch.QueueDeclarePassive(queue, true, false, false, false, amqp.Table{"x-queue-type": "quorum"})
	if err != nil {
		return 0, err
	}
	return q.Messages, nil
}

func running(t *testing.T, c *cluster.Cluster, i int) []string {
	t.Helper()
	out, err := c.Ctl(i, "cluster_status", "--formatter", "json")
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Running []string `json:"running_nodes"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("cluster_status: %v: %s", err, out)
	}
	return st.Running
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}
