package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/dedupe"
	"github.com/mailroom-go/mailroom/internal/locks"
	"github.com/mailroom-go/mailroom/internal/sqlident"
	"github.com/mailroom-go/mailroom/internal/tablenames"
	"github.com/mailroom-go/mailroom/relay"
)

type maintConfig struct {
	interval time.Duration // 0 = off
	timeout  time.Duration // bound of one run
	inbox    purgeList     // consumers whose inbox entries to purge; none = leave the inbox alone
	retain   time.Duration // relay's --retain; 0 = no published rows to purge
	batch    int
}

// idle reports whether there is nothing for maintenance to purge.
func (c maintConfig) idle() bool { return len(c.inbox.items) == 0 && c.retain <= 0 }

// lockClass is the maintenance lock's first key (seeded by
// locks.Maintenance; the second is the outbox table's OID, so each
// installation has its own leader) for this instance's
// purges, a hash of them: instances that run the same purges take turns on
// one lock, and an instance that runs a purge the leader does not (another
// --purge-inbox list or --retain, say during a rolling change of the flags)
// is not kept from it. Two such leaders may purge the same rows at the same
// time, which is correct (they skip each other's rows), only repeated work.
func (c maintConfig) lockClass() int32 {
	h := fnv.New32a()
	fmt.Fprintf(h, "%d retain=%d", locks.Maintenance, c.retain)
	for _, p := range c.inbox.items { // sorted by consumer
		fmt.Fprintf(h, " inbox %q=%d", p.consumer, p.retention)
	}
	return int32(h.Sum32())
}

const (
	maintLockSQL   = `SELECT pg_try_advisory_lock($2::int, ($1::regclass)::oid::int)`
	maintUnlockSQL = `SELECT pg_advisory_unlock($2::int, ($1::regclass)::oid::int)`
)

// maintainer purges the inbox entries of the consumers it is told to (each
// by its own retention) and retained published rows, on one sidecar at a
// time among those running the same purges (lockClass). The
// leader holds a session-level advisory lock on a dedicated connection and
// runs every purge statement on that same connection: if the session dies,
// the lock is gone and so is the leader's ability to purge, so two such
// instances never purge at once. (Concurrent purges are still correct,
// they skip each other's rows; the lock saves the duplicate work.)
type maintainer struct {
	cfg    maintConfig
	db     *sql.DB
	admin  *relay.Admin
	store  *dedupe.Store
	m      *metrics
	log    *slog.Logger
	outbox string // quoted outbox table name, the lock's object

	conn *sql.Conn // non-nil while this instance is the leader

	noInbox bool // the inbox table is missing: said once, purge skipped
}

func newMaintainer(cfg maintConfig, db *sql.DB, admin *relay.Admin, tables mailroom.Tables, store *dedupe.Store, m *metrics, log *slog.Logger) *maintainer {
	r, _ := tablenames.Resolve(tablenames.Names(tables)) // validated by common.check
	return &maintainer{cfg: cfg, db: db, admin: admin, store: store, m: m, log: log.With("component", "maintenance"), outbox: r.Outbox.Quoted()}
}

