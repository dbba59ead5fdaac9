package main

import (
	"context"
	"log/slog"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/amqpx"
	"github.com/mailroom-go/mailroom/internal/wait"
)

// brokerRedialDelay is how long the watch waits after losing its connection
// before dialing again: a dropped connection shows as not ready for at least
// this long, so a load balancer or a probe polling /readyz sees the flap.
const brokerRedialDelay = time.Second

// brokerWatch keeps one AMQP connection open, named like the relay's own
// ("mailroom-relay <name>"), and reports whether it is up: the broker part of
// /readyz. Closing the relay's connection by name (rabbitmqctl
// close_connection, a network cut, a broker restart) closes this one too.
type brokerWatch struct {
	nodes *amqpx.Nodes
	name  string
	log   *slog.Logger

	mu    sync.Mutex
	up    bool
	since time.Time
	err   string
}

func newBrokerWatch(nodes *amqpx.Nodes, name string, log *slog.Logger) *brokerWatch {
	return &brokerWatch{nodes: nodes, name: name, log: log, since: time.Now(), err: "not connected yet"}
}

// state reports whether the connection is up, since when, and the last
// error (secrets redacted).
func (w *brokerWatch) state() (up bool, since time.Time, lastErr string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.up, w.since, w.err
}

func (w *brokerWatch) set(up bool, err string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.up != up {
		w.since = time.Now()
	}
	w.up, w.err = up, err
}

func (w *brokerWatch) run(ctx context.Context) {
	for {
		said := false // an outage is logged once, at its first failed dial
		conn, err := w.nodes.DialRetry(ctx, w.name, 5*time.Second, func(err error, d time.Duration) {
			w.set(false, err.Error()) // amqpx errors carry the redacted URL only
			if !said {
				w.log.Warn("cannot connect to the broker; not ready until it answers (check AMQP_URL)", "error", err.Error(), "retry_in", d.String())
				said = true
			}
		})
		if err != nil {
			return // ctx ended
		}
		if said {
			w.log.Info("connected to the broker")
		}
		w.set(true, "")
		closed := conn.NotifyClose(make(chan *amqp.Error, 1))
		select {
		case <-ctx.Done():
			conn.Close()
			return
		case e := <-closed:
			msg := "connection closed"
			if e != nil {
				msg = e.Error()
			}
			w.set(false, msg)
			w.log.Warn("broker connection lost; not ready until it is back", "error", msg)
		}
		if !wait.Sleep(ctx, brokerRedialDelay) {
			return
		}
	}
}
