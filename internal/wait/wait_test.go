package wait

import (
	"context"
	"testing"
	"time"
)

func TestBackoffDoublesThenCaps(t *testing.T) {
	for _, c := range []struct {
		attempt  int
		lo, high time.Duration
	}{
		{1, 80 * time.Millisecond, 120 * time.Millisecond},
		{2, 160 * time.Millisecond, 240 * time.Millisecond},
		{3, 320 * time.Millisecond, 480 * time.Millisecond},
		{10, 800 * time.Millisecond, 1200 * time.Millisecond}, // capped at 1 s
		{1000, 800 * time.Millisecond, 1200 * time.Millisecond},
	} {
		for range 50 {
			if d := Backoff(100*time.Millisecond, time.Second, 0.2, c.attempt); d < c.lo || d > c.high {
				t.Fatalf("attempt %d: %s, want within [%s, %s]", c.attempt, d, c.lo, c.high)
			}
		}
	}
}

func TestSleepEndsWithTheContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if Sleep(ctx, time.Hour) {
		t.Fatal("Sleep reported the hour passed on an ended context")
	}
	if !Sleep(context.Background(), time.Millisecond) {
		t.Fatal("Sleep reported an ended context for a live one")
	}
}
