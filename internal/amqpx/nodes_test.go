package amqpx

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
)

// A dial skips nodes that do not answer, and the one after a lost
// connection starts with the next node, so a dead node is tried last.
func TestNodesDialMovesPastADeadNode(t *testing.T) {
	t.Parallel()
	testenv.SkipWithoutServices(true)
	dead := deadURL(t)
	live := testenv.AMQPURL()
	nodes, err := ParseNodes(dead+","+live, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 4 { // from either start, the live node answers
		nodes.next.Store(uint32(i % 2))
		conn, err := nodes.Dial(testenv.Unique("nodes-test"))
		if err != nil {
			t.Fatalf("start %d: %v", i%2, err)
		}
		conn.Close()
		if got := nodes.next.Load(); got != 0 {
			t.Errorf("after connecting to node 2, the next dial starts at %d, want the node after it (0)", got)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	both, _ := ParseNodes(dead+","+dead, nil)
	_, err = both.DialRetry(ctx, "nodes-test", 10*time.Millisecond, func(error, time.Duration) {})
	if err == nil {
		t.Fatal("dial to two dead nodes succeeded")
	}
	one, _ := ParseNodes(dead, nil)
	if _, err := one.Dial("nodes-test"); err == nil || strings.Contains(err.Error(), "no node of the cluster") {
		t.Errorf("one dead node: %v, want the node's own error", err)
	}
	if _, err := both.Dial("nodes-test"); err == nil || !strings.Contains(err.Error(), "no node of the cluster answers") {
		t.Errorf("two dead nodes: %v, want both named", err)
	}
}

// TestParseNodesSpreads: instances start from different nodes.
func TestParseNodesSpreads(t *testing.T) {
	t.Parallel()
	seen := map[uint32]bool{}
	for range 200 {
		n, err := ParseNodes("amqp://a/,amqp://b/,amqp://c/", nil)
		if err != nil {
			t.Fatal(err)
		}
		seen[n.next.Load()] = true
	}
	if len(seen) != 3 {
		t.Errorf("200 parses started at %v, want every one of 3 nodes", seen)
	}
	if s := (&Nodes{urls: []string{"amqp://u:secret@a/", "amqp://v:secret@b/"}}).String(); strings.Contains(s, "secret") {
		t.Errorf("String() = %s: a password shows", s)
	}
}

// deadURL is an amqp URL of a loopback port nothing listens on.
func deadURL(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "amqp://guest:guest@" + addr + "/"
}
