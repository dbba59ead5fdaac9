// Package wait holds the two ways mailroom waits: for a while unless the
// context ends, and for the backoff before a numbered retry.
package wait

import (
	"context"
	"time"

	"github.com/cenkalti/backoff/v4"
)

// Sleep waits d or until ctx ends; it reports whether d passed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// Backoff is the delay before retry number attempt (1-based): first,
// doubled at each attempt, the doubling capped at most, with ±jitter (a
// fraction: 0.2 is ±20%) around it, as backoff.ExponentialBackOff draws it.
func Backoff(first, most time.Duration, jitter float64, attempt int) time.Duration {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval, b.MaxInterval, b.RandomizationFactor, b.Multiplier = first, most, jitter, 2
	b.MaxElapsedTime = 0
	b.Reset()
	d := b.NextBackOff()
	for i := 1; i < attempt && i < 64; i++ { // at 64 the doubling is long capped
		d = b.NextBackOff()
	}
	return d
}
