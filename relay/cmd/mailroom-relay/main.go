// Command mailroom-relay is the relay sidecar: it moves outbox rows to
// RabbitMQ next to a service that only writes them.
//
//	mailroom-relay migrate            create or upgrade the mailroom tables
//	mailroom-relay run                run the relay until SIGINT/SIGTERM
//
// Configuration comes from flags and the environment (DATABASE_URL,
// AMQP_URL, …); flags win. A bad setting exits with status 2 and one line
// saying which and how to fix it.
package main

import (
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	_ "github.com/lib/pq"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/relay"
)

const usage = `mailroom-relay moves transactional-outbox rows to RabbitMQ.

Usage:
  mailroom-relay <command> [flags]

Commands:
  migrate   create or upgrade the mailroom tables (safe to run concurrently and repeatedly)
  run       run the relay until SIGINT or SIGTERM

Environment (flags win): DATABASE_URL, AMQP_URL, MAILROOM_OUTBOX_TABLE,
MAILROOM_INBOX_TABLE, MAILROOM_BATCH_SIZE, MAILROOM_POLL_INTERVAL,
MAILROOM_MAX_ATTEMPTS, MAILROOM_LOG_LEVEL.

Run "mailroom-relay <command> -h" for the flags of a command.
`

// errUsage marks configuration errors: exit status 2.
type errUsage struct{ msg string }

func (e errUsage) Error() string { return e.msg }

func usageErr(format string, args ...any) error { return errUsage{fmt.Sprintf(format, args...)} }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	var err error
	switch args[0] {
	case "migrate":
		err = cmdMigrate(args[1:], stdout, stderr)
	case "run":
		err = cmdRun(args[1:], stderr)
	default:
		err = usageErr("unknown command %q; commands: migrate, run (see mailroom-relay -h)", args[0])
	}
	var ue errUsage
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, "mailroom-relay: "+ue.msg)
		return 2
	default:
		fmt.Fprintln(stderr, "mailroom-relay: "+err.Error())
		return 1
	}
}

// common holds the settings every command shares.
type common struct {
	databaseURL string
	tables      mailroom.Tables
	logLevel    string
}

func (c *common) register(fs *flag.FlagSet) {
	fs.StringVar(&c.databaseURL, "database-url", "", "PostgreSQL URL (lib/pq), e.g. postgres://user@host:5432/db?sslmode=disable&search_path=app [$DATABASE_URL]")
	fs.StringVar(&c.tables.Outbox, "outbox-table", os.Getenv("MAILROOM_OUTBOX_TABLE"), "outbox table, \"table\" or \"schema.table\" (default mailroom_outbox) [$MAILROOM_OUTBOX_TABLE]")
	fs.StringVar(&c.tables.Inbox, "inbox-table", os.Getenv("MAILROOM_INBOX_TABLE"), "inbox/dedupe table (default mailroom_inbox) [$MAILROOM_INBOX_TABLE]")
	fs.StringVar(&c.logLevel, "log-level", envOr("MAILROOM_LOG_LEVEL", "info"), "debug, info, warn or error [$MAILROOM_LOG_LEVEL]")
}

func (c *common) check() (*slog.Logger, error) {
	if c.databaseURL == "" { // from the environment; not a flag default, so -h never prints a password
		c.databaseURL = os.Getenv("DATABASE_URL")
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.logLevel)); err != nil {
		return nil, usageErr("--log-level %q: use debug, info, warn or error", c.logLevel)
	}
	if c.databaseURL == "" {
		return nil, usageErr("DATABASE_URL is not set: pass --database-url or set DATABASE_URL, e.g. postgres://root@127.0.0.1:5432/test?sslmode=disable")
	}
	if u, err := url.Parse(c.databaseURL); err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return nil, usageErr("DATABASE_URL is not a postgres:// URL (got %s)", redactURL(c.databaseURL))
	}
	if _, err := c.tables.Resolve(); err != nil {
		return nil, usageErr("%v", err)
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})), nil
}

func (c *common) open(ctx context.Context) (*sql.DB, error) {
	db, err := sql.Open("postgres", c.databaseURL)
	if err != nil {
		return nil, usageErr("DATABASE_URL: %v", err)
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := db.PingContext(pctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("cannot reach PostgreSQL at %s: %v (is it running? start it, or fix DATABASE_URL)", redactURL(c.databaseURL), err)
	}
	return db, nil
}

func cmdMigrate(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("migrate", "create or upgrade the mailroom tables", stderr)
	var c common
	c.register(fs)
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if _, err := c.check(); err != nil {
		return err
	}
	ctx := context.Background()
	db, err := c.open(ctx)
	if err != nil {
		return err
	}
	defer db.Close()
	if err := mailroom.Migrate(ctx, db, c.tables); err != nil {
		return err
	}
	applied, _, err := mailroom.SchemaVersion(ctx, db, c.tables)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "mailroom tables at schema version %d\n", applied)
	return nil
}

