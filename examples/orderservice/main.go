// Command orderservice is mailroom's example: an order service and a
// payments service that talk through RabbitMQ with a transactional outbox
// on the sending side and an inbox on the receiving side.
//
//	orderservice demo --orders N   place N orders, wait until all are paid, print a summary
//	orderservice serve             run the API, relays and workers until SIGINT/SIGTERM
//
// Both use DATABASE_URL and AMQP_URL, or the local defaults. See README.md.
package main

import (
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/lib/pq"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/redact"
)

// Local defaults, overridden by DATABASE_URL and AMQP_URL.
const (
	defaultDatabaseURL = "postgres://root@127.0.0.1:5432/test?sslmode=disable"
	defaultAMQPURL     = "amqp://guest:guest@127.0.0.1:5672/"
)

const usage = `orderservice is mailroom's example order and payments service.

Usage:
  orderservice demo [--orders N]   place N orders over HTTP (some retried), wait until
                                   all are paid, print a summary; exit 1 unless all are
                                   placed, charged and paid exactly once
  orderservice serve [--addr A]    run the API, relays and workers until SIGINT/SIGTERM
  orderservice healthcheck [--addr A]
                                   exit 0 when the API at A answers GET /healthz (a container health check)

Environment: DATABASE_URL (default ` + defaultDatabaseURL + `),
AMQP_URL (default amqp://guest:***@127.0.0.1:5672/).
Run "orderservice <command> -h" for a command's flags.
`

// errUsage marks a bad command line: exit status 2.
type errUsage struct{ error }

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

func run(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch args[0] {
	case "demo":
		err = cmdDemo(ctx, args[1:], getenv, stdout, stderr)
	case "serve":
		err = cmdServe(ctx, args[1:], getenv, stderr)
	case "healthcheck":
		err = cmdHealthcheck(ctx, args[1:], stdout, stderr)
	default:
		err = errUsage{fmt.Errorf("unknown command %q; commands: demo, serve, healthcheck (see orderservice -h)", args[0])}
	}
	var ue errUsage
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, "orderservice: "+err.Error())
		return 2
	case errors.Is(err, errFailed):
		return 1 // already reported
	default:
		fmt.Fprintln(stderr, "orderservice: "+err.Error())
		return 1
	}
}

// errFailed is a failure already reported on the output.
var errFailed = errors.New("failed")

func cmdDemo(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flagSet("demo", "place orders, wait until they are paid, print a summary", stderr)
	orders := fs.Int("orders", 100, "number of orders to place")
	concurrency := fs.Int("concurrency", 16, "concurrent HTTP clients")
	wait := fs.Duration("wait", time.Minute, "how long to wait for every order to be paid")
	verbose := fs.Bool("v", false, "log the relays and consumers at info level")
	traceOn := traceFlag(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	stopTracing, err := startTracing(*traceOn, stderr)
	if err != nil {
		return err
	}
	defer stopTracing()
	switch {
	case *orders < 1:
		return errUsage{fmt.Errorf("demo: --orders %d: must be at least 1", *orders)}
	case *concurrency < 1:
		return errUsage{fmt.Errorf("demo: --concurrency %d: must be at least 1", *concurrency)}
	case *wait <= 0:
		return errUsage{fmt.Errorf("demo: --wait %s: must be positive", *wait)}
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	cfg := configFromEnv(getenv, slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level})))
	if err := checkServices(ctx, cfg, stderr); err != nil {
		return err
	}
	app, err := NewApp(cfg)
	if err != nil {
		return err
	}
	defer app.Close()
	fmt.Fprintf(stdout, "setting up tables and queues (database %s, broker %s)\n", redact.String(cfg.DatabaseURL), redact.String(cfg.AMQPURL))
	if err := app.Setup(ctx); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}

	// The services run until the demo is done (or one of them fails).
	appCtx, stopApp := context.WithCancel(ctx)
	defer stopApp()
	appDone := make(chan error, 1)
	go func() { appDone <- app.Run(appCtx, ln); stopApp() }()

	run := placeOrders(appCtx, "http://"+ln.Addr().String(), *orders, *concurrency, stdout)
	waitErr := waitPaid(appCtx, app.DB(), run, *wait, stdout)
	stopApp()
	if err := <-appDone; err != nil {
		return err
	}
	if waitErr != nil && ctx.Err() == nil {
		return waitErr
	}
	// Counted after everything stopped, so nothing is still in flight.
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := summarize(sctx, app.DB(), run)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, s)
	if !s.OK(*orders) {
		return errFailed
	}
	return nil
}

