// Package testenv gives each test its own PostgreSQL schema and its own
// RabbitMQ names on the real local services, and cleans them up after.
//
// Under CI=true a missing service fails the test with the command that starts
// it; elsewhere the test is skipped with that message.
package testenv

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" driver (see Driver)

	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq" // the driver under test
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/redact"
)

// Defaults for the local services of a development machine.
const (
	DefaultDatabaseURL = "postgres://root@127.0.0.1:5432/test?sslmode=disable"
	DefaultAMQPURL     = "amqp://guest:guest@127.0.0.1:5672/"
)

const (
	startPostgres = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
	startRabbit   = "rabbitmq-server -detached (or `rabbitmqctl start_app` if the node runs)"
)

// Driver is the database/sql driver the tests' schemas are opened with:
// "postgres" (lib/pq, the default) or, with MAILROOM_TEST_DRIVER=pgx,
// "pgx" (github.com/jackc/pgx/v5/stdlib). `make test` runs the outbox,
// inbox and dedupe tests with both.
func Driver() string {
	if os.Getenv("MAILROOM_TEST_DRIVER") == "pgx" {
		return "pgx"
	}
	return "postgres"
}

// DatabaseURL is $DATABASE_URL or the local default.
func DatabaseURL() string { return envOr("DATABASE_URL", DefaultDatabaseURL) }

