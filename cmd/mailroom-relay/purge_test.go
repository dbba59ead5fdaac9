package main

import (
	"strings"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
)

// inboxLeft lists the inbox entries as "scope/id".
func inboxLeft(t *testing.T, s *testenv.Schema) string {
	t.Helper()
	var left []string
	if err := s.DB.Select(&left, `SELECT scope || '/' || id FROM mailroom_inbox ORDER BY 1`); err != nil {
		t.Fatal(err)
	}
	return strings.Join(left, " ")
}

// A sidecar told nothing about the inbox leaves it to the consumers, each
// of which purges its own ids by its own Retention: entries far older than
// any default stay.
func TestDefaultSidecarLeavesInboxAlone(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	testenv.NewBroker(t)
	s.DB.MustExec(`INSERT INTO mailroom_inbox (scope, id, recorded_at) VALUES
		('payments', 'a', now() - interval '8 days'), ('orders', 'b', now() - interval '40 days')`)
	sc := startSidecar(t, s.URL, "--maintenance-interval", "50ms")
	testenv.Eventually(t, time.Minute, "maintenance to have run or said it has nothing to do", func() bool {
		if ok, _ := sc.metrics().get("mailroom_relay_maintenance_runs_total", "result=ok"); ok > 0 {
			return true
		}
		for _, l := range sc.lines() {
			if strings.Contains(l, "maintenance has nothing to do") {
				return true
			}
		}
		return false
	})
	if got := inboxLeft(t, s); got != "orders/b payments/a" {
		t.Fatalf("inbox left: %s; want every entry (a default sidecar purges nothing)", got)
	}
}

// A sidecar told to purge consumers (by flag or by environment) purges only
// their entries, each older than that consumer's retention.
func TestSidecarPurgesNamedConsumers(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		env   []string
		flags []string
	}{
		{"flags", nil, []string{"--purge-inbox", "payments=1h", "--purge-inbox", "refunds=5h"}},
		{"env", []string{"MAILROOM_PURGE_INBOX=payments=1h, refunds=5h"}, nil},
		{"flags win", []string{"MAILROOM_PURGE_INBOX=orders=1h"}, []string{"--purge-inbox", "payments=1h", "--purge-inbox", "refunds=5h"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := testenv.NewSchema(t)
			testenv.NewBroker(t)
			s.DB.MustExec(`INSERT INTO mailroom_inbox (scope, id, recorded_at) VALUES
				('payments', 'old', now() - interval '2 hours'),
				('payments', 'half', now() - interval '30 minutes'),
				('payments', 'new', now()),
				('refunds', 'old', now() - interval '6 hours'),
				('refunds', 'recent', now() - interval '3 hours'),
				('orders', 'old', now() - interval '40 days')`)
			sc := startSidecarEnv(t, tc.env, s.URL, append([]string{"--maintenance-interval", "50ms"}, tc.flags...)...)
			testenv.Eventually(t, time.Minute, "the named consumers' old entries to be purged", func() bool {
				return sc.value("mailroom_relay_maintenance_purged_rows_total", "table=mailroom_inbox") == 2
			})
			if got, want := inboxLeft(t, s), "orders/old payments/half payments/new refunds/recent"; got != want {
				t.Fatalf("inbox left: %s; want %s", got, want)
			}
		})
	}
}