func (mt *maintainer) run(ctx context.Context) {
	if mt.cfg.interval <= 0 {
		mt.log.Info("maintenance is off (--maintenance-interval 0)")
		return
	}
	if mt.cfg.idle() {
		mt.log.Info("maintenance has nothing to do: no --purge-inbox and no --retain (each inbox consumer purges its own entries)")
		return
	}
	defer mt.resign()
	t := time.NewTicker(mt.cfg.interval)
	defer t.Stop()
	for {
		mt.once(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// once runs maintenance if this instance is (or becomes) the leader.
func (mt *maintainer) once(ctx context.Context) {
	if !mt.lead(ctx) {
		mt.m.maintRuns.WithLabelValues("skipped").Inc()
		return
	}
	start := time.Now()
	rctx, cancel := context.WithTimeout(ctx, mt.cfg.timeout)
	defer cancel()
	var inbox, published int64
	var errs []error
	// bounded reports whether err only means the run hit its time limit.
	bounded := func(err error) bool { return err != nil && rctx.Err() != nil && ctx.Err() == nil }
	if len(mt.cfg.inbox.items) > 0 && mt.inboxExists(rctx) {
		for _, p := range mt.cfg.inbox.items {
			if rctx.Err() != nil {
				break
			}
			n, err := mt.store.Purge(rctx, mt.conn, p.consumer, p.retention)
			inbox += n
			if err != nil && !bounded(err) {
				errs = append(errs, err)
			}
		}
	}
	if mt.cfg.retain > 0 && rctx.Err() == nil {
		n, err := mt.admin.PurgePublishedOn(rctx, mt.conn, mt.cfg.retain, mt.cfg.batch)
		published = n
		if err != nil && !bounded(err) {
			errs = append(errs, err)
		}
	}
	d := time.Since(start)
	mt.m.inbox.Add(float64(inbox))
	mt.m.published.Add(float64(published))
	mt.m.maintDuration.Observe(d.Seconds())
	switch {
	case ctx.Err() != nil:
		return // stopping: not a failure
	case len(errs) > 0:
		mt.m.maintRuns.WithLabelValues("error").Inc()
		mt.log.Warn("maintenance failed; giving up the lock and trying again next run", "error", errors.Join(errs...), "inbox_purged", inbox, "published_purged", published)
		mt.resign() // the session may be gone, and the lock with it
		return
	}
	mt.m.maintRuns.WithLabelValues("ok").Inc()
	lvl := slog.LevelDebug
	if inbox+published > 0 || rctx.Err() != nil {
		lvl = slog.LevelInfo
	}
	mt.log.Log(ctx, lvl, "maintenance done", "inbox_purged", inbox, "published_purged", published,
		"duration", d.String(), "time_limit_reached", rctx.Err() != nil)
}

// lead makes this instance the leader if no other holds the lock.
func (mt *maintainer) lead(ctx context.Context) bool {
	if mt.conn != nil {
		return true // checked by use: a failed purge resigns
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := mt.db.Conn(cctx)
	if err != nil {
		if ctx.Err() == nil {
			mt.log.Warn("maintenance: no database connection", "error", err)
		}
		return false
	}
	var got bool
	if err := conn.QueryRowContext(cctx, maintLockSQL, mt.outbox, mt.cfg.lockClass()).Scan(&got); err != nil {
		if ctx.Err() == nil {
			mt.log.Warn("maintenance: taking the lock failed", "error", err)
		}
		discard(conn)
		return false
	}
	if !got {
		conn.Close() // holds no lock: back to the pool
		return false
	}
	mt.conn = conn
	mt.m.maintLeader.Set(1)
	mt.log.Info("maintenance leader: this instance runs maintenance", "interval", mt.cfg.interval.String())
	return true
}

// resign gives the lock up. A connection whose unlock fails is discarded,
// never returned to the pool still holding the lock.
func (mt *maintainer) resign() {
	if mt.conn == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var released bool
	if err := mt.conn.QueryRowContext(ctx, maintUnlockSQL, mt.outbox, mt.cfg.lockClass()).Scan(&released); err != nil || !released {
		discard(mt.conn)
	} else {
		mt.conn.Close()
	}
	mt.conn = nil
	mt.m.maintLeader.Set(0)
	mt.log.Info("maintenance leader: lock released")
}

// discard closes conn's session instead of returning it to the pool.
func discard(conn *sql.Conn) {
	_ = conn.Raw(func(any) error { return driver.ErrBadConn })
	conn.Close()
}

// inboxExists reports whether the inbox table is there. A service that
// names its inbox tables otherwise (and did not pass --inbox-table) has no
// mailroom_inbox: that is configuration, not a failure, so it is said once
// and the purge skipped, instead of a warning every run.
func (mt *maintainer) inboxExists(ctx context.Context) bool {
	var found bool
	if err := mt.conn.QueryRowContext(ctx, `SELECT to_regclass($1) IS NOT NULL`, sqlident.MustParse(mt.store.Table()).Quoted()).Scan(&found); err != nil {
		return true // let the purge report the real error
	}
	if !found && !mt.noInbox {
		mt.log.Info("inbox table not found; skipping the inbox purge (set --inbox-table to your inbox table, or drop --purge-inbox)", "table", mt.store.Table())
	}
	mt.noInbox = !found
	return found
}

// inboxPurge is one --purge-inbox entry: a consumer (dedupe scope) and how
// long its entries are kept.
type inboxPurge struct {
	consumer  string
	retention time.Duration
}

// purgeList is the repeatable --purge-inbox flag, sorted by consumer. It
// starts from $MAILROOM_PURGE_INBOX (comma-separated); the first flag
// replaces that list (flags win).
type purgeList struct {
	items   []inboxPurge
	fromEnv bool
}

func (l *purgeList) String() string {
	if l == nil {
		return ""
	}
	var s []string
	for _, p := range l.items {
		s = append(s, p.consumer+"="+p.retention.String())
	}
	return strings.Join(s, ",")
}

func (l *purgeList) Set(v string) error {
	if l.fromEnv {
		l.items, l.fromEnv = nil, false
	}
	return l.add(v)
}

// add parses "consumer=retention". The retention is the consumer's own
// (its inbox.Config.Retention or longer): there is no table-wide default.
func (l *purgeList) add(v string) error {
	i := strings.LastIndexByte(v, '=')
	if i < 0 {
		return fmt.Errorf("%q: want consumer=retention, e.g. payments=168h", v)
	}
	consumer, ret := strings.TrimSpace(v[:i]), strings.TrimSpace(v[i+1:])
	d, err := time.ParseDuration(ret)
	switch {
	case consumer == "":
		return fmt.Errorf("%q: no consumer name before the =", v)
	case err != nil:
		return fmt.Errorf("%q: %q is not a duration (e.g. 168h)", v, ret)
	case d < minDedupeRetention:
		return fmt.Errorf("%q: retention must be at least %s (ids forgotten sooner may still be redelivered, and would be applied twice; use the consumer's inbox.Config.Retention or longer)", v, minDedupeRetention)
	}
	for _, p := range l.items {
		if p.consumer == consumer {
			return fmt.Errorf("consumer %q named twice", consumer)
		}
	}
	l.items = append(l.items, inboxPurge{consumer, d})
	slices.SortFunc(l.items, func(a, b inboxPurge) int { return strings.Compare(a.consumer, b.consumer) })
	return nil
}

// envPurgeList reads $MAILROOM_PURGE_INBOX; a bad entry is reported after
// the flags are parsed, unless --purge-inbox overrides it.
func envPurgeList() purgeList {
	const k = "MAILROOM_PURGE_INBOX"
	l := purgeList{fromEnv: true}
	for _, v := range strings.Split(os.Getenv(k), ",") {
		if strings.TrimSpace(v) == "" {
			continue
		}
		if err := l.add(v); err != nil {
			envErrs = append(envErrs, envError{k, usageErr("%s: %v", k, err)})
			break
		}
	}
	return l
}
