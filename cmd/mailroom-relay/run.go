package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/dedupe"
	"github.com/mailroom-go/mailroom/internal/amqpx"
	"github.com/mailroom-go/mailroom/internal/redact"
	"github.com/mailroom-go/mailroom/internal/tablenames"
	"github.com/mailroom-go/mailroom/relay"
)

const runHelp = `Usage: mailroom-relay run [flags]

Runs the relay until SIGINT or SIGTERM: claims due outbox rows, publishes
them (persistent, mandatory), waits for the broker's confirm, then deletes
them (or, with --retain, moves them to the published table). On SIGTERM it
stops claiming, waits for outstanding confirms (at most --confirm-timeout),
hands unpublished rows back to the outbox, stops its HTTP server and exits 0.

On --http it serves:
  /          status page: pending, lag, throughput and lag over the last
             minutes, dead letters (replay/discard need --admin-token)
  /healthz   200 while the process runs
  /readyz    200 when PostgreSQL answers, the broker connection is up and the
             relay loop made progress within --stall-timeout; otherwise 503
             (the JSON body says which check failed)
  /metrics   Prometheus metrics

Maintenance runs on one instance at a time among those with the same purges
(a PostgreSQL advisory lock held by the leader's session): every
--maintenance-interval it deletes, --purge-batch rows per statement and for at
most --maintenance-timeout per run:
  - the inbox entries of each consumer named by --purge-inbox older than that
    consumer's retention; no other consumer's entries. By default the inbox
    is left alone: each inbox consumer purges its own entries by its own
    Retention (inbox.Config). Name a consumer here when it does not purge
    itself (PurgeInterval < 0), for another scope of the table (an HTTP
    idempotency key store), or for a consumer that was retired.
  - with --retain, published rows older than --retain.
With neither, maintenance has nothing to do and does not run.

Every --sample-interval it looks at what holds the database's vacuum
horizon back (docs/operations.md, "Vacuum horizon and dead tuples"). When a
transaction has held it for --horizon-warn, it logs a warning naming the
holder (pid, application_name, state; never its query), again every 5
minutes while it lasts, and an info line when it clears: meanwhile the rows
it deletes cannot be cleaned up and claims slow down.
`

// runOpts are the sidecar's settings beyond relay.Config.
type runOpts struct {
	httpAddr    string
	adminToken  string
	stall       time.Duration
	sampleEvery time.Duration
	horizonWarn time.Duration // 0 = off
	maint       maintConfig

	removedDedupeRetention string // refused unless empty or a zero duration
}

// runIdleConns is how many idle database connections run keeps.
const runIdleConns = 4