// cmdHealthcheck asks a running API's /healthz: for the image's health
// check, which has no shell or curl.
func cmdHealthcheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flagSet("healthcheck", "exit 0 when the API answers GET /healthz", stderr)
	addr := fs.String("addr", "127.0.0.1:8080", "the API's address (serve --addr)")
	if err := parse(fs, args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+*addr+"/healthz", nil)
	if err != nil {
		return errUsage{fmt.Errorf("healthcheck: --addr %q: %w", *addr, err)}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("not healthy: %w (is `orderservice serve` listening on %s?)", err, *addr)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("not healthy: /healthz answered %d", resp.StatusCode)
	}
	fmt.Fprintln(stdout, "healthy")
	return nil
}

func cmdServe(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	fs := flagSet("serve", "run the API, relays and workers until SIGINT or SIGTERM", stderr)
	addr := fs.String("addr", "127.0.0.1:8080", "HTTP listen address of the order API")
	external := fs.Bool("external-relay", false, "do not relay in-process; run `mailroom-relay run` for each outbox instead")
	traceOn := traceFlag(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	stopTracing, err := startTracing(*traceOn, stderr)
	if err != nil {
		return err
	}
	defer stopTracing()
	log := slog.New(slog.NewTextHandler(stderr, nil))
	cfg := configFromEnv(getenv, log)
	cfg.ExternalRelay = *external
	if err := checkServices(ctx, cfg, stderr); err != nil {
		return err
	}
	app, err := NewApp(cfg)
	if err != nil {
		return err
	}
	defer app.Close()
	if err := app.Setup(ctx); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return errUsage{fmt.Errorf("serve: --addr: %w", err)}
	}
	log.Info("order API listening", "addr", "http://"+ln.Addr().String(), "in_process_relay", !cfg.ExternalRelay)
	if err := app.Run(ctx, ln); err != nil {
		return err
	}
	log.Info("stopped")
	return nil
}

func configFromEnv(getenv func(string) string, log *slog.Logger) Config {
	cfg := Config{DatabaseURL: getenv("DATABASE_URL"), AMQPURL: getenv("AMQP_URL"), Logger: log}
	if cfg.DatabaseURL == "" {
		cfg.DatabaseURL = defaultDatabaseURL
	}
	if cfg.AMQPURL == "" {
		cfg.AMQPURL = defaultAMQPURL
	}
	return cfg
}

// checkServices connects to PostgreSQL and RabbitMQ once each. When one is
// not there it says which, where, and how to start it; when it answers but
// refuses the connection, what to check.
func checkServices(ctx context.Context, cfg Config, stderr io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	db, err := sql.Open("postgres", cfg.DatabaseURL)
	if err == nil {
		err = db.PingContext(ctx)
		db.Close()
	}
	// lib/pq's parse errors quote the URL, password included.
	err = redact.Error(err, cfg.DatabaseURL)
	var pgRefused *pq.Error // the server answered: wrong user, password or database
	switch {
	case errors.As(err, &pgRefused):
		fmt.Fprintf(stderr, "orderservice: PostgreSQL at %s refused the connection: %v\n"+
			"  check DATABASE_URL (user, password, database name)\n", redact.String(cfg.DatabaseURL), err)
		return errFailed
	case err != nil:
		fmt.Fprintf(stderr, "orderservice: cannot reach PostgreSQL at %s: %v\n"+
			"  start it:  pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n"+
			"  or set DATABASE_URL to a running server\n", redact.String(cfg.DatabaseURL), err)
		return errFailed
	}
	conn, err := dialAMQP(cfg.AMQPURL, "orderservice check")
	var amqpRefused *amqp.Error // the broker answered: wrong user, password or vhost
	switch {
	case errors.As(err, &amqpRefused):
		fmt.Fprintf(stderr, "orderservice: RabbitMQ at %s refused the connection: %v\n"+
			"  check AMQP_URL (user, password, vhost)\n", redact.String(cfg.AMQPURL), amqpRefused)
		return errFailed
	case err != nil:
		fmt.Fprintf(stderr, "orderservice: cannot reach RabbitMQ at %s: %v\n"+
			"  start it:  rabbitmq-server -detached  (or rabbitmqctl start_app if the node runs)\n"+
			"  or set AMQP_URL to a running broker\n", redact.String(cfg.AMQPURL), errors.Unwrap(err))
		return errFailed
	}
	conn.Close()
	return nil
}

func flagSet(name, what string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported in one line by run
	fs.Usage = func() {
		fs.SetOutput(stderr)
		fmt.Fprintf(stderr, "orderservice %s: %s\n\nFlags:\n", name, what)
		fs.PrintDefaults()
	}
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	err := fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return err // Parse printed the usage
	case err != nil:
		return errUsage{fmt.Errorf("%s: %v (see orderservice %s -h)", fs.Name(), err, fs.Name())}
	case fs.NArg() > 0:
		return errUsage{fmt.Errorf("%s: unexpected argument %q (see orderservice %s -h)", fs.Name(), fs.Arg(0), fs.Name())}
	}
	return nil
}
