package main

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/mailroom-go/mailroom/relay"
)

// sampleWindow is how far back the status page's chart reaches.
const sampleWindow = 10 * time.Minute

// sample is one point of the status page's chart.
type sample struct {
	At      time.Time
	Pending int64
	Lag     float64 // seconds
	Rate    float64 // messages published by this relay per second since the previous sample
}

// sampler records throughput and lag in memory, every interval, for the
// last sampleWindow.
type sampler struct {
	admin *relay.Admin
	relay *relay.Relay
	every time.Duration
	keep  int
	log   *slog.Logger

	mu      sync.Mutex
	samples []sample
	lastPub int64
	lastAt  time.Time
}

func newSampler(admin *relay.Admin, r *relay.Relay, every time.Duration, log *slog.Logger) *sampler {
	keep := int(sampleWindow / every)
	keep = max(2, min(keep, 1000))
	return &sampler{admin: admin, relay: r, every: every, keep: keep, log: log}
}

func (s *sampler) run(ctx context.Context) {
	t := time.NewTicker(s.every)
	defer t.Stop()
	s.take(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.take(ctx)
		}
	}
}

func (s *sampler) take(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, max(s.every, time.Second))
	defer cancel()
	st, err := s.admin.Status(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.log.Warn("status page: sampling the outbox failed", "error", err)
		}
		return
	}
	now, pub := time.Now(), s.relay.Stats().Published
	s.mu.Lock()
	defer s.mu.Unlock()
	p := sample{At: now, Pending: st.Pending, Lag: st.OldestPendingAge.Seconds()}
	if !s.lastAt.IsZero() {
		p.Rate = float64(pub-s.lastPub) / now.Sub(s.lastAt).Seconds()
	}
	s.lastPub, s.lastAt = pub, now
	s.samples = append(s.samples, p)
	if len(s.samples) > s.keep {
		s.samples = append(s.samples[:0], s.samples[len(s.samples)-s.keep:]...)
	}
}

// snapshot returns a copy of the samples, oldest first.
func (s *sampler) snapshot() []sample {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]sample(nil), s.samples...)
}
