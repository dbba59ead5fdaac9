// Command mailroom-relay is the relay sidecar: it moves outbox rows to
// RabbitMQ next to a service that only writes them, and is the operator's
// tool for what is waiting and what died.
//
//	mailroom-relay migrate                 create or upgrade the mailroom tables
//	mailroom-relay run                     run the relay, /healthz /readyz /metrics and a status page
//	mailroom-relay status [--json]         pending rows, oldest pending age, dead letters, vacuum horizon
//	mailroom-relay dead list [--json]      dead letters with their last error
//	mailroom-relay dead replay ID…|--all   move dead letters back into the outbox
//	mailroom-relay dead discard ID…        delete dead letters
//	mailroom-relay version                 print the version
//
// Configuration comes from flags and the environment (DATABASE_URL,
// AMQP_URL, …); flags win. A bad setting exits with status 2 and one line
// saying which and how to fix it; a failure at run time exits with status 1.
// No password, token or other secret of a connection string appears in
// logs, errors, help, the status page or metrics (see internal/redact).
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
	"sync"
	"syscall"
	"time"

	"github.com/lib/pq"
	_ "github.com/lib/pq"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/redact"
	"github.com/mailroom-go/mailroom/internal/tablenames"
	"github.com/mailroom-go/mailroom/relay"
)

const usage = `mailroom-relay moves transactional-outbox rows to RabbitMQ.

Usage:
  mailroom-relay <command> [flags]

Commands:
  migrate                create or upgrade the mailroom tables (safe to run concurrently and repeatedly)
  run                    run the relay until SIGINT or SIGTERM; serves /, /healthz, /readyz, /metrics on --http
  status [--json]        pending rows, age of the oldest pending row (the lag), dead letters,
                         the outbox's dead tuples and what holds the vacuum horizon back
  dead list [--json]     dead letters: id, exchange, routing key, key, attempts, last error, when
  dead replay ID...      move dead letters back into the outbox (--all: every one)
  dead discard ID...     delete dead letters
  version                print the version
  healthcheck            exit 0 if a running relay's /readyz answers 200, else 1 (for a container health check)
  help [command]         this help, or a command's

Environment (flags win): DATABASE_URL, AMQP_URL, MAILROOM_OUTBOX_TABLE,
MAILROOM_DEAD_TABLE, MAILROOM_PUBLISHED_TABLE, MAILROOM_INBOX_TABLE,
MAILROOM_LOG_LEVEL, MAILROOM_HORIZON_WARN; for run also MAILROOM_HTTP,
MAILROOM_ADMIN_TOKEN, MAILROOM_NAME, MAILROOM_BATCH_SIZE,
MAILROOM_POLL_INTERVAL, ... (see mailroom-relay run -h).

Exit status: 0 done, 1 failed (e.g. database unreachable, unknown dead-letter
id), 2 bad command line or configuration.

Run "mailroom-relay help <command>" (or "<command> -h") for a command's flags.
`

// errUsage marks configuration errors: exit status 2.
type errUsage struct{ msg string }

func (e errUsage) Error() string { return e.msg }

func usageErr(format string, args ...any) error { return errUsage{fmt.Sprintf(format, args...)} }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	switch {
	case len(args) == 0: // not asked for: an error, on stderr
		fmt.Fprint(stderr, usage)
		return 2
	case args[0] == "-h" || args[0] == "--help" || args[0] == "help" && len(args) == 1:
		fmt.Fprint(stdout, usage) // asked for: on stdout
		return 0
	case args[0] == "help": // help run, help dead replay: the command's -h
		args = append(append([]string{}, args[1:]...), "-h")
	}
	var err error
	switch args[0] {
	case "migrate":
		err = cmdMigrate(args[1:], stdout, stderr)
	case "run":
		err = cmdRun(args[1:], stdout, stderr)
	case "status":
		err = cmdStatus(args[1:], stdout, stderr)
	case "dead":
		err = cmdDead(args[1:], stdout, stderr)
	case "version", "-version", "--version":
		err = cmdVersion(args[1:], stdout, stderr)
	case "healthcheck":
		err = cmdHealthcheck(args[1:], stdout, stderr)
	default:
		err = usageErr("unknown command %q; commands: migrate, run, status, dead, version, healthcheck, help (see mailroom-relay -h)", args[0])
	}
	var ue errUsage
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, "mailroom-relay: "+redact.Text(ue.msg, hidden...))
		return 2
	default:
		fmt.Fprintln(stderr, "mailroom-relay: "+redact.Text(err.Error(), hidden...))
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
	fs.StringVar(&c.tables.Dead, "dead-table", os.Getenv("MAILROOM_DEAD_TABLE"), "dead-letter table (default <outbox-table>_dead) [$MAILROOM_DEAD_TABLE]")
	fs.StringVar(&c.tables.Published, "published-table", os.Getenv("MAILROOM_PUBLISHED_TABLE"), "retained published rows (default <outbox-table>_published) [$MAILROOM_PUBLISHED_TABLE]")
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
	if u, err := url.Parse(c.databaseURL); err != nil {
		// url.Parse's error quotes the URL, password included: not shown.
		return nil, usageErr("DATABASE_URL does not parse as a URL: percent-encode special characters in the user and password (%%40 for @, %%25 for %%, %%2F for /)")
	} else if u.Scheme != "postgres" && u.Scheme != "postgresql" {
		return nil, usageErr("DATABASE_URL is not a postgres:// URL (got %s)", redact.String(c.databaseURL))
	}
	hide(c.databaseURL)
	if _, err := pq.NewConnector(c.databaseURL); err != nil { // a bad sslmode, a malformed option
		return nil, usageErr("DATABASE_URL (or --database-url): %v: fix the setting (lib/pq's URL or key=value options)", redact.Error(err, c.databaseURL))
	}
	if _, err := tablenames.Resolve(tablenames.Names(c.tables)); err != nil {
		return nil, usageErr("%v", err)
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})), nil
}

