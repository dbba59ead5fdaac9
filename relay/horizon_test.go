package relay_test

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/relay"
)

// holderNamed returns the holder whose application_name is app.
func holderNamed(h relay.HorizonReport, app string) (relay.HorizonHolder, bool) {
	for _, hh := range h.Holders {
		if hh.ApplicationName == app {
			return hh, true
		}
	}
	return relay.HorizonHolder{}, false
}

// Other tests on the same server hold transactions too: the test asserts
// that its own holder is listed and that the report's age covers it, not
// that it is the oldest.
func TestHorizonNamesAHeldSnapshotAndDeadTuplesStay(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := testenv.NewSchema(t)
	admin := adminOf(t, s.DB.DB, mailroom.Tables{})
	app, release := testenv.HoldSnapshot(t, s.URL)

	// Rows written and deleted after the snapshot: dead, and not removable
	// while it is held.
	testenv.DeadRows(t, s.DB, 100, 60)

	var h relay.HorizonReport
	var ours relay.HorizonHolder
	testenv.Eventually(t, 30*time.Second, "the held snapshot listed with an age, and the outbox's 60 dead tuples", func() bool {
		var err error
		if h, err = admin.Horizon(ctx); err != nil {
			t.Fatal(err)
		}
		var ok bool
		ours, ok = holderNamed(h, app)
		return ok && ours.Age > 0 && h.DeadTuples >= 60
	})
	if h.Age < ours.Age || h.XminAge < ours.XminAge || ours.XminAge < 1 || h.HeldBy == "" {
		t.Fatalf("report %+v does not cover the held snapshot %+v", h, ours)
	}
	if ours.Kind != "session" || ours.State != "idle in transaction" || ours.PID == 0 {
		t.Fatalf("held snapshot reported as %+v, want an idle-in-transaction session", ours)
	}
	if want := fmt.Sprintf("pid %d (application_name %q, idle in transaction)", ours.PID, app); ours.String() != want {
		t.Fatalf("holder reads %q, want %q", ours.String(), want)
	}
	if h.LiveTuples != 40 {
		t.Errorf("live tuples %d, want 40 (100 written, 60 deleted)", h.LiveTuples)
	}

	release()
	testenv.Eventually(t, 30*time.Second, "the released snapshot gone from the holders", func() bool {
		var err error
		if h, err = admin.Horizon(ctx); err != nil {
			t.Fatal(err)
		}
		_, held := holderNamed(h, app)
		return !held
	})
}

func TestHorizonJSONKeys(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	h, err := adminOf(t, s.DB.DB, mailroom.Tables{}).Horizon(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"outbox_dead_tuples", "outbox_live_tuples", "horizon_age_seconds", "horizon_xmin_age"} {
		if _, ok := m[k].(float64); !ok {
			t.Errorf("JSON %s = %#v, want a number (%s)", k, m[k], b)
		}
	}
	if m["outbox_dead_tuples"] != 0.0 || m["outbox_live_tuples"] != 0.0 {
		t.Errorf("a new outbox has tuples: %s", b)
	}
	if _, ok := m["horizon_held_by"].(string); !ok {
		t.Errorf("JSON horizon_held_by = %#v, want a string (%s)", m["horizon_held_by"], b)
	}
	if v, ok := m["outbox_last_vacuum"]; !ok || v != nil {
		t.Errorf("JSON outbox_last_vacuum = %#v, want null for a table never vacuumed (%s)", v, b)
	}
}

func TestHorizonHolderString(t *testing.T) {
	for _, c := range []struct {
		h    relay.HorizonHolder
		want string
	}{
		{relay.HorizonHolder{Kind: "session", PID: 7, ApplicationName: "billing", State: "idle in transaction", BackendType: "client backend"}, `pid 7 (application_name "billing", idle in transaction)`},
		{relay.HorizonHolder{Kind: "session", PID: 8, BackendType: "walsender", State: "streaming"}, `pid 8 (walsender, application_name "", streaming)`},
		{relay.HorizonHolder{Kind: "prepared transaction", Name: "tx-1"}, `prepared transaction "tx-1"`},
		{relay.HorizonHolder{Kind: "replication slot", Name: "standby1"}, `replication slot "standby1"`},
	} {
		if got := c.h.String(); got != c.want {
			t.Errorf("%+v reads %q, want %q", c.h, got, c.want)
		}
	}
}
