package mailroom_test

import (
	"context"
	"strings"
	"testing"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// Version 6 indexes the inbox by (scope, recorded_at) for the per-scope
// purge and drops the index on recorded_at alone, also for an inbox in a
// schema that is not on the search_path, and on an upgrade from version 5.
func TestMigrateInboxScopeIndex(t *testing.T) {
	t.Parallel()
	s := testenv.NewEmptySchema(t)
	other := testenv.NewEmptySchema(t) // not on s's search_path
	ctx := context.Background()
	sets := []mailroom.Tables{
		{},
		{Outbox: "events", Inbox: other.Name + ".seen"},
		{Outbox: "events2", Inbox: "seen2"},
	}
	for _, tb := range sets {
		if err := mailroom.MigrateTo(ctx, s.DB.DB, tb, 5); err != nil {
			t.Fatal(err)
		}
	}
	s.DB.MustExec(`INSERT INTO mailroom_inbox (scope, id) VALUES ('a', '1')`)
	for _, tb := range sets {
		if err := mailroom.Migrate(ctx, s.DB.DB, tb); err != nil {
			t.Fatal(err)
		}
	}
	var idx []string
	if err := s.DB.Select(&idx, `SELECT schemaname || '.' || indexname || ' ' || indexdef FROM pg_indexes
WHERE schemaname IN ($1, $2) AND tablename IN ('mailroom_inbox', 'seen', 'seen2') ORDER BY 1`, s.Name, other.Name); err != nil {
		t.Fatal(err)
	}
	got := strings.Join(idx, "\n")
	for _, want := range []string{
		s.Name + ".mailroom_inbox_scope_recorded_idx ", other.Name + ".seen_scope_recorded_idx ", s.Name + ".seen2_scope_recorded_idx ",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("index %s missing; have:\n%s", want, got)
		}
	}
	if strings.Contains(got, "(recorded_at)") || len(idx) != 6 {
		t.Errorf("want a primary key and the (scope, recorded_at) index per inbox, no index on recorded_at alone; have:\n%s", got)
	}
	for _, i := range idx {
		if strings.Contains(i, "scope_recorded_idx") && !strings.HasSuffix(i, "(scope, recorded_at)") {
			t.Errorf("index %s: want it on (scope, recorded_at)", i)
		}
	}
}