func cmdRun(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("run", runHelp, stdout)
	var c common
	c.register(fs)
	cfg := relay.Config{}
	fs.Var(urlsFlag{&cfg.URL}, "amqp-url", "RabbitMQ URL, e.g. amqp://guest:guest@127.0.0.1:5672/; repeat it for each node of a cluster (the variable takes them comma-separated): the relay connects to one and moves to another when it goes away [$AMQP_URL]")
	fs.StringVar(&cfg.Name, "name", os.Getenv("MAILROOM_NAME"), "instance name for logs, the AMQP connection name (\"mailroom-relay <name>\") and the PostgreSQL application_name (default host-pid) [$MAILROOM_NAME]")
	fs.IntVar(&cfg.BatchSize, "batch-size", envInt("MAILROOM_BATCH_SIZE"), "rows per claim (default 500) [$MAILROOM_BATCH_SIZE]")
	fs.IntVar(&cfg.ConfirmWindow, "confirm-window", envInt("MAILROOM_CONFIRM_WINDOW"), "messages published but not yet confirmed, at most (at least --batch-size; default 1024 shared among the relays publishing on the table, e.g. 512 each for two) [$MAILROOM_CONFIRM_WINDOW]")
	fs.IntVar(&cfg.ActiveRelays, "active-relays", envInt("MAILROOM_ACTIVE_RELAYS"), "how many relays of the table publish at once; the others stand by and take over within a second (default 1) [$MAILROOM_ACTIVE_RELAYS]")
	fs.IntVar(&cfg.MaxMessageSize, "max-message-size", envInt("MAILROOM_MAX_MESSAGE_SIZE"), "largest payload published, in bytes; a larger row fails as an attempt and is dead-lettered after --max-attempts; keep it at or below the broker's max_message_size (default 16777216, 16 MiB; at most 536870912) [$MAILROOM_MAX_MESSAGE_SIZE]")
	fs.IntVar(&cfg.MaxAttempts, "max-attempts", envInt("MAILROOM_MAX_ATTEMPTS"), "failed publishes before a row is dead-lettered (default 20) [$MAILROOM_MAX_ATTEMPTS]")
	fs.DurationVar(&cfg.PollInterval, "poll-interval", envDuration("MAILROOM_POLL_INTERVAL"), "poll for due rows this often without a NOTIFY (default 500ms) [$MAILROOM_POLL_INTERVAL]")
	fs.DurationVar(&cfg.Lease, "lease", envDuration("MAILROOM_LEASE"), "how long a claimed row belongs to this relay (default 60s) [$MAILROOM_LEASE]")
	fs.DurationVar(&cfg.ConfirmTimeout, "confirm-timeout", envDuration("MAILROOM_CONFIRM_TIMEOUT"), "longest wait for a publisher confirm (default 15s) [$MAILROOM_CONFIRM_TIMEOUT]")
	fs.DurationVar(&cfg.MinBackoff, "min-backoff", envDuration("MAILROOM_MIN_BACKOFF"), "delay before the first retry of a failed row, doubled each time (default 1s) [$MAILROOM_MIN_BACKOFF]")
	fs.DurationVar(&cfg.MaxBackoff, "max-backoff", envDuration("MAILROOM_MAX_BACKOFF"), "longest delay between retries of a row (default 5m) [$MAILROOM_MAX_BACKOFF]")
	fs.DurationVar(&cfg.Retain, "retain", envDuration("MAILROOM_RETAIN"), "keep published rows this long in the published table instead of deleting them; maintenance purges older ones (default 0: delete at once) [$MAILROOM_RETAIN]")
	var ce relay.CloudEvents
	fs.StringVar(&ce.Source, "cloudevents-source", os.Getenv("MAILROOM_CLOUDEVENTS_SOURCE"), "publish every message as a CloudEvent 1.0 (binary mode) with this source attribute, e.g. /orders; empty: plain messages [$MAILROOM_CLOUDEVENTS_SOURCE]")
	fs.StringVar(&ce.Prefix, "cloudevents-prefix", os.Getenv("MAILROOM_CLOUDEVENTS_PREFIX"), "header prefix of the CloudEvents attributes: cloudEvents_ (default, the AMQP binding's), cloudEvents: or ce- [$MAILROOM_CLOUDEVENTS_PREFIX]")
	fs.BoolVar(&cfg.DisableListen, "no-listen", envBool("MAILROOM_NO_LISTEN"), "poll only, no LISTEN (PgBouncer in transaction mode) [$MAILROOM_NO_LISTEN]")
	var o runOpts
	fs.StringVar(&o.httpAddr, "http", envOr("MAILROOM_HTTP", "127.0.0.1:9108"), "listen address for /, /healthz, /readyz, /metrics; port 0 picks a free port (logged as \"http listening\") [$MAILROOM_HTTP]")
	fs.StringVar(&o.adminToken, "admin-token", "", "enables replay/discard on the status page; POSTs must carry it (form field token or Authorization: Bearer); at least 16 characters [$MAILROOM_ADMIN_TOKEN]")
	fs.DurationVar(&o.stall, "stall-timeout", envDurationOr("MAILROOM_STALL_TIMEOUT", 30*time.Second), "/readyz fails when the relay loop made no progress for this long [$MAILROOM_STALL_TIMEOUT]")
	fs.DurationVar(&o.sampleEvery, "sample-interval", envDurationOr("MAILROOM_SAMPLE_INTERVAL", 5*time.Second), "how often the status page's chart samples throughput and lag (it keeps 10 minutes) [$MAILROOM_SAMPLE_INTERVAL]")
	horizonWarnFlag(fs, &o.horizonWarn)
	fs.DurationVar(&o.maint.interval, "maintenance-interval", envDurationOr("MAILROOM_MAINTENANCE_INTERVAL", time.Minute), "how often maintenance runs; 0 turns it off [$MAILROOM_MAINTENANCE_INTERVAL]")
	fs.DurationVar(&o.maint.timeout, "maintenance-timeout", envDurationOr("MAILROOM_MAINTENANCE_TIMEOUT", 30*time.Second), "longest one maintenance run may take; the rest waits for the next run [$MAILROOM_MAINTENANCE_TIMEOUT]")
	o.maint.inbox = envPurgeList()
	fs.Var(&o.maint.inbox, "purge-inbox", "`consumer=retention`: delete this consumer's inbox (dedupe) entries older than retention, and no other consumer's; repeat for more consumers; the environment variable takes a comma-separated list; retention at least 1h: the consumer's inbox.Config.Retention or longer (default: the inbox is left to its consumers) [$MAILROOM_PURGE_INBOX]")
	fs.StringVar(&o.removedDedupeRetention, "dedupe-retention", os.Getenv("MAILROOM_DEDUPE_RETENTION"), "removed: it purged every consumer's entries with one retention; use --purge-inbox [$MAILROOM_DEDUPE_RETENTION]")
	fs.IntVar(&o.maint.batch, "purge-batch", envIntOr("MAILROOM_PURGE_BATCH", dedupe.DefaultPurgeBatch), "rows per purge statement [$MAILROOM_PURGE_BATCH]")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if err := checkEnv(fs); err != nil {
		return err
	}
	log, err := c.check()
	if err != nil {
		return err
	}
	switch {
	case ce.Source != "":
		cfg.CloudEvents = &ce
	case ce.Prefix != "":
		return usageErr("--cloudevents-prefix (MAILROOM_CLOUDEVENTS_PREFIX) without --cloudevents-source (MAILROOM_CLOUDEVENTS_SOURCE): set the source to publish CloudEvents")
	}
	if cfg.URL == "" {
		cfg.URL = os.Getenv("AMQP_URL")
	}
	if cfg.URL == "" {
		return usageErr("AMQP_URL is not set: pass --amqp-url or set AMQP_URL, e.g. amqp://guest:guest@127.0.0.1:5672/")
	}
	nodes, err := amqpx.ParseNodes(cfg.URL, nil)
	if err != nil {
		return usageErr("AMQP_URL (--amqp-url): %s", strings.TrimPrefix(err.Error(), "URL: "))
	}
	hide(cfg.URL)
	if o.adminToken == "" {
		o.adminToken = os.Getenv("MAILROOM_ADMIN_TOKEN")
	}
	if err := o.check(); err != nil {
		return err
	}
	if cfg.Name == "" {
		h, _ := os.Hostname()
		cfg.Name = fmt.Sprintf("%s-%d", h, os.Getpid())
	}
	c.databaseURL = withAppName(c.databaseURL, "mailroom-relay "+cfg.Name)
	hide(c.databaseURL)
	o.maint.retain = cfg.Retain
	cfg.DatabaseURL, cfg.Tables, cfg.Logger = c.databaseURL, c.tables, log

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	db, err := c.open(ctx)
	if err != nil {
		return err
	}
	defer db.Close()
	// The claim loop, the finisher, the sampler and a scrape each hold a
	// connection at times: with database/sql's default of 2 idle ones, the
	// pool closed and reopened a PostgreSQL session for many of them.
	db.SetMaxIdleConns(runIdleConns)
	reg := prometheus.NewRegistry()
	mp, err := relayMeterProvider(reg)
	if err != nil {
		return err
	}
	defer mp.Shutdown(context.Background()) //nolint:errcheck // nothing is pushed: the exporter is pulled
	cfg.MeterProvider = mp
	tp, prop, stopTracing, err := tracing(ctx)
	if err != nil {
		return err
	}
	defer func() { // flush the batched spans, bounded
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := stopTracing(sctx); err != nil {
			log.Warn("flushing spans at stop failed", "error", err)
		}
	}()
	if tp != nil {
		cfg.TracerProvider, cfg.Propagator = tp, prop
		log.Info("tracing on: publish spans are exported (OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_*)")
	}
	cfg.BacklogInterval = -1 // outboxCollector exports pending and lag, read at scrape time
	// A bad setting is reported before a missing schema.
	r, err := relay.New(db, cfg)
	if err != nil {
		return usageErr("%s", namedForUser(err.Error()))
	}
	applied, latest, err := mailroom.SchemaVersion(ctx, db, c.tables)
	switch {
	case err != nil:
		return fmt.Errorf("cannot read the mailroom schema version: %w", err)
	case applied < latest:
		return fmt.Errorf("the mailroom tables are missing or old (schema version %d, this build needs %d): run `mailroom-relay migrate` first", applied, latest)
	case applied > latest:
		log.Warn("the mailroom tables are newer than this build knows; upgrade this relay", "schema_version", applied, "known", latest)
	}
	store, err := dedupe.New(dedupe.Config{Table: c.tables.Inbox, PurgeBatch: o.maint.batch})
	if err != nil {
		return usageErr("%v", err)
	}
	ln, err := net.Listen("tcp", o.httpAddr)
	if err != nil {
		return fmt.Errorf("cannot listen on --http %s: %v (pick another address with --http or MAILROOM_HTTP)", o.httpAddr, err)
	}

	admin, err := relay.NewAdmin(db, c.tables)
	if err != nil { // validated by check
		return usageErr("%v", err)
	}
	m := newMetrics(reg, db, admin, c.tables, log)
	resolved, _ := tablenames.Resolve(tablenames.Names(c.tables))
	registerRelayProgress(reg, r, resolved.Outbox.String())
	watch := newBrokerWatch(nodes, "mailroom-relay "+cfg.Name, log)
	m.registerBroker(reg, watch)
	samp := newSampler(admin, r, o.sampleEvery, log)
	horizon := &horizonWatch{admin: admin, warnAfter: o.horizonWarn, log: log}
	maint := newMaintainer(o.maint, db, admin, c.tables, store, m, log)
	srv := &server{
		db: db, admin: admin, relay: r, watch: watch, samp: samp, reg: reg,
		stall: o.stall, token: o.adminToken, horizonWarn: o.horizonWarn, name: cfg.Name, log: log, started: time.Now(),
	}
	context.AfterFunc(ctx, func() { srv.stopping.Store(true) }) // /readyz fails at once on SIGTERM
	httpSrv := &http.Server{Handler: srv.routes(), ReadHeaderTimeout: 10 * time.Second}

	var wg sync.WaitGroup
	serveErr := make(chan error, 1)
	wg.Add(5)
	go func() {
		defer wg.Done()
		if err := httpSrv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			serveErr <- err
			stop() // without its endpoints the sidecar is blind: stop cleanly and say why
		}
	}()
	go func() { defer wg.Done(); watch.run(ctx) }()
	go func() { defer wg.Done(); samp.run(ctx) }()
	go func() { defer wg.Done(); maint.run(ctx) }()
	go func() { defer wg.Done(); horizon.run(ctx, o.sampleEvery) }()

	log.Info("http listening", "addr", ln.Addr().String(), "admin", o.adminToken != "")
	log.Info("relay starting", "name", cfg.Name, "outbox", resolved.Outbox.String(), "amqp", nodes.String(), "database", redact.String(c.databaseURL))
	runErr := r.Run(ctx) // returns after ctx ends, with in-flight rows finished or released
	srv.stopping.Store(true)
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := httpSrv.Shutdown(sctx); err != nil {
		log.Warn("http server did not shut down cleanly", "error", err)
	}
	wg.Wait()
	st := r.Stats()
	log.Info("relay stopped", "published", st.Published, "failed", st.Failed, "dead_lettered", st.DeadLettered, "released", st.Released)
	select {
	case err := <-serveErr:
		return fmt.Errorf("http server on %s failed: %w", ln.Addr(), err)
	default:
	}
	return runErr
}

