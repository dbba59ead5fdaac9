package amqpx

import (
	"log/slog"
	"sync"
	"sync/atomic"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Watch supervises one AMQP connection for the relay or the inbox. Broken
// is closed, once, when the session on it is over: the connection closes,
// a channel given to Channel closes, or the broker cancels a consumer on
// one. Blocked says whether the broker blocked the connection (a resource
// alarm: it stops reading what is published). Close closes the connection
// within CloseTimeout and waits for the watchers. Each event is logged
// once, prefixed by what (e.g. "inbox: ").
type Watch struct {
	Conn *amqp.Connection

	log       *slog.Logger
	what      string
	broken    chan struct{}
	breakOnce sync.Once
	closeOnce sync.Once
	blocked   atomic.Bool
	wg        sync.WaitGroup
}

// NewWatch starts watching conn.
func NewWatch(conn *amqp.Connection, log *slog.Logger, what string) *Watch {
	w := &Watch{Conn: conn, log: log, what: what, broken: make(chan struct{})}
	closed := conn.NotifyClose(make(chan *amqp.Error, 1))
	blocked := conn.NotifyBlocked(make(chan amqp.Blocking, 4))
	w.wg.Add(1)
	go func() { // both channels are closed when the connection is
		defer w.wg.Done()
		for closed != nil || blocked != nil {
			select {
			case err, ok := <-closed:
				if !ok {
					closed = nil
					w.Break()
					continue
				}
				w.log.Warn(w.what+"connection closed", "error", err)
				w.Break()
			case b, ok := <-blocked:
				if !ok {
					blocked = nil
					continue
				}
				w.blocked.Store(b.Active)
				if b.Active {
					w.log.Warn(w.what+"broker blocked the connection (resource alarm): what is published waits", "reason", b.Reason)
				} else {
					w.log.Info(w.what + "broker unblocked the connection")
				}
			}
		}
	}()
	return w
}

// Channel ends the session when ch closes or the broker cancels a consumer
// on it (its queue deleted or moved); name says which channel it is.
func (w *Watch) Channel(ch *amqp.Channel, name string) {
	closed := ch.NotifyClose(make(chan *amqp.Error, 1))
	cancels := ch.NotifyCancel(make(chan string, 1))
	w.wg.Add(1)
	go func() { // both channels are closed when ch is
		defer w.wg.Done()
		for closed != nil || cancels != nil {
			select {
			case err, ok := <-closed:
				if !ok {
					closed = nil
					continue
				}
				w.log.Warn(w.what+name+" closed", "error", err)
				w.Break()
			case tag, ok := <-cancels:
				if !ok {
					cancels = nil
					continue
				}
				w.log.Warn(w.what+"broker cancelled the consumer (queue deleted or moved)", "tag", tag)
				w.Break()
			}
		}
	}()
}

// Break ends the session (idempotent).
func (w *Watch) Break() { w.breakOnce.Do(func() { close(w.broken) }) }

// Broken is closed once the session is over.
func (w *Watch) Broken() <-chan struct{} { return w.broken }

// IsBroken reports whether the session is over.
func (w *Watch) IsBroken() bool {
	select {
	case <-w.broken:
		return true
	default:
		return false
	}
}

// Blocked reports whether the broker blocks the connection now.
func (w *Watch) Blocked() bool { return w.blocked.Load() }

// Close ends the session, closes the connection (bounded by CloseTimeout,
// see Close) and waits for the watchers to drain. Safe to call more than
// once, from any goroutine.
func (w *Watch) Close() {
	w.closeOnce.Do(func() {
		w.Break()
		Close(w.Conn)
	})
	w.wg.Wait()
}
