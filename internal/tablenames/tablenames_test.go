package tablenames

import (
	"strings"
	"testing"
)

func TestOne(t *testing.T) {
	for _, c := range []struct{ table, fromTables, want, err string }{
		{"", "", "", ""},
		{"a", "", "a", ""},
		{"", "b", "b", ""},
		{"a", "a", "a", ""},
		{"a", "b", "", `Table "a" and Tables.Outbox "b" differ`},
	} {
		got, err := One(c.table, "Outbox", c.fromTables)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("One(%q, %q): %v, want an error with %q", c.table, c.fromTables, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("One(%q, %q) = %q, %v; want %q", c.table, c.fromTables, got, err, c.want)
		}
	}
}

func TestResolveDerivesFromTheOutbox(t *testing.T) {
	r, err := Resolve(Names{Outbox: "s.events"})
	if err != nil {
		t.Fatal(err)
	}
	if r.Dead.String() != "s.events_dead" || r.Published.String() != "s.events_published" || r.Inbox.String() != DefaultInbox {
		t.Fatalf("derived %s, %s, inbox %s", r.Dead, r.Published, r.Inbox)
	}
	if _, err := Resolve(Names{Inbox: "no such"}); err == nil || !strings.Contains(err.Error(), "Tables.Inbox") {
		t.Fatalf("a bad inbox name: %v, want an error naming Tables.Inbox", err)
	}
}