func (o *runOpts) check() error {
	if _, _, err := net.SplitHostPort(o.httpAddr); err != nil {
		return usageErr("--http %q is not host:port (e.g. 127.0.0.1:9108, or :9108 for every interface)", o.httpAddr)
	}
	switch {
	case o.adminToken != "" && len(o.adminToken) < 16:
		return usageErr("--admin-token (MAILROOM_ADMIN_TOKEN) is too short: use at least 16 random characters, e.g. `openssl rand -hex 16`")
	case o.stall < time.Second:
		return usageErr("--stall-timeout %s: must be at least 1s", o.stall)
	case o.sampleEvery < 100*time.Millisecond:
		return usageErr("--sample-interval %s: must be at least 100ms", o.sampleEvery)
	case o.horizonWarn < 0:
		return usageErr("--horizon-warn %s: must be positive, or 0 to turn the warning off", o.horizonWarn)
	case o.maint.interval < 0 || o.maint.interval > 0 && o.maint.interval < 10*time.Millisecond:
		return usageErr("--maintenance-interval %s: must be at least 10ms, or 0 to turn maintenance off", o.maint.interval)
	case o.maint.interval > 0 && o.maint.timeout <= 0:
		return usageErr("--maintenance-timeout %s: must be positive", o.maint.timeout)
	case o.removedDedupeRetention != "" && !zeroDuration(o.removedDedupeRetention):
		return usageErr("--dedupe-retention (MAILROOM_DEDUPE_RETENTION) was removed: it purged every consumer's inbox entries with one retention, cutting short the window of consumers that keep theirs longer. Each consumer purges its own; to have the sidecar purge one, name it with its retention: --purge-inbox payments=%s (MAILROOM_PURGE_INBOX=payments=%[1]s)", o.removedDedupeRetention)
	case o.maint.batch < 1 || o.maint.batch > 100000:
		return usageErr("--purge-batch %d: must be between 1 and 100000", o.maint.batch)
	}
	return nil
}

