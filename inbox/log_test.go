package inbox_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
)

// testLogger sends the consumer's log to t.Log (shown with -v or on failure).
func testLogger(t testing.TB) *slog.Logger { return slog.New(&tlog{t: t}) }

// logLines is a log a test can wait on: each record's level, message and
// attributes as one line, also sent to t.Log.
type logLines struct {
	mu    sync.Mutex
	lines []string
}

func captureLog(t testing.TB) (*slog.Logger, *logLines) {
	l := &logLines{}
	return slog.New(&tlog{t: t, sink: l}), l
}

// has reports whether a line so far contains s.
func (l *logLines) has(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, line := range l.lines {
		if strings.Contains(line, s) {
			return true
		}
	}
	return false
}

type tlog struct {
	t     testing.TB
	attrs []slog.Attr
	sink  *logLines
}

func (h *tlog) Enabled(context.Context, slog.Level) bool { return true }
func (h *tlog) Handle(_ context.Context, r slog.Record) error {
	args := []any{r.Level, r.Message}
	for _, a := range h.attrs {
		args = append(args, a)
	}
	r.Attrs(func(a slog.Attr) bool { args = append(args, a); return true })
	if h.sink != nil {
		h.sink.mu.Lock()
		h.sink.lines = append(h.sink.lines, fmt.Sprint(args...))
		h.sink.mu.Unlock()
	}
	defer func() { _ = recover() }() // logging after the test ended
	h.t.Log(args...)
	return nil
}
func (h *tlog) WithAttrs(as []slog.Attr) slog.Handler {
	return &tlog{t: h.t, attrs: append(append([]slog.Attr{}, h.attrs...), as...), sink: h.sink}
}
func (h *tlog) WithGroup(string) slog.Handler { return h }
