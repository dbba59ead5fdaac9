package main

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/otlptranslator"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/tablenames"
	"github.com/mailroom-go/mailroom/relay"
)

// metrics are the sidecar's own instruments, on a private registry (no
// global state, nothing registered twice in tests).
type metrics struct {
	maintRuns     *prometheus.CounterVec // by result: ok, error, skipped
	maintPurged   *prometheus.CounterVec // by table name
	inbox         prometheus.Counter     // maintPurged of the inbox table
	published     prometheus.Counter     // maintPurged of the published table
	maintLeader   prometheus.Gauge
	maintDuration prometheus.Histogram
}

func newMetrics(reg *prometheus.Registry, db *sql.DB, admin *relay.Admin, tables mailroom.Tables, log *slog.Logger) *metrics {
	r, _ := tablenames.Resolve(tablenames.Names(tables)) // validated by common.check
	m := &metrics{
		maintRuns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mailroom_relay_maintenance_runs_total",
			Help: "Maintenance runs by result: ok, error, or skipped (another instance holds the maintenance lock).",
		}, []string{"result"}),
		maintPurged: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mailroom_relay_maintenance_purged_rows_total",
			Help: "Rows deleted by maintenance, by table: the inbox (entries of the --purge-inbox consumers older than their retention) and the published table (rows older than --retain).",
		}, []string{"table"}),
		maintLeader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "mailroom_relay_maintenance_leader",
			Help: "1 while this instance holds the maintenance lock and runs maintenance, else 0.",
		}),
		maintDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "mailroom_relay_maintenance_duration_seconds",
			Help:    "Duration of maintenance runs on the leader.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}),
	}
	for _, r := range []string{"ok", "error", "skipped"} {
		m.maintRuns.WithLabelValues(r)
	}
	m.inbox, m.published = m.maintPurged.WithLabelValues(r.Inbox.String()), m.maintPurged.WithLabelValues(r.Published.String())
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collectors.NewDBStatsCollector(db, "mailroom_relay"),
		newOutboxCollector(admin, r.Outbox.String(), log),
		m.maintRuns, m.maintPurged, m.maintLeader, m.maintDuration,
	)
	return m
}

func (m *metrics) registerBroker(reg *prometheus.Registry, w *brokerWatch) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "mailroom_relay_broker_up",
		Help: "1 while the sidecar's broker connection is open, else 0.",
	}, func() float64 {
		if up, _, _ := w.state(); up {
			return 1
		}
		return 0
	}))
}

// relayMeterProvider exports the relay's OpenTelemetry instruments
// (relay/doc.go lists them: published, failures by reason, dead-lettered,
// released, confirm/batch/claim duration histograms) through the
// OpenTelemetry Prometheus exporter on reg, under the Prometheus names the
// doc gives. The relay's own backlog gauges are turned off
// (Config.BacklogInterval < 0): outboxCollector exports those, read at
// scrape time, with the same names.
func relayMeterProvider(reg *prometheus.Registry) (*sdkmetric.MeterProvider, error) {
	exp, err := otelprom.New(
		otelprom.WithRegisterer(reg),
		otelprom.WithTranslationStrategy(otlptranslator.UnderscoreEscapingWithSuffixes),
		otelprom.WithoutScopeInfo(),
		otelprom.WithoutTargetInfo(), // the scrape target already says which process this is
	)
	if err != nil {
		return nil, fmt.Errorf("metrics: OpenTelemetry Prometheus exporter: %w", err)
	}
	return sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp)), nil
}

// registerRelayProgress exposes Stats().LastProgress, which the readiness
// check uses and the relay's instruments do not carry.
func registerRelayProgress(reg *prometheus.Registry, r *relay.Relay, table string) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "mailroom_relay_last_progress_timestamp_seconds",
		Help:        "Unix time of the relay loop's last successful claim (0 before the first); /readyz fails when it is older than --stall-timeout.",
		ConstLabels: prometheus.Labels{"table": table},
	}, func() float64 {
		t := r.Stats().LastProgress
		if t.UnixNano() <= 0 {
			return 0
		}
		return float64(t.UnixNano()) / 1e9
	}))
}

// outboxCollector reads the outbox, and what holds its database's vacuum
// horizon back, at scrape time, so the gauges are never staler than the
// scrape. A failed read is counted and its gauges are left out of that
// scrape (alert on absent(mailroom_outbox_pending_rows)).
type outboxCollector struct {
	admin         *relay.Admin
	log           *slog.Logger
	errors        prometheus.Counter
	horizonErrors prometheus.Counter

	pending, scheduled, retrying, inFlight, age, dead *prometheus.Desc
	// From Admin.Horizon: the outbox's tuples, and the database's horizon.
	deadTuples, liveTuples, lastVacuum, horizonAge, horizonXminAge *prometheus.Desc
}

