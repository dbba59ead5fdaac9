package inbox_test

import (
	"context"
	"log/slog"
	"testing"
)

// testLogger sends the consumer's log to t.Log (shown with -v or on failure).
func testLogger(t testing.TB) *slog.Logger { return slog.New(&tlog{t: t}) }

type tlog struct {
	t     testing.TB
	attrs []slog.Attr
}

func (h *tlog) Enabled(context.Context, slog.Level) bool { return true }
func (h *tlog) Handle(_ context.Context, r slog.Record) error {
	args := []any{r.Level, r.Message}
	for _, a := range h.attrs {
		args = append(args, a)
	}
	r.Attrs(func(a slog.Attr) bool { args = append(args, a); return true })
	defer func() { _ = recover() }() // logging after the test ended
	h.t.Log(args...)
	return nil
}
func (h *tlog) WithAttrs(as []slog.Attr) slog.Handler {
	return &tlog{t: h.t, attrs: append(append([]slog.Attr{}, h.attrs...), as...)}
}
func (h *tlog) WithGroup(string) slog.Handler { return h }
