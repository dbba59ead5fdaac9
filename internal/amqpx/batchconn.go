package amqpx

import (
	"context"
	"net"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// maxHeld bounds what a BatchConn keeps in memory before writing anyway.
const maxHeld = 256 << 10

// BatchConn is the network connection under an AMQP connection, able to
// hold writes: between Hold and Flush they collect in memory and reach the
// socket in one write. amqp091-go flushes its buffer after every publish,
// so a run of N publishes costs N write syscalls in the client and N
// reads in the broker; held, it costs one of each. Whoever calls Hold must
// Flush before it waits for anything the broker would answer, or that
// answer waits for the flush.
type BatchConn struct {
	net.Conn
	mu   sync.Mutex
	held bool
	buf  []byte
	err  error // the first failed write: every later write fails with it
}

// Hold makes writes collect in memory until Flush.
func (c *BatchConn) Hold() {
	c.mu.Lock()
	c.held = true
	c.mu.Unlock()
}

// Flush writes what was held and stops holding. After a failed write the
// connection is closed, so amqp091-go sees the failure and closes the
// AMQP connection (and with it the channels and their unconfirmed
// messages, which the relay releases).
func (c *BatchConn) Flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.held = false
	return c.flushLocked()
}

func (c *BatchConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	if c.held && len(c.buf)+len(b) <= maxHeld {
		c.buf = append(c.buf, b...)
		return len(b), nil
	}
	if err := c.flushLocked(); err != nil {
		return 0, err
	}
	n, err := c.Conn.Write(b)
	if err != nil {
		c.fail(err)
	}
	return n, err
}

func (c *BatchConn) flushLocked() error {
	if c.err != nil || len(c.buf) == 0 {
		return c.err
	}
	_, err := c.Conn.Write(c.buf)
	c.buf = c.buf[:0]
	if err != nil {
		c.fail(err)
	}
	return err
}

func (c *BatchConn) fail(err error) {
	c.err = err
	c.Conn.Close()
}

// DialBatchRetry is DialRetry for a connection whose writes can be held
// (see BatchConn).
func (n *Nodes) DialBatchRetry(ctx context.Context, name string, maxWait time.Duration, onError func(error, time.Duration)) (*amqp.Connection, *BatchConn, error) {
	var bc *BatchConn
	conn, err := retry(ctx, maxWait, onError, func() (*amqp.Connection, error) {
		return n.dial(func() amqp.Config {
			cfg := config(name)
			dial := amqp.DefaultDial(30 * time.Second)
			cfg.Dial = func(network, addr string) (net.Conn, error) {
				nc, err := dial(network, addr)
				if err != nil {
					return nil, err
				}
				bc = &BatchConn{Conn: nc}
				return bc, nil
			}
			return cfg
		})
	})
	return conn, bc, err
}