func newOutboxCollector(admin *relay.Admin, outbox string, log *slog.Logger) *outboxCollector {
	labels := prometheus.Labels{"table": outbox}
	d := func(name, help string) *prometheus.Desc { return prometheus.NewDesc(name, help, nil, labels) }
	return &outboxCollector{
		admin: admin, log: log,
		errors: prometheus.NewCounter(prometheus.CounterOpts{
			Name:        "mailroom_outbox_status_errors_total",
			Help:        "Scrapes whose outbox status query failed (the outbox gauges are missing from those scrapes).",
			ConstLabels: labels,
		}),
		pending:   d("mailroom_outbox_pending_rows", "Rows in the outbox not yet published: due, in flight, retrying or scheduled."),
		scheduled: d("mailroom_outbox_scheduled_rows", "Pending rows not attempted yet whose delivery time is in the future."),
		retrying:  d("mailroom_outbox_retrying_rows", "Pending rows that failed at least once."),
		inFlight:  d("mailroom_outbox_in_flight_rows", "Pending rows leased by a relay right now (relays publishing side by side; a relay publishing alone leases none)."),
		age:       d("mailroom_outbox_oldest_pending_age_seconds", "How long the oldest pending row has waited since it was due, or since it was written once it failed (the relay's lag); 0 when none is pending."),
		dead:      d("mailroom_outbox_dead_rows", "Rows in the dead-letter table."),
		horizonErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name:        "mailroom_db_horizon_errors_total",
			Help:        "Scrapes whose read of the outbox's tuple statistics and the vacuum horizon failed (those gauges are missing from those scrapes).",
			ConstLabels: labels,
		}),
		deadTuples: d("mailroom_outbox_dead_tuples", "Dead tuples in the outbox table (pg_stat_all_tables.n_dead_tup, an estimate): rows deleted but not yet vacuumed away; they grow while the vacuum horizon is held back."),
		liveTuples: d("mailroom_outbox_live_tuples", "Live tuples in the outbox table (pg_stat_all_tables.n_live_tup, an estimate)."),
		lastVacuum: d("mailroom_outbox_last_vacuum_timestamp_seconds", "Unix time the outbox table was last vacuumed (autovacuum or VACUUM); 0 if never since the statistics were reset."),
		horizonAge: prometheus.NewDesc("mailroom_db_horizon_age_seconds",
			"How long the oldest transaction holding this database's vacuum horizon back has been open (a session's, or a prepared transaction's); 0 when nothing holds it. Dead rows deleted since cannot be removed.", nil, nil),
		horizonXminAge: prometheus.NewDesc("mailroom_db_horizon_xmin_age_transactions",
			"How many transactions the vacuum horizon is held behind: the greatest age(xmin) of the sessions, prepared transactions and replication slots holding it.", nil, nil),
	}
}

func (c *outboxCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.pending, c.scheduled, c.retrying, c.inFlight, c.age, c.dead,
		c.deadTuples, c.liveTuples, c.lastVacuum, c.horizonAge, c.horizonXminAge} {
		ch <- d
	}
	c.errors.Describe(ch)
	c.horizonErrors.Describe(ch)
}

func (c *outboxCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	g := func(d *prometheus.Desc, v float64) { ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v) }
	st, err := c.admin.Status(ctx)
	if err != nil {
		c.errors.Inc()
		c.log.Warn("metrics: reading the outbox status failed", "error", err)
	} else {
		g(c.pending, float64(st.Pending))
		g(c.scheduled, float64(st.Scheduled))
		g(c.retrying, float64(st.Retrying))
		g(c.inFlight, float64(st.InFlight))
		g(c.age, st.OldestPendingAge.Seconds())
		g(c.dead, float64(st.Dead))
	}
	h, err := c.admin.Horizon(ctx)
	if err != nil {
		c.horizonErrors.Inc()
		c.log.Warn("metrics: reading the vacuum horizon failed", "error", err)
	} else {
		g(c.deadTuples, float64(h.DeadTuples))
		g(c.liveTuples, float64(h.LiveTuples))
		vacuumed := 0.0
		if !h.LastVacuum.IsZero() {
			vacuumed = float64(h.LastVacuum.UnixNano()) / 1e9
		}
		g(c.lastVacuum, vacuumed)
		g(c.horizonAge, h.Age.Seconds())
		g(c.horizonXminAge, float64(h.XminAge))
	}
	c.errors.Collect(ch)
	c.horizonErrors.Collect(ch)
}