// connect is what the one-shot commands start with: validate the settings,
// then open and ping the database, within timeout (0 = none). done cancels
// and closes.
func (c *common) connect(timeout time.Duration) (ctx context.Context, db *sql.DB, done func(), err error) {
	if _, err := c.check(); err != nil {
		return nil, nil, nil, err
	}
	// Ctrl-C cancels the running statement (PostgreSQL rolls it back), so
	// a command stopped midway says what it did, as replay --all does.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	cancel := context.CancelFunc(func() {})
	if timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, timeout)
	}
	if db, err = c.open(ctx); err != nil {
		cancel()
		stop()
		return nil, nil, nil, err
	}
	return ctx, db, func() { db.Close(); cancel(); stop() }, nil
}

// connectAdmin is connect for the commands that read or change the outbox
// and its dead letters.
func (c *common) connectAdmin(timeout time.Duration) (context.Context, *relay.Admin, func(), error) {
	ctx, db, done, err := c.connect(timeout)
	if err != nil {
		return nil, nil, nil, err
	}
	a, err := relay.NewAdmin(db, c.tables)
	if err != nil { // validated by check
		done()
		return nil, nil, nil, usageErr("%v", err)
	}
	return ctx, a, done, nil
}

func (c *common) open(ctx context.Context) (*sql.DB, error) {
	db, err := sql.Open("postgres", c.databaseURL)
	if err != nil {
		return nil, usageErr("DATABASE_URL: %v", redact.Error(err, c.databaseURL))
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := db.PingContext(pctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("cannot reach PostgreSQL at %s: %v (is it running? start it, or fix DATABASE_URL)", redact.String(c.databaseURL), redact.Error(err, c.databaseURL))
	}
	return db, nil
}

func cmdMigrate(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("migrate", `Usage: mailroom-relay migrate [flags]

Creates or upgrades every mailroom table (outbox, dead letters, published
rows, inbox) in DATABASE_URL, in one transaction under an advisory lock:
safe to run from several processes at once and again after an upgrade.
Unqualified table names resolve through the URL's search_path.
`, stdout)
	var c common
	c.register(fs)
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	ctx, db, done, err := c.connect(0)
	if err != nil {
		return err
	}
	defer done()
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

// helps holds each flag set's -h printer. The flag package calls Usage on
// every parse error too; that must not print a screen of help above the
// one-line error, so Usage is a no-op and parseArgs prints help for -h only.
var helps sync.Map // *flag.FlagSet -> func()

// newFlagSet makes a command's flag set; help is printed to stdout above
// the flags for -h (asked for, so not an error): a usage line and what the
// command does.
func newFlagSet(name, help string, stdout io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported in one line by run
	fs.Usage = func() {}
	helps.Store(fs, func() {
		fs.SetOutput(stdout)
		fmt.Fprintf(stdout, "%s\nFlags:\n", help)
		fs.PrintDefaults()
	})
	return fs
}

func printHelp(fs *flag.FlagSet) {
	if h, ok := helps.Load(fs); ok {
		h.(func())()
	}
}

// parse parses flags; -h prints the command's help, anything else wrong is
// a one-line usage error. No positional arguments are allowed.
func parse(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	rest, err := parseArgs(fs, args, stderr)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return usageErr("%s: unexpected argument %q (see mailroom-relay %s -h)", fs.Name(), rest[0], fs.Name())
	}
	return nil
}

// parseArgs parses flags anywhere among the arguments and returns the
// positional ones ("--" ends the flags).
func parseArgs(fs *flag.FlagSet, args []string, stderr io.Writer) (rest []string, err error) {
	for {
		err := fs.Parse(args)
		switch {
		case errors.Is(err, flag.ErrHelp):
			printHelp(fs)
			return nil, err
		case err != nil:
			return nil, usageErr("%s: %v (see mailroom-relay %s -h)", fs.Name(), err, fs.Name())
		}
		if fs.NArg() == 0 {
			return rest, nil
		}
		if len(args) > fs.NArg() && args[len(args)-fs.NArg()-1] == "--" {
			return append(rest, fs.Args()...), nil
		}
		rest = append(rest, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// envErrs records malformed numeric environment values, in order. They are
// reported after flags are parsed, except where a flag overrides the
// variable (flags win).
var envErrs []envError

type envError struct {
	key string
	err error
}

// checkEnv returns the first environment error whose variable no flag given
// on the command line overrides (settings says which flag overrides which).
func checkEnv(fs *flag.FlagSet) error {
	for _, e := range envErrs {
		if !overridden(fs, e.key) {
			return e.err
		}
	}
	return nil
}

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
	if err != nil {
		envErrs = append(envErrs, envError{k, usageErr("%s=%q is not a whole number", k, v)})
	}
	return n
}

func envBool(k string) bool {
	v := os.Getenv(k)
	if v == "" {
		return false
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		envErrs = append(envErrs, envError{k, usageErr("%s=%q is not true or false", k, v)})
	}
	return b
}

func envDuration(k string) time.Duration { return envDurationOr(k, 0) }

func envDurationOr(k string, def time.Duration) time.Duration {
	v := os.Getenv(k)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		envErrs = append(envErrs, envError{k, usageErr("%s=%q is not a duration (e.g. 500ms, 2s, 1m)", k, v)})
	}
	return d
}

// hidden are the connection strings in use, once they parse: the last
// error a command prints is cleared of their secrets, whatever quoted them.
var hidden []string

func hide(dsn string) { hidden = append(hidden, dsn) }
