package dedupe_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/dedupe"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

func newStore(t *testing.T, cfg dedupe.Config) *dedupe.Store {
	t.Helper()
	s, err := dedupe.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestConfigErrorsNameTheField(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		cfg  dedupe.Config
		want string
	}{
		{dedupe.Config{Table: `inbox"; drop`}, "Config.Table"},
		{dedupe.Config{Table: "a.b.c"}, "Config.Table"},
		{dedupe.Config{PurgeBatch: -1}, "Config.PurgeBatch"},
		{dedupe.Config{Tables: mailroom.Tables{Inbox: "a.b.c"}}, "Config.Tables.Inbox"},
		{dedupe.Config{Table: "a", Tables: mailroom.Tables{Inbox: "b"}}, `Table "a" and Tables.Inbox "b" differ`},
	} {
		_, err := dedupe.New(tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want an error naming %s", tc.cfg, err, tc.want)
		}
	}
}

func TestClaimFirstThenDuplicate(t *testing.T) {
	t.Parallel()
	db := testenv.NewSchema(t).DB
	st := newStore(t, dedupe.Config{})
	ctx := context.Background()

	tx := db.MustBeginTx(ctx, nil) // *sqlx.Tx
	first, err := st.Claim(ctx, tx, "payments", "m1")
	if err != nil || !first {
		t.Fatalf("first claim = %v, %v; want true", first, err)
	}
	if first, err := st.Claim(ctx, tx, "payments", "m1"); err != nil || first {
		t.Fatalf("same tx again = %v, %v; want false", first, err)
	}
	if first, err := st.Claim(ctx, tx, "shipping", "m1"); err != nil || !first {
		t.Fatalf("other scope = %v, %v; want true", first, err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	sqlTx, err := db.DB.BeginTx(ctx, nil) // *sql.Tx
	if err != nil {
		t.Fatal(err)
	}
	defer sqlTx.Rollback()
	if first, err := st.Claim(ctx, sqlTx, "payments", "m1"); err != nil || first {
		t.Fatalf("after commit = %v, %v; want false", first, err)
	}
	if _, err := st.Claim(ctx, sqlTx, "", "m1"); !errors.Is(err, dedupe.ErrInvalid) {
		t.Fatalf("empty scope: %v, want ErrInvalid", err)
	}
}

func TestRolledBackClaimIsForgotten(t *testing.T) {
	t.Parallel()
	db := testenv.NewSchema(t).DB
	st := newStore(t, dedupe.Config{})
	ctx := context.Background()
	tx := db.MustBeginTx(ctx, nil)
	if first, err := st.Claim(ctx, tx, "s", "m"); err != nil || !first {
		t.Fatal(first, err)
	}
	tx.Rollback()
	if first, err := st.Claim(ctx, db, "s", "m"); err != nil || !first {
		t.Fatalf("after rollback = %v, %v; want true", first, err)
	}
}

// Concurrent transactions claiming one id: exactly one commits a first claim.
func TestConcurrentClaimsOneWinner(t *testing.T) {
	t.Parallel()
	db := testenv.NewSchema(t).DB
	st := newStore(t, dedupe.Config{})
	ctx := context.Background()
	var mu sync.Mutex
	winners := 0
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tx := db.MustBeginTx(ctx, nil)
			first, err := st.Claim(ctx, tx, "s", "same")
			if err != nil {
				t.Error(err)
				tx.Rollback()
				return
			}
			if err := tx.Commit(); err != nil {
				t.Error(err)
				return
			}
			if first {
				mu.Lock()
				winners++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if winners != 1 {
		t.Fatalf("%d winners, want 1", winners)
	}
}

func TestClaimManyAndRelease(t *testing.T) {
	t.Parallel()
	db := testenv.NewSchema(t).DB
	st := newStore(t, dedupe.Config{})
	ctx := context.Background()
	if _, err := st.Claim(ctx, db, "s", "b"); err != nil {
		t.Fatal(err)
	}
	tx := db.MustBeginTx(ctx, nil)
	first, err := st.ClaimMany(ctx, tx, "s", []string{"a", "b", "c", "a"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []bool{true, false, true, false}; fmt.Sprint(first) != fmt.Sprint(want) {
		t.Fatalf("ClaimMany = %v, want %v", first, want)
	}
	if err := st.Release(ctx, tx, "s", "c"); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := db.Get(&n, `SELECT count(*) FROM mailroom_inbox WHERE scope = 's'`); err != nil || n != 2 {
		t.Fatalf("rows = %d (%v), want 2 (a, b)", n, err)
	}
	if got, err := st.ClaimMany(ctx, db, "s", nil); err != nil || len(got) != 0 {
		t.Fatalf("empty ClaimMany = %v, %v", got, err)
	}
}

// Ids are stored and matched exactly whatever they hold, through lib/pq's
// literal form (an *sqlx.Tx) and the parameterised one (a *sql.Tx).
func TestClaimAnyIDBothForms(t *testing.T) {
	t.Parallel()
	db := testenv.NewSchema(t).DB
	st := newStore(t, dedupe.Config{})
	ctx := context.Background()
	nasty := []string{`it's`, `back\slash`, `\'`, `"quoted"`, `{a,b}`, `NULL`, `$1`, `'); DROP TABLE mailroom_inbox; --`, "tab\tnewline\n", "ünïcødé ✓", ` `, `E'x'`}
	for _, form := range []string{"sqlx", "database/sql"} {
		scope := "s'" + form
		begin := func() dedupe.Execer {
			if form == "sqlx" {
				return db.MustBeginTx(ctx, nil)
			}
			tx, err := db.DB.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			return tx
		}
		commit := func(tx dedupe.Execer) {
			if err := tx.(interface{ Commit() error }).Commit(); err != nil {
				t.Fatal(err)
			}
		}
		tx := begin()
		for _, id := range nasty[:6] {
			if first, err := st.Claim(ctx, tx, scope, id); err != nil || !first {
				t.Fatalf("%s: Claim(%q) = %v, %v; want true", form, id, first, err)
			}
		}
		first, err := st.ClaimMany(ctx, tx, scope, nasty)
		if err != nil {
			t.Fatalf("%s: ClaimMany: %v", form, err)
		}
		for i, f := range first {
			if f != (i >= 6) {
				t.Errorf("%s: ClaimMany: %q first = %v", form, nasty[i], f)
			}
		}
		commit(tx)
		var stored []string
		if err := db.Select(&stored, `SELECT id FROM mailroom_inbox WHERE scope = $1 ORDER BY id`, scope); err != nil {
			t.Fatal(err)
		}
		want := slices.Clone(nasty)
		slices.Sort(want)
		slices.Sort(stored)
		if !slices.Equal(stored, want) {
			t.Errorf("%s: stored %q, want %q", form, stored, want)
		}
		tx = begin()
		if first, err := st.Claim(ctx, tx, scope, nasty[8]); err != nil || first {
			t.Errorf("%s: Claim of a recorded id = %v, %v; want false", form, first, err)
		}
		commit(tx)
	}
	if _, err := st.Claim(ctx, db, "s", "nul\x00byte"); !errors.Is(err, dedupe.ErrInvalid) {
		t.Errorf("id with a NUL byte: %v, want ErrInvalid", err)
	}
	if _, err := st.ClaimMany(ctx, db, "s\x00", []string{"a"}); !errors.Is(err, dedupe.ErrInvalid) {
		t.Errorf("scope with a NUL byte: %v, want ErrInvalid", err)
	}
	if _, err := st.Claim(ctx, db, "s", "bad\xffutf8"); !errors.Is(err, dedupe.ErrInvalid) {
		t.Errorf("id that is not UTF-8: %v, want ErrInvalid", err)
	}
	long := strings.Repeat("x", dedupe.MaxKeyLen)
	if _, err := st.ClaimMany(ctx, db, "s", []string{"a", long}); !errors.Is(err, dedupe.ErrInvalid) || strings.Contains(err.Error(), long) {
		t.Errorf("id over MaxKeyLen: %v, want a short ErrInvalid", err)
	}
	if first, err := st.Claim(ctx, db, "s", long[:dedupe.MaxKeyLen-1]); err != nil || !first {
		t.Errorf("id of MaxKeyLen with its scope: %v, %v; want stored", first, err)
	}
}

func TestPurgeRemovesOnlyOldEntries(t *testing.T) {
	t.Parallel()
	db := testenv.NewSchema(t).DB
	st := newStore(t, dedupe.Config{PurgeBatch: 7}) // several batches
	ctx := context.Background()
	// 50 entries 8 days old, 20 entries 6 days old, 10 new ones.
	if _, err := db.Exec(`INSERT INTO mailroom_inbox (scope, id, recorded_at)
		SELECT 's', 'old' || g, now() - interval '8 days' FROM generate_series(1, 50) g
		UNION ALL SELECT 's', 'recent' || g, now() - interval '6 days' FROM generate_series(1, 20) g
		UNION ALL SELECT 't', 'new' || g, now() FROM generate_series(1, 10) g`); err != nil {
		t.Fatal(err)
	}
	n, err := st.Purge(ctx, db, "s", 0) // default 7 days
	if err != nil || n != 50 {
		t.Fatalf("Purge = %d, %v; want 50", n, err)
	}
	var left, old int
	db.Get(&left, `SELECT count(*) FROM mailroom_inbox`)
	db.Get(&old, `SELECT count(*) FROM mailroom_inbox WHERE id LIKE 'old%'`)
	if left != 30 || old != 0 {
		t.Fatalf("left %d (old %d), want 30 (0)", left, old)
	}
	if n, err := st.Purge(ctx, db, "s", 5*24*time.Hour); err != nil || n != 20 {
		t.Fatalf("Purge(5 days) = %d, %v; want 20", n, err)
	}
	if first, _ := st.Claim(ctx, db, "s", "old1"); !first {
		t.Fatal("a purged id should be claimable again")
	}
	if _, err := st.Purge(ctx, db, "s", -time.Second); !errors.Is(err, dedupe.ErrInvalid) {
		t.Fatalf("negative window: %v, want ErrInvalid", err)
	}
}

// Scopes share the table, not their retention: purging one scope by its
// window leaves every other scope's entries, however old.
func TestPurgeOnlyItsScope(t *testing.T) {
	t.Parallel()
	db := testenv.NewSchema(t).DB
	st := newStore(t, dedupe.Config{PurgeBatch: 3})
	ctx := context.Background()
	// Each scope: 10 entries 10 days old, 10 entries 40 days old.
	if _, err := db.Exec(`INSERT INTO mailroom_inbox (scope, id, recorded_at)
		SELECT s, s || '-' || g || '-' || d, now() - d * interval '1 day'
		FROM unnest(ARRAY['week', 'month', 'other']) s, generate_series(1, 10) g, unnest(ARRAY[10, 40]) d`); err != nil {
		t.Fatal(err)
	}
	if n, err := st.Purge(ctx, db, "week", 7*24*time.Hour); err != nil || n != 20 {
		t.Fatalf("Purge(week, 7 days) = %d, %v; want its 20", n, err)
	}
	if n, err := st.Purge(ctx, db, "month", 30*24*time.Hour); err != nil || n != 10 {
		t.Fatalf("Purge(month, 30 days) = %d, %v; want its 10 of 40 days", n, err)
	}
	var left []string
	if err := db.Select(&left, `SELECT scope || ' ' || count(*) FROM mailroom_inbox GROUP BY scope ORDER BY scope`); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(left, ", "); got != "month 10, other 20" {
		t.Fatalf("left %s; want month 10, other 20", got)
	}
	for _, scope := range []string{"", "bad\x00"} {
		if _, err := st.Purge(ctx, db, scope, 0); !errors.Is(err, dedupe.ErrInvalid) {
			t.Errorf("Purge(%q): %v, want ErrInvalid", scope, err)
		}
	}
}

// Purge must not wait on a transaction holding an uncommitted claim, nor
// delete it.
func TestPurgeSkipsLockedRows(t *testing.T) {
	t.Parallel()
	db := testenv.NewSchema(t).DB
	st := newStore(t, dedupe.Config{})
	ctx := context.Background()
	db.MustExec(`INSERT INTO mailroom_inbox (scope, id, recorded_at) VALUES ('s', 'a', now() - interval '8 days'), ('s', 'b', now() - interval '8 days')`)
	tx := db.MustBeginTx(ctx, nil)
	defer tx.Rollback()
	tx.MustExec(`SELECT 1 FROM mailroom_inbox WHERE id = 'a' FOR UPDATE`)
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	n, err := st.Purge(pctx, db, "s", 0)
	if err != nil || n != 1 {
		t.Fatalf("Purge = %d, %v; want 1 (the unlocked row), without waiting", n, err)
	}
}
