// Command consumer is the chaos suite's consumer process: an inbox consumer
// whose handler records one effect row per message, so the driver can check
// from the database that every event had exactly one effect, in key order.
//
// Environment: DATABASE_URL, AMQP_URL, CHAOS_QUEUE, CHAOS_NAME, and
// CHAOS_PARTITIONS: when set, a member of an inbox.Group consuming that many
// partitions of CHAOS_QUEUE (test/cluster runs it so).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq"

	"github.com/mailroom-go/mailroom/inbox"
)

// event is the payload the chaos driver writes.
type event struct {
	Key    string `json:"key"`
	N      int    `json:"n"`
	Poison bool   `json:"poison"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "consumer:", err)
		os.Exit(1)
	}
}

func run() error {
	name := os.Getenv("CHAOS_NAME")
	db, err := sqlx.Open("postgres", os.Getenv("DATABASE_URL"))
	if err != nil {
		return err
	}
	defer db.Close()
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	cfg := inbox.Config{
		URL:              os.Getenv("AMQP_URL"),
		Queue:            os.Getenv("CHAOS_QUEUE"),
		Consumer:         "chaos",
		ConnectionName:   name,
		Concurrency:      4,
		OrderedByKey:     true,
		MaxAttempts:      3,
		MinBackoff:       50 * time.Millisecond,
		MaxBackoff:       200 * time.Millisecond,
		ReconnectMaxWait: time.Second,
		ShutdownTimeout:  5 * time.Second,
		Logger:           log,
		Handler: func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
			var e event
			if err := json.Unmarshal(m.Payload, &e); err != nil {
				return err
			}
			if e.Poison {
				return errors.New("poisoned on purpose by the chaos driver")
			}
			_, err := tx.ExecContext(ctx, `INSERT INTO chaos_effects (message_id, key, n, consumer) VALUES ($1, $2, $3, $4)`, m.ID, e.Key, e.N, name)
			return err
		},
	}
	var c interface {
		Run(context.Context) error
		Stats() inbox.Stats
	}
	if p := os.Getenv("CHAOS_PARTITIONS"); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil {
			return fmt.Errorf("CHAOS_PARTITIONS %q: %w", p, err)
		}
		c, err = inbox.NewGroup(db, cfg, n)
		if err != nil {
			return err
		}
	} else if c, err = inbox.New(db, cfg); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	// Report counters for the driver's summary (not for its invariants,
	// which it reads from the database and the broker).
	go func() {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		pid := os.Getpid()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				s := c.Stats()
				db.ExecContext(ctx, `INSERT INTO chaos_stats (process, duplicates, requeued, retried, sessions) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (process) DO UPDATE SET duplicates = excluded.duplicates, requeued = excluded.requeued, retried = excluded.retried, sessions = excluded.sessions`,
					fmt.Sprintf("%s/%d", name, pid), s.Duplicates, s.Requeued, s.Retried, s.Sessions)
				if g, ok := c.(*inbox.Group); ok { // test/cluster waits for the partitions to be shared out
					db.ExecContext(ctx, `UPDATE chaos_stats SET owned = $2 WHERE process = $1`, fmt.Sprintf("%s/%d", name, pid), fmt.Sprint(g.Owned()))
				}
			}
		}
	}()
	return c.Run(ctx)
}