func cmdRun(args []string, stderr io.Writer) error {
	fs := newFlagSet("run", "run the relay until SIGINT or SIGTERM", stderr)
	var c common
	c.register(fs)
	cfg := relay.Config{}
	fs.StringVar(&cfg.URL, "amqp-url", "", "RabbitMQ URL, e.g. amqp://guest:guest@127.0.0.1:5672/ [$AMQP_URL]")
	fs.StringVar(&cfg.Name, "name", os.Getenv("MAILROOM_NAME"), "instance name for logs and the AMQP connection name (default host-pid) [$MAILROOM_NAME]")
	fs.IntVar(&cfg.BatchSize, "batch-size", envInt("MAILROOM_BATCH_SIZE"), "rows per claim (default 500) [$MAILROOM_BATCH_SIZE]")
	fs.IntVar(&cfg.MaxAttempts, "max-attempts", envInt("MAILROOM_MAX_ATTEMPTS"), "failed publishes before a row is dead-lettered (default 20) [$MAILROOM_MAX_ATTEMPTS]")
	fs.DurationVar(&cfg.PollInterval, "poll-interval", envDuration("MAILROOM_POLL_INTERVAL"), "poll for due rows this often without a NOTIFY (default 500ms) [$MAILROOM_POLL_INTERVAL]")
	fs.DurationVar(&cfg.Lease, "lease", envDuration("MAILROOM_LEASE"), "how long a claimed row belongs to this relay (default 60s) [$MAILROOM_LEASE]")
	fs.DurationVar(&cfg.ConfirmTimeout, "confirm-timeout", envDuration("MAILROOM_CONFIRM_TIMEOUT"), "longest wait for a publisher confirm (default 15s) [$MAILROOM_CONFIRM_TIMEOUT]")
	fs.DurationVar(&cfg.Retain, "retain", envDuration("MAILROOM_RETAIN"), "keep published rows this long instead of deleting them (default 0) [$MAILROOM_RETAIN]")
	fs.BoolVar(&cfg.DisableListen, "no-listen", os.Getenv("MAILROOM_NO_LISTEN") == "true", "poll only, no LISTEN (PgBouncer in transaction mode) [$MAILROOM_NO_LISTEN]")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if envErr != nil {
		return envErr
	}
	log, err := c.check()
	if err != nil {
		return err
	}
	if cfg.URL == "" {
		cfg.URL = os.Getenv("AMQP_URL")
	}
	if cfg.URL == "" {
		return usageErr("AMQP_URL is not set: pass --amqp-url or set AMQP_URL, e.g. amqp://guest:guest@127.0.0.1:5672/")
	}
	if u, err := url.Parse(cfg.URL); err != nil || (u.Scheme != "amqp" && u.Scheme != "amqps") {
		return usageErr("AMQP_URL is not an amqp:// URL (got %s)", redactURL(cfg.URL))
	}
	cfg.DatabaseURL, cfg.Tables, cfg.Logger = c.databaseURL, c.tables, log
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	db, err := c.open(ctx)
	if err != nil {
		return err
	}
	defer db.Close()
	if applied, latest, err := mailroom.SchemaVersion(ctx, db, c.tables); err != nil || applied < latest {
		return fmt.Errorf("the mailroom tables are missing or old (schema version %d, this build needs %d): run `mailroom-relay migrate` first", applied, latest)
	}
	r, err := relay.New(db, cfg)
	if err != nil {
		return usageErr("%v", err)
	}
	log.Info("relay starting", "outbox", c.tables.Outbox, "amqp", redactURL(cfg.URL), "database", redactURL(c.databaseURL))
	if err := r.Run(ctx); err != nil {
		return err
	}
	st := r.Stats()
	log.Info("relay stopped", "published", st.Published, "failed", st.Failed, "dead_lettered", st.DeadLettered, "released", st.Released)
	return nil
}

func newFlagSet(name, what string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported in one line by run
	fs.Usage = func() {
		fs.SetOutput(stderr)
		fmt.Fprintf(stderr, "mailroom-relay %s: %s\n\nFlags:\n", name, what)
		fs.PrintDefaults()
	}
	return fs
}

// parse parses flags; -h prints the command's help, anything else wrong is
// a one-line usage error.
func parse(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	err := fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		fs.Usage()
		return err
	case err != nil:
		return usageErr("%s: %v (see mailroom-relay %s -h)", fs.Name(), err, fs.Name())
	case fs.NArg() > 0:
		return usageErr("%s: unexpected argument %q (see mailroom-relay %s -h)", fs.Name(), fs.Arg(0), fs.Name())
	}
	return nil
}

// envErr records the first malformed numeric environment value, reported
// after flags are parsed (a flag may override it).
var envErr error

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func envInt(k string) int {
	v := os.Getenv(k)
	if v == "" {
		return 0
	}
	n, err := strconv.Atoi(v)
	if err != nil && envErr == nil {
		envErr = usageErr("%s=%q is not a whole number", k, v)
	}
	return n
}

func envDuration(k string) time.Duration {
	v := os.Getenv(k)
	if v == "" {
		return 0
	}
	d, err := time.ParseDuration(v)
	if err != nil && envErr == nil {
		envErr = usageErr("%s=%q is not a duration (e.g. 500ms, 2s, 1m)", k, v)
	}
	return d
}

func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "(unparsable URL)"
	}
	return u.Redacted()
}