// AMQPURL is $AMQP_URL or the local default.
func AMQPURL() string { return envOr("AMQP_URL", DefaultAMQPURL) }

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// Unavailable fails (CI=true) or skips the test because a service is missing.
func Unavailable(t testing.TB, what string, err error, start string) {
	t.Helper()
	msg := fmt.Sprintf("%s not reachable: %v; start it with: %s", what, err, start)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// Unique returns prefix plus a random suffix, for schema, exchange and queue
// names that never collide between parallel tests.
func Unique(prefix string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return prefix + "_" + hex.EncodeToString(b)
}

// Schema is a test's own PostgreSQL schema with the mailroom tables in it.
type Schema struct {
	Name string
	URL  string   // DATABASE_URL with search_path set to the schema
	DB   *sqlx.DB // connected through URL
}

// NewSchema creates a fresh schema, migrates the mailroom tables into it and
// drops it when the test ends.
func NewSchema(t testing.TB) *Schema {
	t.Helper()
	s := NewEmptySchema(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := mailroom.Migrate(ctx, s.DB.DB, mailroom.Tables{}); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	return s
}

// NewEmptySchema is NewSchema without the migration.
func NewEmptySchema(t testing.TB) *Schema {
	t.Helper()
	name, u, drop, err := createSchema("t")
	var down errUnreachable
	switch {
	case errors.As(err, &down):
		Unavailable(t, "PostgreSQL at "+Redact(DatabaseURL()), down.err, startPostgres)
	case err != nil:
		t.Fatal(err)
	}
	db, err := sqlx.Open(Driver(), u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		db.Close()
		if err := drop(); err != nil {
			t.Error(err)
		}
	})
	return &Schema{Name: name, URL: u, DB: db}
}

// errUnreachable is createSchema's error when PostgreSQL does not answer.
type errUnreachable struct{ err error }

func (e errUnreachable) Error() string { return e.err.Error() }

// createSchema creates a schema named prefix plus a random suffix and
// returns its name, the URL whose search_path is it, and drop, which drops
// it and closes the admin connection.
func createSchema(prefix string) (name, url string, drop func() error, err error) {
	admin, err := sql.Open("postgres", DatabaseURL())
	if err != nil {
		return "", "", nil, fmt.Errorf("open %s: %v", Redact(DatabaseURL()), err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := admin.PingContext(ctx); err != nil {
		admin.Close()
		return "", "", nil, errUnreachable{err}
	}
	name = Unique(prefix)
	if _, err := admin.ExecContext(ctx, `CREATE SCHEMA `+name); err != nil {
		admin.Close()
		return "", "", nil, fmt.Errorf("create schema: %v", err)
	}
	drop = func() error {
		defer admin.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := admin.ExecContext(ctx, `DROP SCHEMA `+name+` CASCADE`); err != nil {
			return fmt.Errorf("drop schema %s: %v", name, err)
		}
		return nil
	}
	if url, err = WithSearchPath(DatabaseURL(), name); err != nil {
		drop() //nolint:errcheck // the URL error says what is wrong
		return "", "", nil, err
	}
	return name, url, drop, nil
}

// WithSearchPath returns a lib/pq URL whose connections use schema first.
func WithSearchPath(dbURL, schema string) (string, error) {
	u, err := url.Parse(dbURL)
	if err != nil {
		return "", fmt.Errorf("DATABASE_URL is not a URL: %v", err)
	}
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	return u.String(), nil
}

// WithAppName returns a lib/pq URL whose sessions carry application_name, so
// a fault test can pg_terminate_backend exactly its own sessions.
func WithAppName(dbURL, name string) string {
	u, err := url.Parse(dbURL)
	if err != nil {
		return dbURL
	}
	q := u.Query()
	q.Set("application_name", name)
	u.RawQuery = q.Encode()
	return u.String()
}

// Redact hides the secrets of a connection string for messages (see
// internal/redact).
func Redact(s string) string { return redact.String(s) }

// Broker is a test's connection to RabbitMQ plus the names it declared.
type Broker struct {
	URL  string
	Conn *amqp.Connection
	t    testing.TB
}

// NewBroker connects to RabbitMQ (the first node of AMQPURL that answers,
// when it lists a cluster's) and closes the connection when the test ends.
func NewBroker(t testing.TB) *Broker {
	t.Helper()
	var err error
	for _, url := range strings.Split(AMQPURL(), ",") {
		var conn *amqp.Connection
		if conn, err = Dial(url, Unique("test")); err == nil {
			t.Cleanup(func() { conn.Close() })
			return &Broker{URL: url, Conn: conn, t: t}
		}
	}
	Unavailable(t, "RabbitMQ at "+Redact(AMQPURL()), err, startRabbit)
	return nil
}

// Dial connects with a connection_name, which `rabbitmqctl list_connections
// client_properties` shows, so fault tests close only their own connections.
func Dial(amqpURL, name string) (*amqp.Connection, error) {
	cfg := amqp.Config{Properties: amqp.NewConnectionProperties(), Heartbeat: 10 * time.Second}
	cfg.Properties.SetClientConnectionName(name)
	return amqp.DialConfig(amqpURL, cfg)
}

// Channel opens a channel closed when the test ends.
func (b *Broker) Channel() *amqp.Channel {
	b.t.Helper()
	ch, err := b.Conn.Channel()
	if err != nil {
		b.t.Fatalf("open channel: %v", err)
	}
	b.t.Cleanup(func() { ch.Close() })
	return ch
}

// Exchange declares a durable topic exchange with a unique name and deletes
// it when the test ends.
func (b *Broker) Exchange() string {
	b.t.Helper()
	name := Unique("ex")
	ch := b.Channel()
	if err := ch.ExchangeDeclare(name, "topic", true, false, false, false, nil); err != nil {
		b.t.Fatalf("declare exchange: %v", err)
	}
	b.t.Cleanup(func() { b.cleanup(func(ch *amqp.Channel) error { return ch.ExchangeDelete(name, false, false) }) })
	return name
}

// Queue declares a durable classic queue with a unique name, bound to
// exchange with routing key pattern (when exchange is not ""), and deletes it
// when the test ends.
func (b *Broker) Queue(exchange, pattern string, args amqp.Table) string {
	b.t.Helper()
	name := Unique("q")
	ch := b.Channel()
	if _, err := ch.QueueDeclare(name, true, false, false, false, args); err != nil {
		b.t.Fatalf("declare queue: %v", err)
	}
	b.t.Cleanup(func() {
		b.cleanup(func(ch *amqp.Channel) error { _, err := ch.QueueDelete(name, false, false, false); return err })
	})
	if exchange != "" {
		if err := ch.QueueBind(name, pattern, exchange, false, nil); err != nil {
			b.t.Fatalf("bind queue: %v", err)
		}
	}
	return name
}

// cleanup runs on a fresh connection: the test may have broken its own.
func (b *Broker) cleanup(f func(*amqp.Channel) error) {
	conn, err := Dial(b.URL, "test-cleanup")
	if err != nil {
		b.t.Errorf("cleanup: connect: %v", err)
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		b.t.Errorf("cleanup: channel: %v", err)
		return
	}
	if err := f(ch); err != nil && !strings.Contains(err.Error(), "NOT_FOUND") {
		b.t.Errorf("cleanup: %v", err)
	}
}

// Eventually polls cond until it returns true or the deadline passes.
// A condition with a deadline, never a sleep, is how tests synchronise.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// CleanupQueues deletes the named queues when the test ends (for queues the
// code under test declared, e.g. through a topology helper).
func (b *Broker) CleanupQueues(names ...string) {
	for _, name := range names {
		b.t.Cleanup(func() {
			b.cleanup(func(ch *amqp.Channel) error { _, err := ch.QueueDelete(name, false, false, false); return err })
		})
	}
}

// CleanupExchanges deletes the named exchanges when the test ends.
func (b *Broker) CleanupExchanges(names ...string) {
	for _, name := range names {
		b.t.Cleanup(func() {
			b.cleanup(func(ch *amqp.Channel) error { return ch.ExchangeDelete(name, false, false) })
		})
	}
}

// CloseConnection closes, from the broker side, every connection whose
// connection_name is exactly name (`rabbitmqctl close_connection`), as a
// network failure or an operator would, and returns how many it closed.
// It never touches another connection: tests of other packages run at the
// same time on the same broker.
func CloseConnection(t testing.TB, name string) int {
	t.Helper()
	out, err := Ctl("-q", "list_connections", "pid", "client_properties")
	if err != nil {
		t.Fatalf("rabbitmqctl list_connections: %v: %s", err, out)
	}
	want := `{"connection_name","` + name + `"}`
	closed := 0
	for _, line := range strings.Split(out, "\n") {
		pid, props, ok := strings.Cut(line, "\t")
		if !ok || !strings.Contains(props, want) {
			continue
		}
		if out, err := Ctl("-q", "close_connection", pid, "closed by test"); err != nil {
			t.Fatalf("rabbitmqctl close_connection %s: %v: %s", pid, err, out)
		}
		closed++
	}
	return closed
}

// ctl runs rabbitmqctl on the tests' broker (see UseBroker).
var ctl = func(args ...string) (string, error) {
	var stderr strings.Builder
	cmd := exec.Command("rabbitmqctl", args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		err = fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return string(out), err
}

// Ctl runs rabbitmqctl with args against the broker the tests use (the
// machine's, or a private node: see UseBroker) and returns its standard
// output; the error carries its standard error.
func Ctl(args ...string) (string, error) { return ctl(args...) }

// UseBroker makes the broker at url, managed by run (rabbitmqctl with its
// arguments), the one AMQPURL and Ctl name for the rest of this process and
// the processes it starts: a TestMain's first step, before any test runs.
func UseBroker(url string, run func(args ...string) (string, error)) {
	os.Setenv("AMQP_URL", url)
	ctl = run
}
