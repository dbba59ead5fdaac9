package dedupe_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/mailroom-go/mailroom/dedupe"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// The inbox's claim hot path on the real PostgreSQL, each benchmark in its
// own schema: Claim (one id, the transaction-per-message mode) and
// ClaimMany (a batch), for new ids and for ids already recorded
// (redeliveries). Transactions of 1,000 ids are committed with the clock
// stopped, so ns/op is the statement and its round trips as the inbox
// pays them inside its transaction.
//
//	go test -run '^$' -bench Claim -benchmem ./dedupe/
func BenchmarkClaim(b *testing.B) {
	for _, dup := range []bool{false, true} {
		b.Run(kind(dup), func(b *testing.B) {
			db, st := benchStore(b)
			ids := benchIDs(b, db, st, "claim", b.N, dup)
			tx := newTx(b, db, nil)
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				first, err := st.Claim(context.Background(), tx, "bench", ids[i])
				if err != nil || first == dup {
					b.Fatalf("Claim(%s) = %v, %v", ids[i], first, err)
				}
				if (i+1)%1000 == 0 {
					tx = newTx(b, db, tx)
				}
			}
			b.StopTimer()
			commit(b, tx)
		})
	}
}

func BenchmarkClaimMany(b *testing.B) {
	for _, size := range []int{32, 256} {
		for _, dup := range []bool{false, true} {
			b.Run(fmt.Sprintf("%d-%s", size, kind(dup)), func(b *testing.B) {
				db, st := benchStore(b)
				ids := benchIDs(b, db, st, "many", b.N*size, dup)
				tx := newTx(b, db, nil)
				per := max(1, 1000/size) // batches per transaction
				b.ReportAllocs()
				b.ResetTimer()
				for i := range b.N {
					batch := ids[i*size : (i+1)*size]
					first, err := st.ClaimMany(context.Background(), tx, "bench", batch)
					if err != nil || len(first) != size || first[0] == dup || first[size-1] == dup {
						b.Fatalf("ClaimMany = %v, %v", first, err)
					}
					if (i+1)%per == 0 {
						tx = newTx(b, db, tx)
					}
				}
				b.StopTimer()
				commit(b, tx)
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*size), "ns/id")
			})
		}
	}
}

func kind(dup bool) string {
	if dup {
		return "duplicate"
	}
	return "new"
}

func benchStore(b *testing.B) (*sqlx.DB, *dedupe.Store) {
	b.Helper()
	db := testenv.NewSchema(b).DB
	st, err := dedupe.New(dedupe.Config{})
	if err != nil {
		b.Fatal(err)
	}
	return db, st
}

// benchIDs returns n message-id-like ids, already recorded when dup.
func benchIDs(b *testing.B, db *sqlx.DB, st *dedupe.Store, prefix string, n int, dup bool) []string {
	b.Helper()
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("0190c1b2-7c1e-7d3a-9f1e-%s%07d", prefix, i)
	}
	if dup {
		for i := 0; i < n; i += 10_000 {
			tx := newTx(b, db, nil)
			if _, err := st.ClaimMany(context.Background(), tx, "bench", ids[i:min(n, i+10_000)]); err != nil {
				b.Fatal(err)
			}
			commit(b, tx)
		}
	}
	return ids
}

// newTx commits prev (if any) with the clock stopped and begins the next.
func newTx(b *testing.B, db *sqlx.DB, prev *sqlx.Tx) *sqlx.Tx {
	b.Helper()
	b.StopTimer()
	defer b.StartTimer()
	if prev != nil {
		commit(b, prev)
	}
	tx, err := db.BeginTxx(context.Background(), nil)
	if err != nil {
		b.Fatal(err)
	}
	return tx
}

func commit(b *testing.B, tx *sqlx.Tx) {
	b.Helper()
	if err := tx.Commit(); err != nil {
		b.Fatal(err)
	}
}
