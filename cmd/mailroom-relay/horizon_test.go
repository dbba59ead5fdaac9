package main

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/relay"
)

// The warning comes once when the horizon passes --horizon-warn, again
// every horizonRepeat while it stays there, and an info line says when it
// clears.
func TestHorizonWarningOncePerEpisode(t *testing.T) {
	var buf bytes.Buffer
	w := &horizonWatch{warnAfter: time.Minute, log: slog.New(slog.NewJSONHandler(&buf, nil))}
	holder := relay.HorizonHolder{Kind: "session", PID: 42, ApplicationName: "billing", State: "idle in transaction"}
	held := func(age time.Duration) relay.HorizonReport {
		h := holder
		h.Age = age
		return relay.HorizonReport{Age: age, XminAge: 7, HeldBy: h.String(), Holders: []relay.HorizonHolder{h}}
	}
	start := time.Now()
	for _, step := range []struct {
		at   time.Duration
		h    relay.HorizonReport
		want string // the level of the line logged, "" for none
	}{
		{0, held(30 * time.Second), ""},
		{10 * time.Second, held(time.Minute), "WARN"},
		{20 * time.Second, held(time.Minute + 10*time.Second), ""},
		{horizonRepeat, held(6 * time.Minute), ""}, // 4m50s after the warning
		{horizonRepeat + 10*time.Second, held(6 * time.Minute), "WARN"},
		{horizonRepeat + 20*time.Second, relay.HorizonReport{}, "INFO"},
		{horizonRepeat + 30*time.Second, relay.HorizonReport{}, ""},
		{horizonRepeat + 40*time.Second, held(2 * time.Minute), "WARN"}, // a new episode
	} {
		buf.Reset()
		w.observe(step.h, start.Add(step.at))
		var line struct {
			Level, Msg string
			HeldBy     string `json:"held_by"`
		}
		if buf.Len() > 0 {
			if err := json.Unmarshal(buf.Bytes(), &line); err != nil {
				t.Fatalf("at %s: %v: %s", step.at, err, buf.String())
			}
		}
		if line.Level != step.want || strings.Count(buf.String(), "\n") > 1 {
			t.Fatalf("at %s (age %s): logged %q, want one %q line", step.at, step.h.Age, buf.String(), step.want)
		}
		if line.Level == "WARN" && (line.HeldBy != holder.String() || !strings.Contains(buf.String(), horizonSection)) {
			t.Fatalf("at %s: the warning does not name the holder and the docs section: %s", step.at, buf.String())
		}
	}

	buf.Reset()
	off := &horizonWatch{log: slog.New(slog.NewJSONHandler(&buf, nil))}
	off.observe(held(time.Hour), start)
	if buf.Len() != 0 {
		t.Fatalf("--horizon-warn 0 logged %s", buf.String())
	}
}

// Other tests on the same server may hold transactions too: the test looks
// for its own holder among those named, not for it to be the oldest.
func TestSidecarWarnsOfAHeldHorizon(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	app, release := testenv.HoldSnapshot(t, s.URL)

	testenv.DeadRows(t, s.DB, 50, 50) // written and deleted after the snapshot: dead, and kept
	// Past --horizon-warn before the sidecar's first look.
	testenv.Eventually(t, 30*time.Second, "the snapshot held for a second", func() bool {
		var past bool
		err := s.DB.QueryRow(`SELECT coalesce(bool_or(xact_start < now() - interval '1100 milliseconds'), false) FROM pg_stat_activity WHERE application_name = $1`, app).Scan(&past)
		if err != nil {
			t.Fatal(err)
		}
		return past
	})

	sc := startSidecar(t, s.URL, "--horizon-warn", "1s")
	testenv.Eventually(t, 30*time.Second, "a warning naming "+app, func() bool {
		for _, l := range sc.lines() {
			var line struct {
				Level, Msg string
				HeldBy     string `json:"held_by"`
			}
			if json.Unmarshal([]byte(l), &line) == nil && line.Level == "WARN" &&
				strings.HasPrefix(line.Msg, "vacuum horizon held back") && strings.Contains(line.HeldBy, `application_name "`+app+`"`) {
				return true
			}
		}
		return false
	})
	m := sc.metrics()
	table := "table=mailroom_outbox"
	if v, ok := m.get("mailroom_db_horizon_age_seconds"); !ok || v < 1 {
		t.Errorf("mailroom_db_horizon_age_seconds = %v (exported %v), want at least 1", v, ok)
	}
	if v, ok := m.get("mailroom_db_horizon_xmin_age_transactions"); !ok || v < 1 {
		t.Errorf("mailroom_db_horizon_xmin_age_transactions = %v (exported %v), want at least 1", v, ok)
	}
	if v, ok := m.get("mailroom_outbox_dead_tuples", table); !ok || v < 50 {
		t.Errorf("mailroom_outbox_dead_tuples = %v (exported %v), want at least the 50 deleted", v, ok)
	}
	for _, name := range []string{"mailroom_outbox_live_tuples", "mailroom_outbox_last_vacuum_timestamp_seconds"} {
		if _, ok := m.get(name, table); !ok {
			t.Errorf("%s missing from /metrics", name)
		}
	}
	if _, page := sc.get("/"); !strings.Contains(page, `id="horizon" class="flash bad"`) || !strings.Contains(page, app) {
		t.Errorf("the status page does not flag the horizon held by %s:\n%s", app, page)
	}

	env := cleanEnv("DATABASE_URL=" + s.URL)
	if r := runBin(t, env, "status", "--horizon-warn", "1s"); r.code != 0 || !strings.Contains(r.stdout, app) || !strings.Contains(r.stdout, "PAST 1s") {
		t.Errorf("status: exit %d, want the horizon held by %s flagged past 1s:\n%s%s", r.code, app, r.stdout, r.stderr)
	}
	r := runBin(t, env, "status", "--json")
	var st map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatalf("status --json: %v: %q", err, r.stdout)
	}
	for _, k := range []string{"pending", "oldest_pending_age_seconds", "dead", "outbox_dead_tuples", "outbox_live_tuples", "horizon_age_seconds", "horizon_xmin_age"} {
		if _, ok := st[k].(float64); !ok {
			t.Errorf("status --json %s = %#v, want a number: %s", k, st[k], r.stdout)
		}
	}
	if age, _ := st["horizon_age_seconds"].(float64); age < 1 {
		t.Errorf("status --json horizon_age_seconds %v, want at least 1: %s", age, r.stdout)
	}

	release()
	testenv.Eventually(t, 30*time.Second, "the released snapshot gone from the status page", func() bool {
		_, page := sc.get("/")
		return !strings.Contains(page, app)
	})
}