// horizonRepeat is how often the horizon warning repeats while the
// horizon stays held.
const horizonRepeat = 5 * time.Minute

// horizonWatch logs when something has held the database's vacuum horizon
// back for warnAfter: a warning when it starts, again every horizonRepeat
// while it lasts, and an info line when it clears. Dead tuples pile up in
// the outbox meanwhile and every claim reads past them, long before the
// lag shows anything.
type horizonWatch struct {
	admin     *relay.Admin
	warnAfter time.Duration // 0 = off
	log       *slog.Logger

	since  time.Time // when the horizon went past warnAfter; zero while it is not
	warned time.Time // the last warning
}

func (w *horizonWatch) run(ctx context.Context, every time.Duration) {
	if w.warnAfter == 0 {
		return
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		cctx, cancel := context.WithTimeout(ctx, max(every, time.Second))
		h, err := w.admin.Horizon(cctx)
		cancel()
		switch {
		case err == nil:
			w.observe(h, time.Now())
		case ctx.Err() == nil: // the sampler and /readyz report a database that is down
			w.log.Debug("horizon check failed", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// observe takes one reading of the horizon, at now.
func (w *horizonWatch) observe(h relay.HorizonReport, now time.Time) {
	if !horizonPast(h, w.warnAfter) {
		if !w.since.IsZero() {
			w.log.Info("vacuum horizon no longer held back", "past_horizon_warn_for", now.Sub(w.since).Round(time.Second).String(),
				"horizon_age", h.Age.Round(time.Millisecond).String(), "outbox_dead_tuples", h.DeadTuples)
			w.since = time.Time{}
		}
		return
	}
	if !w.since.IsZero() && now.Sub(w.warned) < horizonRepeat {
		return
	}
	if w.since.IsZero() {
		w.since = now
	}
	w.warned = now
	w.log.Warn("vacuum horizon held back: rows deleted from the outbox cannot be cleaned up and claims slow down",
		"held_by", heldBy(h, w.warnAfter), "horizon_age", h.Age.Round(time.Second).String(), "xmin_age", h.XminAge,
		"outbox_dead_tuples", h.DeadTuples, "horizon_warn", w.warnAfter.String(),
		"fix", "end that transaction: its application commits or rolls back, or SELECT pg_terminate_backend(pid); ROLLBACK PREPARED for a prepared transaction; see docs/operations.md, \""+horizonSection+"\"")
}

// minDedupeRetention is the shortest --purge-inbox retention taken: a guard
// against a unit typo (1s, 1m). The real bound is the consumer's own
// Retention, which inbox.Config checks against its retry span.
const minDedupeRetention = time.Hour

// withAppName sets application_name on a lib/pq URL unless it has one, so
// the sidecar's sessions are recognisable in pg_stat_activity.
func withAppName(dbURL, name string) string {
	u, err := url.Parse(dbURL)
	if err != nil {
		return dbURL
	}
	q := u.Query()
	if q.Get("application_name") != "" {
		return dbURL
	}
	q.Set("application_name", name)
	u.RawQuery = q.Encode()
	return u.String()
}

// zeroDuration reports whether s is a duration of 0 ("0", "0s").
func zeroDuration(s string) bool {
	d, err := time.ParseDuration(s)
	return err == nil && d == 0
}

func envIntOr(k string, def int) int {
	if os.Getenv(k) == "" {
		return def
	}
	return envInt(k)
}

// urlsFlag is --amqp-url: each use adds a node, kept comma-separated as
// AMQP_URL has them.
type urlsFlag struct{ urls *string }

func (f urlsFlag) String() string {
	if f.urls == nil {
		return ""
	}
	return redact.String(*f.urls)
}

func (f urlsFlag) Set(v string) error {
	if *f.urls != "" {
		*f.urls += ","
	}
	*f.urls += v
	return nil
}
