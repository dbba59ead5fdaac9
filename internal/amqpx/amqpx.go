// Package amqpx holds the AMQP plumbing the relay and the inbox share:
// dialing with a connection name and retrying with backoff until the
// context ends, the connection's supervisor (Watch: one "broken" signal
// from connection and channel closes and consumer cancels, the blocked
// flag, a bounded close), the URL check, and the relay's batched socket.
package amqpx

import (
	"context"
	"fmt"
	"net/url"
	"time"

	"github.com/cenkalti/backoff/v4"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/redact"
)

// Dial connects once. name becomes the connection_name client property,
// which `rabbitmqctl list_connections name client_properties` shows, so an
// operator (or a fault test) can tell and close exactly this connection.
func Dial(amqpURL, name string) (*amqp.Connection, error) {
	return dialConfig(amqpURL, config(name))
}

func config(name string) amqp.Config {
	cfg := amqp.Config{
		Properties: amqp.NewConnectionProperties(),
		Heartbeat:  10 * time.Second,
		Locale:     "en_US",
	}
	cfg.Properties.SetClientConnectionName(name)
	return cfg
}

func dialConfig(amqpURL string, cfg amqp.Config) (*amqp.Connection, error) {
	conn, err := amqp.DialConfig(amqpURL, cfg)
	if err != nil {
		// amqp091's parse errors quote the URL, password included.
		return nil, fmt.Errorf("connect to RabbitMQ at %s: %w", redact.String(amqpURL), redact.Error(err, amqpURL))
	}
	return conn, nil
}

func retry(ctx context.Context, maxWait time.Duration, onError func(error, time.Duration), dial func() (*amqp.Connection, error)) (*amqp.Connection, error) {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = 100 * time.Millisecond
	b.MaxInterval = maxWait
	b.MaxElapsedTime = 0 // until ctx ends
	return backoff.RetryNotifyWithData(dial, backoff.WithContext(b, ctx), onError)
}

// IsURL reports whether s parses as an amqp:// or amqps:// URL: what the
// relay, the inbox and the sidecar check their configured URL against.
func IsURL(s string) bool {
	u, err := url.Parse(s)
	return err == nil && (u.Scheme == "amqp" || u.Scheme == "amqps")
}

// CloseTimeout bounds the close of a connection (see Close).
const CloseTimeout = 5 * time.Second

// Close closes conn, waiting at most CloseTimeout for the broker's reply.
// The broker stops reading from a connection it blocked (a resource alarm
// after the connection published), so an unbounded close waits for the
// alarm to clear; when the deadline passes, the socket is closed anyway.
func Close(conn *amqp.Connection) {
	_ = conn.CloseDeadline(time.Now().Add(CloseTimeout))
}
