package amqpx

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
)

// countingConn records each Write reaching the socket.
type countingConn struct {
	net.Conn
	writes [][]byte
	err    error
	closed bool
}

func (c *countingConn) Write(b []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	c.writes = append(c.writes, append([]byte(nil), b...))
	return len(b), nil
}

func (c *countingConn) Close() error { c.closed = true; return nil }

func TestBatchConnHoldsWritesUntilFlush(t *testing.T) {
	under := &countingConn{}
	c := &BatchConn{Conn: under}
	c.Write([]byte("a")) // not held: straight through
	c.Hold()
	c.Write([]byte("b"))
	c.Write([]byte("c"))
	if len(under.writes) != 1 {
		t.Fatalf("held writes reached the socket: %q", under.writes)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("d")) // Flush ended holding
	want := [][]byte{[]byte("a"), []byte("bc"), []byte("d")}
	if len(under.writes) != len(want) {
		t.Fatalf("socket writes %q, want %q", under.writes, want)
	}
	for i := range want {
		if !bytes.Equal(under.writes[i], want[i]) {
			t.Fatalf("socket writes %q, want %q", under.writes, want)
		}
	}
}

func TestBatchConnWritesThroughWhenTheHoldIsFull(t *testing.T) {
	under := &countingConn{}
	c := &BatchConn{Conn: under}
	c.Hold()
	c.Write(make([]byte, maxHeld-1))
	c.Write(make([]byte, 2)) // would pass the bound: the held bytes go first, then this
	if len(under.writes) != 2 || len(under.writes[0]) != maxHeld-1 || len(under.writes[1]) != 2 {
		t.Fatalf("got %d socket writes", len(under.writes))
	}
}

func TestBatchConnFailedFlushClosesAndKeepsFailing(t *testing.T) {
	under := &countingConn{}
	c := &BatchConn{Conn: under}
	c.Hold()
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	under.err = io.ErrClosedPipe
	if err := c.Flush(); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("Flush: %v, want the socket's error", err)
	}
	if !under.closed {
		t.Fatal("socket not closed after a failed write: the AMQP reader would not notice")
	}
	under.err = nil
	if _, err := c.Write([]byte("y")); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("Write after a failure: %v, want the first error", err)
	}
}
