package main

import (
	"context"
	"database/sql"
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/atcommit"
	"github.com/mailroom-go/mailroom/dedupe"
	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/redact"
	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

//go:embed schema.sql
var schemaSQL string

// Each service has its own mailroom tables, as it would in its own database.
var (
	ordersTables   = mailroom.Tables{Outbox: "orders_outbox", Inbox: "orders_inbox"}
	paymentsTables = mailroom.Tables{Outbox: "payments_outbox", Inbox: "payments_inbox"}
)

// Config configures the whole example. DatabaseURL and AMQPURL are
// required; the names default to what a real deployment would use.
type Config struct {
	DatabaseURL string // lib/pq URL; its search_path picks the schema
	AMQPURL     string // e.g. amqp://guest:guest@127.0.0.1:5672/, or a cluster's nodes separated by commas

	OrdersExchange   string // order.placed is published here; default "orders"
	PaymentsExchange string // payment.captured is published here; default "payments"
	PaymentsQueue    string // the payments service consumes order.placed from it; default "payments.order-placed"
	OrdersQueue      string // the order service consumes payment.captured from it; default "orders.payment-captured"

	// ExternalRelay leaves the outboxes to mailroom-relay sidecars instead
	// of relays in this process.
	ExternalRelay bool
	// Name prefixes the AMQP connection names. Default "orderservice".
	Name string

	Logger *slog.Logger // nil discards
}

func (c *Config) setDefaults() error {
	if c.DatabaseURL == "" {
		return errors.New("Config.DatabaseURL: required")
	}
	if c.AMQPURL == "" {
		return errors.New("Config.AMQPURL: required")
	}
	def := func(v *string, d string) {
		if *v == "" {
			*v = d
		}
	}
	def(&c.OrdersExchange, "orders")
	def(&c.PaymentsExchange, "payments")
	def(&c.PaymentsQueue, "payments.order-placed")
	def(&c.OrdersQueue, "orders.payment-captured")
	def(&c.Name, "orderservice")
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// App is both services wired in one process: the order service (HTTP API,
// its outbox and relay, its payment.captured consumer) and the payments
// service (its order.placed consumer, its outbox and relay).
type App struct {
	cfg      Config
	db       *sqlx.DB
	Orders   *OrderService
	Payments *PaymentService
	API      *API

	relays    []*relay.Relay
	consumers []*inbox.Consumer
}

// NewApp validates cfg and builds everything; nothing connects yet.
func NewApp(cfg Config) (*App, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	// Opened through atcommit.OpenDB, and given to the outboxes as
	// Config.DB: Add then costs no round trip of its own, its insert
	// travels with the COMMIT.
	sqlDB, err := atcommit.OpenDB(cfg.DatabaseURL)
	if err != nil {
		return nil, fmt.Errorf("DATABASE_URL: %w", redact.Error(err, cfg.DatabaseURL))
	}
	db := sqlx.NewDb(sqlDB, "postgres")
	a := &App{cfg: cfg, db: db}
	if err := a.build(); err != nil {
		db.Close()
		return nil, err
	}
	return a, nil
}

func (a *App) build() error {
	cfg := a.cfg
	ordersOutbox, err := outbox.New(outbox.Config{Tables: ordersTables, DB: a.db.DB})
	if err != nil {
		return err
	}
	paymentsOutbox, err := outbox.New(outbox.Config{Tables: paymentsTables, DB: a.db.DB})
	if err != nil {
		return err
	}
	keys, err := dedupe.New(dedupe.Config{Tables: ordersTables})
	if err != nil {
		return err
	}
	a.Orders = &OrderService{db: a.db, outbox: ordersOutbox, keys: keys, exchange: cfg.OrdersExchange}
	a.Payments = &PaymentService{outbox: paymentsOutbox, exchange: cfg.PaymentsExchange}
	a.API = &API{orders: a.Orders, log: cfg.Logger}

	if !cfg.ExternalRelay {
		for _, t := range []mailroom.Tables{ordersTables, paymentsTables} {
			r, err := relay.New(a.db.DB, relay.Config{
				URL: cfg.AMQPURL, DatabaseURL: cfg.DatabaseURL, Tables: t,
				Name: cfg.Name + " " + t.Outbox, Logger: cfg.Logger,
			})
			if err != nil {
				return err
			}
			a.relays = append(a.relays, r)
		}
	}
	for _, c := range []inbox.Config{
		{Queue: cfg.PaymentsQueue, Consumer: "payments", Tables: paymentsTables, Handler: a.Payments.HandleOrderPlaced},
		{Queue: cfg.OrdersQueue, Consumer: "orders", Tables: ordersTables, Handler: a.Orders.HandlePaymentCaptured},
	} {
		c.URL, c.Logger, c.Concurrency = cfg.AMQPURL, cfg.Logger, 8
		c.ConnectionName = cfg.Name + " inbox " + c.Consumer
		consumer, err := inbox.New(a.db, c)
		if err != nil {
			return err
		}
		a.consumers = append(a.consumers, consumer)
	}
	return nil
}

// DB is the database handle the services use.
func (a *App) DB() *sqlx.DB { return a.db }

// Close closes the database handle.
func (a *App) Close() error { return a.db.Close() }

// Setup creates or upgrades the tables and declares the queues and
// exchanges. It is idempotent. A real service runs the same steps at deploy
// time (mailroom-relay migrate plus its own migrations).
func (a *App) Setup(ctx context.Context) error {
	var schema sql.NullString
	if err := a.db.QueryRowContext(ctx, `SELECT current_schema()`).Scan(&schema); err != nil {
		return fmt.Errorf("setup: %w", err)
	}
	if !schema.Valid {
		var path string
		_ = a.db.QueryRowContext(ctx, `SHOW search_path`).Scan(&path)
		return fmt.Errorf("setup: no schema of the search_path (%s) exists: create it (CREATE SCHEMA …) or fix search_path in DATABASE_URL", path)
	}
	for _, t := range []mailroom.Tables{ordersTables, paymentsTables} {
		if err := mailroom.Migrate(ctx, a.db.DB, t); err != nil {
			return err
		}
	}
	tx, err := a.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("create tables: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // a no-op after Commit
	// Serialise concurrent setups: CREATE TABLE IF NOT EXISTS races itself.
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(hashtext('mailroom examples/orderservice schema'))`); err != nil {
		return fmt.Errorf("create tables: %w", err)
	}
	if _, err := tx.ExecContext(ctx, schemaSQL); err != nil {
		return fmt.Errorf("create tables: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("create tables: %w", err)
	}
	return a.declareTopology()
}

// declareTopology: each consumer's queue (with its retry and dead-letter
// queues) bound to the exchange its events arrive on.
func (a *App) declareTopology() error {
	conn, err := dialAMQP(a.cfg.AMQPURL, a.cfg.Name+" setup")
	if err != nil {
		return err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("declare topology: %w", err)
	}
	for _, t := range []inbox.Topology{
		{Queue: a.cfg.PaymentsQueue, Exchange: a.cfg.OrdersExchange, BindingKeys: []string{EventOrderPlaced}},
		{Queue: a.cfg.OrdersQueue, Exchange: a.cfg.PaymentsExchange, BindingKeys: []string{EventPaymentCaptured}},
	} {
		if err := inbox.DeclareTopology(ch, t); err != nil {
			return err
		}
	}
	return nil
}

// Run serves the API on ln and runs the relays and consumers until ctx
// ends or one of them fails; then it stops them all and returns.
func (a *App) Run(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{Handler: a.API.Handler(), ReadHeaderTimeout: 10 * time.Second}
	tasks := []func(context.Context) error{func(ctx context.Context) error {
		errc := make(chan error, 1)
		go func() { errc <- srv.Serve(ln) }()
		select {
		case err := <-errc:
			return fmt.Errorf("http: %w", err)
		case <-ctx.Done():
		}
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		err := srv.Shutdown(sctx)
		<-errc
		return err
	}}
	tasks = append(tasks, a.purgeKeys)
	for _, r := range a.relays {
		tasks = append(tasks, r.Run)
	}
	for _, c := range a.consumers {
		tasks = append(tasks, c.Run)
	}
	return runAll(ctx, tasks...)
}

// purgeKeys runs OrderService.PurgeKeys at start and then hourly until ctx
// ends.
func (a *App) purgeKeys(ctx context.Context) error {
	t := time.NewTicker(time.Hour)
	defer t.Stop()
	for {
		if _, err := a.Orders.PurgeKeys(ctx); err != nil && ctx.Err() == nil {
			a.cfg.Logger.Warn("purge of old Idempotency-Keys failed; retrying in an hour", "error", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// runAll runs the tasks until ctx ends or any one returns; then it cancels
// the others, waits for all, and returns the first error.
func runAll(ctx context.Context, tasks ...func(context.Context) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, len(tasks))
	for _, task := range tasks {
		go func() { errc <- task(ctx) }()
	}
	var first error
	for range tasks {
		err := <-errc
		cancel()
		if first == nil && err != nil {
			first = err
		}
	}
	return first
}

// dialAMQP connects to the first node of urls (one URL, or the nodes of a
// cluster separated by commas, as AMQP_URL has them) that answers, under a
// connection name, which the management UI and `rabbitmqctl
// list_connections client_properties` show.
func dialAMQP(urls, name string) (*amqp.Connection, error) {
	cfg := amqp.Config{
		Properties: amqp.NewConnectionProperties(),
		Heartbeat:  10 * time.Second,
		Dial:       amqp.DefaultDial(10 * time.Second),
	}
	cfg.Properties.SetClientConnectionName(name)
	var errs []error
	for _, url := range strings.Split(urls, ",") { // the nodes of a cluster: the first that answers
		url = strings.TrimSpace(url)
		conn, err := amqp.DialConfig(url, cfg)
		if err == nil {
			return conn, nil
		}
		errs = append(errs, fmt.Errorf("connect to RabbitMQ at %s: %w", redact.String(url), redact.Error(err, url)))
	}
	return nil, errors.Join(errs...)
}
